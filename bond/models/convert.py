"""Checkpoint import/export: HF safetensors <-> `bond` params, and GGUF import.

HF torch layout (`nn.Linear.weight` is [out, in]) versus ours (einsum letters of `gemma.py`):

  model.embed_tokens               [V', D]            -> input_embedding   [V, D]  (V' >= V)
  self_attn.q_proj                 [H*Hd, D]          -> attn/q_einsum     [D, H, Hd]
  self_attn.k_proj, v_proj         [K*Hd, D] each     -> attn/kv_einsum    [D, 2, K, Hd]
  self_attn.o_proj                 [D, H*Hd]          -> attn/attn_vec_einsum [H, Hd, D]
  mlp.gate_proj, up_proj           [F, D] each        -> mlp/gating_einsum [D, 2, F]
  mlp.down_proj                    [D, F]             -> mlp/linear        [F, D]
  *_layernorm, q_norm, k_norm      [D] or [Hd]        -> */scale (both store w of `x*(1+w)`)

Gemma 1 has two norms per layer and HF calls the pre-FFW one `post_attention_layernorm`;
Gemma 2/3 have four. Embedding rows beyond `vocab_size` (vocab padding) are dropped on import.

GGUF (llama.cpp) stores Gemma norm weights as `1 + w`; like transformers' GGUF loader
(`Gemma2TensorProcessor`, used for gemma2 and gemma3) we subtract 1 from every `*norm.weight`.
Dequantized GGUF tensors come out in the torch [out, in] layout, so they reuse the HF mapping.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from bond.models import gguf_file
from bond.models.gemma import GLOBAL, LOCAL, GemmaConfig

Params = dict[str, Any]

SUPPORTED_MODEL_TYPES = ("gemma", "gemma2", "gemma3_text", "gemma3")
SUPPORTED_GGUF_ARCHITECTURES = ("gemma3",)
_VERSION = {"gemma": 1, "gemma2": 2, "gemma3_text": 3}
_HF_CLASS = {1: ("gemma", "GemmaForCausalLM"), 2: ("gemma2", "Gemma2ForCausalLM"),
             3: ("gemma3_text", "Gemma3ForCausalLM")}
_LAYER_TYPE = {"sliding_attention": LOCAL, "full_attention": GLOBAL}
_HF_LAYER_TYPE = {v: k for k, v in _LAYER_TYPE.items()}

# transformers' config defaults (GemmaConfig, Gemma2Config, Gemma3TextConfig) for keys a
# config.json may omit (`save_pretrained` writes only values that differ from these).
_COMMON_DEFAULTS = dict(rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                        head_dim=256, query_pre_attn_scalar=None, sliding_window=None,
                        final_logit_softcapping=None, attn_logit_softcapping=None)
_HF_DEFAULTS = {
    "gemma": dict(_COMMON_DEFAULTS, vocab_size=256_000, hidden_size=3072,
                  intermediate_size=24576, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=16, rope_theta=10_000.0),
    "gemma2": dict(_COMMON_DEFAULTS, vocab_size=256_000, hidden_size=2304,
                   intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                   num_key_value_heads=4, rope_theta=10_000.0, query_pre_attn_scalar=256,
                   sliding_window=4096, final_logit_softcapping=30.0,
                   attn_logit_softcapping=50.0),
    "gemma3_text": dict(_COMMON_DEFAULTS, vocab_size=262_208, hidden_size=2304,
                        intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                        num_key_value_heads=4, rope_theta=1_000_000.0,
                        rope_local_base_freq=10_000.0, query_pre_attn_scalar=256,
                        sliding_window=4096, sliding_window_pattern=6),
}

# GGUF metadata key (after "<arch>.") -> HF config key, as in transformers' GGUF_CONFIG_MAPPING.
_GGUF_CONFIG_KEYS = {
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "rope.freq_base": "rope_theta",
    "attention.key_length": "head_dim",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.sliding_window": "sliding_window",
}
_GGUF_TOKEN_IDS = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
                   "padding_token_id": "pad_token_id"}
# GGUF tensor name (per block `blk.{i}.`) -> HF name (per layer `model.layers.{i}.`).
_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


# ----------------------------------------------------------------------------------- config


def _rope(params: dict | None, theta: float) -> tuple[float, float]:
  """(base, linear scale factor) of one HF rope-parameters dict."""
  params = params or {}
  kind = params.get("rope_type", params.get("type", "default"))
  if kind not in ("default", "linear"):
    raise ValueError(f"unsupported rope_type {kind!r}; bond supports 'default' and 'linear'")
  factor = float(params.get("factor", 1.0)) if kind == "linear" else 1.0
  return float(params.get("rope_theta", theta)), factor


def config_from_hf(hf: dict, **overrides) -> GemmaConfig:
  """`GemmaConfig` from an HF config dict (transformers 4.x or 5.x keys); overrides e.g. dtype."""
  model_type = hf.get("model_type")
  if model_type == "gemma3":
    hf = dict(hf.get("text_config") or {}, model_type="gemma3_text")
    model_type = "gemma3_text"
  if model_type not in _VERSION:
    raise ValueError(f"unsupported model_type {model_type!r}; supported: "
                     f"{', '.join(SUPPORTED_MODEL_TYPES)}")
  c = {**_HF_DEFAULTS[model_type], **hf}
  version = _VERSION[model_type]
  rope = c.get("rope_parameters") or {}
  if version == 3:
    if "full_attention" not in rope:   # 4.x keys: rope_theta, rope_local_base_freq, rope_scaling
      rope = {"full_attention": dict(c.get("rope_scaling") or {}, rope_theta=c["rope_theta"]),
              "sliding_attention": {"rope_theta": c["rope_local_base_freq"]}}
    base_g, scale_g = _rope(rope.get("full_attention"), c["rope_theta"])
    base_l, scale_l = _rope(rope.get("sliding_attention"), c["rope_local_base_freq"])
  else:
    base_g, scale_g = _rope(rope or c.get("rope_scaling"), c["rope_theta"])
    base_l, scale_l = base_g, scale_g
  n = c["num_hidden_layers"]
  layer_types = None
  if version == 2:
    layer_types = c.get("layer_types") or [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
  elif version == 3:
    pattern = c.get("sliding_window_pattern", c.get("_sliding_window_pattern", 6))
    layer_types = c.get("layer_types") or [
        "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]
  if layer_types is not None:
    bad = sorted(set(layer_types) - set(_LAYER_TYPE))
    if bad:
      raise ValueError(f"unsupported layer_types {bad}; supported: {sorted(_LAYER_TYPE)}")
    layer_types = tuple(_LAYER_TYPE[t] for t in layer_types)
  eos = c["eos_token_id"]
  fields = dict(
      version=version, vocab_size=c["vocab_size"], num_layers=n, embed_dim=c["hidden_size"],
      hidden_dim=c["intermediate_size"], num_heads=c["num_attention_heads"],
      num_kv_heads=c["num_key_value_heads"], head_dim=c["head_dim"],
      query_pre_attn_scalar=c["query_pre_attn_scalar"],
      attn_logit_softcap=c["attn_logit_softcapping"],
      final_logit_softcap=c["final_logit_softcapping"],
      sliding_window=c["sliding_window"] if layer_types else None, layer_types=layer_types,
      rope_base_global=base_g, rope_base_local=base_l, rope_scale_global=scale_g,
      rope_scale_local=scale_l, use_qk_norm=version == 3, use_post_norms=version >= 2,
      rms_norm_eps=c["rms_norm_eps"], pad_id=c["pad_token_id"] or 0, bos_id=c["bos_token_id"],
      eos_id=eos[0] if isinstance(eos, (list, tuple)) else eos)
  return GemmaConfig(**{**fields, **overrides})


def config_to_hf(config: GemmaConfig) -> dict:
  """Complete HF config dict (transformers 5.x keys) for `config`."""
  model_type, arch = _HF_CLASS[config.version]

  def rope(base, scale):
    return ({"rope_type": "default", "rope_theta": base} if scale == 1.0 else
            {"rope_type": "linear", "factor": scale, "rope_theta": base})

  hf = dict(
      model_type=model_type, architectures=[arch], vocab_size=config.vocab_size,
      hidden_size=config.embed_dim, intermediate_size=config.hidden_dim,
      num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
      num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
      hidden_activation="gelu_pytorch_tanh", rms_norm_eps=config.rms_norm_eps,
      pad_token_id=config.pad_id, bos_token_id=config.bos_id, eos_token_id=config.eos_id,
      tie_word_embeddings=True, dtype="float32",
      rope_parameters=rope(config.rope_base_global, config.rope_scale_global))
  if config.version >= 2:
    hf.update(query_pre_attn_scalar=config.query_pre_attn_scalar or config.head_dim,
              attn_logit_softcapping=config.attn_logit_softcap,
              final_logit_softcapping=config.final_logit_softcap,
              sliding_window=config.sliding_window,
              layer_types=[_HF_LAYER_TYPE[config.layer_type(i)] for i in range(config.num_layers)])
  if config.version == 3:
    hf["rope_parameters"] = {
        "full_attention": rope(config.rope_base_global, config.rope_scale_global),
        "sliding_attention": rope(config.rope_base_local, config.rope_scale_local)}
  exported = _canonical(config_from_hf(hf, dtype=config.dtype, param_dtype=config.param_dtype,
                                       remat=config.remat, scan_layers=config.scan_layers))
  wrong = {f.name: (getattr(config, f.name), getattr(exported, f.name))
           for f in dataclasses.fields(config)
           if getattr(_canonical(config), f.name) != getattr(exported, f.name)}
  if wrong:
    raise ValueError(f"HF {arch} cannot express this config; (ours, exported) differ in {wrong}")
  return hf


def _canonical(config: GemmaConfig) -> GemmaConfig:
  """Spells equivalent configs alike: explicit layer types, scalar and window only if used."""
  layer_types = tuple(config.layer_type(i) for i in range(config.num_layers))
  return config.replace(
      layer_types=layer_types,
      query_pre_attn_scalar=config.query_pre_attn_scalar or config.head_dim,
      sliding_window=config.sliding_window if LOCAL in layer_types else None)


# ---------------------------------------------------------------------------------- tensors


def _layer_names(config: GemmaConfig) -> list[str]:
  """HF per-layer tensor names (after `model.layers.{i}.`, before `.weight`)."""
  norms = (["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
            "post_feedforward_layernorm"] if config.use_post_norms else
           ["input_layernorm", "post_attention_layernorm"])
  qk = ["self_attn.q_norm", "self_attn.k_norm"] if config.use_qk_norm else []
  return (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"] + qk + norms)


def hf_shapes(config: GemmaConfig) -> dict[str, tuple[int, ...]]:
  """Every HF tensor name (without the `model.` prefix) and its torch shape."""
  d, h, k, hd, f = (config.embed_dim, config.num_heads, config.num_kv_heads, config.head_dim,
                    config.hidden_dim)
  per_layer = {"self_attn.q_proj": (h * hd, d), "self_attn.k_proj": (k * hd, d),
               "self_attn.v_proj": (k * hd, d), "self_attn.o_proj": (d, h * hd),
               "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f),
               "self_attn.q_norm": (hd,), "self_attn.k_norm": (hd,)}
  shapes = {"embed_tokens.weight": (config.vocab_size, d), "norm.weight": (d,)}
  for i in range(config.num_layers):
    for name in _layer_names(config):
      shapes[f"layers.{i}.{name}.weight"] = per_layer.get(name, (d,))
  return shapes


def _pre_ffw_norm_name(config: GemmaConfig) -> str:
  return "pre_feedforward_layernorm" if config.use_post_norms else "post_attention_layernorm"


def params_from_torch_layout(config: GemmaConfig, get: Callable[[str], np.ndarray],
                            shape_of: Callable[[str], tuple] | None = None) -> Params:
  """Our param tree from HF-named torch-layout tensors; `get(name)` takes names of `hf_shapes`.

  Checks every tensor first and raises one error naming all missing tensors, or the first
  tensor whose shape is wrong (expected vs got). With `shape_of(name)` the check reads shapes
  only and `get` runs once per tensor as its layer is built (e.g. dequantizing on demand); each
  layer becomes `param_dtype` arrays at once, so the loader holds about one copy of the model.
  """
  shapes = hf_shapes(config)
  shape_of = shape_of or (lambda name: get(name).shape)   # noqa: E731
  missing = []
  for name, shape in shapes.items():
    try:
      got = tuple(int(x) for x in shape_of(name))
    except KeyError:
      missing.append(name)
      continue
    rows_ok = name == "embed_tokens.weight" and got[1:] == shape[1:] and got[0] >= shape[0]
    if got != shape and not rows_ok:
      raise ValueError(f"tensor {name!r} has shape {got}, expected {shape} for {config}")
  if missing:
    raise KeyError(f"checkpoint is missing {len(missing)} tensor(s): {', '.join(missing)}")

  d, h, k, hd = config.embed_dim, config.num_heads, config.num_kv_heads, config.head_dim
  norm = lambda w: {"scale": w}                                       # noqa: E731
  # Cast on the host first: a device f32 copy of a 262k-row embedding is 0.7 GB more at peak.
  host_dtype = jnp.dtype(config.param_dtype)
  to_jax = lambda tree: jax.tree.map(  # noqa: E731
      lambda x: jnp.asarray(np.asarray(x, dtype=host_dtype)), tree)
  params = {"input_embedding": to_jax(get("embed_tokens.weight")[:config.vocab_size]),
            "final_norm": to_jax(norm(get("norm.weight")))}
  for i in range(config.num_layers):
    t = {name: get(f"layers.{i}.{name}.weight") for name in _layer_names(config)}
    attn = {
        "q_einsum": t["self_attn.q_proj"].T.reshape(d, h, hd),
        "kv_einsum": np.stack([t["self_attn.k_proj"].T.reshape(d, k, hd),
                               t["self_attn.v_proj"].T.reshape(d, k, hd)], axis=1),
        "attn_vec_einsum": t["self_attn.o_proj"].T.reshape(h, hd, d),
    }
    if config.use_qk_norm:
      attn.update(query_norm=norm(t["self_attn.q_norm"]), key_norm=norm(t["self_attn.k_norm"]))
    layer = {
        "attn": attn,
        "mlp": {"gating_einsum": np.stack([t["mlp.gate_proj"].T, t["mlp.up_proj"].T], axis=1),
                "linear": t["mlp.down_proj"].T},
        "pre_attention_norm": norm(t["input_layernorm"]),
        "pre_ffw_norm": norm(t[_pre_ffw_norm_name(config)]),
    }
    if config.use_post_norms:
      layer.update(post_attention_norm=norm(t["post_attention_layernorm"]),
                   post_ffw_norm=norm(t["post_feedforward_layernorm"]))
    params[f"layer_{i}"] = to_jax(layer)
    del t, layer, attn
  return params


def params_to_torch_layout(config: GemmaConfig, params: Params) -> dict[str, np.ndarray]:
  """Inverse of `params_from_torch_layout`: HF names (with `model.` prefix) -> f32 arrays."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
  d, h, k, hd = config.embed_dim, config.num_heads, config.num_kv_heads, config.head_dim
  out = {"embed_tokens.weight": p["input_embedding"], "norm.weight": p["final_norm"]["scale"]}
  for i in range(config.num_layers):
    layer, attn = p[f"layer_{i}"], p[f"layer_{i}"]["attn"]
    t = {
        "self_attn.q_proj": attn["q_einsum"].reshape(d, h * hd).T,
        "self_attn.k_proj": attn["kv_einsum"][:, 0].reshape(d, k * hd).T,
        "self_attn.v_proj": attn["kv_einsum"][:, 1].reshape(d, k * hd).T,
        "self_attn.o_proj": attn["attn_vec_einsum"].reshape(h * hd, d).T,
        "mlp.gate_proj": layer["mlp"]["gating_einsum"][:, 0].T,
        "mlp.up_proj": layer["mlp"]["gating_einsum"][:, 1].T,
        "mlp.down_proj": layer["mlp"]["linear"].T,
        "input_layernorm": layer["pre_attention_norm"]["scale"],
        _pre_ffw_norm_name(config): layer["pre_ffw_norm"]["scale"],
    }
    if config.use_qk_norm:
      t.update({"self_attn.q_norm": attn["query_norm"]["scale"],
                "self_attn.k_norm": attn["key_norm"]["scale"]})
    if config.use_post_norms:
      t.update(post_attention_layernorm=layer["post_attention_norm"]["scale"],
               post_feedforward_layernorm=layer["post_ffw_norm"]["scale"])
    out.update({f"layers.{i}.{name}.weight": w for name, w in t.items()})
  return {f"model.{name}": np.ascontiguousarray(w) for name, w in out.items()}


# --------------------------------------------------------------------------- safetensors I/O


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of one file as numpy (memory-mapped); BF16 via `ml_dtypes` (numpy lacks it)."""
  with open(path, "rb") as fh:
    header_len = int.from_bytes(fh.read(8), "little")
    header = json.loads(fh.read(header_len))
  out = {}
  with safe_open(path, framework="np") as f:
    for name in f.keys():
      if header[name]["dtype"] != "BF16":
        out[name] = f.get_tensor(name)
        continue
      start, _ = header[name]["data_offsets"]
      out[name] = np.memmap(path, dtype=ml_dtypes.bfloat16, mode="r",
                            offset=8 + header_len + start, shape=tuple(header[name]["shape"]))
  return out


def _hf_prefix(names) -> str:
  """Prefix of the decoder's tensors: `model.` (CausalLM) or the multimodal language model's."""
  for prefix in ("model.", "model.language_model.", "language_model.model.", ""):
    if f"{prefix}embed_tokens.weight" in names:
      return prefix
  raise KeyError("checkpoint has no embed_tokens.weight under any known prefix "
                 "('model.', 'model.language_model.', 'language_model.model.')")


def from_hf(path: str, dtype: Any = jnp.float32,
            param_dtype: Any = jnp.float32) -> tuple[GemmaConfig, Params]:
  """Loads an HF Gemma 1/2/3 directory (config.json + *.safetensors) as `(config, params)`."""
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"no config.json in {path!r}; expected an HF model directory")
  with open(config_path) as f:
    config = config_from_hf(json.load(f), dtype=dtype, param_dtype=param_dtype)
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index) as f:
      files = sorted({os.path.join(path, v) for v in json.load(f)["weight_map"].values()})
  else:
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  if not files:
    raise FileNotFoundError(f"no *.safetensors files in {path!r}")
  tensors = {}
  for file in files:
    tensors.update(_read_safetensors(file))
  prefix = _hf_prefix(tensors)
  lm_head = tensors.get("lm_head.weight")
  if lm_head is not None and not np.array_equal(
      lm_head[:config.vocab_size], tensors[f"{prefix}embed_tokens.weight"][:config.vocab_size]):
    raise ValueError("lm_head.weight differs from embed_tokens.weight; bond's Gemma ties them")
  return config, params_from_torch_layout(config, lambda name: tensors[prefix + name])


def to_hf(config: GemmaConfig, params: Params, path: str) -> None:
  """Writes `path/config.json` and `path/model.safetensors` (f32) loadable by transformers."""
  hf = config_to_hf(config)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)
  save_file(params_to_torch_layout(config, params), os.path.join(path, "model.safetensors"),
            metadata={"format": "pt"})


# ------------------------------------------------------------------------------------- GGUF


def _dequantize_rows(dequantize, data: np.ndarray, qtype, rows: int = 8192,
                     dtype=np.float32) -> np.ndarray:
  """gguf's `dequantize` in chunks of rows into one `dtype` array: its NumPy block decoding makes
  several temporaries the size of the tensor (GBs for a 262k x 640 embedding) when called whole."""
  if data.ndim < 2 or data.shape[0] <= rows:
    return np.asarray(dequantize(data, qtype), dtype)
  first = np.asarray(dequantize(data[:rows], qtype), dtype)
  out = np.empty((data.shape[0],) + first.shape[1:], dtype)
  out[:rows] = first
  for lo in range(rows, data.shape[0], rows):
    out[lo:lo + rows] = dequantize(data[lo:lo + rows], qtype)
  return out


def from_gguf(path: str, dtype: Any = jnp.float32,
              param_dtype: Any = jnp.float32) -> tuple[GemmaConfig, Params]:
  """Loads a Gemma 3 GGUF (any llama.cpp quantization, dequantized to f32) as `(config, params)`.

  Metadata missing from GGUF (local RoPE base, query_pre_attn_scalar, layer pattern) takes
  transformers' Gemma3TextConfig defaults, exactly as transformers' own GGUF loader does.
  """
  from gguf.quants import dequantize

  reader = gguf_file.read(path)
  fields = reader.fields
  arch = fields["general.architecture"]
  if arch not in SUPPORTED_GGUF_ARCHITECTURES:
    raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: "
                     f"{', '.join(SUPPORTED_GGUF_ARCHITECTURES)}")
  hf = {"model_type": "gemma3_text",
        "vocab_size": len(fields["tokenizer.ggml.tokens"])}
  for key, hf_key in _GGUF_CONFIG_KEYS.items():
    if f"{arch}.{key}" in fields:
      hf[hf_key] = fields[f"{arch}.{key}"]
  for key, hf_key in _GGUF_TOKEN_IDS.items():
    if f"tokenizer.ggml.{key}" in fields:
      hf[hf_key] = fields[f"tokenizer.ggml.{key}"]
  config = config_from_hf(hf, dtype=dtype, param_dtype=param_dtype)

  names = {"token_embd": "embed_tokens", "output_norm": "norm"}
  for i in range(config.num_layers):
    names.update({f"blk.{i}.{g}": f"layers.{i}.{h}" for g, h in _GGUF_LAYER_NAMES.items()})
  tensors = {names[t.name.removesuffix(".weight")] + ".weight": t for t in reader.tensors
             if t.name.removesuffix(".weight") in names}

  def get(name: str) -> np.ndarray:     # dequantized on demand, one tensor at a time
    t = tensors[name]
    if t.name.endswith("norm.weight"):
      return _dequantize_rows(dequantize, t.data, t.tensor_type) - 1.0
    return _dequantize_rows(dequantize, t.data, t.tensor_type, dtype=jnp.dtype(param_dtype))

  return config, params_from_torch_layout(
      config, get, shape_of=lambda name: tuple(reversed([int(x) for x in tensors[name].shape])))
