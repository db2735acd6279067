"""CPU kernels for the decode loop on x86 CPUs with AVX512-BF16, called through the XLA FFI.

Decode multiplies a few rows (the batch) by every weight matrix, so a step is bound by how fast
the weights stream from memory. XLA:CPU's dots reach about half the machine's bandwidth there
(benchmarks/RESULTS.md). `cpu_kernels.cc` has these kernels:
  * `matmul`: reads weights pre-packed by `pack` as one sequential stream, split over XLA's
    intra-op threads, and reaches the bandwidth. On Intel CPUs with AMX-BF16 (where Linux grants
    the tile registers) the same packed weights go through the AMX tile unit (`amx()`), which at
    8-64 rows runs 2-4x AVX512-BF16's GFLOP/s; `BOND_AMX=0` keeps AVX512-BF16;
  * `geglu`: the same matmul for the MLP's fused gate/up weight (packed by `pack_geglu`), with
    gelu(gate) * up computed on the accumulators: one op instead of a matmul and an XLA
    elementwise pass that XLA:CPU runs in f32;
  * `pack`: the packing permutation, which XLA:CPU's transpose runs at ~2 GB/s; from f32
    weights it also rounds them to bf16 in the same pass, and `pack_transposed` packs the
    tied embedding [V, D] as the logits' [D, V] weight without materialising its transpose;
  * `decode_attention`: one query token per row over the bf16 KV cache read in place as its
    uint16 bits, the query heads that share a key head together (each key and value read once)
    and the cache prefetched ahead (a step's weights evict it). XLA:CPU materialises a bf16 copy
    of the cache for its attention dots and runs them as many tiny batched products;
    `decode_attention_update` also applies RoPE to the new key and the queries and writes the
    key and value into the cache in place (XLA:CPU ran those as a dozen small bf16 ops a layer);
  * `take_rows`: the token lookup of a bf16 table, without XLA's converted copy of all of it;
  * `greedy`: greedy decoding's argmax and its log-prob in one pass (XLA runs four).

Used only where it is correct and useful: on a single-device CPU backend whose CPU has
avx512_bf16, for a bf16 model, in the sampler's decode loop, through the `CpuKernels` backend
of `bond.models.backends` (the model itself knows nothing of them). `build()` compiles them with
the system C++ compiler once, ahead of any trace (the backend's selection calls it), and caches
the library on disk (`$BOND_KERNEL_CACHE`, default ~/.cache/bond, keyed by the source, flags and
jaxlib); the ops below also build on first direct use. `BOND_CPU_KERNELS=0` turns them off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile
import threading

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

TARGET = "bond_bf16_matmul"
BF16_TARGET = "bond_bf16_matmul_bf16"
PACK_TARGET = "bond_bf16_pack"
PACK_F32_TARGET = "bond_f32_pack"
ATTENTION_TARGET = "bond_decode_attention"
ATTENTION_UPDATE_TARGET = "bond_decode_attention_update"
GEGLU_TARGET = "bond_bf16_geglu"
TAKE_ROWS_TARGET = "bond_take_rows"
GREEDY_TARGET = "bond_greedy"
COLS = 32            # output columns per packed block (cpu_kernels.cc: kCols)
BUILD_FAILED = "the kernels did not build"
_SOURCE = pathlib.Path(__file__).with_name("cpu_kernels.cc")
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-mavx512f", "-mavx512bw", "-mavx512vl",
          "-mavx512bf16")


@functools.cache
def cpu_has_avx512_bf16() -> bool:
  try:
    with open("/proc/cpuinfo") as f:
      return any(line.startswith("flags") and "avx512_bf16" in line.split() for line in f)
  except OSError:
    return False


def _cache_dir() -> pathlib.Path:
  default = pathlib.Path.home() / ".cache" / "bond"
  return pathlib.Path(os.environ.get("BOND_KERNEL_CACHE", default))


def _compile() -> pathlib.Path:
  """The kernel's shared library, built once per (source, flags, jaxlib) and cached on disk."""
  include = jax.ffi.include_dir()
  key = hashlib.sha256(_SOURCE.read_bytes() + " ".join(_FLAGS).encode()
                       + jax.lib.__version__.encode() + include.encode()).hexdigest()[:16]
  lib = _cache_dir() / f"cpu_kernels_{key}.so"
  if lib.exists():
    return lib
  cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
  if cxx is None:
    raise RuntimeError("no C++ compiler found (set CXX)")
  lib.parent.mkdir(parents=True, exist_ok=True)
  # Build under a temporary name and rename: concurrent processes (pytest -n) may race here.
  with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
    out = pathlib.Path(tmp) / lib.name
    cmd = [cxx, *_FLAGS, f"-I{include}", str(_SOURCE), "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
      raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    os.replace(out, lib)
  return lib


_BUILD_LOCK = threading.Lock()   # a stored program's loader (bond/aot.py) may build on a thread


def _build() -> str | None:
  """Compiles, loads and registers the FFI targets, once per process; None, or why it failed."""
  with _BUILD_LOCK:
    return _build_once()


@functools.cache
def _build_once() -> str | None:
  try:
    lib = ctypes.cdll.LoadLibrary(str(_compile()))
    for target, symbol in ((TARGET, lib.BondBf16Matmul), (BF16_TARGET, lib.BondBf16MatmulBf16),
                           (PACK_TARGET, lib.BondBf16Pack),
                           (PACK_F32_TARGET, lib.BondF32Pack),
                           (ATTENTION_TARGET, lib.BondDecodeAttention),
                           (ATTENTION_UPDATE_TARGET, lib.BondDecodeAttentionUpdate),
                           (GEGLU_TARGET, lib.BondBf16Geglu),
                           (TAKE_ROWS_TARGET, lib.BondTakeRows),
                           (GREEDY_TARGET, lib.BondGreedy)):
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(symbol), platform="cpu")
    _LIB.append(lib)
  except Exception as e:  # noqa: BLE001 -- any failure means: the kernels cannot run here
    return f"{BUILD_FAILED}: {e}"
  return None


_LIB = []   # the loaded library, once built


def amx() -> bool:
  """Whether the matmul kernels run on the AMX tile unit (Intel CPUs with AMX-BF16, where the OS
  grants the tiles; `BOND_AMX=0` switches it off) instead of AVX512-BF16. Same products, f32
  sums; the tile unit streams the weights at row counts where AVX512 is compute-bound."""
  return available() and bool(_LIB[0].BondAmx())


def set_amx(on: bool) -> bool:
  """Runs the matmul kernels on AMX tiles (True, where the CPU allows) or AVX512-BF16 (False)
  from the next call on, in this process; returns `amx()`. For tests and benchmarks."""
  if not available():
    return False
  _LIB[0].BondSetAmx(int(bool(on)))
  return amx()


def build() -> None:
  """Builds the kernels (cached on disk and per process); RuntimeError saying why if it fails.

  Call it outside any trace, before the first model that uses the kernels (the backend's
  selection does); concurrent processes may build at once (the library is renamed into place).
  """
  if not cpu_has_avx512_bf16():
    raise RuntimeError("bond.models.cpu_kernels: this CPU has no avx512_bf16")
  error = _build()
  if error:
    raise RuntimeError(f"bond.models.cpu_kernels: {error}")


def unavailable_reason() -> str | None:
  """Why the kernels cannot run here (None if they can): switched off, not a single CPU device,
  no avx512_bf16, or the build failed. Builds them if everything else allows."""
  if os.environ.get("BOND_CPU_KERNELS", "1") == "0":
    return "BOND_CPU_KERNELS=0"
  if jax.default_backend() != "cpu":
    return f"the backend is {jax.default_backend()}, the kernels are CPU-only"
  if jax.device_count() != 1:
    return f"{jax.device_count()} devices, the kernels run on a single CPU device"
  if not cpu_has_avx512_bf16():
    return "this CPU has no avx512_bf16"
  return _build()


def available() -> bool:
  """True if the kernels can run here: one CPU device, avx512_bf16, and they built."""
  return unavailable_reason() is None


def supports(k: int, n: int) -> bool:
  """Whether a [K, N] weight can be packed: K even, N a multiple of 32."""
  return k >= 2 and k % 2 == 0 and n >= COLS and n % COLS == 0


def pack(w: Array, contract: int = 1) -> Array:
  """Weight [*in, *out] (the first `contract` dims are contracted) -> packed bf16 [N/32, K/2, 32, 2].

  Block b holds output columns [32 b, 32 b + 32); within it, rows k and k+1 of those columns
  are interleaved, the operand layout of `vdpbf16ps`.
  """
  k = int(np.prod(w.shape[:contract]))
  n = int(np.prod(w.shape[contract:]))
  if not supports(k, n):
    raise ValueError(f"cannot pack a [{k}, {n}] weight: need K even and N a multiple of {COLS}")
  w = w.reshape(k, n)
  out = jax.ShapeDtypeStruct((n // COLS, k // 2, COLS, 2), jnp.bfloat16)
  if available():   # the same permutation as below, about 5x faster than XLA:CPU's transpose
    if w.dtype == jnp.float32:   # and the cast to bf16 in the same pass
      return jax.ffi.ffi_call(PACK_F32_TARGET, out)(w, transposed=False)
    return jax.ffi.ffi_call(PACK_TARGET, out)(w.astype(jnp.bfloat16), transposed=False)
  w = w.astype(jnp.bfloat16)
  return w.reshape(k // 2, 2, n // COLS, COLS).transpose(2, 0, 3, 1)


def pack_transposed(w: Array) -> Array:
  """`pack(w.T)` for w [N, K]: the tied embedding [V, D] as the logits' [D, V] weight.

  From f32 (the training params) the kernel rounds to bf16 and packs in one pass over w, without
  the transposed or bf16 copies that `pack(w.T)` makes (for Gemma 3's 262,144 x 640 embedding,
  the largest weight, those took most of the sampler's weight preparation); from bf16 (a frozen
  LoRA base, bf16 inference) it packs in one pass too, without XLA's transposed copy.
  """
  n, k = w.shape
  if not supports(k, n):
    raise ValueError(f"cannot pack a [{n}, {k}] weight transposed: need K even and N a multiple "
                     f"of {COLS}")
  if available() and w.dtype in (jnp.float32, jnp.bfloat16):
    target = PACK_F32_TARGET if w.dtype == jnp.float32 else PACK_TARGET
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(
        (n // COLS, k // 2, COLS, 2), jnp.bfloat16))(w, transposed=True)
  return pack(w.T)


def _call_packed(target: str, x: Array, packed: Array, cols_per_block: int, dtype) -> Array:
  """x [..., K] times a packed weight through `target` -> [..., blocks * cols_per_block]."""
  blocks, half_k = packed.shape[:2]
  k, n = 2 * half_k, blocks * cols_per_block
  if x.shape[-1] != k:
    raise ValueError(f"x has {x.shape[-1]} features, the packed weight expects {k}")
  build()
  lead = x.shape[:-1]
  rows = int(np.prod(lead))
  call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((rows, n), dtype))
  return call(x.reshape(rows, k).astype(jnp.bfloat16), packed).reshape(*lead, n)


def matmul(x: Array, packed: Array, dtype=jnp.float32) -> Array:
  """x [..., K] @ W -> [..., N], W given packed by `pack`; x is cast to bf16. dtype: f32, or
  bf16 (the f32 result rounded as XLA's convert rounds it, written by the kernel)."""
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    raise ValueError(f"matmul writes float32 or bfloat16, not {jnp.dtype(dtype).name}")
  target = BF16_TARGET if jnp.dtype(dtype) == jnp.bfloat16 else TARGET
  return _call_packed(target, x, packed, COLS, jnp.dtype(dtype))


def pack_geglu(w: Array) -> Array:
  """Gate/up weight [K, 2, F] -> packed [F/16, K/2, 32, 2] for `geglu`.

  Block b holds gate columns [16 b, 16 b + 16) and then the same up columns, so one block
  yields 16 columns of gelu(gate) * up.
  """
  k, two, f = w.shape
  if two != 2 or f % 16 or not supports(k, 2 * f):
    raise ValueError(f"cannot pack a [{k}, {two}, {f}] gate/up weight: need [K, 2, F], K even, "
                     "F a multiple of 16")
  return pack(w.reshape(k, 2, f // 16, 16).transpose(0, 2, 1, 3).reshape(k, 2 * f))


def geglu(x: Array, packed: Array) -> Array:
  """bf16 [..., F] = gelu_tanh(x @ W_gate) * (x @ W_up), as `gemma.MLP` rounds it, W from
  `pack_geglu`: gate and up are rounded to bf16 first, the product once at the end."""
  return _call_packed(GEGLU_TARGET, x, packed, COLS // 2, jnp.bfloat16)


def take_rows(table: Array, ids: Array) -> Array:
  """`jnp.take(table, ids, axis=0)` for a bf16 table [V, D] and in-range ids -> [*ids, D].

  Copies the rows; XLA:CPU's own lookup of a bf16 table first converts all of it (for Gemma 3's
  [262144, 640] embedding, a 335 MB copy in every sampler call). Out-of-range ids are clipped.
  """
  if table.ndim != 2 or table.dtype != jnp.bfloat16:
    raise ValueError(f"take_rows wants a bf16 table [V, D], got {table.dtype}{list(table.shape)}")
  build()
  out = jax.ffi.ffi_call(TAKE_ROWS_TARGET, jax.ShapeDtypeStruct((ids.size, table.shape[1]),
                                                                jnp.bfloat16))
  return out(table, ids.reshape(-1).astype(jnp.int32)).reshape(*ids.shape, table.shape[1])


def greedy(logits: Array) -> tuple[Array, Array]:
  """Greedy decoding's choice over f32 logits [R, V]: (the first argmax [R] int32, the log
  softmax at it [R] f32), as `argmax` then `log_softmax(logits)[argmax]`, in one kernel.

  XLA:CPU runs the same as four passes over [R, V] (a max, a select, a min and an exp-sum),
  0.6 ms a decode step at 64 rows x 16,384 (benchmarks/RESULTS.md, session 17).
  """
  if logits.ndim != 2 or logits.dtype != jnp.float32:
    raise ValueError(f"greedy wants f32 logits [R, V], got {logits.dtype}{list(logits.shape)}")
  build()
  r = logits.shape[0]
  call = jax.ffi.ffi_call(GREEDY_TARGET, (jax.ShapeDtypeStruct((r,), jnp.int32),
                                          jax.ShapeDtypeStruct((r,), jnp.float32)))
  return tuple(call(logits))


def decode_attention(q: Array, k_bits: Array, v_bits: Array, mask: Array,
                     softcap: float = 0.0) -> Array:
  """One query token per row against a bf16 KV cache held as uint16 bits -> f32 [R, K, G, Hd].

  q [R, K, G, Hd] (cast to bf16, already scaled), k_bits [R, S, K, Hd], v_bits [R, K, Hd, S]
  (the layouts of `gemma.init_cache`), mask [R, S] (True: attend). Computes what
  `gemma.Attention` does with XLA ops: f32 logits, optional `softcap * tanh(logits / softcap)`,
  masked softmax in f32, probabilities rounded to bf16, f32 sum over the values.
  """
  r, kh, g, hd = q.shape
  s = k_bits.shape[1]
  if k_bits.shape != (r, s, kh, hd) or v_bits.shape != (r, kh, hd, s) or mask.shape != (r, s):
    raise ValueError(f"decode_attention: q {q.shape}, k {k_bits.shape}, v {v_bits.shape}, "
                     f"mask {mask.shape} do not fit q [R, K, G, Hd], k [R, S, K, Hd], "
                     "v [R, K, Hd, S], mask [R, S]")
  if k_bits.dtype != jnp.uint16 or v_bits.dtype != jnp.uint16:
    raise ValueError("decode_attention: the cache must hold bf16 as uint16 bits")
  build()
  call = jax.ffi.ffi_call(ATTENTION_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))
  return call(q.astype(jnp.bfloat16), k_bits, v_bits, mask.astype(jnp.bool_),
              softcap=np.float32(softcap))


def decode_attention_update(q: Array, key: Array, value: Array, cos: Array, sin: Array,
                            query_scale: float, k_bits: Array, v_bits: Array, index: Array,
                            mask: Array, softcap: float = 0.0) -> tuple[Array, Array, Array]:
  """One decode step of `gemma.Backend.attention` on a bf16 KV cache held as uint16 bits.

  q [R, K, G, Hd] and key, value [R, K, Hd] as projected (bf16; q and key before RoPE), cos and
  sin [R, Hd/2] (`gemma.rope_table`, bf16), query_scale the model's (rounded to bf16 as the
  model does), k_bits [R, S, K, Hd] and v_bits [R, K, Hd, S] the cache (`gemma.init_cache`),
  index the slot to write (clamped into [0, S) as XLA's dynamic-update-slice does), mask
  [R, S] over the cache after the write. Rotates the key and the queries and scales the queries
  in bf16 as `gemma.rotate` rounds on XLA:CPU (every product and sum), writes the key and value
  at `index` and attends as `decode_attention`. Returns (bf16 [R, K, G, Hd], k_bits, v_bits),
  the caches updated in place where the caller donates them (inside the decode loop).
  """
  r, kh, g, hd = q.shape
  s = k_bits.shape[1]
  if (key.shape != (r, kh, hd) or value.shape != (r, kh, hd) or cos.shape != (r, hd // 2)
      or sin.shape != cos.shape or hd % 2 or k_bits.shape != (r, s, kh, hd)
      or v_bits.shape != (r, kh, hd, s) or mask.shape != (r, s) or jnp.shape(index) != ()):
    raise ValueError(f"decode_attention_update: q {q.shape}, key {key.shape}, value "
                     f"{value.shape}, cos {cos.shape}, sin {sin.shape}, k {k_bits.shape}, v "
                     f"{v_bits.shape}, index {jnp.shape(index)}, mask {mask.shape} do not fit "
                     "q [R, K, G, Hd], key and value [R, K, Hd], cos and sin [R, Hd/2] (Hd even), "
                     "k [R, S, K, Hd], v [R, K, Hd, S], index [], mask [R, S]")
  if k_bits.dtype != jnp.uint16 or v_bits.dtype != jnp.uint16:
    raise ValueError("decode_attention_update: the cache must hold bf16 as uint16 bits")
  build()
  bf16 = lambda a: a.astype(jnp.bfloat16)   # noqa: E731
  call = jax.ffi.ffi_call(ATTENTION_UPDATE_TARGET,
                          (jax.ShapeDtypeStruct(q.shape, jnp.bfloat16),
                           jax.ShapeDtypeStruct(k_bits.shape, jnp.uint16),
                           jax.ShapeDtypeStruct(v_bits.shape, jnp.uint16)),
                          input_output_aliases={6: 1, 7: 2})
  scale = float(np.float32(query_scale).astype(jnp.bfloat16))   # as the model rounds it
  return tuple(call(bf16(q), bf16(key), bf16(value), bf16(cos), bf16(sin),
                    jnp.asarray(index, jnp.int32), k_bits, v_bits, mask.astype(jnp.bool_),
                    softcap=np.float32(softcap), query_scale=np.float32(scale)))
