"""bond/models/gguf_file.py against the `gguf` package's own writer and reader."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize, quantize

from bond.models import gguf_file


def _assert_same_as_gguf(path):
  ours, ref = gguf_file.read(str(path)), GGUFReader(str(path))
  assert list(ours.fields) == [k for k in ref.fields if not k.startswith("GGUF.")]
  for key, value in ours.fields.items():
    expected = ref.fields[key].contents()
    if isinstance(value, np.ndarray):
      assert value.tolist() == expected, key
    else:
      assert value == expected and type(value) is type(expected), (key, value, expected)
  assert len(ours.tensors) == len(ref.tensors)
  for a, b in zip(ours.tensors, ref.tensors):
    assert (a.name, a.tensor_type, a.shape) == (b.name, b.tensor_type, tuple(b.shape.tolist()))
    assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
    np.testing.assert_array_equal(a.data, b.data)
    assert not a.data.flags.writeable
  return ours


def _write(path, fields, tensors, alignment=None):
  w = GGUFWriter(str(path), "gemma3")
  if alignment:
    w.add_custom_alignment(alignment)
  for key, (value, kind) in fields.items():
    w.add_key_value(key, value, kind)
  for name, (array, qtype) in tensors.items():
    w.add_tensor(name, array, raw_dtype=qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.mark.parametrize("alignment", [None, 64])
def test_every_value_type_and_tensor_layout_reads_like_gguf(tmp_path, alignment):
  rng = np.random.default_rng(0)
  fields = {
      "u8": (7, GGUFValueType.UINT8), "i8": (-7, GGUFValueType.INT8),
      "u16": (60000, GGUFValueType.UINT16), "i16": (-300, GGUFValueType.INT16),
      "u32": (4_000_000_000, GGUFValueType.UINT32), "i32": (-5, GGUFValueType.INT32),
      "f32": (0.1, GGUFValueType.FLOAT32), "f64": (0.1, GGUFValueType.FLOAT64),
      "u64": (2**60, GGUFValueType.UINT64), "i64": (-2**60, GGUFValueType.INT64),
      "yes": (True, GGUFValueType.BOOL), "no": (False, GGUFValueType.BOOL),
      "text": ("ünïcödé ▁▁ spaces  ", GGUFValueType.STRING),
      "tokens": (["<pad>", "", "  ", "日本", "a" * 300], GGUFValueType.ARRAY),
      "scores": ([0.5, -1.25, 3.0], GGUFValueType.ARRAY),
      "types": ([1, 2, 3, 6], GGUFValueType.ARRAY),
  }
  tensors = {
      "f32": (rng.normal(size=(3, 5)).astype(np.float32), None),
      "f16": (rng.normal(size=(4, 2, 3)).astype(np.float16), None),
      "i32": (np.arange(7, dtype=np.int32), None),
      "q8": (quantize(rng.normal(size=(4, 64)).astype(np.float32), GGMLQuantizationType.Q8_0),
             GGMLQuantizationType.Q8_0),
  }
  _write(tmp_path / "m.gguf", fields, tensors, alignment)
  ours = _assert_same_as_gguf(tmp_path / "m.gguf")
  assert ours.fields["tokens"][3] == "日本" and ours.fields["f32"] == np.float32(0.1)
  q8 = {t.name: t for t in ours.tensors}["q8"]
  np.testing.assert_array_equal(dequantize(q8.data, q8.tensor_type),
                                dequantize(tensors["q8"][0], GGMLQuantizationType.Q8_0))
  assert q8.shape == (64, 4)    # GGUF order, as gguf's reader reports it


def test_bad_files_raise_one_line_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no GGUF file"):
    gguf_file.read(str(tmp_path / "missing.gguf"))
  (tmp_path / "text.gguf").write_bytes(b"this is not a GGUF file at all")
  with pytest.raises(ValueError, match="not a GGUF file"):
    gguf_file.read(str(tmp_path / "text.gguf"))
  _write(tmp_path / "m.gguf", {"tokens": (["a", "b"], GGUFValueType.ARRAY)},
         {"w": (np.ones((64, 64), np.float32), None)})
  whole = (tmp_path / "m.gguf").read_bytes()
  (tmp_path / "cut.gguf").write_bytes(whole[:len(whole) - 100])
  with pytest.raises(ValueError, match="runs past the end"):
    gguf_file.read(str(tmp_path / "cut.gguf"))
  (tmp_path / "header.gguf").write_bytes(whole[:40])
  with pytest.raises(ValueError, match="truncated"):
    gguf_file.read(str(tmp_path / "header.gguf"))
  (tmp_path / "swapped.gguf").write_bytes(whole[:4] + whole[4:8][::-1] + whole[8:])
  with pytest.raises(ValueError, match="byte-swapped: True"):
    gguf_file.read(str(tmp_path / "swapped.gguf"))


@pytest.mark.slow
def test_real_gemma3_270m_reads_like_gguf():
  from bond import assets
  ours = _assert_same_as_gguf(assets.gemma3_270m_gguf_path())
  assert len(ours.fields["tokenizer.ggml.tokens"]) == 262_144 and len(ours.tensors) == 236
