"""Losses for Best-of-N alignment: BOND, J-BOND, BoNBoN and their baselines.

Every objective is a pure function of per-sequence log-probabilities (sums of token log-probs
over the completion mask, see `sequence_log_probs`) and returns `(loss, metrics)`; minimising
`loss` follows the paper's update. Shapes: B prompts, S policy samples per prompt, T time, V vocab.
`mask` arguments are optional per-prompt validity masks [B] (or per-sample [B, S]); masked
entries never reach a loss, a gradient, a baseline or a metric.

Score-function (policy-gradient) losses are written as

    loss = mean(−R) − mean(sg(R − b) · (log π − sg(log π)))

(sg = stop_gradient): the value is the Monte-Carlo estimate of the objective being minimised,
E_π[−R], and the gradient is the score-function estimate −E_π[(R − b)·∇log π]. The baseline b of a
sample never depends on that sample, so it leaves the expected gradient unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp

from bond import bon

Array = jax.Array
Metrics = dict[str, Array]

# J-BOND penalty for a policy sample that loses to both anchor samples (BOND §5: r = −log 16).
JBOND_PENALTY = math.log(16.0)


# ---------------------------------------------------------------------------------------------
# Log-probabilities.

def token_log_probs(logits: Array, targets: Array) -> Array:
  """log softmax(logits)[target] in f32: logits [B, T, V], targets [B, T] -> [B, T].

  logits[:, t] must already be the prediction for targets[:, t] (the caller shifts).
  Computed as logit − logsumexp(logits), which never materialises a second [B, T, V] array.
  """
  chex.assert_rank(logits, 3)
  chex.assert_shape(targets, logits.shape[:2])
  logits = logits.astype(jnp.float32)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return picked - jax.nn.logsumexp(logits, axis=-1)


def sequence_log_probs(logits: Array, targets: Array, mask: Array) -> Array:
  """log π(y) = Σ_t mask[t]·log π(y_t | y_<t): logits [B, T, V], targets, mask [B, T] -> [B].

  Padded positions are never scored: their targets are replaced by a valid id and their
  token log-probs (even NaN or inf ones) by 0 before the sum.
  """
  chex.assert_equal_shape([targets, mask])
  mask = mask.astype(jnp.bool_)
  per_token = token_log_probs(logits, jnp.where(mask, targets, 0))
  return jnp.sum(jnp.where(mask, per_token, 0.0), axis=-1)


# ---------------------------------------------------------------------------------------------
# Shared pieces.

def _valid(x: Array, mask: Array | None) -> Array:
  """Bool mask shaped like x: a [B] mask broadcasts over trailing sample axes."""
  if mask is None:
    return jnp.ones(x.shape, jnp.bool_)
  mask = jnp.asarray(mask).astype(jnp.bool_)
  return jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim)), x.shape)


def _masked_mean(x: Array, mask: Array | None) -> Array:
  valid = _valid(x, mask)
  total = jnp.sum(jnp.where(valid, x.astype(jnp.float32), 0.0))
  return total / jnp.maximum(jnp.sum(valid), 1)


def _leave_one_out_mean(x: Array, mask: Array | None, axis: int) -> Array:
  """b_i = mean of x_j over the valid j ≠ i along `axis` (0 when there is no other sample).

  b_i never looks at x_i, so as a baseline it keeps the score-function estimator unbiased.
  """
  valid = _valid(x, mask)
  x = jnp.where(valid, x, 0.0)
  others_sum = jnp.sum(x, axis=axis, keepdims=True) - x
  others_count = jnp.sum(valid, axis=axis, keepdims=True) - valid
  return jnp.where(others_count > 0, others_sum / jnp.maximum(others_count, 1), 0.0)


def _policy_gradient(policy_logp: Array, rewards: Array, baseline: Array,
                     mask: Array | None) -> Array:
  """Value E[−R], gradient −E[(R − b)·∇log π]: the score-function surrogate of the module doc."""
  valid = _valid(policy_logp, mask)   # masked rewards may be NaN: zero them before any product
  rewards = jnp.where(valid, jax.lax.stop_gradient(rewards), 0.0)
  advantage = jnp.where(valid, jax.lax.stop_gradient(rewards - baseline), 0.0)
  zero_valued = policy_logp - jax.lax.stop_gradient(policy_logp)
  return _masked_mean(-rewards - advantage * zero_valued, mask)


def _kl_regularised_policy_gradient(policy_logp: Array, ref_logp: Array, rewards: Array,
                                    beta: float | Array, mask: Array | None,
                                    log_ratio: Array | None = None) -> tuple[Array, Array]:
  """Maximises E_π[r] − β·KL(π‖π_ref) with R = r − β·(log π − log π_ref) and an RLOO baseline.

  policy_logp, ref_logp, rewards: [B, S] with S ≥ 2 samples of each prompt. Returns the loss and
  the per-sample KL estimates [B, S]. log_ratio [B, S]: log π − log π_ref given (e.g. from the
  samplers' log-probs, `sampler_log_ratio`) instead of computed from policy_logp and ref_logp.
  """
  chex.assert_rank(policy_logp, 2)
  chex.assert_equal_shape([policy_logp, ref_logp, rewards])
  if policy_logp.shape[1] < 2:
    raise ValueError("the leave-one-out (RLOO) baseline needs at least 2 policy samples per "
                     f"prompt, got S={policy_logp.shape[1]}")
  log_ratio = jax.lax.stop_gradient(policy_logp - ref_logp if log_ratio is None else log_ratio)
  total_reward = rewards - beta * log_ratio
  baseline = _leave_one_out_mean(total_reward, mask, axis=1)
  return _policy_gradient(policy_logp, total_reward, baseline, mask), log_ratio


# ---------------------------------------------------------------------------------------------
# BOND (Sessa et al. 2024, §3-§5).

def sft_loss(policy_logp: Array, mask: Array | None = None) -> tuple[Array, Metrics]:
  """Supervised fine-tuning: L = −E[log π_θ(y)], log π summed over tokens (not length-normalised).

  policy_logp: [B] log π_θ of the demonstrations.
  """
  nll = _masked_mean(-policy_logp, mask)
  return nll, {"nll": nll}


def forward_kl_loss(policy_logp_best: Array, mask: Array | None = None
                    ) -> tuple[Array, Metrics]:
  """Forward-KL BOND (BOND §3): KL(π_BoN ‖ π_θ) = −E_{y∼π_BoN}[log π_θ(y)] + const.

  policy_logp_best: [B] log π_θ of the best of N reference (or anchor) samples of each prompt,
  an exact sample of π_BoN; the loss is SFT on it (mode-covering).
  """
  return sft_loss(policy_logp_best, mask)


def backward_kl_loss(policy_logp: Array, ref_logp: Array, log_quantile: Array, n: int,
                     mask: Array | None = None, log_ratio: Array | None = None
                     ) -> tuple[Array, Metrics]:
  """Backward-KL BOND (BOND §3): KL(π_θ ‖ π_BoN) = E_π[log π_θ − log π_ref − (N−1)·log p≤] − log N.

  Gradient E_{y∼π_θ}[∇log π_θ(y)·(log π_θ(y) − log π_ref(y) − (N−1)·log p̂≤(y))]: policy gradient
  with reward (N−1)·log p̂≤ and a unit-weight KL to π_ref, RLOO baseline over the S ≥ 2 samples
  (mode-seeking); `kl_to_bon` = loss − log N. The identity is BOND Thm 1 for continuous rewards;
  with ties or heavy atoms the optimum is π_ref·p≤^(N−1)/Z, close to but not exactly π_BoN.

  policy_logp, ref_logp, log_quantile: [B, S] for S policy samples of each prompt; log_quantile
  is log p̂≤(y) (bon.log_quantile_estimate) under π_ref or the anchor, matching ref_logp.
  log_ratio [B, S]: log π_θ − log π_ref given instead (`_kl_regularised_policy_gradient`).
  """
  bond_reward = jnp.asarray(log_quantile, jnp.float32)
  loss, log_ratio = _kl_regularised_policy_gradient(
      policy_logp, ref_logp, (n - 1) * bond_reward, 1.0, mask, log_ratio)
  return loss, {"bond_reward": _masked_mean(bond_reward, mask),
                "kl_to_ref": _masked_mean(log_ratio, mask),
                "kl_to_bon": loss - math.log(n)}


def jeffreys_loss(policy_logp_best: Array, policy_logp: Array, ref_logp: Array,
                  log_quantile: Array, *, n: int, beta: float | Array,
                  mask: Array | None = None, log_ratio: Array | None = None
                  ) -> tuple[Array, Metrics]:
  """Jeffreys BOND (BOND §3): J_β = (1−β)·KL(π_BoN ‖ π_θ) + β·KL(π_θ ‖ π_BoN), β ∈ [0, 1].

  policy_logp_best: [B] as in `forward_kl_loss`; the rest: [B, S] as in `backward_kl_loss`.
  """
  fwd, fwd_metrics = forward_kl_loss(policy_logp_best, mask)
  bwd, bwd_metrics = backward_kl_loss(policy_logp, ref_logp, log_quantile, n, mask, log_ratio)
  metrics = {"backward/loss": bwd}
  metrics.update({f"forward/{k}": v for k, v in fwd_metrics.items()})
  metrics.update({f"backward/{k}": v for k, v in bwd_metrics.items()})
  return (1.0 - beta) * fwd + beta * bwd, metrics


def jbond_loss(policy_logp_anchor_best: Array, policy_logp_sample: Array,
               anchor_logp_sample: Array, sample_beats_anchor: Array, *, beta: float | Array,
               gamma: float | Array, penalty: float = JBOND_PENALTY,
               mask: Array | None = None, log_ratio: Array | None = None
               ) -> tuple[Array, Metrics]:
  """J-BOND (BOND §5, Algorithm 2): L = (1−β)·G_FW + β·G_BW + γ·G_KL, one policy sample y.

    G_FW = −log π_θ(y'_best), y'_best the better of 2 anchor samples (Best-of-2 of the anchor);
    G_BW: policy gradient on y with reward r_J(y) − log π_θ(y)/π_anchor(y),
          r_J(y) = 0 if y beats at least one anchor sample else −penalty (paper: −log 16);
    G_KL: score-function gradient of KL(π_θ ‖ π_anchor) estimated on y.

  Inputs are [B]: log π_θ(y'_best), log π_θ(y), log π_anchor(y), and whether y beats an anchor
  sample (the caller decides ties; with p̂≤ from the 2 anchor samples, "beats" is p̂≤(y) > 0).
  With a single sample per prompt there is no RLOO: the baseline of prompt b is the mean reward
  of the other prompts of the batch, which is independent of y_b (unbiased) and removes the
  common offset (e.g. −penalty·P[lose]) that dominates the variance of plain REINFORCE.
  log_ratio [B]: log π_θ(y) − log π_anchor(y) given (e.g. from the samplers' log-probs) instead of
  computed from the two log-prob inputs; it enters as a reward only (no gradient).
  """
  chex.assert_rank(policy_logp_sample, 1)
  chex.assert_equal_shape([policy_logp_anchor_best, policy_logp_sample, anchor_logp_sample,
                           sample_beats_anchor])
  fwd, _ = forward_kl_loss(policy_logp_anchor_best, mask)
  log_ratio = jax.lax.stop_gradient(policy_logp_sample - anchor_logp_sample
                                    if log_ratio is None else log_ratio)
  jbond_reward = jnp.where(sample_beats_anchor, 0.0, -penalty)

  def policy_gradient(rewards):
    return _policy_gradient(policy_logp_sample, rewards,
                            _leave_one_out_mean(rewards, mask, axis=0), mask)

  bwd = policy_gradient(jbond_reward - log_ratio)
  kl = policy_gradient(-log_ratio)
  loss = (1.0 - beta) * fwd + beta * bwd + gamma * kl
  return loss, {"forward/nll": fwd, "backward/loss": bwd, "kl_to_anchor": kl,
                "jbond_reward": _masked_mean(jbond_reward, mask),
                "win_rate_vs_anchor": _masked_mean(sample_beats_anchor.astype(jnp.float32), mask)}


# ---------------------------------------------------------------------------------------------
# Preference losses: DPO, IPO, BoNBoN (Gui et al. 2024, §6 of algorithms.md).

def _log_ratio_margin(policy_logp_w: Array, policy_logp_l: Array, ref_logp_w: Array,
                      ref_logp_l: Array) -> tuple[Array, Metrics]:
  """h = log[π(y_w)·π_0(y_l) / (π(y_l)·π_0(y_w))], all inputs [B] -> [B]."""
  chex.assert_equal_shape([policy_logp_w, policy_logp_l, ref_logp_w, ref_logp_l])
  chosen = policy_logp_w - ref_logp_w
  rejected = policy_logp_l - ref_logp_l
  return chosen - rejected, {"chosen_log_ratio": chosen, "rejected_log_ratio": rejected}


def _preference_metrics(h: Array, parts: Metrics, mask: Array | None) -> Metrics:
  metrics = {"margin": h, "accuracy": (h > 0).astype(jnp.float32), **parts}
  return {k: _masked_mean(v, mask) for k, v in metrics.items()}


def dpo_loss(policy_logp_w: Array, policy_logp_l: Array, ref_logp_w: Array, ref_logp_l: Array,
             *, beta: float | Array, mask: Array | None = None) -> tuple[Array, Metrics]:
  """DPO: L = −log σ(β·h), h = log[π(y_w)π_0(y_l) / (π(y_l)π_0(y_w))]; inputs [B]."""
  h, parts = _log_ratio_margin(policy_logp_w, policy_logp_l, ref_logp_w, ref_logp_l)
  return _masked_mean(jax.nn.softplus(-beta * h), mask), _preference_metrics(h, parts, mask)


def ipo_loss(policy_logp_w: Array, policy_logp_l: Array, ref_logp_w: Array, ref_logp_l: Array,
             *, beta: float | Array, mask: Array | None = None) -> tuple[Array, Metrics]:
  """IPO: L = (h − 1/(2β))², h as in `dpo_loss`; inputs [B]. Minimised at E[h] = 1/(2β)."""
  h, parts = _log_ratio_margin(policy_logp_w, policy_logp_l, ref_logp_w, ref_logp_l)
  return _masked_mean(jnp.square(h - 1.0 / (2.0 * beta)), mask), _preference_metrics(h, parts, mask)


def bonbon_loss(policy_logp_best: Array, policy_logp_worst: Array, ref_logp_best: Array,
                ref_logp_worst: Array, *, alpha: float | Array, beta: float | Array,
                mask: Array | None = None) -> tuple[Array, Metrics]:
  """BoNBoN (Gui et al. 2024): L = α·L_SFT(best) + (1−α)·L_IPO(best vs worst; β).

  On best-and-worst-of-n samples of π_0 with β = β*_n = 1/(2(n−1)H_{n−1}) (bon.beta_star) the IPO
  target h = 1/(2β*_n) is the expected best-vs-worst log-ratio of π_BoN. L_SFT is summed over
  tokens, not length-normalised, as in the authors' trainers.py; paper: α = 0.005, n = 8.
  Inputs [B].
  """
  sft, _ = sft_loss(policy_logp_best, mask)
  ipo, metrics = ipo_loss(policy_logp_best, policy_logp_worst, ref_logp_best, ref_logp_worst,
                          beta=beta, mask=mask)
  return alpha * sft + (1.0 - alpha) * ipo, {"sft": sft, "ipo": ipo, **metrics}


def bonbon_dpo_loss(policy_logp_best: Array, policy_logp_worst: Array, ref_logp_best: Array,
                    ref_logp_worst: Array, *, alpha: float | Array, beta: float | Array,
                    mask: Array | None = None) -> tuple[Array, Metrics]:
  """BoNBoN as the authors' public code runs it: α·L_SFT(best) + (1−α)·L_DPO(best vs worst; β).

  gl-ybnbxb/BoNBoN `trainers.py` calls its preference loss without `ipo=True`, so its `bonbon`
  path trains a DPO term where the paper (and `bonbon_loss`) has IPO (algorithms.md §6).
  """
  sft, _ = sft_loss(policy_logp_best, mask)
  dpo, metrics = dpo_loss(policy_logp_best, policy_logp_worst, ref_logp_best, ref_logp_worst,
                          beta=beta, mask=mask)
  return alpha * sft + (1.0 - alpha) * dpo, {"sft": sft, "dpo": dpo, **metrics}


# ---------------------------------------------------------------------------------------------
# Baselines: REINFORCE with KL, reward model.

def reinforce_loss(policy_logp: Array, ref_logp: Array, rewards: Array, beta_rl: float | Array,
                   mask: Array | None = None) -> tuple[Array, Metrics]:
  """REINFORCE with KL (algorithms.md §7): maximise E_{y∼π_θ}[r(y)] − β_RL·KL(π_θ ‖ π_ref).

  The per-sample KL estimate log π_θ(y) − log π_ref(y) is folded into the reward,
  R = r − β_RL·(log π_θ − log π_ref), with an RLOO baseline over the S ≥ 2 samples of a prompt.
  policy_logp, ref_logp, rewards: [B, S]. The loss value is −(E[r] − β_RL·KL).
  """
  rewards = jnp.asarray(rewards, jnp.float32)
  loss, log_ratio = _kl_regularised_policy_gradient(policy_logp, ref_logp, rewards, beta_rl, mask)
  return loss, {"reward": _masked_mean(rewards, mask), "kl_to_ref": _masked_mean(log_ratio, mask)}


def reward_model_loss(reward_w: Array, reward_l: Array, mask: Array | None = None
                      ) -> tuple[Array, Metrics]:
  """Bradley–Terry reward model: L = −log σ(r(y_w) − r(y_l)); inputs [B] scalar rewards."""
  chex.assert_equal_shape([reward_w, reward_l])
  margin = reward_w.astype(jnp.float32) - reward_l.astype(jnp.float32)
  loss = _masked_mean(jax.nn.softplus(-margin), mask)
  return loss, {"accuracy": _masked_mean((margin > 0).astype(jnp.float32), mask),
                "margin": _masked_mean(margin, mask)}


# ---------------------------------------------------------------------------------------------
# The registry: one entry per algorithm, `config.bond.objective` names it.
#
# An entry says which samples its rollout draws (`rollout.make_rollout_fn` reads it) and which
# loss consumes the rollout. A loss is `loss(params, rollout, hp, logp) -> (loss, metrics)`:
# `hp` is `config.bond`, `logp(params, samples) -> [B, N]` the differentiable sequence log-probs
# of `samples` ([B, N, T], a `rollout.Samples`) under params; everything else it reads from the
# rollout, computed there without gradients. Losses score their sample sets through `_pass`.
# Adding an algorithm = one loss + one entry.

def _pass(params, logp, *samples) -> list[Array]:
  """Sequence log-probs [B, N_i] of each [B, N_i, T] sample set.

  A pass per set, or, where `logp.one_pass` is set (`steps.make_loss_fn` sets it when the
  vocabulary projection is chunked), one pass over the sets concatenated on N: the chunked
  projection then streams the tied embedding once instead of once per set (Gemma 3 270M J-BOND
  fwd+bwd 1.18x faster, gemma3_35m 1.02x: `python benchmarks/loss_passes.py [--gguf]`). Elsewhere
  the per-set passes keep the toy harness's trajectories as they were. Sets of different lengths
  T always run a pass each.
  """
  if (not getattr(logp, "one_pass", False) or len(samples) == 1
      or len({s.tokens.shape[2] for s in samples}) > 1):
    return [logp(params, s) for s in samples]
  lp = logp(params, functools.reduce(lambda a, b: a.concat(b), samples))
  ends = list(itertools.accumulate(s.tokens.shape[1] for s in samples))
  return [lp[:, end - s.tokens.shape[1]:end] for s, end in zip(samples, ends)]


def _best(samples, n: int):
  """The best of the first n samples of each prompt (first maximiser), [B, 1, ...]."""
  best, _ = bon.select_best_worst(samples.rewards[:, :n])
  return samples.take(best)


def bond_reward_estimate(rollout, hp) -> Array:
  """[B, S] BOND reward of the policy samples from the first k anchor samples (algorithms.md §2).

  hp.bond_reward: 'log_quantile' = log p̂≤ (the paper's practical choice, biased under ties);
  'exact_ties' = BOND Eq. 8 from p̂< and p̂≤ (`bon.bond_reward`). Smoothing: hp.quantile_smoothing.
  """
  p_lt, p_le = bon.quantile_estimates(rollout.policy.rewards, rollout.anchor.rewards[:, :hp.k],
                                      smoothing=hp.quantile_smoothing)
  if hp.get("bond_reward", "log_quantile") == "exact_ties":
    return bon.bond_reward(p_lt, p_le, hp.n)
  return jnp.log(p_le)


def _bond_forward(params, rollout, hp, logp):
  (lp_best,) = _pass(params, logp, _best(rollout.anchor, hp.n))
  return forward_kl_loss(lp_best[:, 0])


def anchor_logp_in_decode(hp) -> bool:
  """Whether log π_anchor of the policy samples comes from the anchor's decode loop (config key
  `bond.anchor_logp` = 'decode', with a moving anchor; a fixed anchor is π_ref, whose pass the
  rollout runs anyway). The losses then take log π_θ/π_anchor from the two samplers' log-probs,
  so that both terms come from one numerical path (`sampler_log_ratio`)."""
  return hp.get("anchor_logp", "decode") == "decode" and hp.get("anchor", "fixed") != "fixed"


def sampler_log_ratio(samples, hp) -> Array | None:
  """[B, S] log π_θ(y) − log π_anchor(y) of the policy samples from the samplers' log-probs
  (`anchor_logp_in_decode`), or None: the losses then compute it from their own pass (also for
  samples without the sampler's log-probs, e.g. a hand-built rollout)."""
  if not anchor_logp_in_decode(hp) or samples.logp is None:
    return None
  return samples.logp - samples.anchor_logp


def _bond_backward(params, rollout, hp, logp):
  (lp,) = _pass(params, logp, rollout.policy)
  return backward_kl_loss(lp, rollout.policy.anchor_logp, bond_reward_estimate(rollout, hp), hp.n,
                          log_ratio=sampler_log_ratio(rollout.policy, hp))


def _bond_jeffreys(params, rollout, hp, logp):
  lp_best, lp = _pass(params, logp, _best(rollout.anchor, hp.n), rollout.policy)
  return jeffreys_loss(lp_best[:, 0], lp, rollout.policy.anchor_logp,
                       bond_reward_estimate(rollout, hp), n=hp.n, beta=hp.beta,
                       log_ratio=sampler_log_ratio(rollout.policy, hp))


def _jbond(params, rollout, hp, logp):
  anchor, policy = rollout.anchor, rollout.policy
  lp_best, lp_y = _pass(params, logp, _best(anchor, 2), policy)
  # r_J = 0 when y is not worse than at least one anchor sample (p̂≤ > 0 from the 2 samples).
  beats = policy.rewards[:, 0] >= jnp.min(anchor.rewards, axis=1)
  ratio = sampler_log_ratio(policy, hp)
  return jbond_loss(lp_best[:, 0], lp_y[:, 0], policy.anchor_logp[:, 0], beats, beta=hp.beta,
                    gamma=hp.gamma, penalty=hp.jbond_penalty,
                    log_ratio=None if ratio is None else ratio[:, 0])


def _reinforce(params, rollout, hp, logp):
  (lp,) = _pass(params, logp, rollout.policy)
  return reinforce_loss(lp, rollout.policy.ref_logp, rollout.policy.rewards, beta_rl=hp.beta_rl)


def _sft(params, rollout, hp, logp):
  del hp
  (lp,) = _pass(params, logp, rollout.chosen)
  return sft_loss(lp[:, 0])


def _preference(fn):
  """DPO/IPO/BoNBoN on (chosen, rejected) pairs against π_ref's log-probs from the rollout."""
  def loss(params, rollout, hp, logp):
    w, l = rollout.chosen, rollout.rejected
    lp_w, lp_l = _pass(params, logp, w, l)
    return fn(lp_w[:, 0], lp_l[:, 0], w.ref_logp[:, 0], l.ref_logp[:, 0], hp)
  return loss


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """A registered algorithm: the samples its rollout draws and the loss that consumes them."""

  loss: Callable[..., tuple[Array, Metrics]]
  policy_samples: Callable[[Any], int] = lambda hp: 0   # S samples of π_θ per prompt
  anchor_samples: Callable[[Any], int] = lambda hp: 0   # samples of π_anchor per prompt
  policy_anchor_logp: bool = False   # the loss reads log π_anchor on the policy samples
  policy_ref_logp: bool = False      # the loss reads log π_ref on the policy samples (else that
  #                                    pass only feeds the kl/policy_ref metric)
  offline: bool = False              # chosen/rejected pairs from the batch, no sampling


_S = lambda hp: hp.num_policy_samples  # noqa: E731

OBJECTIVES: dict[str, Algorithm] = {
    # Forward-KL BOND needs only Best-of-N anchor samples; its S policy samples feed the metrics.
    "bond_fwd": Algorithm(_bond_forward, _S, lambda hp: hp.n),
    "bond_bwd": Algorithm(_bond_backward, _S, lambda hp: hp.k, policy_anchor_logp=True),
    "bond_jeffreys": Algorithm(_bond_jeffreys, _S, lambda hp: max(hp.n, hp.k),
                               policy_anchor_logp=True),
    "jbond": Algorithm(_jbond, lambda hp: 1, lambda hp: 2, policy_anchor_logp=True),
    "reinforce": Algorithm(_reinforce, _S, policy_ref_logp=True),
    "sft": Algorithm(_sft, offline=True),
    "dpo": Algorithm(_preference(lambda w, l, rw, rl, hp: dpo_loss(w, l, rw, rl, beta=hp.beta_ipo)),
                     offline=True),
    "ipo": Algorithm(_preference(lambda w, l, rw, rl, hp: ipo_loss(w, l, rw, rl, beta=hp.beta_ipo)),
                     offline=True),
    "bonbon": Algorithm(_preference(lambda w, l, rw, rl, hp: bonbon_loss(
        w, l, rw, rl, alpha=hp.alpha, beta=hp.beta_ipo)), offline=True),
    "bonbon_dpo": Algorithm(_preference(lambda w, l, rw, rl, hp: bonbon_dpo_loss(
        w, l, rw, rl, alpha=hp.alpha, beta=hp.beta_ipo)), offline=True),
}


def get_objective(name: str) -> Algorithm:
  """The algorithm registered as `name` (a value of `config.bond.objective`)."""
  if name not in OBJECTIVES:
    known = ", ".join(sorted(OBJECTIVES))
    raise ValueError(f"unknown objective {name!r}; known objectives: {known}")
  return OBJECTIVES[name]
