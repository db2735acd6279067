"""Backends for `gemma.Gemma`: how its matmuls and attention run, chosen by platform.

The model calls one small interface, `gemma.Backend` (`embed`, `dense`, `geglu`, `attention`,
`logits`, `prepare` for a backend's own copy of the weights, and `greedy`, the sampler's greedy
choice over the logits); its default, `gemma.XLA`, is the plain XLA ops that define the model.
Here:

  * `CpuKernels`: the AVX512-BF16 decode kernels of `bond.models.cpu_kernels`, for a bf16 model
    on one CPU device. `prepare` packs the matmul weights once, outside the decode loop, into the
    `PACKED` collection, and the matmuls write bf16 where the model casts to it; a decode
    step's attention rotates the new key and the queries, writes the key and value into the bf16
    KV cache in place and attends over it in one kernel; a bf16 embedding's token lookup copies
    the rows (XLA:CPU converts the whole table to gather from it).
    Constructing one builds the kernels (once, cached on disk), so no model trace ever runs the
    compiler.
  * `select(config, cpu_kernels)`: the backend of the sampler's decode loop. `CpuKernels` where
    the kernels can run, else `gemma.XLA` with one log line saying why.
  * `packed_prefill(backend)`: whether the sampler's prompt pass reads the packed weights too
    (where the kernels run on AMX tiles).

Both compute the same numbers up to f32 summation order and bf16 rounding: the kernels round
where the model rounds (tests/test_cpu_kernels.py checks the log-probs of the same samples under
both backends and under the model's teacher-forced pass).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from bond.models import cpu_kernels as kernels
from bond.models import gemma

Array = jax.Array

# Variable collection of the packed weights (`pack_weights`), passed next to "params".
PACKED = "packed"


@dataclasses.dataclass(frozen=True)
class CpuKernels(gemma.Backend):
  """The decode kernels where a weight has a packed copy or a decode step reads a bf16 cache;
  the XLA ops elsewhere. Build-ahead: construct it outside any trace (`select` does)."""

  def __post_init__(self):
    kernels.build()

  def prepare(self, params: Any) -> dict[str, Any]:
    return {PACKED: pack_weights(params)}

  def embed(self, embedding, tokens):
    if embedding.dtype != jnp.bfloat16:
      return super().embed(embedding, tokens)
    return kernels.take_rows(embedding, tokens)

  def dense(self, module, name, equation, x, w, dtype):
    if not module.has_variable(PACKED, name):
      return super().dense(module, name, equation, x, w, dtype)
    x_spec, w_spec = equation.split("->")[0].split(",")
    contract = len(set(x_spec) & set(w_spec))
    lead = x.shape[:x.ndim - contract]
    out = dtype if jnp.dtype(dtype) == jnp.bfloat16 else jnp.float32   # rounded by the kernel
    y = kernels.matmul(x.reshape(*lead, -1).astype(dtype), module.get_variable(PACKED, name), out)
    return y.reshape(*lead, *w.shape[contract:]).astype(dtype)

  def geglu(self, module, name, x, w, dtype):
    if not module.has_variable(PACKED, "gating_geglu"):
      return super().geglu(module, name, x, w, dtype)
    return kernels.geglu(x, module.get_variable(PACKED, "gating_geglu")).astype(dtype)

  def attention(self, q, key, value, rope, query_scale, kv_ctx, mask, softcap, dtype):
    b, t, h, hd = q.shape
    cache = kv_ctx.layer_cache
    if t != 1 or cache is None or cache["k"].dtype != jnp.uint16:   # not a bf16 decode step
      return super().attention(q, key, value, rope, query_scale, kv_ctx, mask, softcap, dtype)
    k = key.shape[2]
    (cos, sin) = (x[:, 0] for x in rope)
    out, k_bits, v_bits = kernels.decode_attention_update(
        q.reshape(b, k, h // k, hd), key[:, 0], value[:, 0], cos, sin, query_scale, cache["k"],
        cache["v"], kv_ctx.index, mask[:, 0], softcap or 0.0)
    return out.astype(dtype).reshape(b, t, h, hd), {"k": k_bits, "v": v_bits}

  def logits(self, module, x, embedding, dtype):
    if not module.has_variable(PACKED, "input_embedding"):
      return super().logits(module, x, embedding, dtype)
    return kernels.matmul(x, module.get_variable(PACKED, "input_embedding"))

  def greedy(self, logits):
    return kernels.greedy(logits)


def packed_prefill(backend: gemma.Backend) -> bool:
  """Whether the sampler's prompt pass (B·(P-1) rows per weight) reads `backend`'s packed weights:
  `CpuKernels` where they run on AMX tiles, whose fused GeGLU and bf16 outputs beat XLA's dots
  and elementwise passes there (gemma3_35m, 64 prompts x (16 + 64) tokens: a greedy call 727-742
  against 768-811 ms, temperature 1 766-803 against 855-867; 8 and 32 rows within noise). On
  AVX512-BF16 alone the kernels are compute-bound at such row counts: XLA's dots run it."""
  return isinstance(backend, CpuKernels) and kernels.amx()


# Matmul weights of a layer, as (module, param, number of leading contracted dims).
_LAYER_MATMULS = (("attn", "q_einsum", 1), ("attn", "kv_einsum", 1), ("attn", "attn_vec_einsum", 2),
                  ("mlp", "gating_einsum", 1), ("mlp", "linear", 1))


def pack_weights(params: Any) -> dict[str, Any]:
  """Packed copies of the matmul weights for `CpuKernels` (the `PACKED` collection).

  Pass them next to the params, `apply({"params": p, PACKED: pack_weights(p)}, ...)` with
  `backend=CpuKernels()`, and those matmuls run through the kernel. Weights whose shapes it
  cannot take are left out (they keep their einsum). The tied embedding is packed transposed,
  [D, V], for the logits; the MLP's gate/up weight is packed as "gating_geglu" for the fused
  GeGLU kernel. Pack once, outside any decode loop: it is a full pass over the weights.
  """
  def packable(w, contract):
    return kernels.supports(int(np.prod(w.shape[:contract])), int(np.prod(w.shape[contract:])))

  packed: dict[str, Any] = {}
  for layer, layer_params in params.items():
    if not layer.startswith("layer_"):
      continue
    for module, name, contract in _LAYER_MATMULS:
      w = layer_params[module][name]
      if name == "gating_einsum" and packable(w, contract):   # [D, 2F]: 2F % 32 <=> F % 16
        packed.setdefault(layer, {}).setdefault(module, {})["gating_geglu"] = (
            kernels.pack_geglu(w))
      elif packable(w, contract):
        packed.setdefault(layer, {}).setdefault(module, {})[name] = kernels.pack(w, contract)
  vocab, dim = params["input_embedding"].shape
  if kernels.supports(dim, vocab):
    packed["input_embedding"] = kernels.pack_transposed(params["input_embedding"])
  return packed


@functools.cache
def _log_once(why: str) -> None:
  """One line per reason and process; a warning if the kernels should have run but failed."""
  log = logging.warning if why.startswith(kernels.BUILD_FAILED) else logging.info
  log("bond.models.backends: decoding with XLA ops, not the CPU kernels: %s", why)


def select(config: gemma.GemmaConfig, cpu_kernels: bool | None = None) -> gemma.Backend:
  """The decode loop's backend: `CpuKernels` if `cpu_kernels` is not False and the kernels can
  run here (a bf16 model on one CPU device with avx512_bf16; built here, before any model is
  traced), else `gemma.XLA`, logging why once. `cpu_kernels=True` raises where they cannot."""
  if cpu_kernels is False:
    return gemma.XLA
  if jnp.dtype(config.dtype) != jnp.bfloat16:
    why = f"the model computes in {jnp.dtype(config.dtype).name}, the kernels are bf16-only"
  else:
    why = kernels.unavailable_reason()
  if why is None:
    return CpuKernels()
  if cpu_kernels:
    raise ValueError("cpu_kernels=True needs config.dtype=bfloat16 on a single CPU device with "
                     f"avx512_bf16 and a C++ compiler (see bond.models.cpu_kernels); here {why}")
  _log_once(why)
  return gemma.XLA
