"""The sampling stage: `rollout_fn(state, batch, rng) -> Rollout`, outside autodiff.

A rollout holds everything an update needs that carries no gradient: the completions (sampled
from the policy and the anchor, or read from a preference dataset), their rewards, and the
log-probabilities of fixed models on them. The sampler's own sequence log-probs are kept
(`Samples.logp`), so no pass recomputes them. With a moving anchor, log π_anchor of the policy's
samples comes from the anchor's own decode loop, which scores them as forced rows beside its
samples (`bond.anchor_logp='decode'`, the default; `sampling.sample_fn`'s forced_tokens): the
policy samples first, then the anchor. Which samples a rollout draws is declared by the
algorithm's registry entry (`objectives.OBJECTIVES`): e.g. J-BOND 2 anchor + 1 policy sample,
Jeffreys BOND max(N, k) anchor + S policy, REINFORCE S policy, DPO none (pairs from the batch).

Shapes: B prompts, P prompt tokens, N completions per prompt, T new tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from bond import logprobs
from bond import objectives
from bond import sampling
from bond.models import gemma

Array = jax.Array
Params = Any
RewardFn = Callable[[Array, Array, Array, Array], Array]


@flax.struct.dataclass
class Samples:
  """N completions of each of B prompts and what is known about them without gradients.

  Fields a rollout does not need are None.
  """

  tokens: Array                    # [B, N, T] int32, padded after eos
  mask: Array                      # [B, N, T] bool, real tokens (eos included)
  rewards: Array | None = None     # [B, N] f32
  logp: Array | None = None        # [B, N] log-prob under the model that drew them (the sampler's)
  ref_logp: Array | None = None    # [B, N] log π_ref(y)
  anchor_logp: Array | None = None  # [B, N] log π_anchor(y)

  def take(self, idx: Array) -> "Samples":
    """The completion idx[b] of each prompt, as [B, 1, ...] (e.g. the best of N)."""
    pick = lambda x: None if x is None else jnp.take_along_axis(  # noqa: E731
        x, idx.reshape((-1, 1) + (1,) * (x.ndim - 2)), axis=1)
    return jax.tree.map(pick, self)

  def concat(self, other: "Samples") -> "Samples":
    """[B, N1, ...] and [B, N2, ...] -> [B, N1 + N2, ...] (fields present in both)."""
    join = lambda a, b: None if a is None or b is None else jnp.concatenate([a, b], axis=1)  # noqa: E731
    return Samples(*(join(getattr(self, f), getattr(other, f)) for f in _FIELDS))


_FIELDS = ("tokens", "mask", "rewards", "logp", "ref_logp", "anchor_logp")


@flax.struct.dataclass
class Rollout:
  """The input of one update: a prompt batch and the samples its algorithm consumes."""

  prompt_tokens: Array             # [B, P] left-padded
  prompt_mask: Array               # [B, P]
  policy: Samples | None = None    # online: samples of π_θ (the params being updated)
  anchor: Samples | None = None    # online: samples of π_anchor (BOND's Best-of-N base)
  chosen: Samples | None = None    # offline: preferred completions (e.g. best of n)
  rejected: Samples | None = None  # offline: dispreferred completions (e.g. worst of n)


def completion_log_probs(model_config: gemma.GemmaConfig, params: Params, prompt_tokens: Array,
                         prompt_mask: Array, tokens: Array, mask: Array, *,
                         chunk_size: int = logprobs.DEFAULT_CHUNK_SIZE,
                         share_prompt: bool = True, keep_logits_mb: float = 0) -> Array:
  """log π(y|x) summed over the completion mask: tokens, mask [B, N, T] -> [B, N].

  One teacher-forced pass over the B·N rows [x; y], differentiable in params. The vocabulary
  projection runs at the completion positions only, over chunks of `chunk_size` rows of the tied
  embedding (`bond.logprobs`; config key `model.logprob_chunk`): no [B·N, P+T, V] array forward
  or backward, 3x less memory on Gemma 3's 262k vocabulary. chunk_size 0, or a vocabulary of at
  most chunk_size rows (one chunk: nothing to save): through the model's full logits
  (`logprobs.completion_log_probs_full`, the reference; the toy harness's path).
  share_prompt (chunked path; config key `model.share_prompt`): each prompt runs through the
  layers once with its N completions behind it (`logprobs.packed_rows`), or as N rows (False).
  keep_logits_mb (chunked path; config key `model.logprob_keep_mb`): under autodiff the forward
  keeps the [rows, V] f32 logits for the backward where they fit in this many MiB, instead of
  recomputing them (`logprobs.keeps_logits`; the same gradients).
  """
  if not is_chunked(model_config, chunk_size):
    return logprobs.completion_log_probs_full(model_config, params, prompt_tokens, prompt_mask,
                                              tokens, mask)
  return logprobs.completion_log_probs(model_config, params, prompt_tokens, prompt_mask, tokens,
                                       mask, chunk_size=chunk_size, share_prompt=share_prompt,
                                       keep_logits_mb=keep_logits_mb)


@dataclasses.dataclass(frozen=True)
class Stages:
  """An online rollout in three parts, for rewards computed on the host outside any jit.

  `sample(state, batch, rng=None) -> Samples` draws every completion (anchor's first, then the
  policy's, concatenated on axis 1; no rewards), `reward_fn.host` scores them as numpy arrays,
  and `finish(state, batch, samples, rewards [B, N], with_metrics=True) -> Rollout` adds the
  no-grad log-probs. `rollout_fn` is the same composition in one function, the reward inside it
  through `jax.pure_callback`. JAX's persistent compilation cache stores no program with a host
  callback, so a training loop that jits `sample` and `finish` apart compiles them once per
  config and machine instead of on every run (bond/train.py does on one process).
  """

  sample: Callable[..., Samples]
  finish: Callable[..., Rollout]


def score_samples(reward_fn, batch: dict, samples: Samples, xp=np):
  """reward_fn over every completion: samples [B, N, T] -> rewards [B, N]. Each prompt row is
  repeated N times; xp = jnp inside a jit, np for a host scorer (`reward_fn.host`)."""
  b, n, t = samples.tokens.shape
  rep = lambda x: xp.repeat(xp.asarray(x), n, axis=0)  # noqa: E731
  r = reward_fn(rep(batch["prompt_tokens"]), rep(batch["prompt_mask"]),
                xp.asarray(samples.tokens).reshape(b * n, t),
                xp.asarray(samples.mask).reshape(b * n, t))
  return xp.asarray(r).reshape(b, n)


def logprob_options(config) -> dict:
  """`completion_log_probs`'s keyword options from the config: chunk_size (`model.logprob_chunk`),
  share_prompt (`model.share_prompt`, default True) and keep_logits_mb (`model.logprob_keep_mb`,
  default `logprobs.DEFAULT_KEEP_LOGITS_MB`). Every teacher-forced pass takes them."""
  return dict(chunk_size=config.model.logprob_chunk,
              share_prompt=bool(config.model.get("share_prompt", True)),
              keep_logits_mb=float(config.model.get("logprob_keep_mb",
                                                    logprobs.DEFAULT_KEEP_LOGITS_MB)))


def is_chunked(model_config: gemma.GemmaConfig, chunk_size: int) -> bool:
  """Whether `completion_log_probs` takes the chunked path (else the full logits)."""
  return bool(chunk_size) and chunk_size < model_config.vocab_size


def cpu_kernels(config) -> bool | None:
  """`sampling.cpu_kernels` ('auto' | 'on' | 'off') as `sampling.sample_fn`'s cpu_kernels."""
  return {"auto": None, "on": True, "off": False}[config.sampling.get("cpu_kernels", "auto")]


def make_rollout_stages(config, model_config: gemma.GemmaConfig,
                        reward_fn: RewardFn | None) -> Stages:
  """The `Stages` of `make_rollout_fn`'s online rollout (same numbers, same rng use)."""
  return _make(config, model_config, reward_fn)[1]


def make_rollout_fn(config, model_config: gemma.GemmaConfig, reward_fn: RewardFn | None):
  """`rollout_fn(state, batch, rng=None, with_metrics=True) -> Rollout` for `config.bond.objective`.

  rng defaults to fold_in(state.rng, state.step), so a step's samples are a function of
  (state, batch). Anchor samples use the first half of split(rng), policy samples the second.
  with_metrics (a bool, or a traced bool scalar: one compiled rollout serves both): False skips
  the teacher-forced π_ref pass on the policy samples when only the kl/policy_ref metric reads it
  (J-BOND, BOND with a moving anchor); their ref_logp, and so that metric, are then NaN. The
  training loop passes True on the steps it logs.
  """
  return _make(config, model_config, reward_fn)[0]


def _after(done, state):
  """(done, state), with `state` usable only once `done` is computed: the next model view
  (a LoRA merge of base and adapters, an int8 base dequantized, the CPU kernels' packed weights)
  is then built after the previous pass has finished, so one such copy of the weights is live at
  a time instead of all of them (XLA hoists the cheap merges otherwise). An identity."""
  return jax.lax.optimization_barrier((done, state))


def _make(config, model_config: gemma.GemmaConfig, reward_fn: RewardFn | None):
  bc, sc = config.bond, config.sampling
  algorithm = objectives.get_objective(bc.objective)
  num_anchor, num_policy = algorithm.anchor_samples(bc), algorithm.policy_samples(bc)
  options = logprob_options(config)
  # log π_ref on the policy samples: read by the loss (REINFORCE's KL; a fixed anchor is π_ref),
  # or only by the kl/policy_ref metric.
  ref_for_loss = algorithm.policy_ref_logp or (algorithm.policy_anchor_logp and bc.anchor == "fixed")
  # log π_anchor of the policy samples scored in the anchor's decode loop (`bond.anchor_logp`).
  in_decode = (algorithm.policy_anchor_logp and num_anchor > 0
               and objectives.anchor_logp_in_decode(bc))

  def logp(params, batch, samples):
    return completion_log_probs(model_config, params, batch["prompt_tokens"], batch["prompt_mask"],
                                samples.tokens, samples.mask, **options)

  def draw(params, batch, rng, n, scored=None):
    """Samples: n of each prompt. With `scored` (Samples [B, F, T]): (Samples, [B, F] the log-probs
    of `scored` under these params, from the same decode loop as forced rows)."""
    out = sampling.sample_fn(
        model_config, params, batch["prompt_tokens"], batch["prompt_mask"], rng,
        max_new_tokens=sc.max_new_tokens, num_samples=n, temperature=sc.temperature,
        top_k=sc.top_k, top_p=sc.top_p, eos_id=model_config.eos_id,
        cpu_kernels=cpu_kernels(config), forced_tokens=None if scored is None else scored.tokens,
        forced_mask=None if scored is None else scored.mask)
    samples = Samples(out.tokens, out.mask, logp=jnp.sum(out.logprobs, axis=-1))
    return samples if scored is None else (samples, jnp.sum(out.forced_logprobs, axis=-1))

  def rewards(batch, samples):
    return jax.lax.stop_gradient(score_samples(reward_fn, batch, samples, jnp).astype(jnp.float32))

  def offline(state, batch):
    pairs = Samples(jnp.stack([batch["chosen_tokens"], batch["rejected_tokens"]], axis=1),
                    jnp.stack([batch["chosen_mask"], batch["rejected_mask"]], axis=1))
    ref = logp(state.reference(), batch, pairs)                                   # [B, 2]
    chosen, rejected = (Samples(pairs.tokens[:, i:i + 1], pairs.mask[:, i:i + 1],
                                ref_logp=ref[:, i:i + 1]) for i in (0, 1))
    return Rollout(batch["prompt_tokens"], batch["prompt_mask"], chosen=chosen, rejected=rejected)

  def ref_logp(state, batch, policy, with_metrics):
    score = lambda: logp(state.reference(), batch, policy)  # noqa: E731
    if ref_for_loss or with_metrics is True:
      return score()
    nan = lambda: jnp.full(policy.tokens.shape[:2], jnp.nan, jnp.float32)  # noqa: E731
    if with_metrics is False:
      return nan()
    return jax.lax.cond(with_metrics, score, nan)

  def sample(state, batch, rng=None):
    if rng is None:
      rng = jax.random.fold_in(state.rng, state.step)
    state = jax.lax.stop_gradient(state)
    rng_anchor, rng_policy = jax.random.split(rng)
    if in_decode:
      # The policy's samples first; the anchor's decode loop then scores them beside its own
      # samples (the anchor's own samples' anchor_logp is their sampler log-prob).
      policy = draw(state.policy(), batch, rng_policy, num_policy)
      policy, state = _after(policy, state)
      anchor, scored = draw(state.anchor(), batch, rng_anchor, num_anchor, scored=policy)
      return anchor.replace(anchor_logp=anchor.logp).concat(policy.replace(anchor_logp=scored))
    anchor = draw(state.anchor(), batch, rng_anchor, num_anchor) if num_anchor else None
    if anchor is not None:
      anchor, state = _after(anchor, state)
    policy = draw(state.policy(), batch, rng_policy, num_policy)
    return policy if anchor is None else anchor.concat(policy)

  def finish(state, batch, both, r, with_metrics=True):
    state = jax.lax.stop_gradient(state)
    r = jax.lax.stop_gradient(jnp.asarray(r, jnp.float32))
    anchor = None
    if num_anchor:
      take = lambda s, lo, hi: jax.tree.map(lambda x: x[:, lo:hi], s)  # noqa: E731
      anchor = take(both, 0, num_anchor).replace(rewards=r[:, :num_anchor])
      policy = take(both, num_anchor, num_anchor + num_policy)
    else:
      policy = both
    policy = policy.replace(rewards=r[:, num_anchor:],
                            ref_logp=ref_logp(state, batch, policy, with_metrics))
    if algorithm.policy_anchor_logp and not in_decode:
      # A fixed anchor is π_ref itself (same params): its log-probs are already there.
      policy = policy.replace(anchor_logp=policy.ref_logp if bc.anchor == "fixed"
                              else logp(state.anchor(), batch, policy))
    return Rollout(batch["prompt_tokens"], batch["prompt_mask"], policy=policy, anchor=anchor)

  def rollout_fn(state, batch: dict[str, Array], rng: Array | None = None,
                 with_metrics: bool | Array = True) -> Rollout:
    if algorithm.offline:
      return offline(jax.lax.stop_gradient(state), batch)
    both = sample(state, batch, rng)
    return finish(state, batch, both, rewards(batch, both), with_metrics)

  return rollout_fn, Stages(sample, finish)


def metrics(rollout: Rollout) -> dict[str, Array]:
  """Batch metrics of the policy's own samples (online rollouts; {} otherwise).

  kl/policy_ref uses the sampler's log-probs: an unbiased estimate of KL(π‖π_ref).
  """
  s = rollout.policy
  if s is None:
    return {}
  return {"reward/mean": jnp.mean(s.rewards),
          "kl/policy_ref": jnp.mean(s.logp - s.ref_logp),
          "length/mean": jnp.mean(jnp.sum(s.mask, axis=-1))}
