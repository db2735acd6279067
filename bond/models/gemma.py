"""Gemma 1, 2 and 3 text decoders in `flax.linen`, faithful to the HF PyTorch reference.

One module family with config switches (see `GemmaConfig`):
  * Gemma 1: GQA/MQA, RoPE, GeGLU (tanh-GELU), RMSNorm `x*(1+w)`, tied embedding * sqrt(D).
  * Gemma 2: + post-attention / post-FFW norms, `query_pre_attn_scalar`, alternating
    local (sliding window) / global layers, attention and final logit soft-caps.
  * Gemma 3: + QK RMSNorm, per-layer-type RoPE bases (local 10k, global 1M) with linear
    scaling on global layers, five local layers then one global.

Shapes: B batch, T query length, S key length (cache slots), D model dim, H query heads,
K kv heads, G = H // K query heads per kv head, Hd head dim, F MLP hidden dim, V vocab.

Masking works on positions rather than slot indices: key `s` is visible to query `t` iff the
key is a real token, `pos[s] <= pos[t]`, and on local layers `pos[t] - pos[s] < window`. The
same rule serves a left-padded full forward pass and a KV-cache decode step.

The weight matmuls, the GeGLU, the attention and the logits go through `Backend`, whose methods
are the plain XLA ops below (`XLA`, the default). A backend for one platform (the CPU decode
kernels of `bond.models.backends`) overrides them with the same numerics.

Tracing cost does not grow with depth: outside `init`, each layer runs as one jitted function
per layer type (`_layer_fn`), so a model call traces one local and one global layer and XLA
inlines the calls; with `scan_layers` a full pass is one `lax.scan` over the stacked layers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array
Cache = dict[str, Any]

# Large negative logit for masked attention entries; finite so fully masked rows give no NaN.
K_MASK = -2.3819763e38

LOCAL = "local"
GLOBAL = "global"


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
  """Architecture of a Gemma text decoder. Field names follow the Gemma papers."""

  vocab_size: int
  num_layers: int
  embed_dim: int            # D
  hidden_dim: int           # F, the MLP inner size
  num_heads: int            # H
  num_kv_heads: int         # K (1 = MQA, H = MHA)
  head_dim: int             # Hd, independent of D
  version: int = 1          # 1, 2 or 3: picks norm layout and defaults; checked in __post_init__
  query_pre_attn_scalar: float | None = None   # queries scaled by this**-0.5; None = head_dim
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  sliding_window: int | None = None            # window of LOCAL layers
  layer_types: tuple[str, ...] | None = None   # per layer LOCAL/GLOBAL; None = all GLOBAL
  rope_base_global: float = 10_000.0
  rope_base_local: float = 10_000.0
  rope_scale_global: float = 1.0               # linear RoPE scaling factor on GLOBAL layers
  rope_scale_local: float = 1.0
  use_qk_norm: bool = False
  use_post_norms: bool = False                 # Gemma 2/3 post-attention and post-FFW norms
  rms_norm_eps: float = 1e-6
  dtype: Any = jnp.float32                     # compute dtype
  param_dtype: Any = jnp.float32
  remat: bool = False
  # True: full passes (no KV cache) run the layers as one `lax.scan` over their stacked params
  # (`scan_stack`), one compiled layer instead of num_layers copies: compiling and loading a
  # cached program get much cheaper (Gemma 3 270M LoRA J-BOND: warm first step 9.6 s vs 13 s,
  # cold 20 s vs 28 s), but on XLA:CPU that model's step runs 1.2-1.3x slower (35M: on par),
  # hence off by default. The params keep their per-layer layout; the KV-cache path is unrolled.
  scan_layers: bool = False
  # Token ids of the tokenizer this model was trained with (HF conventions).
  pad_id: int = 0
  bos_id: int = 2
  eos_id: int = 1

  def __post_init__(self):
    if self.version not in (1, 2, 3):
      raise ValueError(f"GemmaConfig.version must be 1, 2 or 3, got {self.version}")
    for name in ("vocab_size", "num_layers", "embed_dim", "hidden_dim", "num_heads",
                 "num_kv_heads", "head_dim"):
      if getattr(self, name) < 1:
        raise ValueError(f"GemmaConfig.{name} must be >= 1, got {getattr(self, name)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"GemmaConfig.num_heads ({self.num_heads}) must be a multiple of "
                       f"num_kv_heads ({self.num_kv_heads})")
    if self.layer_types is not None:
      object.__setattr__(self, "layer_types", tuple(self.layer_types))
      if len(self.layer_types) != self.num_layers:
        raise ValueError(f"GemmaConfig.layer_types has {len(self.layer_types)} entries, "
                         f"expected num_layers={self.num_layers}")
      bad = set(self.layer_types) - {LOCAL, GLOBAL}
      if bad:
        raise ValueError(f"GemmaConfig.layer_types entries must be 'local' or 'global', got {bad}")
      if LOCAL in self.layer_types and not self.sliding_window:
        raise ValueError("GemmaConfig.sliding_window must be set when some layer is 'local'")

  def layer_type(self, i: int) -> str:
    return GLOBAL if self.layer_types is None else self.layer_types[i]

  @property
  def query_scale(self) -> float:
    scalar = self.query_pre_attn_scalar or self.head_dim
    return float(scalar) ** -0.5

  def replace(self, **kw) -> "GemmaConfig":
    return dataclasses.replace(self, **kw)


def _dense_init(stddev: float = 0.02):
  return nn.initializers.normal(stddev=stddev)


def _einsum(equation: str, x: Array, w: Array, dtype: Any) -> Array:
  """`einsum` of x and w cast to `dtype`, accumulated in f32, result in `dtype`.

  Same numbers as a plain `dtype` einsum (which accumulates in f32 too), but XLA:CPU runs
  bf16 x bf16 -> f32 dots natively while it upcasts bf16 -> bf16 dots, weights included, to f32.
  In a low-precision `dtype` the gradient's dots also take `dtype` operands (`_lowp_einsum`).
  """
  if jnp.dtype(dtype) == jnp.float32:
    return _cast_einsum(equation, x, w, dtype)
  return _lowp_einsum(equation, jnp.dtype(dtype), jnp.dtype(x.dtype), jnp.dtype(w.dtype), x, w)


def _cast_einsum(equation: str, x: Array, w: Array, dtype: Any) -> Array:
  return jnp.einsum(equation, x.astype(dtype), w.astype(dtype),
                    preferred_element_type=jnp.float32).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _lowp_einsum(equation, dtype, x_dtype, w_dtype, x, w):
  """`_einsum` in a low-precision dtype, with a VJP whose two dots also take `dtype` operands.

  Autodiff of the plain form transposes an f32-output dot: its cotangent arrives in f32 and XLA
  runs both gradient dots in f32 x f32, about half as fast as bf16 x bf16 -> f32 on a CPU with
  AVX512-BF16 (35M J-BOND fwd+bwd). The cotangent of a `dtype` output holds `dtype` values, so
  casting it back is exact; the weight gradient comes out of the f32 accumulator in w's dtype.
  """
  del x_dtype, w_dtype
  return _cast_einsum(equation, x, w, dtype)


def _lowp_einsum_fwd(equation, dtype, x_dtype, w_dtype, x, w):
  x, w = x.astype(dtype), w.astype(dtype)
  return _lowp_einsum(equation, dtype, x_dtype, w_dtype, x, w), (x, w)


def _lowp_einsum_bwd(equation, dtype, x_dtype, w_dtype, res, ct):
  x, w = res
  inputs, out = equation.replace(" ", "").split("->")
  xs, ws = inputs.split(",")
  ct = ct.astype(dtype)
  dx = jnp.einsum(f"{out},{ws}->{xs}", ct, w, preferred_element_type=jnp.float32)
  dw = jnp.einsum(f"{xs},{out}->{ws}", x, ct, preferred_element_type=jnp.float32)
  return dx.astype(x_dtype), dw.astype(w_dtype)


_lowp_einsum.defvjp(_lowp_einsum_fwd, _lowp_einsum_bwd)


@jax.custom_vjp
def gelu_mul(gu: Array) -> Array:
  """gelu_tanh(gu[..., 0, :]) * gu[..., 1, :] for gu [..., 2, F], in gu's dtype.

  The VJP computes the GELU's derivative in f32 and writes d(gu) in one pass; autodiff of the
  slices wrote it as two zero-padded halves and their sum, in a loop that re-evaluated the
  bf16 GELU chain per element (a third of the 35M J-BOND fwd+bwd in one profile).
  """
  return jax.nn.gelu(gu[..., 0, :], approximate=True) * gu[..., 1, :]


_GELU_C = (2.0 / 3.141592653589793) ** 0.5


def _gelu_mul_fwd(gu):
  return gelu_mul(gu), gu


def _gelu_mul_bwd(gu, ct):
  g, u = gu[..., 0, :].astype(jnp.float32), gu[..., 1, :].astype(jnp.float32)
  ct = ct.astype(jnp.float32)
  t = jnp.tanh(_GELU_C * (g + 0.044715 * g**3))
  gelu = 0.5 * g * (1.0 + t)
  dgelu = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * _GELU_C * (1.0 + 3 * 0.044715 * g * g)
  return (jnp.stack([ct * u * dgelu, ct * gelu], axis=-2).astype(gu.dtype),)


gelu_mul.defvjp(_gelu_mul_fwd, _gelu_mul_bwd)


@jax.custom_jvp
def _take_rows(table: Array, ids: Array) -> Array:
  """`jnp.take(table, ids, axis=0)`; a bf16 table is gathered as its uint16 bits.

  XLA:CPU has no bf16 gather: it converted the whole table (the embedding, V x D) to f32 on
  every call. The bits gather is exact, and the JVP below keeps it differentiable.
  """
  if table.dtype == jnp.bfloat16:
    bits = jnp.take(jax.lax.bitcast_convert_type(table, jnp.uint16), ids, axis=0)
    return jax.lax.bitcast_convert_type(bits, jnp.bfloat16)
  return jnp.take(table, ids, axis=0)


@_take_rows.defjvp
def _take_rows_jvp(primals, tangents):
  table, ids = primals
  return _take_rows(table, ids), jnp.take(tangents[0], ids, axis=0)


class RMSNorm(nn.Module):
  """Gemma RMSNorm: `x * rsqrt(mean(x^2) + eps) * (1 + w)`, computed in f32."""

  eps: float = 1e-6
  param_dtype: Any = jnp.float32
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                             (self.axis_name,)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(var + self.eps) * (1.0 + scale.astype(jnp.float32))
    return y.astype(x.dtype)


def rope_inv_freq(head_dim: int, base: float, scale: float) -> Array:
  """[Hd/2] f32 RoPE frequencies, with linear scaling."""
  return 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)) / scale


def rope_table(positions: Array, inv_freq: Array, dtype: Any) -> tuple[Array, Array]:
  """(cos, sin) [B, T, Hd/2] of the RoPE angles at positions [B, T], rounded to `dtype`."""
  angles = positions.astype(jnp.float32)[..., None] * inv_freq          # [B, T, Hd/2]
  return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def rotate(x: Array, cos: Array, sin: Array) -> Array:
  """Split-half rotary embedding (HF `rotate_half` convention): x [B, T, N, Hd] rotated by
  `rope_table`'s (cos, sin), [x1 c - x2 s, x2 c + x1 s].

  Stacked halves, not a concatenation: XLA:CPU fuses this into one loop (a concatenate of the
  two halves stays a separate op after two more). The same values either way.
  """
  x1, x2 = jnp.split(x, 2, axis=-1)
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  return jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-2).reshape(x.shape)


# {LOCAL: (cos, sin), GLOBAL: (cos, sin)}: the `rope_table` of each layer type's frequencies.
RopeTables = dict[str, tuple[Array, Array]]


def rope_tables(config: GemmaConfig, positions: Array) -> RopeTables:
  """Both layer types' RoPE tables at positions [B, T], in the model's dtype. Computed once per
  model call and passed to every layer (XLA:CPU otherwise computed sin and cos in each layer)."""
  hd = config.head_dim
  return {LOCAL: rope_table(positions, rope_inv_freq(hd, config.rope_base_local,
                                                     config.rope_scale_local), config.dtype),
          GLOBAL: rope_table(positions, rope_inv_freq(hd, config.rope_base_global,
                                                      config.rope_scale_global), config.dtype)}


def attention_mask(q_pos: Array, k_pos: Array, k_valid: Array, window: int | Array | None) -> Array:
  """[B, T, S] bool: key s visible to query t (causal by position, real keys, optional window;
  a traced window is allowed)."""
  visible = (k_pos[:, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :]
  if window is not None:
    visible &= (q_pos[:, :, None] - k_pos[:, None, :]) < window
  return visible


@dataclasses.dataclass(frozen=True)
class Backend:
  """How the model runs its token lookup, weight matmuls, GeGLU, attention and logits: plain XLA
  ops.

  Subclasses override these with the same numerics (`bond.models.backends`). Weights are named by
  their module and param name, so a backend can use its own copy of them: `prepare` returns extra
  variable collections, computed once from the params, that the caller passes to `apply` next to
  "params" and the backend reads with `module.get_variable`.
  """

  def prepare(self, params: Any) -> dict[str, Any]:
    del params
    return {}

  def dense(self, module: nn.Module, name: str, equation: str, x: Array, w: Array,
            dtype: Any) -> Array:
    """x times the weight param `name` of `module` (x's trailing dims contract with w's leading)."""
    del module, name
    return _einsum(equation, x, w, dtype)

  def geglu(self, module: nn.Module, name: str, x: Array, w: Array, dtype: Any) -> Array:
    """gelu_tanh(x W[:, 0]) * (x W[:, 1]) for the fused gate/up weight w [D, 2, F]."""
    return gelu_mul(self.dense(module, name, "BTD,DCF->BTCF", x, w, dtype))

  def attention(self, q: Array, key: Array, value: Array, rope: tuple[Array, Array],
                query_scale: float, kv_ctx: "KVContext", mask: Array, softcap: float | None,
                dtype: Any) -> tuple[Array, Cache | None]:
    """RoPE, the KV cache write and softmax attention -> (out [B, T, H, Hd], this layer's new
    cache or None). q [B, T, H, Hd] and key, value [B, T, K, Hd] as projected (and QK-normed),
    rope the (cos, sin) of `rope_table`, kv_ctx the keys to attend to, mask [B, T, S]."""
    cos, sin = rope
    q = rotate(q, cos, sin) * jnp.asarray(query_scale, dtype)
    keys, values, cache = kv_ctx.update(rotate(key, cos, sin), value)
    return dot_attention(q, keys, values, mask, softcap, dtype, cache is not None), cache

  def embed(self, embedding: Array, tokens: Array) -> Array:
    """Rows `tokens` [B, T] of the embedding table [V, D] -> [B, T, D], in the table's dtype."""
    return _take_rows(embedding, tokens)

  def logits(self, module: nn.Module, x: Array, embedding: Array, dtype: Any) -> Array:
    """f32 logits [B, T, V] of x [B, T, D] against the tied embedding [V, D]."""
    del module
    return jnp.einsum("BTD,VD->BTV", x, embedding.astype(dtype),
                      preferred_element_type=jnp.float32)

  def greedy(self, logits: Array) -> tuple[Array, Array]:
    """Greedy decoding's choice over f32 logits [R, V]: (the first argmax [R] int32, the log
    softmax there [R] f32)."""
    tokens = first_argmax(logits)
    return tokens, token_logprob(logits, tokens)


XLA = Backend()


@flax.struct.dataclass
class SegmentMask:
  """The attention mask of rows [x; y_1; ...; y_N] (`Gemma`'s `segments`): that of the N rows
  [x; y_n] (`_rows`), mask [B·N, P + T, P + T]. `dot_attention` attends in those rows, so y_n
  never sees the other segments' keys."""

  mask: Array
  p: int = flax.struct.field(pytree_node=False)
  n: int = flax.struct.field(pytree_node=False)

  @classmethod
  def build(cls, positions: Array, valid: Array, window, p: int, n: int) -> "SegmentMask":
    pos = _rows(positions, p, n)
    return cls(attention_mask(pos, pos, _rows(valid, p, n), window), p, n)


def _rows(x: Array, p: int, n: int) -> Array:
  """[B, P + N·T, ...] -> the rows [x; y_n]: [B·N, P + T, ...] (the prefix repeated N times)."""
  b, length, rest = x.shape[0], x.shape[1], x.shape[2:]
  t = (length - p) // n
  return jnp.concatenate([jnp.repeat(x[:, :p], n, axis=0),
                          x[:, p:].reshape(b * n, t, *rest)], axis=1)


def _segment_attention(q: Array, keys: Array, values: Array, mask: SegmentMask,
                       softcap: float | None, dtype: Any) -> Array:
  """`dot_attention` of rows [x; y_1; ...; y_N]: one call in the rows [x; y_n], built from the
  prefix's projections (repeated, not recomputed); the prefix's output is read from the first
  row. The attention of the separate rows, op for op; only the layers' matmuls see fewer rows."""
  b, length, h, hd = q.shape
  p, n = mask.p, mask.n
  t = (length - p) // n
  out = dot_attention(_rows(q, p, n), _rows(keys, p, n), _rows(values, p, n), mask.mask, softcap,
                      dtype, False).reshape(b, n, p + t, h, hd)
  return jnp.concatenate([out[:, 0, :p], out[:, :, p:].reshape(b, n * t, h, hd)], axis=1)


def dot_attention(q: Array, keys: Array, values: Array, mask: Array | SegmentMask,
                  softcap: float | None, dtype: Any, cached: bool) -> Array:
  """Softmax attention -> [B, T, H, Hd]. q [B, T, H, Hd] (rotated, scaled), keys [B, S, K, Hd],
  mask [B, T, S] (or a `SegmentMask`); values [B, S, K, Hd], or [B, K, Hd, S] if `cached`
  (`init_cache`'s layout)."""
  if isinstance(mask, SegmentMask):
    return _segment_attention(q, keys, values, mask, softcap, dtype)
  b, t, h, hd = q.shape
  k = keys.shape[2]
  q = q.reshape(b, t, k, h // k, hd)
  logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, keys, preferred_element_type=jnp.float32)
  if softcap:
    logits = jnp.tanh(logits / softcap) * softcap
  logits = jnp.where(mask[:, None, None], logits, K_MASK)
  probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
  pv = "BKGTS,BKHS->BTKGH" if cached else "BKGTS,BSKH->BTKGH"
  return _einsum(pv, probs, values, dtype).reshape(b, t, h, hd)


def first_argmax(logits: Array) -> Array:
  """`argmax(logits [..., V], -1)` as int32 (the first maximum), from two plain reductions.

  XLA:CPU runs argmax as a scalar (value, index) reduction: 2.4 ms at [64, 16384], against
  0.5 ms for a max and a min over the indices that reach it (vectorised).
  """
  v = logits.shape[-1]
  top = jnp.max(logits, axis=-1, keepdims=True)
  first = jnp.min(jnp.where(logits == top, jnp.arange(v, dtype=jnp.int32), v), axis=-1)
  return jnp.minimum(first, v - 1)        # NaN rows: unspecified (XLA:CPU's max skips NaNs)


def token_logprob(logits: Array, tokens: Array) -> Array:
  """log softmax(logits [R, V])[tokens [R]] in f32, without materialising the [R, V] log-probs."""
  picked = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
  return picked - jax.nn.logsumexp(logits, axis=-1)


class Attention(nn.Module):
  """layer_type LOCAL or GLOBAL; None in a scanned stack of both kinds, where the call's traced
  `is_local` picks the RoPE table and the window (the same values as the static choice)."""

  config: GemmaConfig
  layer_type: str | None
  backend: Backend = XLA

  @nn.compact
  def __call__(self, x: Array, positions: Array, kv_ctx: "KVContext",
               is_local: Array | None = None,
               rope: "RopeTables | None" = None) -> tuple[Array, Cache | None]:
    cfg = self.config
    d, h, k, hd = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    w_q = self.param("q_einsum", nn.with_logical_partitioning(
        _dense_init(), ("embed", "q_heads", "head_dim")), (d, h, hd), cfg.param_dtype)
    w_kv = self.param("kv_einsum", nn.with_logical_partitioning(
        _dense_init(), ("embed", None, "kv_heads", "head_dim")), (d, 2, k, hd), cfg.param_dtype)
    w_o = self.param("attn_vec_einsum", nn.with_logical_partitioning(
        _dense_init(), ("q_heads", "head_dim", "embed")), (h, hd, d), cfg.param_dtype)

    x = x.astype(cfg.dtype)
    q = self.backend.dense(self, "q_einsum", "BTD,DNH->BTNH", x, w_q, cfg.dtype)
    kv = self.backend.dense(self, "kv_einsum", "BTD,DCKH->BTCKH", x, w_kv, cfg.dtype)
    key, value = kv[:, :, 0], kv[:, :, 1]
    if cfg.use_qk_norm:
      q = RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, "head_dim", name="query_norm")(q)
      key = RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, "head_dim", name="key_norm")(key)

    if rope is None:
      rope = rope_tables(cfg, positions)
    if self.layer_type is None:
      cos, sin = (jnp.where(is_local, a, b) for a, b in zip(rope[LOCAL], rope[GLOBAL]))
      window = jnp.where(is_local, cfg.sliding_window or 0, jnp.iinfo(jnp.int32).max)
    elif self.layer_type == LOCAL:
      (cos, sin), window = rope[LOCAL], cfg.sliding_window
    else:
      (cos, sin), window = rope[GLOBAL], None
    if kv_ctx.segments is None:
      mask = attention_mask(positions, kv_ctx.k_pos, kv_ctx.k_valid, window)   # [B, T, S]
    else:
      mask = SegmentMask.build(positions, kv_ctx.k_valid, window, *kv_ctx.segments)
    out, new_cache = self.backend.attention(q, key, value, (cos, sin), cfg.query_scale, kv_ctx,
                                            mask, cfg.attn_logit_softcap, cfg.dtype)
    out = self.backend.dense(self, "attn_vec_einsum", "BTNH,NHD->BTD", out, w_o, cfg.dtype)
    return out, new_cache


class MLP(nn.Module):
  """GeGLU: `linear(gelu_tanh(x W_gate) * (x W_up))` with gate and up fused in one matmul."""

  config: GemmaConfig
  backend: Backend = XLA

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    w_gu = self.param("gating_einsum", nn.with_logical_partitioning(
        _dense_init(), ("embed", None, "mlp")), (cfg.embed_dim, 2, cfg.hidden_dim), cfg.param_dtype)
    w_down = self.param("linear", nn.with_logical_partitioning(
        _dense_init(), ("mlp", "embed")), (cfg.hidden_dim, cfg.embed_dim), cfg.param_dtype)
    hidden = self.backend.geglu(self, "gating_einsum", x, w_gu, cfg.dtype)
    hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
    return self.backend.dense(self, "linear", "BTF,FD->BTD", hidden, w_down, cfg.dtype)


class Block(nn.Module):
  config: GemmaConfig
  layer_type: str | None      # None: traced `is_local` (see `Attention`)
  backend: Backend = XLA

  @nn.compact
  def __call__(self, x: Array, positions: Array, kv_ctx: "KVContext",
               is_local: Array | None = None, rope: "RopeTables | None" = None):
    cfg = self.config
    norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, name=name)  # noqa: E731
    h = norm("pre_attention_norm")(x)
    h, new_cache = Attention(cfg, self.layer_type, self.backend, name="attn")(
        h, positions, kv_ctx, is_local, rope)
    if cfg.use_post_norms:
      h = norm("post_attention_norm")(h)
    x = x + h
    h = norm("pre_ffw_norm")(x)
    h = MLP(cfg, self.backend, name="mlp")(h)
    if cfg.use_post_norms:
      h = norm("post_ffw_norm")(h)
    x = nn.with_logical_constraint(x + h, ("batch", "length", "embed"))
    return x, new_cache


@flax.struct.dataclass
class KVContext:
  """Keys a layer attends to: the current tokens (no cache) or the KV cache after a write.

  k_pos, k_valid: [B, S] positions and realness of the keys (shared by all layers).
  layer_cache: this layer's {'k', 'v'} [B, S, K, Hd] or None; index: first slot to write.
  segments: (P, N) for rows [x; y_1; ...; y_N] (`Gemma`'s `segments`), or None.
  """

  k_pos: Array
  k_valid: Array
  layer_cache: Cache | None = None
  index: Array | None = None
  segments: tuple[int, int] | None = flax.struct.field(pytree_node=False, default=None)

  def update(self, key: Array, value: Array):
    """Writes key/value [B, T, K, Hd] at `index`; returns the keys [B, S, K, Hd], values, cache.

    Without a cache the values come back as given; with one, as stored: [B, K, Hd, S].
    """
    if self.layer_cache is None:
      return key, value, None
    k = _write(self.layer_cache["k"], key, (0, self.index, 0, 0))
    v = _write(self.layer_cache["v"], value.transpose(0, 2, 3, 1), (0, 0, 0, self.index))
    new_cache = {"k": k, "v": v}
    return _read(k, key.dtype), _read(v, value.dtype), new_cache


# bf16 caches are stored as their uint16 bits. XLA:CPU has no bf16 dynamic-update-slice: it
# upcasts the whole buffer to f32 and back, i.e. copies the entire KV cache (4 passes over it) at
# every decode step. On uint16 the write is native and in place. The read's bitcast to bf16 is
# free on TPU/GPU; XLA:CPU still materialises it (one pass) because its dot fusions cannot absorb
# it. Values are stored transposed because XLA:CPU otherwise transposes them at every step.
def _storage_dtype(dtype) -> Any:
  return jnp.uint16 if jnp.dtype(dtype) == jnp.bfloat16 else jnp.dtype(dtype)


def _write(buffer: Array, update: Array, start) -> Array:
  if buffer.dtype == jnp.uint16:
    update = jax.lax.bitcast_convert_type(update.astype(jnp.bfloat16), jnp.uint16)
  return jax.lax.dynamic_update_slice(buffer, update.astype(buffer.dtype), start)


def _read(buffer: Array, dtype) -> Array:
  if buffer.dtype == jnp.uint16:
    buffer = jax.lax.bitcast_convert_type(buffer, jnp.bfloat16)
  return buffer.astype(dtype)


def init_cache(config: GemmaConfig, batch_size: int, cache_len: int, dtype=None) -> Cache:
  """Empty KV cache: per layer keys [B, S, K, Hd] and values TRANSPOSED [B, K, Hd, S] (so a
  decode step's probs @ values reads them without a per-step transpose), key positions and
  validity [B, S], and the write index. `dtype` (default `config.dtype`) is the cache precision;
  bf16 is held as uint16 bits (see `_storage_dtype`)."""
  dtype = dtype or config.dtype
  storage = _storage_dtype(dtype)
  k_shape = (batch_size, cache_len, config.num_kv_heads, config.head_dim)
  v_shape = (batch_size, config.num_kv_heads, config.head_dim, cache_len)
  return {
      "layers": [{"k": jnp.zeros(k_shape, storage), "v": jnp.zeros(v_shape, storage)}
                 for _ in range(config.num_layers)],
      "positions": jnp.zeros((batch_size, cache_len), jnp.int32),
      "valid": jnp.zeros((batch_size, cache_len), jnp.bool_),
      "index": jnp.zeros((), jnp.int32),
  }


def default_positions(attention_mask: Array) -> Array:
  """Positions of a left-padded batch: 0 at the first real token (HF `generate` convention)."""
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


class Gemma(nn.Module):
  """Gemma decoder. `apply({'params': p}, tokens [B, T]) -> logits [B, T, V]` in f32.

  attention_mask [B, T]: 1 on real tokens (left padding allowed); positions [B, T] default to
  `default_positions(attention_mask)`. With `cache=` (from `init_cache`), the tokens are
  written at `cache['index']` and `(logits, new_cache)` is returned.

  segments=(P, N) (no cache): each row is a prefix of P tokens then N segments of (T - P) / N,
  e.g. a prompt and N completions [x; y_1; ...; y_N]. Each segment attends to the prefix and to
  itself only, so y_n sees what it sees in the row [x; y_n] (pass positions continuing the
  prefix's in each segment); the prefix runs through the layers once instead of N times.

  backend: how the matmuls and attention run (`Backend`); default plain XLA ops. Pass the
  backend's own variables too: `apply({"params": p, **backend.prepare(p)}, ...)`.
  """

  config: GemmaConfig
  backend: Backend = XLA

  @nn.compact
  def __call__(self, tokens: Array, positions: Array | None = None,
               attention_mask: Array | None = None, cache: Cache | None = None,
               return_hidden: bool = False, segments: tuple[int, int] | None = None):
    cfg = self.config
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
    if segments is not None:
      p, n = segments = tuple(int(v) for v in segments)
      if cache is not None or p < 1 or n < 1 or (tokens.shape[1] - p) % n or tokens.shape[1] <= p:
        raise ValueError(f"segments=(P, N) needs no cache, P >= 1, N >= 1 and T - P > 0 a "
                         f"multiple of N; got {segments} for T = {tokens.shape[1]}"
                         f"{' with a cache' if cache is not None else ''}")
    if attention_mask is None:
      attention_mask = jnp.ones(tokens.shape, jnp.bool_)
    attention_mask = attention_mask.astype(jnp.bool_)
    if positions is None:
      positions = default_positions(attention_mask)
    positions = positions.astype(jnp.int32)

    embedding = self.param("input_embedding", nn.with_logical_partitioning(
        _dense_init(), ("vocab", "embed")),
        (cfg.vocab_size, cfg.embed_dim), cfg.param_dtype)
    x = self.backend.embed(embedding, tokens).astype(cfg.dtype)
    x = x * jnp.asarray(cfg.embed_dim ** 0.5, cfg.dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    if cache is None:
      k_pos, k_valid, index = positions, attention_mask, None
    else:
      index = cache["index"]
      k_pos = jax.lax.dynamic_update_slice(cache["positions"], positions, (0, index))
      k_valid = jax.lax.dynamic_update_slice(cache["valid"], attention_mask, (0, index))

    rope = rope_tables(cfg, positions)   # once per call, not per layer
    new_layers = []
    if cache is None and cfg.scan_layers and cfg.num_layers > 1 and not self.is_initializing():
      x = self._scanned_layers(x, positions, KVContext(k_pos, k_valid, segments=segments),
                               rope)
    else:
      block_cls = nn.remat(Block) if cfg.remat else Block
      for i in range(cfg.num_layers):
        layer_cache = None if cache is None else cache["layers"][i]
        ctx = KVContext(k_pos, k_valid, layer_cache, index, segments)
        if self.is_initializing():
          x, layer_new = block_cls(cfg, cfg.layer_type(i), self.backend, name=f"layer_{i}")(
              x, positions, ctx, None, rope)
        else:   # one trace per layer type, not per layer (XLA inlines the calls)
          x, layer_new = _layer_fn(cfg, cfg.layer_type(i), self.backend)(
              self._layer_variables(i), x, positions, ctx, rope)
        new_layers.append(layer_new)
    x = RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, name="final_norm")(x)
    if return_hidden:
      out = x
    else:
      out = self.backend.logits(self, x, embedding, cfg.dtype)
      if cfg.final_logit_softcap:
        out = jnp.tanh(out / cfg.final_logit_softcap) * cfg.final_logit_softcap
    if cache is None:
      return out
    new_cache = {"layers": new_layers, "positions": k_pos, "valid": k_valid,
                 "index": index + tokens.shape[1]}
    return out, new_cache


  def _scanned_layers(self, x: Array, positions: Array, ctx: KVContext,
                      rope: "RopeTables") -> Array:
    """The layer stack as one `lax.scan` over the layers' variables stacked on a leading axis.

    Same computation as the unrolled loop: each layer's variables (every collection the caller
    passed, e.g. "params") are its own, and its type reaches the body as a traced flag when the
    stack mixes LOCAL and GLOBAL layers. Stacking copies the layer weights once per pass; the
    gradient flows back to the per-layer params through it (`scan_stack`).
    """
    cfg = self.config
    per_layer = [self._layer_variables(i) for i in range(cfg.num_layers)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
    types = {cfg.layer_type(i) for i in range(cfg.num_layers)}
    layer_type = types.pop() if len(types) == 1 else None
    is_local = jnp.asarray([cfg.layer_type(i) == LOCAL for i in range(cfg.num_layers)])
    apply = _layer_fn(cfg.replace(remat=False), layer_type, self.backend)
    layer = lambda h, variables, local, consts: apply(variables, h, *consts, local)[0]  # noqa: E731
    policy = (jax.checkpoint_policies.nothing_saveable if cfg.remat
              else jax.checkpoint_policies.dots_saveable)
    return scan_stack(jax.checkpoint(layer, policy=policy), x, stacked, is_local,
                       (positions, ctx, rope))
  def _layer_variables(self, i: int) -> dict[str, Any]:
    """Layer i's variables, every collection the caller passed (params, a backend's own)."""
    name = f"layer_{i}"
    return {col: nn.meta.unbox(tree[name]) for col, tree in self.variables.items() if name in tree}



def _bits(a: Array) -> Array:
  return jax.lax.bitcast_convert_type(a, jnp.uint16) if a.dtype == jnp.bfloat16 else a


def _unbits(a: Array, dtype) -> Array:
  return jax.lax.bitcast_convert_type(a, jnp.bfloat16) if dtype == jnp.bfloat16 else a


def scan_stack(layer, x: Array, stacked: Any, flags: Array, consts: Any) -> Array:
  """`x = layer(x, stacked[i], flags[i], consts)` for each i, as one `lax.scan`.

  Differentiable in x and `stacked` (flags and consts are not), through a custom VJP: the forward
  scan keeps each layer's VJP residuals stacked on a leading axis, the backward scan runs their
  pullbacks in reverse. Residuals and weight gradients are stacked as uint16 bits where they are
  bf16: XLA:CPU has no bf16 dynamic-update-slice, and writing one layer's slice converted the
  whole bf16 stack to f32 and back at every layer (a scanned fwd+bwd ran at 0.66x the unrolled
  one; with bits it runs at parity). On TPU the bitcasts are free.
  """
  meta = {}

  def call(h, w, flag):
    return layer(h, w, flag, consts)

  @jax.custom_vjp
  def run(x, stacked):
    return jax.lax.scan(lambda h, xs: (call(h, *xs), None), x, (stacked, flags))[0]

  def fwd(x, stacked):
    def body(h, xs):
      w, flag = xs
      y, pullback = jax.vjp(lambda h, w: call(h, w, flag), h, w)
      leaves, meta["pullback"] = jax.tree.flatten(pullback)
      meta["dtypes"] = [leaf.dtype for leaf in leaves]
      return y, [_bits(leaf) for leaf in leaves]

    meta["weights"] = jax.tree.map(lambda w: w.dtype, stacked)
    return jax.lax.scan(body, x, (stacked, flags))

  def bwd(residuals, g):
    def body(gh, r):
      pullback = jax.tree.unflatten(
          meta["pullback"], [_unbits(leaf, d) for leaf, d in zip(r, meta["dtypes"])])
      gh, gw = pullback(gh)
      return gh, jax.tree.map(_bits, gw)

    gx, gw = jax.lax.scan(body, g, residuals, reverse=True)
    return gx, jax.tree.map(_unbits, gw, meta["weights"])

  run.defvjp(fwd, bwd)
  return run(x, stacked)


def _layer_fn(config: GemmaConfig, layer_type: str | None, backend: Backend):
  """`Block.apply` as one jitted function per (config, layer type, backend, Flax axis rules).

  Inside a trace, calling the same jitted function with the same shapes reuses its jaxpr: a
  model call traces one layer of each type instead of every layer (tracing the unrolled stack
  was most of a warm start's time). XLA inlines the calls, so the compiled program is the same.
  The logical axis rules in force are part of the key: the layer's sharding constraints read them
  at trace time.
  """
  return _jitted_layer(config, layer_type, backend, _hashable(nn.get_logical_axis_rules()))


def _hashable(x):
  return tuple(_hashable(y) for y in x) if isinstance(x, (list, tuple)) else x


@functools.lru_cache(maxsize=None)
def _jitted_layer(config: GemmaConfig, layer_type: str | None, backend: Backend, rules):
  del rules   # a cache key only
  block = Block(config, layer_type, backend, parent=None)

  def apply(variables, x, positions, ctx, rope=None, is_local=None):
    return block.apply(variables, x, positions, ctx, is_local, rope)

  if config.remat:
    apply = jax.checkpoint(apply)
  return jax.jit(apply)


def init_params(config: GemmaConfig, rng: Array, batch_shape: Sequence[int] = (1, 4)):
  """Random params (unboxed), for tests and toy tasks.

  `lazy_init`: the initializers run as `init` runs them (the same values, bit for bit), without
  the forward pass, whose ops would each compile on their own (seconds per process).
  """
  params = Gemma(config).lazy_init(rng, jax.ShapeDtypeStruct(tuple(batch_shape), jnp.int32))
  return nn.meta.unbox(params["params"])


def param_shapes(config: GemmaConfig):
  """Abstract param shapes via `jax.eval_shape` (no allocation)."""
  return jax.eval_shape(lambda r: init_params(config, r), jax.random.key(0))


def count_params(config: GemmaConfig) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(param_shapes(config)))


def logical_axes(config: GemmaConfig):
  """Pytree of logical axis-name tuples matching the params (for `bond.sharding`)."""
  return param_shapes_and_axes(config)[1]


def param_shapes_and_axes(config: GemmaConfig):
  """(param shapes, their logical axes) from one abstract init (no allocation)."""
  boxed = jax.eval_shape(lambda r: Gemma(config).init(r, jnp.zeros((1, 4), jnp.int32))["params"],
                         jax.random.key(0))
  return nn.unbox(boxed), nn.get_partition_spec(boxed)
