"""Sampling from a Gemma decoder: one prefill, then a `lax.while_loop` decode over a KV cache.

`sample` draws `N` completions of `T <= max_new_tokens` tokens for each of `B` left-padded prompts:

  1. prefill: the first `P - 1` prompt tokens of the `B` prompts go through the model once, into
     a preallocated cache of `P - 1 + T` slots (`init_cache`);
  2. the prefilled cache is repeated to `R = B * N` rows (row `b * N + n` is sample `n` of prompt
     `b`), so a prompt is prefilled once however many samples it gets (and to `B * (N + F)` rows
     with `F` forced rows per prompt: given completions the same loop scores);
  3. one jitted `lax.while_loop` decodes all `R` rows together, one token per step, writing the
     cache in place, until every row has emitted an eos or `T` tokens exist.

Each step feeds the previous token (at step 0 the last prompt token), so no logits over the whole
prompt are ever materialised. Randomness is per row: the key of row (b, n) at step t is
`fold_in(fold_in(key_b, n), t)` with `key_b` the caller's key for prompt b (or `fold_in(rng, b)`),
so a row's sample never depends on the other rows. Log-probs are computed in f32.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from bond.models import backends, gemma

Array = jax.Array


class SampleOutput(NamedTuple):
  """Completions of `sample`: B prompts, N samples each, T = max_new_tokens.

  tokens: [B, N, T] int32, completion tokens; after eos they hold `config.pad_id`.
  mask: [B, N, T] bool, True on completion tokens up to and including the eos.
  logprobs: [B, N, T] f32, log pi(y_t | x, y_<t) under the model itself (no temperature, top-k
    or top-p): the quantity the objectives need. 0 where `mask` is False.
  sample_logprobs: [B, N, T] f32, log-prob of each token under the processed distribution it was
    drawn from (temperature, top-k, top-p applied); 0 for greedy decoding and where masked.
  forced_logprobs: [B, F, T] f32, log pi(y_t | x, y_<t) of the given `forced_tokens` (rows
    teacher-forced in the same decode loop), 0 where `forced_mask` is False; None without them.
  """

  tokens: Array
  mask: Array
  logprobs: Array
  sample_logprobs: Array
  forced_logprobs: Array | None = None


def process_logits(logits: Array, temperature: float, top_k: int = 0, top_p: float = 1.0) -> Array:
  """Logits [R, V] of the sampling distribution: `/ temperature`, then top-k, then top-p.

  Tokens outside the kept set get -inf. top-k keeps logits >= the k-th largest (ties kept);
  top-p (nucleus) keeps the smallest prefix of the tokens sorted by probability whose mass
  reaches `top_p` (the token that crosses `top_p` is kept), computed after top-k. Same order and
  rule as HF `generate` (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper).
  """
  logits = logits.astype(jnp.float32) / temperature
  v = logits.shape[-1]
  if top_k and top_k < v:
    top = jax.lax.top_k(logits, top_k)[0]                                 # [R, k] descending
    logits = jnp.where(logits < top[:, -1:], -jnp.inf, logits)
  else:
    top = None
  if top_p < 1.0:
    # Within top-k the k largest values are already sorted; otherwise sort the whole vocab.
    desc = top if top is not None else -jnp.sort(-logits, axis=-1)        # [R, k or V]
    probs = jax.nn.softmax(desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    num_kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)       # >= 1
    threshold = jnp.take_along_axis(desc, num_kept - 1, axis=-1)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


# `argmax(logits [R, V], -1)` as int32, the first maximum (vectorised on XLA:CPU).
greedy = gemma.first_argmax


def _inverse_cdf(u: Array, weights: Array) -> Array:
  """Index j [R] with cdf[j-1] <= u * total < cdf[j], for u [R] in [0, 1), weights [R, M] >= 0.

  The total is the last cdf entry itself, and u <= 1 - 2^-23 puts u * total strictly below it,
  so a zero-weight entry is never returned.
  """
  cdf = jnp.cumsum(weights, axis=-1)
  return jnp.sum(cdf <= u[:, None] * cdf[:, -1:], axis=-1).astype(jnp.int32)


def categorical(keys: Array, logits: Array, block: int = 128) -> tuple[Array, Array]:
  """Exact draws [R] from softmax(logits [R, V]) (one key per row) and their f32 log-probs [R].

  Inverse CDF in two levels: a block of `block` tokens with probability its mass, then a token
  within it with probability its share, i.e. p(block) * p(token | block) = p(token). It needs two
  uniforms per row (`jax.random.uniform(key, (2,))`) and two passes over the logits (the first
  fused with the block sums), where `jax.random.categorical` needs V Gumbel draws per row: much
  slower on CPU for large V.
  """
  return _categorical(jax.vmap(lambda k: jax.random.uniform(k, (2,)))(keys), logits, block)


def _categorical(u: Array, logits: Array, block: int = 128) -> tuple[Array, Array]:
  """`categorical` given each row's two uniforms u [R, 2] instead of its key."""
  r, v = logits.shape
  top = jnp.max(logits, axis=-1)                                          # [R], finite
  blocks = logits if v % block == 0 else jnp.pad(
      logits, ((0, 0), (0, -v % block)), constant_values=-jnp.inf)
  blocks = blocks.reshape(r, -1, block)                                   # [R, V/block, block]
  mass = jnp.sum(jnp.exp(blocks - top[:, None, None]), axis=-1)           # [R, V/block]
  chosen = _inverse_cdf(u[:, 0], mass)                                    # [R]
  in_block = jnp.take_along_axis(blocks, chosen[:, None, None], axis=1)[:, 0]
  tokens = chosen * block + _inverse_cdf(u[:, 1], jnp.exp(in_block - top[:, None]))
  picked = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
  return tokens, picked - top - jnp.log(jnp.sum(mass, axis=-1))


def prompt_keys(rng: Array, batch_size: int) -> Array:
  """Typed PRNG keys [B], one per prompt: `rng` itself if it is [B] keys, else fold_in(rng, b)."""
  if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.wrap_key_data(rng)
  if rng.shape == (batch_size,):
    return rng
  if rng.shape != ():
    raise ValueError(f"rng must be one key or one key per prompt [B={batch_size}], "
                     f"got key shape {rng.shape}")
  return jax.vmap(lambda b: jax.random.fold_in(rng, b))(jnp.arange(batch_size))


def _compute_params(config: gemma.GemmaConfig, params: Any, packed: Any = None) -> Any:
  """Matmul weights cast to the compute dtype once, outside the decode loop.

  `Gemma` casts each weight to `config.dtype` where it uses it; doing it here instead gives the
  same numbers (norm scales, the only 1-d params, stay as they are) without a per-step cast.
  The tied embedding stays as it is when `packed` (the backend's extra collections) holds it
  packed: the logits then read the packed copy, and a lookup of a few rows followed by the model's
  cast gives the cast table's rows, without a pass over the whole table.
  """
  keep_embedding = "input_embedding" in (packed or {}).get(backends.PACKED, {})
  return {k: v if k == "input_embedding" and keep_embedding else jax.tree.map(
      lambda w: w.astype(config.dtype) if w.ndim >= 2 else w, v) for k, v in params.items()}


def _prefill(config: gemma.GemmaConfig, params: Any, tokens: Array, mask: Array,
             positions: Array, cache: gemma.Cache, backend=gemma.XLA,
             packed: dict[str, Any] | None = None) -> gemma.Cache:
  """Writes tokens [B, P'] into the cache; the hidden states are not needed (no logits). Given
  the params only, a backend runs only its token lookup here; given its `packed` collections
  too, its matmuls (`backends.packed_prefill`)."""
  _, cache = gemma.Gemma(config, backend=backend).apply(
      {"params": params, **(packed or {})}, tokens, positions=positions, attention_mask=mask,
      cache=cache, return_hidden=True)
  return cache


def _decode_step(config, variables, cache, tokens, positions, backend=gemma.XLA):
  """One token per row: tokens, positions [R] -> f32 logits [R, V], updated cache."""
  logits, cache = gemma.Gemma(config, backend=backend).apply(
      variables, tokens[:, None], positions=positions[:, None],
      attention_mask=jnp.ones((tokens.shape[0], 1), jnp.bool_), cache=cache)
  return logits[:, 0], cache


def _eos_tuple(config: gemma.GemmaConfig, eos_id) -> tuple[int, ...]:
  """Stop ids as a hashable tuple: `...` means config.eos_id; None or negative ids mean none."""
  if eos_id is ...:
    eos_id = config.eos_id
  if eos_id is None:
    return ()
  ids = (eos_id,) if jnp.ndim(eos_id) == 0 else tuple(eos_id)
  return tuple(int(i) for i in ids if int(i) >= 0)


def sample_fn(config: gemma.GemmaConfig, params: Any, prompt_tokens: Array, prompt_mask: Array,
              rng: Array, *, max_new_tokens: int, num_samples: int = 1, temperature: float = 1.0,
              top_k: int = 0, top_p: float = 1.0, eos_id: int | Sequence[int] | None = ...,
              cpu_kernels: bool | None = None, forced_tokens: Array | None = None,
              forced_mask: Array | None = None) -> SampleOutput:
  """Pure, traceable body of `sample` (call it inside your own jit); see `sample`.

  forced_tokens, forced_mask [B, F, max_new_tokens]: F more rows per prompt that are not sampled
  but fed these tokens, so that the loop also scores given completions (`forced_logprobs`, e.g.
  the anchor's log-probs of the policy's samples while the anchor draws its own) for little more
  than the rows' share of a decode step: a step streams the weights once for all rows. The mask
  is a prefix of each row (its tokens, then padding: a sampler's own masks are); the loop runs
  until the sampled rows and the forced rows are all finished. Nothing of a forced row reaches
  the sampled rows (every op is per row).

  The decode backend is chosen here (`backends.select`), which builds the CPU kernels on first
  use; call `backends.select(config)` before tracing to build them ahead.
  """
  b, p = prompt_tokens.shape
  n, t = num_samples, max_new_tokens
  if prompt_mask.shape != (b, p):
    raise ValueError(f"prompt_mask must have the shape of prompt_tokens {(b, p)}, "
                     f"got {prompt_mask.shape}")
  if t < 1 or n < 1:
    raise ValueError(f"max_new_tokens and num_samples must be >= 1, got {t} and {n}")
  if temperature < 0 or not 0.0 < top_p <= 1.0 or top_k < 0:
    raise ValueError(f"need temperature >= 0, 0 < top_p <= 1 and top_k >= 0, got "
                     f"temperature={temperature}, top_p={top_p}, top_k={top_k}")
  f = _check_forced(forced_tokens, forced_mask, b, t)
  eos = jnp.asarray(_eos_tuple(config, eos_id), jnp.int32)
  keys = jax.vmap(lambda k: jax.vmap(lambda i: jax.random.fold_in(k, i))(jnp.arange(n)))(
      prompt_keys(rng, b)).reshape(b * n)                                  # [R]
  # Sampling is not differentiated (objectives recompute log-probs with a forward pass), so the
  # params are a `stop_gradient` constant here: a sampler inside `jax.grad` traces no tangents.
  params = jax.lax.stop_gradient(params)
  # Decode is bound by streaming the weights; on CPU the kernels' backend streams them faster.
  # Its packed weights are prepared here, once, outside the loop, from the params as given (f32
  # training params are rounded to bf16 in the same pass).
  backend = backends.select(config, cpu_kernels)
  packed = backend.prepare(params)
  params = _compute_params(config, params, packed)
  variables = {"params": params, **packed}
  mask = prompt_mask.astype(jnp.bool_)
  positions = gemma.default_positions(mask)                                # [B, P]

  cache = gemma.init_cache(config, b, p - 1 + t)
  if p > 1:
    cache = _prefill(config, params, prompt_tokens[:, :-1], mask[:, :-1], positions[:, :-1], cache,
                     backend, packed if backends.packed_prefill(backend) else None)
  # Rows b * (n + f) + j: sample j < n of prompt b, then its forced rows.
  cache = jax.tree.map(lambda x: jnp.repeat(x, n + f, axis=0) if x.ndim else x, cache)

  r = b * n
  unprocessed = temperature == 1.0 and top_k == 0 and top_p == 1.0
  out = {"tokens": jnp.full((r, t), config.pad_id, jnp.int32),
         "mask": jnp.zeros((r, t), jnp.bool_),
         "logprobs": jnp.zeros((r, t), jnp.float32),
         "sample_logprobs": jnp.zeros((r, t), jnp.float32)}
  state = (jnp.zeros((), jnp.int32),                                       # step i
           jnp.repeat(prompt_tokens[:, -1].astype(jnp.int32), n + f),      # token to feed
           jnp.repeat(positions[:, -1], n + f),                            # its position
           jnp.zeros((r,), jnp.bool_),                                     # row finished [R]
           cache, out)
  if f:
    forced = forced_tokens.astype(jnp.int32).reshape(b * f, t)
    forced_live = forced_mask.astype(jnp.bool_).reshape(b * f, t)
    # A forced row is finished after its last masked-in token.
    forced_len = jnp.max(jnp.where(forced_live, jnp.arange(1, t + 1), 0), axis=-1)   # [B*F]
    state += ({"done": forced_len == 0, "logprobs": jnp.zeros((b * f, t), jnp.float32)},)
    # The model's rows [B*(N+F)] -> (sampled rows [B*N], forced rows [B*F]) and back.
    split = lambda x: (x.reshape(b, n + f, -1)[:, :n].reshape(r, -1),  # noqa: E731
                       x.reshape(b, n + f, -1)[:, n:].reshape(b * f, -1))
    merge = lambda x, y: jnp.concatenate(  # noqa: E731
        [x.reshape(b, n), y.reshape(b, f)], axis=1).reshape(b * (n + f))

  if temperature > 0.0:
    # Every step's two uniforms per row, drawn before the loop from the same keys as in it
    # (fold_in(key_row, step)): one batched threefry instead of two small loops in every step.
    uniforms = jax.vmap(lambda s: jax.vmap(lambda k: jax.random.uniform(
        jax.random.fold_in(k, s), (2,)))(keys))(jnp.arange(t))             # [T, R, 2]

  def cond(state):
    i, finished = state[0], jnp.all(state[3])
    if f:
      finished &= jnp.all(state[6]["done"])
    return (i < t) & ~finished

  def body(state):
    i, token, pos, done, cache, out = state[:6]
    logits, cache = _decode_step(config, variables, cache, token, pos, backend)
    if f:
      logits, forced_logits = split(logits)
    if temperature == 0.0:    # the backend's greedy choice and the model's log-prob of it
      new, logprob = backend.greedy(logits)
      sample_lp = jnp.zeros_like(logprob)
    else:
      u = jax.lax.dynamic_index_in_dim(uniforms, i, keepdims=False)           # [R, 2]
      new, sample_lp = _categorical(u, process_logits(logits, temperature, top_k, top_p))
      # Unprocessed sampling (temperature 1, no top-k/top-p) already has the model's log-probs.
      logprob = sample_lp if unprocessed else gemma.token_logprob(logits, new)
    live = ~done
    new = jnp.where(live, new, config.pad_id)
    column = {"tokens": new, "mask": live,
              "logprobs": jnp.where(live, logprob, 0.0),
              "sample_logprobs": jnp.where(live, sample_lp, 0.0)}
    out = {k: jax.lax.dynamic_update_slice(out[k], column[k][:, None].astype(out[k].dtype), (0, i))
           for k in out}
    done = done | (live & jnp.any(new[:, None] == eos[None, :], axis=-1))
    if not f:
      return i + 1, new, pos + 1, done, cache, out
    given = jax.lax.dynamic_index_in_dim(forced, i, axis=1, keepdims=False)         # [B*F]
    given_live = jax.lax.dynamic_index_in_dim(forced_live, i, axis=1, keepdims=False)
    lp = jnp.where(given_live, gemma.token_logprob(forced_logits, given), 0.0)
    scored = {"done": i + 1 >= forced_len,
              "logprobs": jax.lax.dynamic_update_slice(state[6]["logprobs"], lp[:, None], (0, i))}
    return i + 1, merge(new, given), pos + 1, done, cache, out, scored

  final = jax.lax.while_loop(cond, body, state)
  out = {k: v.reshape(b, n, t) for k, v in final[5].items()}
  return SampleOutput(**out, forced_logprobs=final[6]["logprobs"].reshape(b, f, t) if f else None)


def _check_forced(forced_tokens, forced_mask, b: int, t: int) -> int:
  """F, the number of forced rows per prompt (0 without them); a one-line error on bad input."""
  if forced_tokens is None and forced_mask is None:
    return 0
  if forced_tokens is None or forced_mask is None:
    raise ValueError("forced_tokens and forced_mask go together: pass both or neither")
  if forced_tokens.ndim != 3 or forced_tokens.shape[0] != b or forced_tokens.shape[2] != t:
    raise ValueError(f"forced_tokens must be [B={b}, F, max_new_tokens={t}], "
                     f"got {forced_tokens.shape}")
  if forced_mask.shape != forced_tokens.shape:
    raise ValueError(f"forced_mask must have the shape of forced_tokens {forced_tokens.shape}, "
                     f"got {forced_mask.shape}")
  return forced_tokens.shape[1]


_STATIC = ("config", "max_new_tokens", "num_samples", "temperature", "top_k", "top_p", "eos_id",
           "cpu_kernels")
_sample_jit = jax.jit(sample_fn, static_argnames=_STATIC)


def sample(config: gemma.GemmaConfig, params: Any, prompt_tokens: Array, prompt_mask: Array,
           rng: Array, *, max_new_tokens: int, num_samples: int = 1, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, eos_id: int | Sequence[int] | None = ...,
           cpu_kernels: bool | None = None, forced_tokens: Array | None = None,
           forced_mask: Array | None = None) -> SampleOutput:
  """Samples `num_samples` completions per prompt; returns tokens/mask/logprobs [B, N, T].

  prompt_tokens [B, P] int32 LEFT-padded, prompt_mask [B, P] bool (every prompt needs >= 1 real
  token, e.g. bos). rng: one PRNG key, or [B] keys (one per prompt: a prompt's samples then do
  not depend on the rest of the batch). temperature 0 is greedy decoding. eos_id: an id or ids
  that stop a row (kept in the output, masked 1); None or -1: no stop; default `config.eos_id`.
  cpu_kernels: run the decode loop's matmuls and attention through `bond.models.cpu_kernels`
  (bf16 on one CPU device with avx512_bf16; `bond.models.backends.select`); None (default):
  where they can run; False: never; True: always, or an error.
  forced_tokens, forced_mask [B, F, max_new_tokens]: given completions scored in the same loop
  (`forced_logprobs`; see `sample_fn`).
  Compiled once per (config, shapes, static options); traceable inside an outer `jax.jit`.
  """
  # Chosen (and the kernels built) here, before tracing; `sample_fn` only reads the choice.
  cpu_kernels = backends.select(config, cpu_kernels) != gemma.XLA
  return _sample_jit(config, params, prompt_tokens, prompt_mask, rng,
                     max_new_tokens=max_new_tokens, num_samples=num_samples,
                     temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                     eos_id=_eos_tuple(config, eos_id), cpu_kernels=cpu_kernels,
                     forced_tokens=forced_tokens, forced_mask=forced_mask)


def generate_text(config: gemma.GemmaConfig, params: Any, tokenizer, prompts: list[str],
                  rng: Array, **kw) -> list[list[str]]:
  """Text completions [B][N] of `prompts`; `kw` go to `sample` (max_new_tokens, num_samples, ...).

  `tokenizer` provides `batch_encode(texts) -> (tokens [B, P] left-padded, mask)` and
  `decode(ids) -> str`. The eos token is dropped from the text.
  """
  tokens, mask = tokenizer.batch_encode(prompts)
  out = sample(config, params, jnp.asarray(tokens), jnp.asarray(mask), rng, **kw)
  eos = set(_eos_tuple(config, kw.get("eos_id", ...)))
  tokens, mask = jax.device_get((out.tokens, out.mask))
  return [[tokenizer.decode([int(y) for y, m in zip(row, row_mask) if m and int(y) not in eos])
           for row, row_mask in zip(rows, masks)] for rows, masks in zip(tokens, mask)]
