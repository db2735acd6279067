"""The exact harness: a task small enough to enumerate every completion (algorithms.md §8).

Vocabulary V = C + 1: token 0 is eos (and pad), tokens 1..C are content tokens; there are no
other special tokens (no bos), so every token a policy can emit belongs to some completion and
the enumerated distribution sums to exactly 1. A completion is at most L tokens: either k < L
content tokens then eos, or L content tokens (the length cap, no eos). With C = 4, L = 3:
M = 1 + 4 + 16 + 64 = 85. With `use_eos=False` the completions are the C^L content sequences
and `policy_log_probs` renormalises the policy over content tokens (token 0 excluded), so that
mode is exact-only: a sampler there must forbid token 0.

Prompts are P distinct sequences of Lp content tokens (no padding). The reward table [P, M]
takes values on a small integer grid (deliberate ties), plus `length_bonus` × content length.
With the table and the exact log π(y|x) [P, M] of a Gemma policy, π_BoN, KLs, win rates and the
effective N are exact (`exact_metrics`).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from bond import bon
from bond.models import gemma

Array = jax.Array

EOS_ID = 0
PAD_ID = 0
NO_BOS = -1   # the toy vocabulary has no bos token


@dataclasses.dataclass(frozen=True, eq=False)
class ToyTask:
  """An enumerable task. P prompts, M completions, Lp prompt length, L max completion length."""

  prompts: np.ndarray            # [P, Lp] int32, content tokens 1..C
  completions: np.ndarray        # [M, L] int32, padded with 0 after eos
  completion_mask: np.ndarray    # [M, L] bool, real tokens incl. eos
  rewards: np.ndarray            # [P, M] f32
  lengths: np.ndarray            # [M] int32, content tokens (eos excluded)
  vocab_size: int                # V = C + 1
  use_eos: bool = True
  eos_id: int = EOS_ID
  pad_id: int = PAD_ID

  @property
  def num_prompts(self) -> int:
    return self.prompts.shape[0]

  @property
  def num_completions(self) -> int:
    return self.completions.shape[0]

  @property
  def completion_len(self) -> int:
    return self.completions.shape[1]

  @property
  def prompt_mask(self) -> np.ndarray:
    return np.ones(self.prompts.shape, bool)


def _enumerate_completions(c: int, length: int, use_eos: bool):
  """(tokens [M, L], mask [M, L], content lengths [M]) in order of length, then lexicographic."""
  rows, masks, lengths = [], [], []
  sizes = range(length) if use_eos else ()
  for k in sizes:                                            # k content tokens, then eos
    for content in itertools.product(range(1, c + 1), repeat=k):
      rows.append(list(content) + [EOS_ID] + [PAD_ID] * (length - k - 1))
      masks.append([True] * (k + 1) + [False] * (length - k - 1))
      lengths.append(k)
  for content in itertools.product(range(1, c + 1), repeat=length):   # the length cap
    rows.append(list(content))
    masks.append([True] * length)
    lengths.append(length)
  return (np.array(rows, np.int32), np.array(masks, bool), np.array(lengths, np.int32))


def make_task(num_prompts: int = 4, num_content_tokens: int = 4, completion_len: int = 3,
              use_eos: bool = True, length_bonus: float = 0.0, num_reward_levels: int = 5,
              prompt_len: int | None = None, seed: int = 0) -> ToyTask:
  """A random enumerable task; rewards r(x, y) = u(x, y) + length_bonus · len(y), u ∈ {0..levels−1}.

  prompt_len defaults to the shortest length with at least num_prompts distinct prompts (≥ 2).
  """
  c, length = num_content_tokens, completion_len
  for name, value in (("num_prompts", num_prompts), ("num_content_tokens", c),
                      ("completion_len", length), ("num_reward_levels", num_reward_levels)):
    if value < 1:
      raise ValueError(f"make_task: {name} must be >= 1, got {value}")
  if prompt_len is None:
    prompt_len = 2
    while c ** prompt_len < num_prompts:
      prompt_len += 1
  if c ** prompt_len < num_prompts:
    raise ValueError(f"make_task: {num_prompts} distinct prompts need C^prompt_len >= "
                     f"num_prompts, got C={c}, prompt_len={prompt_len}")
  rng = np.random.default_rng(seed)
  codes = rng.choice(c ** prompt_len, size=num_prompts, replace=False)
  digits = (codes[:, None] // c ** np.arange(prompt_len - 1, -1, -1)) % c
  prompts = (digits + 1).astype(np.int32)
  completions, mask, lengths = _enumerate_completions(c, length, use_eos)
  levels = rng.integers(0, num_reward_levels, size=(num_prompts, completions.shape[0]))
  rewards = (levels + length_bonus * lengths[None, :]).astype(np.float32)
  return ToyTask(prompts, completions, mask, rewards, lengths, vocab_size=c + 1, use_eos=use_eos)


NUM_LAYERS = 2   # of the toy Gemma (`model_config`)


def model_config(task: ToyTask, **overrides) -> gemma.GemmaConfig:
  """A tiny Gemma over the toy vocabulary (2 layers, D = 32); overrides replace fields."""
  kw = dict(vocab_size=task.vocab_size, num_layers=NUM_LAYERS, embed_dim=32, hidden_dim=64, num_heads=2,
            num_kv_heads=1, head_dim=16, eos_id=task.eos_id, pad_id=task.pad_id, bos_id=NO_BOS)
  kw.update(overrides)
  return gemma.GemmaConfig(**kw)


def init_policy(task: ToyTask, rng: Array, config: gemma.GemmaConfig | None = None,
                logit_scale: float = 0.05):
  """Random Gemma params for the toy task (the usual π_ref of toy experiments).

  Gemma's init (tied embedding, std 1) makes a near-deterministic policy (max π(y|x) ≈ 1 on the
  default task); the final norm gain (1 + w) is set to `logit_scale` to multiply the logits, which
  gives a diverse π_ref (default: max π(y|x) ≈ 0.15, entropy ≈ 3.5 nats of log 85 ≈ 4.4).
  """
  params = gemma.init_params(config or model_config(task), rng)
  norm = params["final_norm"]
  return {**params, "final_norm": {**norm, "scale": norm["scale"] + (logit_scale - 1.0)}}


def policy_log_probs(config: gemma.GemmaConfig, params, task: ToyTask) -> Array:
  """Exact log π(y|x) [P, M]: one teacher-forced forward pass over all P·M (prompt, completion).

  log π(y|x) = Σ_t mask_t · log softmax(logits_t)[y_t], in f32; differentiable w.r.t. params.
  """
  p, m = task.num_prompts, task.num_completions
  lp, length = task.prompts.shape[1], task.completion_len
  prompts = jnp.repeat(jnp.asarray(task.prompts), m, axis=0)                 # [P*M, Lp]
  completions = jnp.tile(jnp.asarray(task.completions), (p, 1))              # [P*M, L]
  comp_mask = jnp.tile(jnp.asarray(task.completion_mask), (p, 1))
  tokens = jnp.concatenate([prompts, completions], axis=1)                   # [P*M, Lp+L]
  attn = jnp.concatenate([jnp.ones(prompts.shape, jnp.bool_), comp_mask], axis=1)
  logits = gemma.Gemma(config).apply({"params": params}, tokens, attention_mask=attn)
  logits = logits[:, lp - 1:lp + length - 1].astype(jnp.float32)   # [P*M, L, V]: predict y_t
  if not task.use_eos:
    logits = logits.at[..., task.eos_id].set(-jnp.inf)
  logp = jax.nn.log_softmax(logits, axis=-1)
  token_logp = jnp.take_along_axis(logp, completions[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(comp_mask, token_logp, 0.0), axis=-1).reshape(p, m)


def _codes(tokens: Array, mask: Array, base: int) -> Array:
  """Base-(V+1) code of masked token rows [B, T]: digit token+1 on real tokens, 0 on padding."""
  digits = jnp.where(mask, tokens.astype(jnp.int32) + 1, 0)
  powers = base ** jnp.arange(tokens.shape[-1] - 1, -1, -1, dtype=jnp.int32)
  return jnp.sum(digits * powers, axis=-1)


def _lookup(table_tokens: np.ndarray, table_mask: np.ndarray, tokens, mask, what: str) -> Array:
  tokens, mask = jnp.asarray(tokens), jnp.asarray(mask, jnp.bool_)
  if tokens.ndim != 2 or tokens.shape[1] != table_tokens.shape[1] or mask.shape != tokens.shape:
    raise ValueError(f"{what} tokens and mask must be [B, {table_tokens.shape[1]}], got "
                     f"{tokens.shape} and {mask.shape}")
  base = int(table_tokens.max()) + 2
  if base ** table_tokens.shape[1] >= 2 ** 31:
    raise ValueError(f"toy {what}s too long to index with int32 codes")
  table = _codes(jnp.asarray(table_tokens), jnp.asarray(table_mask), base)
  order = jnp.argsort(table)
  sorted_codes = table[order]
  code = _codes(tokens, mask, base)
  pos = jnp.clip(jnp.searchsorted(sorted_codes, code), 0, table.shape[0] - 1)
  return jnp.where(sorted_codes[pos] == code, order[pos], -1).astype(jnp.int32)


def completion_index(task: ToyTask, completion_tokens, completion_mask) -> Array:
  """Row of `task.completions` [B] for completions [B, L] with masks; −1 if not a completion."""
  return _lookup(task.completions, task.completion_mask, completion_tokens, completion_mask,
                 "completion")


def prompt_index(task: ToyTask, prompt_tokens) -> Array:
  """Row of `task.prompts` [B] for prompts [B, Lp]; −1 if not a task prompt."""
  prompt_tokens = jnp.asarray(prompt_tokens)
  return _lookup(task.prompts, task.prompt_mask, prompt_tokens,
                 jnp.ones(prompt_tokens.shape, jnp.bool_), "prompt")


def reward_fn(task: ToyTask) -> Callable[..., Array]:
  """Jittable reward(prompt_tokens [B, Lp], prompt_mask, completion_tokens [B, L], mask) -> [B].

  Looks r(x, y) up in the table; NaN for anything outside the task (caught by `bon.best_of_n`).
  """
  table = jnp.asarray(task.rewards)

  def reward(prompt_tokens, prompt_mask, completion_tokens, completion_mask):
    del prompt_mask   # toy prompts are unpadded
    i = prompt_index(task, prompt_tokens)
    j = completion_index(task, completion_tokens, completion_mask)
    value = table[jnp.maximum(i, 0), jnp.maximum(j, 0)]
    return jnp.where((i >= 0) & (j >= 0), value, jnp.nan)

  return reward


@flax.struct.dataclass
class Samples:
  """Completions [B, N, L] drawn by `categorical_sampler` (the `bon.best_of_n` contract)."""

  tokens: Array     # [B, N, L] int32
  mask: Array       # [B, N, L] bool
  logprobs: Array   # [B, N, L] f32: log π(y|x) on the first token, 0 elsewhere (sums are exact)


def categorical_sampler(task: ToyTask, log_probs) -> Callable[..., Samples]:
  """sample_fn(prompt_tokens [B, Lp], prompt_mask, rng, num_samples) drawing y ~ π(·|x) exactly.

  log_probs [P, M] is an enumerated policy (e.g. `policy_log_probs`); an independent check of
  samplers and of `bon.best_of_n` that needs no decoding loop.
  """
  log_probs = jnp.asarray(log_probs)

  def sample_fn(prompt_tokens, prompt_mask, rng, num_samples):
    del prompt_mask
    rows = log_probs[prompt_index(task, prompt_tokens)]                       # [B, M]
    idx = jax.random.categorical(rng, rows[:, None, :], axis=-1,
                                 shape=(rows.shape[0], num_samples))           # [B, N]
    tokens = jnp.asarray(task.completions)[idx]
    first = jnp.arange(task.completion_len) == 0
    seq_logp = jnp.take_along_axis(rows, idx, axis=-1)
    return Samples(tokens, jnp.asarray(task.completion_mask)[idx],
                   jnp.where(first, seq_logp[..., None], 0.0))

  return sample_fn


def _against_bon(prefix: str, policy_lp, bon_lp, rewards) -> dict[str, Array]:
  """fwd/bwd KL to a BoN distribution and the reward gap, averaged over prompts."""
  return {
      f"exact/fwd_kl_to_bon{prefix}": jnp.mean(bon.kl(bon_lp, policy_lp)),
      f"exact/bwd_kl_to_bon{prefix}": jnp.mean(bon.kl(policy_lp, bon_lp)),
      f"exact/reward_gap_to_bon{prefix}": jnp.mean(bon.expected_reward(policy_lp, rewards)
                                                   - bon.expected_reward(bon_lp, rewards)),
  }


def exact_metrics(task: ToyTask, policy_log_probs, ref_log_probs, n: float | None = None,
                  n_max: float = 4096.0) -> dict[str, Array]:
  """Exact metrics of π against π_ref and π_BoN (algorithms.md §8), averaged over the P prompts.

  The effective N* is ONE N for all prompts: the N whose prompt-averaged KL(π_BoN(N) ‖ π_ref)
  equals the prompt-averaged KL(π ‖ π_ref), i.e. the BoN point of the reward-vs-KL Pareto plot at
  the policy's KL. `*_to_bon` compare against π_BoN(N*), `*_to_bon_n` against π_BoN(n).
  Values are 0-d arrays (the function is jittable; `float()` them to log).
  """
  policy_lp, ref_lp = bon.as_float(policy_log_probs), bon.as_float(ref_log_probs)
  shape = (task.num_prompts, task.num_completions)
  if policy_lp.shape != shape or ref_lp.shape != shape:
    raise ValueError(f"exact_metrics: log-probs must be [P, M] = {shape}, got "
                     f"{policy_lp.shape} and {ref_lp.shape}")
  rewards = jnp.asarray(task.rewards, policy_lp.dtype)
  kl_ref = jnp.mean(bon.kl(policy_lp, ref_lp))
  n_star = bon.effective_n(kl_ref, ref_lp, rewards, n_max=n_max, average=True)
  log_leq, _ = bon.log_quantiles(ref_lp, rewards)
  prob = jnp.exp(policy_lp)
  metrics = {
      "exact/reward": jnp.mean(bon.expected_reward(policy_lp, rewards)),
      "exact/kl_to_ref": kl_ref,
      "exact/win_rate": jnp.mean(bon.win_rate_vs_ref(policy_lp, ref_lp, rewards)),
      "exact/effective_n": n_star,
      "exact/log_quantile": jnp.mean(jnp.sum(prob * log_leq, axis=-1)),
      "exact/mean_length": jnp.mean(prob @ jnp.asarray(task.lengths, prob.dtype)),
  }
  metrics.update(_against_bon("", policy_lp, bon.bon_log_probs(ref_lp, rewards, n_star), rewards))
  if n is not None:
    metrics.update(_against_bon("_n", policy_lp, bon.bon_log_probs(ref_lp, rewards, n), rewards))
  return metrics
