"""Teacher-forced log-probs over a large vocabulary, chunk by chunk: no [rows, V] gradient.

`Gemma.apply` returns f32 logits [B, T, V]; with Gemma 3's V = 262,144 those (and their
gradient) dwarf the rest of a small model's activations. Here log p(y) = cap(logit_y) − lse:
the target's logit is one gathered row per position (`target_logits`, plain autodiff), and the
logsumexp runs over chunks of the tied embedding [V, D] (`chunked_logsumexp`): the forward
streams a running max and sum, the backward (a `jax.custom_vjp`) takes each chunk's logits and
accumulates d_hidden and the chunk's rows of d_embedding. Without gradients the largest array is
[rows, C]. Under autodiff the backward recomputes each chunk's logits, or, where the [rows, V]
f32 logits fit a budget (`keeps_logits`; the training step's `model.logprob_keep_mb`), reads the
ones the forward kept: one vocabulary matmul fewer (of three; of two with a frozen embedding,
whose gradient XLA drops), the same gradients bit for bit.

Numerics follow the model's `Backend.logits` and `objectives.token_log_probs`: `dtype` x `dtype`
matmuls accumulated in f32, the final soft-cap tanh(l / c) · c and the log-probs in f32. The
backward feeds d_logits to its matmuls in `dtype` (the full path's autodiff keeps them f32, which
XLA:CPU runs as f32 dots); against an f32 computation both are equally close
(tests/test_logprobs.py).

Shapes: N rows (scored positions), D model dim, V vocab, C chunk size.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from bond.models import gemma

Array = jax.Array
Params = Any

# Vocabulary chunk: [N, C] f32 logits per step. Measured (benchmarks/logprobs.py, XLA:CPU on 2
# shared cores, value_and_grad): Gemma 3 270M, 336 rows, process CPU s per step 3.99 / 3.92 /
# 3.98 for C = 4096 / 8192 / 16384; gemma3_35m (V = 16,384), 2304 rows, 5.01 / 4.37 / 4.53. The
# matmuls dominate; smaller chunks add per-step overhead, larger ones only grow the temporaries.
# A vocabulary no larger than this is one chunk.
DEFAULT_CHUNK_SIZE = 8192
# The training step's default budget (config key `model.logprob_keep_mb`) for the f32 logits
# [N, V] that the forward keeps for the backward instead of recomputing them: one vocabulary
# matmul of three (two with a frozen embedding) fewer. Gemma 3 270M, 1024 MiB: up to 1024 rows.
DEFAULT_KEEP_LOGITS_MB = 1024


def _cap(logits: Array, softcap: float | None) -> tuple[Array, Array | None]:
  """(tanh(l / c) · c, tanh(l / c)), or (l, None) uncapped; f32."""
  if softcap is None:
    return logits, None
  t = jnp.tanh(logits / softcap)
  return t * softcap, t


def _chunk_raw_logits(hidden: Array, emb: Array, dtype: Any) -> Array:
  """Uncapped logits [N, C] f32 of hidden [N, D] against emb [C, D]."""
  return jnp.einsum("ND,CD->NC", hidden.astype(dtype), emb.astype(dtype),
                    preferred_element_type=jnp.float32)


def _materialised_transpose(x: Array) -> Array:
  """x.T [C, N] laid out row-major. XLA:CPU folds a plain transpose into the next dot, and a dot
  contracting its lhs's leading dim falls back to an f32 Eigen dot, about 3x slower than the
  bf16 one on the materialised transpose. Elsewhere the barrier only costs the copy."""
  rows, cols = x.shape
  return jax.lax.optimization_barrier(x.T.reshape(-1)).reshape(cols, rows)


def _scan_chunks(step, carry, embedding: Array, chunk_size: int, saved=(None, None)):
  """carry, out = step(carry, start, embedding[start:start + size], saved chunk) over the vocab
  chunks in order; the last chunk is shorter when chunk_size does not divide V (no padding, no
  copy of E). saved and the returned outs are (the full chunks' [full, ...] stacked, the short
  last chunk's), either None."""
  vocab = embedding.shape[0]
  full, rest = vocab // chunk_size, vocab % chunk_size
  saved_full, saved_rest = saved
  out_full = out_rest = None
  if full == 1:
    carry, out = step(carry, 0, embedding[:chunk_size],
                      None if saved_full is None else saved_full[0])
    out_full = None if out is None else out[None]
  elif full:
    # A bf16 table is sliced as its uint16 bits: XLA:CPU has no bf16 dynamic-slice, and converted
    # the whole table to f32 (hoisted out of the loop: 671 MB for Gemma 3's) to slice it.
    bits = embedding.dtype == jnp.bfloat16
    table = jax.lax.bitcast_convert_type(embedding, jnp.uint16) if bits else embedding

    def body(carry, xs):
      i, saved_chunk = xs
      start = i * chunk_size
      emb = jax.lax.dynamic_slice_in_dim(table, start, chunk_size)
      emb = jax.lax.bitcast_convert_type(emb, jnp.bfloat16) if bits else emb
      return step(carry, start, emb, saved_chunk)
    carry, out_full = jax.lax.scan(body, carry, (jnp.arange(full), saved_full))
  if rest:
    start = full * chunk_size
    carry, out_rest = step(carry, start, embedding[start:], saved_rest)
  return carry, (out_full, out_rest)


def _logsumexp(hidden, embedding, softcap, dtype, chunk_size, keep=False):
  """([N] f32 logsumexp of the capped logits, streamed: running max m and Σ exp(l − m); with
  keep, each chunk's uncapped f32 logits as `_scan_chunks` returns outs, else (None, None))."""
  def step(carry, start, emb, saved):
    del start, saved
    m, s = carry
    raw = _chunk_raw_logits(hidden, emb, dtype)
    logits, _ = _cap(raw, softcap)
    m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
    s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[:, None]), axis=-1)
    return (m_new, s), raw if keep else None

  n = hidden.shape[0]
  init = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32))
  (m, s), kept = _scan_chunks(step, init, embedding, chunk_size)
  return m + jnp.log(s), kept


def keeps_logits(rows: int, vocab: int, keep_mb: float) -> bool:
  """Whether the backward reads the forward's logits (rows x vocab f32 within keep_mb MiB)
  instead of recomputing them."""
  return rows * vocab * 4 <= keep_mb * 2**20


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def chunked_logsumexp(hidden: Array, embedding: Array, softcap: float | None, dtype: Any,
                      chunk_size: int, keep: bool = False) -> Array:
  """logsumexp_v cap(hidden @ embedding.T)[:, v]: hidden [N, D], embedding [V, D] -> [N] f32.

  Vocab chunks of chunk_size (static; the last one shorter if it does not divide V, one chunk
  if it is >= V). The backward recomputes each chunk's logits, or with keep (static) reads the
  ones the forward kept: one vocabulary matmul fewer at the cost of an [N, V] f32 residual
  (`keeps_logits`; the same gradients, tests/test_logprobs.py).
  """
  return _logsumexp(hidden, embedding, softcap, dtype, chunk_size)[0]


def _logsumexp_fwd(hidden, embedding, softcap, dtype, chunk_size, keep):
  lse, kept = _logsumexp(hidden, embedding, softcap, dtype, chunk_size, keep)
  return lse, (hidden, embedding, lse, kept)


def _logsumexp_bwd(softcap, dtype, chunk_size, keep, residuals, g):
  """d_logits = g · softmax through the cap's 1 − tanh²; d_hidden += d_logits @ E_chunk and
  d_embedding[chunk] = d_logits.T @ hidden, chunk by chunk, in `dtype` with f32 accumulation."""
  del keep
  hidden, embedding, lse, kept = residuals
  g = g.astype(jnp.float32)
  h = hidden.astype(dtype)

  def step(carry, start, emb, raw):
    d_hidden, d_embedding = carry
    if raw is None:
      raw = _chunk_raw_logits(hidden, emb, dtype)
    logits, t = _cap(raw, softcap)
    d_logits = g[:, None] * jnp.exp(logits - lse[:, None])
    if t is not None:
      d_logits = d_logits * (1.0 - t * t)
    d_logits = d_logits.astype(dtype)
    d_hidden = d_hidden + jnp.einsum("NC,CD->ND", d_logits, emb.astype(dtype),
                                     preferred_element_type=jnp.float32)
    d_emb = jnp.einsum("CN,ND->CD", _materialised_transpose(d_logits), h,
                       preferred_element_type=jnp.float32)
    d_embedding = jax.lax.dynamic_update_slice_in_dim(
        d_embedding, d_emb.astype(embedding.dtype), start, 0)
    return (d_hidden, d_embedding), None

  init = (jnp.zeros(hidden.shape, jnp.float32), jnp.zeros(embedding.shape, embedding.dtype))
  (d_hidden, d_embedding), _ = _scan_chunks(step, init, embedding, chunk_size, kept)
  return d_hidden.astype(hidden.dtype), d_embedding


chunked_logsumexp.defvjp(_logsumexp_fwd, _logsumexp_bwd)


def target_logits(hidden: Array, embedding: Array, targets: Array, softcap: float | None,
                  dtype: Any) -> Array:
  """cap(hidden[n] · embedding[targets[n]]) [N] f32: the full logits' products (exact in f32 for
  bf16 inputs), summed in f32. Rows are gathered as `Gemma` gathers them (a bf16 table as bits)."""
  rows = gemma._take_rows(embedding, targets).astype(dtype).astype(jnp.float32)
  raw = jnp.sum(hidden.astype(dtype).astype(jnp.float32) * rows, axis=-1)
  return _cap(raw, softcap)[0]


def token_log_probs_chunked(hidden: Array, embedding: Array, targets: Array, *,
                            softcap: float | None = None, dtype: Any = None,
                            chunk_size: int | None = None,
                            keep_logits_mb: float = 0) -> Array:
  """log softmax(cap(hidden @ embedding.T))[targets]: hidden [N, D], embedding [V, D], targets
  [N] int in [0, V) -> [N] f32, over vocab chunks of `chunk_size` (default `DEFAULT_CHUNK_SIZE`).

  Matmuls in `dtype` (default hidden's) accumulated in f32; cap(l) = tanh(l / softcap) · softcap
  in f32 (None or 0: no cap). The target's logit minus `chunked_logsumexp`; differentiable in
  hidden and embedding. Without gradients it never holds [N, V]; under autodiff the forward
  keeps its f32 logits for the backward where they fit in keep_logits_mb MiB (`keeps_logits`),
  else the backward recomputes them chunk by chunk.
  """
  if hidden.ndim != 2 or embedding.ndim != 2 or hidden.shape[1] != embedding.shape[1]:
    raise ValueError(f"hidden must be [N, D] and embedding [V, D], got {hidden.shape} and "
                     f"{embedding.shape}")
  if targets.shape != hidden.shape[:1]:
    raise ValueError(f"targets must be [N] = {hidden.shape[:1]}, got {targets.shape}")
  chunk_size = int(chunk_size or DEFAULT_CHUNK_SIZE)
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  if keep_logits_mb < 0:
    raise ValueError(f"keep_logits_mb must be >= 0, got {keep_logits_mb}")
  softcap = float(softcap) if softcap else None
  dtype = jnp.dtype(dtype or hidden.dtype)
  keep = keeps_logits(hidden.shape[0], embedding.shape[0], keep_logits_mb)
  lse = chunked_logsumexp(hidden, embedding, softcap, dtype, min(chunk_size, embedding.shape[0]),
                          keep)
  return target_logits(hidden, embedding, targets, softcap, dtype) - lse


def completion_log_probs(model_config: gemma.GemmaConfig, params: Params, prompt_tokens: Array,
                         prompt_mask: Array, tokens: Array, mask: Array, *,
                         chunk_size: int | None = None, share_prompt: bool = True,
                         keep_logits_mb: float = 0) -> Array:
  """log π(y|x) summed over the completion mask: tokens, mask [B, N, T] -> [B, N].

  `bond.rollout.completion_log_probs` without the [B·N, P+T, V] logits: one teacher-forced pass
  to the final hidden states, then the vocab projection at the T completion positions only,
  chunked (`token_log_probs_chunked`; keep_logits_mb: its backward's residual budget). Masked
  positions contribute 0 (even NaN ones).
  Differentiable in params; the tied embedding gets both the lookup's and the projection's part.

  share_prompt (N > 1): run the B rows [x; y_1; ...; y_N] (`packed_rows`, `Gemma`'s
  `segments`: each y_n attends to its prompt and itself) instead of the B·N rows [x; y_n]. The
  same log-probs, with each prompt through the layers once instead of N times: fewer token rows,
  and no attention between the completions.
  """
  b, n, t = tokens.shape
  p = prompt_tokens.shape[1]
  if share_prompt and n > 1:
    seq, positions, seq_mask, at = packed_rows(prompt_tokens, prompt_mask, tokens, mask)
    hidden = gemma.Gemma(model_config).apply(
        {"params": params}, seq, positions, seq_mask, return_hidden=True, segments=(p, n))
    hidden = hidden[:, at].reshape(b * n * t, -1)
  else:
    seq, seq_mask = _sequences(prompt_tokens, prompt_mask, tokens, mask)
    hidden = gemma.Gemma(model_config).apply({"params": params}, seq, attention_mask=seq_mask,
                                             return_hidden=True)
    # The hidden state at position P-1+i predicts completion token i.
    hidden = hidden[:, p - 1:-1].reshape(b * n * t, -1)
  valid = mask.reshape(-1).astype(jnp.bool_)
  targets = jnp.where(valid, tokens.reshape(-1), 0)
  lp = token_log_probs_chunked(hidden, params["input_embedding"], targets,
                               softcap=model_config.final_logit_softcap,
                               dtype=model_config.dtype, chunk_size=chunk_size,
                               keep_logits_mb=keep_logits_mb)
  return jnp.sum(jnp.where(valid, lp, 0.0).reshape(b, n, t), axis=-1)


def packed_rows(prompt_tokens: Array, prompt_mask: Array, tokens: Array, mask: Array):
  """Each prompt once with its N completions behind it: the B rows [x; y_1; ...; y_N].

  -> (tokens [B, P+N·T], positions, mask, `at` [N·T]): y_n's positions continue its prompt's as
  in the row [x; y_n] (`default_positions`), and `hidden[:, at]` are the hidden states that
  predict y's tokens, sample-major (the prompt's last one for each y_n's first token). For
  `Gemma.apply(..., segments=(P, N))`.
  """
  b, n, t = tokens.shape
  p = prompt_tokens.shape[1]
  if p < 1:
    raise ValueError("completion_log_probs needs at least one prompt position (P >= 1)")
  prompt_mask = prompt_mask.astype(jnp.bool_)
  mask = mask.astype(jnp.bool_)
  prompt_len = jnp.sum(prompt_mask.astype(jnp.int32), axis=-1)
  y_pos = jnp.maximum(prompt_len[:, None, None] + jnp.cumsum(mask.astype(jnp.int32), -1) - 1, 0)
  seq = jnp.concatenate([prompt_tokens, tokens.reshape(b, n * t)], axis=1)
  positions = jnp.concatenate([gemma.default_positions(prompt_mask), y_pos.reshape(b, n * t)], 1)
  seq_mask = jnp.concatenate([prompt_mask, mask.reshape(b, n * t)], axis=1)
  starts = p + t * jnp.arange(n)[:, None]                       # y_n's first slot
  at = jnp.where(jnp.arange(t) == 0, p - 1, starts + jnp.arange(t) - 1).reshape(n * t)
  return seq, positions, seq_mask, at


def _sequences(prompt_tokens: Array, prompt_mask: Array, tokens: Array, mask: Array):
  """The B·N teacher-forced rows [x; y] and their mask [B·N, P+T]; each prompt repeated N times,
  sample-minor."""
  b, n, t = tokens.shape
  if prompt_tokens.shape[1] < 1:
    raise ValueError("completion_log_probs needs at least one prompt position (P >= 1)")
  rows = lambda x: jnp.repeat(x, n, axis=0)  # noqa: E731  [B, P] -> [B*N, P]
  seq = jnp.concatenate([rows(prompt_tokens), tokens.reshape(b * n, t)], axis=1)
  seq_mask = jnp.concatenate([rows(prompt_mask), mask.reshape(b * n, t)], axis=1).astype(jnp.bool_)
  return seq, seq_mask


def completion_log_probs_full(model_config: gemma.GemmaConfig, params: Params,
                              prompt_tokens: Array, prompt_mask: Array, tokens: Array,
                              mask: Array) -> Array:
  """`completion_log_probs` through the model's full f32 logits [B·N, P+T, V] (`Gemma.apply`):
  the reference the chunked path is tested and benchmarked against."""
  from bond import objectives
  b, n, t = tokens.shape
  p = prompt_tokens.shape[1]
  seq, seq_mask = _sequences(prompt_tokens, prompt_mask, tokens, mask)
  logits = gemma.Gemma(model_config).apply({"params": params}, seq, attention_mask=seq_mask)
  # logits at position P-1+i predict completion token i.
  lp = objectives.sequence_log_probs(logits[:, p - 1:-1], tokens.reshape(b * n, t),
                                     mask.reshape(b * n, t))
  return lp.reshape(b, n)
