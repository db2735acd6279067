"""LoRA and QLoRA: one frozen base shared by the policy, the anchor and the reference.

With `config.model.lora.rank > 0` a `steps.TrainState` holds

  params         the policy's adapters {layer_i: {proj: {a [in, r], b [r, out]}}} (f32, in Adam)
  anchor_params  the anchor's adapters (an EMA, or a hard swap, of the policy's *factors*)
  ref_params     the frozen base: the model's params, optionally int8 (`QTensor` leaves)

and the three models are views of it (`state.policy()`, `state.anchor()`, `state.reference()`):
`merge(spec, base, adapters)` = base with W ← W + (alpha / rank)·A·B on the targeted projections;
the reference is the base with no adapters. The base is stored once, never in the optimizer and
never copied; gradients reach the adapters only. The model file knows nothing of this: merged
params are ordinary Gemma params, so the sampler, the CPU kernels, sharding and the HF export
run unchanged on them.

Projections (HF names): q, k, v, o (attention), gate, up, down (MLP); aliases 'attn', 'mlp',
'all'. A target that is not a name is a regular expression matched in full against
'layer_{i}/{name}' (e.g. 'layer_(0|1)/q'). B starts at zero, so the first forward is the base's
exactly; A ~ N(0, 1/in).

The anchor is an EMA of the factors A and B, not of the product: EMA(A)·EMA(B) ≠ EMA(A·B). The
difference is second order in the step (η ≪ 1 and slowly moving factors), costs nothing in memory
(an EMA of the product would hold a full matrix per target); `tests/test_lora.py` shows J-BOND on
the exact toy harness still beats Best-of-4 with it (docs/toy_results.md).

Own adapters rather than `qwix`: qwix intercepts the einsums inside a module and keeps its LoRA
weights in the module's own params, so one base shared by three models (policy, EMA anchor,
adapters-off reference) would need tree surgery per view, and its per-einsum adapters would fuse
k with v and gate with up (stored stacked here); merging pure param trees keeps every model view a
plain function of (base, adapters).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Params = Any

# name -> (module, weight, index along axis 1 of a stacked weight or None, number of input axes)
PROJECTIONS = {
    "q": ("attn", "q_einsum", None, 1),          # [D, H, Hd]
    "k": ("attn", "kv_einsum", 0, 1),            # [D, 2, K, Hd][:, 0]
    "v": ("attn", "kv_einsum", 1, 1),            # [D, 2, K, Hd][:, 1]
    "o": ("attn", "attn_vec_einsum", None, 2),   # [H, Hd, D]
    "gate": ("mlp", "gating_einsum", 0, 1),      # [D, 2, F][:, 0]
    "up": ("mlp", "gating_einsum", 1, 1),        # [D, 2, F][:, 1]
    "down": ("mlp", "linear", None, 1),          # [F, D]
    "embed": (None, "input_embedding", None, 1),  # [V, D], tied: the lookup and the logits
}
LAYER_PROJECTIONS = tuple(n for n in PROJECTIONS if n != "embed")
ALIASES = {"attn": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down"),
           "all": LAYER_PROJECTIONS}
EMBED = -1    # the 'layer' of the (global) embedding target
BASE_DTYPES = ("", "float32", "bfloat16", "int8")


@dataclasses.dataclass(frozen=True)
class Spec:
  """A resolved LoRA configuration (hashable: it is static under jit)."""

  rank: int
  alpha: float
  targets: tuple[tuple[int, str], ...]   # (layer, projection), sorted
  dtype: Any                             # compute dtype of the model (merged weights' dtype)
  base_dtype: str = ""                   # '' (= model.param_dtype), float32, bfloat16, int8
  quantize_embedding: bool = False       # int8 base: the tied embedding too (default: kept)

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


@flax.struct.dataclass
class QTensor:
  """A symmetric int8 weight: w ≈ q · scale, one scale per output channel (`quantize`)."""

  q: jax.Array        # int8, the weight's shape
  scale: jax.Array    # f32, the weight's shape with the contracted axis reduced to 1


def resolve_targets(targets: str, num_layers: int) -> tuple[tuple[int, str], ...]:
  """'attn,mlp' / 'q,v' / 'layer_0/q' / a regex -> sorted (layer, projection) pairs.

  Raises ValueError naming an item that matches no projection.
  """
  items = [t.strip() for t in str(targets).split(",") if t.strip()]
  if not items:
    raise ValueError("model.lora.targets must name at least one projection "
                     f"({', '.join(PROJECTIONS)}, or {', '.join(ALIASES)}), got {targets!r}")
  out = set()
  for item in items:
    if item == "embed":
      out.add((EMBED, "embed"))
      continue
    names = ALIASES.get(item, (item,) if item in PROJECTIONS else None)
    if names is not None:
      out.update((i, n) for i in range(num_layers) for n in names)
      continue
    try:
      pattern = re.compile(item)
    except re.error as e:
      raise ValueError(f"model.lora.targets: {item!r} is neither a projection name "
                       f"({', '.join(PROJECTIONS)}) nor a valid regex: {e}") from None
    hits = {(i, n) for i in range(num_layers) for n in LAYER_PROJECTIONS
            if pattern.fullmatch(f"layer_{i}/{n}")}
    if not hits:
      raise ValueError(f"model.lora.targets: {item!r} matches no projection: names are "
                       f"{', '.join(PROJECTIONS)} (or {', '.join(ALIASES)}); a regex must match "
                       f"'layer_{{i}}/NAME' in full, i < {num_layers}")
    out.update(hits)
  return tuple(sorted(out))


def check_config(lora_config) -> None:
  """One-line ValueErrors for model.lora values (targets are resolved later, per model)."""
  rank, alpha = lora_config.rank, lora_config.alpha
  if not isinstance(rank, int) or rank < 0:
    raise ValueError(f"model.lora.rank must be an integer >= 0 (0 = off), got {rank!r}")
  if not alpha > 0:
    raise ValueError(f"model.lora.alpha must be > 0, got {alpha!r}")
  if lora_config.base_dtype not in BASE_DTYPES:
    raise ValueError(f"model.lora.base_dtype must be one of {list(BASE_DTYPES)}, "
                     f"got {lora_config.base_dtype!r}")
  if rank == 0 and lora_config.base_dtype:
    raise ValueError(f"model.lora.base_dtype={lora_config.base_dtype!r} needs model.lora.rank > 0 "
                     "(the frozen base only exists with LoRA)")
  if lora_config.get("quantize_embedding", False) and lora_config.base_dtype != "int8":
    raise ValueError("model.lora.quantize_embedding=True needs model.lora.base_dtype='int8', got "
                     f"{lora_config.base_dtype!r}")


def spec_from_config(config, model_config) -> Spec | None:
  """The run's `Spec`, or None when model.lora.rank == 0 (LoRA off: full fine-tuning)."""
  lc = config.model.lora
  check_config(lc)
  if lc.rank == 0:
    return None
  return Spec(rank=int(lc.rank), alpha=float(lc.alpha),
              targets=resolve_targets(lc.targets, model_config.num_layers),
              dtype=model_config.dtype, base_dtype=lc.base_dtype,
              quantize_embedding=bool(lc.get("quantize_embedding", False)))


def _key(layer: int) -> str:
  return "input_embedding" if layer == EMBED else f"layer_{layer}"


def _weight(params: Params, layer: int, name: str) -> jax.Array:
  module, weight, _, _ = PROJECTIONS[name]
  return params[weight] if layer == EMBED else params[f"layer_{layer}"][module][weight]


def projection_shape(shape: tuple[int, ...], name: str) -> tuple[int, int]:
  """(in, out) of a projection of a stored weight of `shape`."""
  _, _, index, n_in = PROJECTIONS[name]
  if index is not None:
    shape = shape[:1] + shape[2:]
  return int(np.prod(shape[:n_in])), int(np.prod(shape[n_in:]))


def init_adapters(spec: Spec, base: Params, rng: jax.Array) -> Params:
  """Adapters of every target: a ~ N(0, 1/in) [in, r], b = 0 [r, out], in f32."""
  adapters: dict = {}
  for j, (layer, name) in enumerate(spec.targets):
    w = _weight(base, layer, name)
    fan_in, fan_out = projection_shape((w.q if _is_q(w) else w).shape, name)
    a = jax.random.normal(jax.random.fold_in(rng, j), (fan_in, spec.rank), jnp.float32)
    adapters.setdefault(_key(layer), {})[name] = {
        "a": a / np.sqrt(fan_in), "b": jnp.zeros((spec.rank, fan_out), jnp.float32)}
  return adapters


def delta(spec: Spec, factors: dict[str, jax.Array], shape: tuple[int, ...], name: str) -> jax.Array:
  """(alpha / rank)·A·B in f32, shaped as the projection's slice of a weight of `shape`."""
  _, _, index, _ = PROJECTIONS[name]
  if index is not None:
    shape = shape[:1] + shape[2:]
  return (spec.scale * (factors["a"] @ factors["b"])).reshape(shape)


def merge(spec: Spec | None, base: Params, adapters: Params | None) -> Params:
  """Model params: the (dequantized) base with every adapter's delta added.

  Targeted weights come out in the compute dtype (the model casts them to it anyway, so the
  numbers are those of a merged f32 weight); other leaves are the base's own arrays.
  """
  params = dequantize(base, None if spec is None else spec.dtype)
  if spec is None or adapters is None:
    return params
  params = jax.tree.map(lambda x: x, params)     # a fresh container tree; leaves shared
  for key, layer_adapters in adapters.items():
    for name, factors in layer_adapters.items():
      module, weight, index, _ = PROJECTIONS[name]
      parent = params if module is None else params[key][module]
      w = parent[weight]
      d = delta(spec, factors, w.shape, name)
      w32 = w.astype(jnp.float32)
      w32 = w32 + d if index is None else w32.at[:, index].add(d)
      parent[weight] = w32.astype(spec.dtype)
  return params


def reference(spec: Spec | None, base: Params) -> Params:
  """The reference model: the base with no adapters (dequantized when int8)."""
  return dequantize(base, None if spec is None else spec.dtype)


# ------------------------------------------------------------------------- the frozen base


def _is_q(x) -> bool:
  return isinstance(x, QTensor)


@functools.partial(jax.jit, static_argnums=1)
def _quantize(w: jax.Array, axis: int) -> QTensor:
  # Jitted: one fused pass, no f32 temporaries the size of the weight (eager ops made five).
  w32 = w.astype(jnp.float32)
  scale = jnp.max(jnp.abs(w32), axis=axis, keepdims=True) / 127.0
  scale = jnp.where(scale == 0, 1.0, scale)
  return QTensor(jnp.clip(jnp.round(w32 / scale), -127, 127).astype(jnp.int8), scale)


def quantize(params: Params, embedding: bool = False) -> Params:
  """int8 base: every layer weight of rank >= 2 becomes a `QTensor` (per-output-channel
  absmax/127), norms stay as they are. The tied embedding is quantized (per vocabulary row) only
  with `embedding=True`: every jitted pass needs all of it (the logits), so an int8 embedding is
  dequantized whole inside each pass and its bf16 copy in flight costs more than int8 storage
  saves (QLoRA as in bitsandbytes/PEFT keeps embeddings and the LM head in 16 bits too); the
  layers' int8 weights are dequantized into the merge with their adapters' deltas."""
  def q(path, w):
    if w.ndim < 2 or (path[-1].key == "input_embedding" and not embedding):
      return w
    return _quantize(w, w.ndim - 1 if path[-1].key == "input_embedding" else 0)
  return jax.tree_util.tree_map_with_path(q, params)


def dequantize(base: Params, dtype=None) -> Params:
  """Plain params from a base with `QTensor` leaves (in `dtype`); other leaves unchanged."""
  if not any(_is_q(x) for x in jax.tree.leaves(base, is_leaf=_is_q)):
    return base
  return jax.tree.map(lambda x: (x.q.astype(jnp.float32) * x.scale).astype(dtype or jnp.float32)
                      if _is_q(x) else x, base, is_leaf=_is_q)


def make_base(spec: Spec, params: Params) -> Params:
  """The stored frozen base of `params`: cast to spec.base_dtype, or int8-quantized."""
  if spec.base_dtype == "int8":
    return quantize(params, embedding=spec.quantize_embedding)
  if spec.base_dtype:
    return jax.tree.map(lambda x: jnp.asarray(x, spec.base_dtype), params)
  return params


def base_shardings(base: Params, param_shardings: Params, replicated) -> Params:
  """Shardings of a stored base: a `QTensor`'s int8 values follow the weight's sharding, its
  (small) scales are replicated."""
  return jax.tree.map(lambda x, s: QTensor(s, replicated) if _is_q(x) else s, base,
                      param_shardings, is_leaf=_is_q)


def fingerprint(params: Params) -> str:
  """sha256 of every leaf's path, dtype, shape and bytes: the identity of a base model."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    x = np.asarray(jax.device_get(leaf))
    h.update(f"{jax.tree_util.keystr(path)}|{x.dtype}|{x.shape}|".encode())
    h.update(np.ascontiguousarray(x).reshape(-1).view(np.uint8))
  return h.hexdigest()


def count(adapters: Params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(adapters))


# ------------------------------------------------------------------------------ export


def _hf_module(layer: int, name: str) -> str:
  """The transformers module a projection adapts (`convert.params_to_torch_layout` names)."""
  if layer == EMBED:
    return "model.embed_tokens"
  hf = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
        "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
        "down": "mlp.down_proj"}[name]
  return f"model.layers.{layer}.{hf}"


def peft_tensors(spec: Spec, adapters: Params) -> dict[str, np.ndarray]:
  """The adapters under PEFT's LoRA names and layouts (f32): for a projection W [out, in],
  lora_A [r, in] and lora_B [out, r] with ΔW = (alpha/r)·lora_B·lora_A; for the embedding
  [V, D], lora_embedding_A [r, V] and lora_embedding_B [D, r]."""
  out = {}
  for layer, name in spec.targets:
    f = jax.tree.map(lambda x: np.asarray(x, np.float32), adapters[_key(layer)][name])
    prefix = "base_model.model." + _hf_module(layer, name)
    if layer == EMBED:
      out[f"{prefix}.lora_embedding_A"] = f["a"].T
      out[f"{prefix}.lora_embedding_B"] = f["b"].T
    else:
      out[f"{prefix}.lora_A.weight"] = f["a"].T
      out[f"{prefix}.lora_B.weight"] = f["b"].T
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def save_adapters(spec: Spec, adapters: Params, path: str, base: dict | None = None) -> None:
  """`path/adapter_model.safetensors` + `path/adapter_config.json` in PEFT's LoRA format (the
  adapters alone; `base` = the frozen base's identity, recorded in the config)."""
  import json
  import os

  from safetensors.numpy import save_file
  os.makedirs(path, exist_ok=True)
  save_file(peft_tensors(spec, adapters), os.path.join(path, "adapter_model.safetensors"),
            metadata={"format": "pt"})
  config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.rank,
            "lora_alpha": spec.alpha, "lora_dropout": 0.0, "bias": "none",
            "fan_in_fan_out": False,
            "target_modules": sorted({_hf_module(l, n) for l, n in spec.targets}),
            "base_model_name_or_path": (base or {}).get("model", ""),
            "bond_base_fingerprint": (base or {}).get("fingerprint", ""),
            "bond_base_dtype": spec.base_dtype}
  with open(os.path.join(path, "adapter_config.json"), "w") as f:
    json.dump(config, f, indent=2)
