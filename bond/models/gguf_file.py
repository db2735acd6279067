"""A GGUF file's metadata and tensors, read in well under a second.

`gguf.GGUFReader` builds a NumPy view per array element of every metadata field: on Gemma
3's vocabulary (262,144 token strings, scores and types) that took 8-10 s per read, twice per
model load (weights and tokenizer). This reader parses the same little-endian GGUF v2/v3 layout
with `struct` over one memory map; tensor data are the same zero-copy views gguf builds
(quantized types as uint8 rows of blocks), so `gguf.quants.dequantize` takes them as it takes
gguf's. tests/test_gguf_file.py checks every field and tensor against `gguf.GGUFReader`;
benchmarks/gguf_load.py times both.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from typing import Any

import numpy as np

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
# GGUF value types (gguf.GGUFValueType): scalar struct codes; 8 = string, 9 = array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
_STRING, _ARRAY = 8, 9
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
          6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}


@dataclasses.dataclass(frozen=True)
class Tensor:
  name: str
  tensor_type: Any       # gguf.GGMLQuantizationType
  shape: tuple[int, ...]  # GGUF order (fastest-varying first), as gguf's `ReaderTensor.shape`
  data: np.ndarray        # read-only view of the file, gguf's layout


@dataclasses.dataclass(frozen=True)
class File:
  fields: dict[str, Any]  # str, int, float, bool, list[str] or a NumPy array for numeric arrays
  tensors: list[Tensor]


class _Cursor:

  def __init__(self, buf, path: str):
    self.buf, self.pos, self.path = buf, 0, path

  def take(self, fmt: str):
    size = struct.calcsize(fmt)
    if self.pos + size > len(self.buf):
      raise ValueError(f"{self.path}: truncated GGUF header at byte {self.pos}")
    values = struct.unpack_from(fmt, self.buf, self.pos)
    self.pos += size
    return values

  def string(self) -> str:
    (n,) = self.take("<Q")
    if self.pos + n > len(self.buf):
      raise ValueError(f"{self.path}: truncated GGUF string at byte {self.pos}")
    s = str(self.buf[self.pos:self.pos + n], "utf-8")
    self.pos += n
    return s

  def value(self, kind: int) -> Any:
    if kind == _STRING:
      return self.string()
    if kind in _SCALARS:
      return self.take("<" + _SCALARS[kind])[0]
    if kind == _ARRAY:
      item, n = self.take("<IQ")
      if item == _STRING:
        return [self.string() for _ in range(n)]
      if item in _NUMPY:
        dtype = np.dtype(_NUMPY[item]).newbyteorder("<")
        out = np.frombuffer(self.buf, dtype, n, self.pos).astype(dtype.newbyteorder("="))
        self.pos += n * dtype.itemsize
        return out
      return [self.value(item) for _ in range(n)]      # arrays of arrays
    raise ValueError(f"{self.path}: unknown GGUF value type {kind} at byte {self.pos}")


def read(path: str) -> File:
  """Metadata and tensor views of the GGUF file at `path` (little-endian, version 2 or 3)."""
  from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
  from gguf.quants import quant_shape_to_byte_shape

  if not os.path.isfile(path):
    raise FileNotFoundError(f"no GGUF file at {path!r}")
  if os.path.getsize(path) < 24:
    raise ValueError(f"{path}: not a GGUF file ({os.path.getsize(path)} bytes)")
  data = np.memmap(path, mode="r")
  cur = _Cursor(memoryview(data), path)
  if bytes(cur.buf[:4]) != _MAGIC:
    raise ValueError(f"{path}: not a GGUF file (magic {bytes(cur.buf[:4])!r})")
  cur.pos = 4
  (version,) = cur.take("<I")
  if version not in (2, 3):
    raise ValueError(f"{path}: GGUF version {version} (byte-swapped: {version & 0xFFFF == 0}) "
                     "is not supported; expected a little-endian version 2 or 3 file")
  n_tensors, n_fields = cur.take("<QQ")
  fields: dict[str, Any] = {}
  for _ in range(n_fields):
    key = cur.string()
    (kind,) = cur.take("<I")
    if key in fields:
      raise ValueError(f"{path}: duplicate GGUF key {key!r}")
    fields[key] = cur.value(kind)
  infos = []
  for _ in range(n_tensors):
    name = cur.string()
    (n_dims,) = cur.take("<I")
    dims = cur.take(f"<{n_dims}Q")
    kind, offset = cur.take("<IQ")
    infos.append((name, dims, kind, offset))
  align = int(fields.get("general.alignment", _DEFAULT_ALIGNMENT))
  if align <= 0 or align & (align - 1):
    raise ValueError(f"{path}: GGUF alignment {align} is not a power of two")
  start = -(-cur.pos // align) * align

  plain = {GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F32: np.float32,
           GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
           GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
           GGMLQuantizationType.I64: np.int64}
  tensors, seen = [], set()
  for name, dims, kind, offset in infos:
    if name in seen:
      raise ValueError(f"{path}: duplicate GGUF tensor {name!r}")
    seen.add(name)
    qtype = GGMLQuantizationType(kind)
    shape = tuple(reversed(dims))
    block, type_size = GGML_QUANT_SIZES[qtype]
    n_elems = int(np.prod(dims, dtype=np.int64))
    if qtype in plain:
      dtype, count = np.dtype(plain[qtype]), n_elems
    else:
      dtype, count = np.dtype(np.uint8), n_elems * type_size // block
      shape = quant_shape_to_byte_shape(shape, qtype)
    lo = start + offset
    if lo + count * dtype.itemsize > data.size:
      raise ValueError(f"{path}: tensor {name!r} runs past the end of the file (truncated?)")
    view = data[lo:lo + count * dtype.itemsize].view(dtype).reshape(shape)
    tensors.append(Tensor(name, qtype, tuple(int(d) for d in dims), view))
  return File(fields, tensors)
