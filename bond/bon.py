"""Best-of-N maths: the exact BoN distribution, its KL and win rate, quantile estimates, selection.

Exact functions take per-outcome arrays over an enumerated outcome set, outcomes on the LAST
axis, leading axes are batch axes (e.g. [P, M]: P prompts, M completions):
  ref_log_probs [..., M]  log π_ref(y|x), summing (in prob space) to 1 over the last axis;
  rewards       [..., M]  r(x, y), ties allowed (broadcastable against ref_log_probs).
Everything is pure and jittable, accepts NumPy or JAX arrays and keeps float64 when
`jax_enable_x64` is on. Sample-based functions use B prompts and N (or S, k) samples per prompt.
References: BOND (Sessa et al. 2024, arXiv 2407.14622) Thm 1; BoNBoN (Gui et al. 2024);
Beirami et al. 2024 (arXiv 2401.01879); notation of docs algorithms.md.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Iterable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Bisection steps on log N in `effective_n`: 2^-60 of the bracket, far below f32 resolution.
BISECTION_STEPS = 60
SMOOTHINGS = ("clip", "add_one", "none")


def as_float(x) -> Array:
  """As a JAX float array, f32 at least, f64 when given f64 with x64 on."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _is_concrete(*xs) -> bool:
  return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _log1mexp(x: Array) -> Array:
  """log(1 − e^{−x}) for x ≥ 0, accurate at both ends (Mächler 2012)."""
  return jnp.where(x < math.log(2.0), jnp.log(-jnp.expm1(-x)), jnp.log1p(-jnp.exp(-x)))


def _log_levels(ref_log_probs, rewards) -> tuple[Array, Array, Array]:
  """(log p<(y), log π_ref(level of y), log p≤(y)) [..., M], level = {y' : r(y') = r(y)}.

  log p≤ comes from the mass above, log1p(−p>), where p> < ½: BoN raises p≤ to the power n − 1,
  which amplifies its relative error n-fold near p≤ = 1. Pairwise over outcomes (O(M²) memory):
  meant for enumerable outcome sets.
  """
  logp = as_float(ref_log_probs)
  r = jnp.asarray(rewards)
  logp, r = jnp.broadcast_arrays(logp, r)
  other = logp[..., None, :]                      # [..., 1, M'] log π_ref(y')
  r_y, r_other = r[..., :, None], r[..., None, :]   # [..., M, 1], [..., 1, M']
  neg_inf = jnp.asarray(-jnp.inf, logp.dtype)
  mass = lambda where: jax.nn.logsumexp(jnp.where(where, other, neg_inf), axis=-1)  # noqa: E731
  below, level, above = mass(r_other < r_y), mass(r_other == r_y), mass(r_other > r_y)
  small_above = above < -math.log(2.0)
  log_leq = jnp.where(small_above, jnp.log1p(-jnp.exp(jnp.where(small_above, above, -1.0))),
                      jnp.logaddexp(below, level))
  return below, level, log_leq


def log_quantiles(ref_log_probs, rewards) -> tuple[Array, Array]:
  """(log p≤(y), log p<(y)) [..., M]: p≤(y) = P_ref[r(y') ≤ r(y)], p<(y) = P_ref[r(y') < r(y)]."""
  below, _, log_leq = _log_levels(ref_log_probs, rewards)
  return log_leq, below


def reward_cdf(ref_log_probs, rewards, query) -> Array:
  """P_ref[r(y') ≤ q] [..., Q] for query rewards q [..., Q] (e.g. rewards of policy samples)."""
  logp = as_float(ref_log_probs)
  r = jnp.broadcast_to(jnp.asarray(rewards), logp.shape)
  q = jnp.asarray(query)
  return jnp.sum(jnp.where(r[..., None, :] <= q[..., :, None], jnp.exp(logp)[..., None, :], 0.0),
                 axis=-1)


def _log_tie_factor(d: Array, n) -> Array:
  """log Σ_{i=1..n} ρ^(i−1) = log[(1 − ρ^n)/(1 − ρ)] for ρ = e^{−d}, d = log p≤ − log p< ≥ 0.

  d → 0 (a reward level without mass: no ties) gives log n; d = +inf (p< = 0) gives 0.
  """
  tiny = d <= 0
  safe_d = jnp.where(tiny, 1.0, d)
  return jnp.where(tiny, jnp.log(n), _log1mexp(n * safe_d) - _log1mexp(safe_d))


def bon_log_probs(ref_log_probs, rewards, n) -> Array:
  """log π_BoN(y) [..., M], exact with ties (BOND Thm 1), for real n ≥ 1.

    π_BoN(y) = π_ref(y) · (p≤^n − p<^n) / (p≤ − p<)
             = π_ref(y) · p≤^(n−1) · (1 − ρ^n) / (1 − ρ),    ρ = p< / p≤ = e^{−d}.

  d = log p≤ − log p< = softplus(log level − log p<) is computed from the level mass directly, so
  a level much lighter than p< keeps full precision; d → 0 gives the no-ties limit factor n.
  n: a scalar or one per leading index [...].
  """
  logp = as_float(ref_log_probs)
  below, level, log_leq = _log_levels(logp, rewards)
  logp = jnp.broadcast_to(logp, below.shape)
  n = jnp.asarray(n, logp.dtype)
  n = n[..., None] if n.ndim else n
  d = jax.nn.softplus(level - below)                 # +inf on the lowest level (p< = 0)
  out = logp + (n - 1) * log_leq + _log_tie_factor(d, n)
  return jnp.where(jnp.isneginf(logp), -jnp.inf, out)


def kl(log_p, log_q) -> Array:
  """KL(p ‖ q) = Σ_y p(y) (log p(y) − log q(y)) over the last axis; 0·log 0 = 0."""
  log_p, log_q = as_float(log_p), as_float(log_q)
  p = jnp.exp(log_p)
  terms = jnp.where(p > 0, p * (log_p - jnp.where(p > 0, log_q, 0.0)), 0.0)
  return jnp.sum(terms, axis=-1)


def expected_reward(log_probs, rewards) -> Array:
  """E_π[r] = Σ_y π(y) r(y) over the last axis."""
  return jnp.sum(jnp.exp(as_float(log_probs)) * as_float(rewards), axis=-1)


def win_rate_vs_ref(policy_log_probs, ref_log_probs, rewards) -> Array:
  """P[r(y) > r(y')] + ½ P[r(y) = r(y')], y ~ π, y' ~ π_ref independent (ties count half)."""
  below, level, _ = _log_levels(ref_log_probs, rewards)
  return jnp.sum(jnp.exp(as_float(policy_log_probs)) * (jnp.exp(below) + 0.5 * jnp.exp(level)),
                 axis=-1)


def kl_bon_ref(ref_log_probs, rewards, n) -> Array:
  """KL(π_BoN(n) ‖ π_ref), exact with ties; ≤ `kl_bound(n)`, equal without ties in the limit."""
  return kl(bon_log_probs(ref_log_probs, rewards, n), ref_log_probs)


def kl_bound(n) -> Array:
  """log n − (n − 1)/n: KL(π_BoN ‖ π_ref) for continuous rewards, an upper bound with ties."""
  n = as_float(n)
  return jnp.log(n) - (n - 1) / n


def bond_reward(p_less, p_less_equal, n) -> Array:
  """The BOND reward, exact with ties (BOND Eq. 8, algorithms.md §1), elementwise:

    r_BOND(y) = log p≤(y) + (1/(N−1))·log Σ_{i=1..N} (p<(y)/p≤(y))^(i−1),

  so that log π_BoN(y) − log π_ref(y) = (N−1)·r_BOND(y) + const exactly, ties included. The
  correction lies in [0, log N/(N−1)]: log N/(N−1) when y's reward level has no mass (p< = p≤,
  the no-ties case) and 0 on the lowest level (p< = 0). Inputs are probabilities with
  0 ≤ p_less ≤ p_less_equal ≤ 1 (e.g. from `quantile_estimates`; p< exceeding p≤ or p≤ exceeding
  1 by float round-off, as from exact log-quantiles, is accepted and read as p< = p≤). p≤ = 0
  (smoothing='none' when y loses to every reference) gives −inf, like log p̂≤. For N = 1
  (π_BoN = π_ref) the correction is taken as 0: r_BOND = log p≤, which the loss scales by N−1 = 0.
  n: a scalar (or an array broadcasting against the probabilities), n ≥ 1.
  """
  p_lt, p_le = as_float(p_less), as_float(p_less_equal)
  p_lt, p_le = jnp.broadcast_arrays(p_lt, p_le)
  if _is_concrete(p_lt, p_le, n):
    if not np.all(np.asarray(n, np.float64) >= 1):        # NaN fails too
      raise ValueError(f"bond_reward: n must be >= 1, got {n}")
    lt, le = np.asarray(p_lt, np.float64), np.asarray(p_le, np.float64)
    slack = 64 * float(jnp.finfo(p_le.dtype).eps)         # round-off only, never a real error
    ok = (lt >= 0) & (le <= 1 + slack) & (lt <= le * (1 + slack))   # False on NaN
    if not np.all(ok):
      raise ValueError("bond_reward: need 0 <= p_less <= p_less_equal <= 1 (no NaN), got "
                       f"p_less={lt[~ok][:3]}, p_less_equal={le[~ok][:3]}")
  n = jnp.asarray(n, p_le.dtype)
  log_le = jnp.log(p_le)
  # d = log(p≤/p<) ≥ 0; +inf where p< = 0 (then the correction is 0; also for p≤ = 0, where
  # log p≤ − log p< would be NaN).
  d = jnp.where(p_lt > 0, log_le - jnp.log(jnp.where(p_lt > 0, p_lt, 1.0)), jnp.inf)
  correction = jnp.where(n > 1, _log_tie_factor(d, n) / jnp.maximum(n - 1, 1e-30), 0.0)
  return log_le + correction


def win_rate(ref_log_probs, rewards, n) -> Array:
  """Win rate of π_BoN(n) against one π_ref sample (ties half); n/(n+1) without ties."""
  return win_rate_vs_ref(bon_log_probs(ref_log_probs, rewards, n), ref_log_probs, rewards)


def effective_n(policy_kl, ref_log_probs, rewards, *, n_max: float = 4096.0,
                average: bool = False) -> Array:
  """N* ∈ [1, n_max] with KL(π_BoN(N*) ‖ π_ref) = κ (algorithms.md §8), by bisection on log N.

  KL(π_BoN(N) ‖ π_ref) increases with N, so N* = 1 when κ ≤ 0 and N* = n_max when κ exceeds the
  KL at n_max. policy_kl: κ [...] for ref/rewards [..., M]; with `average=True` κ is a scalar and
  N* is the single N whose KL averaged over the leading (prompt) axes equals κ.
  """
  logp = as_float(ref_log_probs)
  kappa = as_float(policy_kl).astype(logp.dtype)
  if _is_concrete(n_max) and not n_max >= 1:
    raise ValueError(f"effective_n: n_max must be >= 1, got {n_max}")
  reduce = jnp.mean if average else (lambda x: x)
  kl_at = lambda log_n: reduce(kl_bon_ref(logp, rewards, jnp.exp(log_n)))  # noqa: E731
  lo = jnp.zeros_like(kappa)
  hi = jnp.full_like(kappa, math.log(n_max))

  def step(_, bracket):
    lo, hi = bracket
    mid = 0.5 * (lo + hi)
    above = kl_at(mid) > kappa
    return jnp.where(above, lo, mid), jnp.where(above, mid, hi)

  lo, hi = jax.lax.fori_loop(0, BISECTION_STEPS, step, (lo, hi))
  log_n = jnp.where(kappa <= 0, 0.0, 0.5 * (lo + hi))
  return jnp.exp(log_n)


def beta_star(n: int) -> float:
  """BoNBoN's IPO strength targeting BoN (BoNBoN §4): β*_n = 1 / (2 (n − 1) H_{n−1}).

  H_m = Σ_{k ≤ m} 1/k; n = 8 gives 0.027548 (the paper's 0.0276).
  """
  if n < 2:
    raise ValueError(f"beta_star needs n >= 2 (best and worst of n samples), got {n}")
  harmonic = sum(1.0 / k for k in range(1, n))
  return 1.0 / (2.0 * (n - 1) * harmonic)


def quantile_estimates(rewards, ref_rewards, ref_mask=None, smoothing: str = "clip"
                       ) -> tuple[Array, Array]:
  """(p̂<, p̂≤) [B, S] from the k reference rewards [B, k] of each prompt (algorithms.md §2).

    p̂≤(y) = (1/k) Σ_j 1[r(y'_j) ≤ r(y)],  p̂<(y) = (1/k) Σ_j 1[r(y'_j) < r(y)]
                                   (smoothing='none': both unbiased for p≤(y), p<(y))
    'clip':    p̂≤ ← max(p̂≤, 1/(k+1)), p̂< unchanged (log p̂≤ finite; equals p̂≤ unless p̂≤ = 0)
    'add_one': p̂≤ = (1 + #≤)/(k+1), p̂< = #</(k+1): y itself joins the references (≤ itself,
               not < itself), so 0 ≤ p̂< < p̂≤ always.
  k counts the unmasked references of each prompt (ref_mask [B, k], default all). Always
  p̂< ≤ p̂≤. Plugging these into the nonlinear `bond_reward` biases it at small k (O(1/k)).
  """
  if smoothing not in SMOOTHINGS:
    raise ValueError(f"smoothing must be one of {SMOOTHINGS}, got {smoothing!r}")
  rewards, ref_rewards = as_float(rewards), as_float(ref_rewards)
  if ref_mask is None:
    ref_mask = jnp.ones(ref_rewards.shape, jnp.bool_)
  ref_mask = jnp.asarray(ref_mask, jnp.bool_)
  if rewards.ndim != 2 or ref_rewards.ndim != 2 or rewards.shape[0] != ref_rewards.shape[0]:
    raise ValueError(f"quantile_estimate: rewards must be [B, S] and ref_rewards [B, k], got "
                     f"{rewards.shape} and {ref_rewards.shape}")
  if ref_mask.shape != ref_rewards.shape:
    raise ValueError(f"quantile_estimate: ref_mask shape {ref_mask.shape} != ref_rewards shape "
                     f"{ref_rewards.shape}")
  k = jnp.sum(ref_mask, axis=-1, keepdims=True).astype(rewards.dtype)            # [B, 1]
  if _is_concrete(k) and np.any(np.asarray(k) < 1):
    raise ValueError("quantile_estimate: every prompt needs k >= 1 unmasked reference rewards")
  count = lambda cmp: jnp.sum(cmp(ref_rewards[:, None, :], rewards[:, :, None])  # noqa: E731
                              & ref_mask[:, None, :], axis=-1).astype(rewards.dtype)   # [B, S]
  at_or_below, below = count(jnp.less_equal), count(jnp.less)
  if smoothing == "add_one":
    return below / (k + 1.0), (1.0 + at_or_below) / (k + 1.0)
  p_le, p_lt = at_or_below / jnp.maximum(k, 1.0), below / jnp.maximum(k, 1.0)
  if smoothing == "clip":
    p_le = jnp.maximum(p_le, 1.0 / (k + 1.0))
  return p_lt, p_le


def quantile_estimate(rewards, ref_rewards, ref_mask=None, smoothing: str = "clip") -> Array:
  """p̂≤ [B, S] alone (see `quantile_estimates`)."""
  return quantile_estimates(rewards, ref_rewards, ref_mask, smoothing)[1]


def log_quantile_estimate(rewards, ref_rewards, ref_mask=None, smoothing: str = "clip") -> Array:
  """log p̂≤ [B, S] (see `quantile_estimate`); −inf possible only with smoothing='none'."""
  return jnp.log(quantile_estimate(rewards, ref_rewards, ref_mask, smoothing))


def select_best_worst(rewards, mask=None) -> tuple[Array, Array]:
  """(best_idx [B], worst_idx [B]) over N candidates [B, N]: first maximiser, first minimiser.

  Masked candidates are never chosen (also when rewards are ±inf).
  """
  r = as_float(rewards)
  mask = jnp.ones(r.shape, jnp.bool_) if mask is None else jnp.asarray(mask, jnp.bool_)
  if r.ndim != 2 or mask.shape != r.shape:
    raise ValueError(f"select_best_worst: rewards must be [B, N] with a mask of the same shape, "
                     f"got {r.shape} and {mask.shape}")
  if _is_concrete(r, mask):
    if not np.all(np.any(np.asarray(mask), axis=-1)):
      raise ValueError("select_best_worst: every row needs at least one unmasked candidate")
    if np.any(np.isnan(np.asarray(r)) & np.asarray(mask)):
      raise ValueError("select_best_worst: rewards contain NaN")
  top = jnp.max(jnp.where(mask, r, -jnp.inf), axis=-1, keepdims=True)
  bottom = jnp.min(jnp.where(mask, r, jnp.inf), axis=-1, keepdims=True)
  best = jnp.argmax(mask & (r == top), axis=-1)
  worst = jnp.argmax(mask & (r == bottom), axis=-1)
  return best.astype(jnp.int32), worst.astype(jnp.int32)


@flax.struct.dataclass
class BestOfN:
  """Best-of-N over N samples for each of B prompts; T completion length."""

  best_tokens: Array      # [B, T]
  best_mask: Array        # [B, T]
  best_logprobs: Array    # [B, T] per-token sampler log-probs of the best sample
  worst_tokens: Array     # [B, T]
  worst_mask: Array       # [B, T]
  worst_logprobs: Array   # [B, T]
  rewards: Array          # [B, N]
  best_idx: Array         # [B]
  worst_idx: Array        # [B]
  quantiles: Array        # [B, N] in-group p̂≤: fraction of the N samples with reward ≤ own


def best_of_n(sample_fn: Callable[..., Any], reward_fn: Callable[..., Array], prompt_tokens,
              prompt_mask, rng: Array, n: int) -> BestOfN:
  """Sample n completions per prompt, score them, keep the best and the worst (BOND §2, BoNBoN).

  sample_fn(prompt_tokens [B, P], prompt_mask [B, P], rng, num_samples) -> object with
    .tokens, .mask, .logprobs [B, N, T] (e.g. `functools.partial(sampling.sample, config, params,
    max_new_tokens=T)`); reward_fn(prompt_tokens [B*N, P], prompt_mask, completion_tokens [B*N, T],
    completion_mask) -> [B*N]. Ties go to the first maximiser / minimiser.
  """
  if not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"best_of_n: n must be an integer >= 1, got {n!r}")
  prompt_tokens, prompt_mask = jnp.asarray(prompt_tokens), jnp.asarray(prompt_mask)
  if prompt_tokens.ndim != 2 or prompt_mask.shape != prompt_tokens.shape:
    raise ValueError(f"best_of_n: prompt_tokens must be [B, P] with a mask of the same shape, "
                     f"got {prompt_tokens.shape} and {prompt_mask.shape}")
  b = prompt_tokens.shape[0]
  out = sample_fn(prompt_tokens, prompt_mask, rng, n)
  tokens, mask, logprobs = out.tokens, jnp.asarray(out.mask), out.logprobs
  if tokens.ndim != 3 or tokens.shape[:2] != (b, n):
    raise ValueError(f"best_of_n: sample_fn must return tokens [B={b}, N={n}, T], "
                     f"got {tokens.shape}")
  if mask.shape != tokens.shape or logprobs.shape != tokens.shape:
    raise ValueError(f"best_of_n: sample mask {mask.shape} and logprobs {logprobs.shape} must "
                     f"match tokens {tokens.shape}")
  t = tokens.shape[-1]
  rep = lambda x: jnp.repeat(x, n, axis=0)  # noqa: E731  [B, P] -> [B*N, P], sample-major
  rewards = reward_fn(rep(prompt_tokens), rep(prompt_mask), tokens.reshape(b * n, t),
                      mask.reshape(b * n, t))
  rewards = as_float(rewards)
  if rewards.shape != (b * n,):
    raise ValueError(f"best_of_n: reward_fn must return [B*N={b * n}], got {rewards.shape}")
  rewards = rewards.reshape(b, n)
  if _is_concrete(rewards) and np.any(np.isnan(np.asarray(rewards))):
    raise ValueError("best_of_n: reward_fn returned NaN rewards")
  best, worst = select_best_worst(rewards)
  pick = lambda x, i: jnp.take_along_axis(x, i[:, None, None], axis=1)[:, 0]  # noqa: E731
  quantiles = quantile_estimate(rewards, rewards, smoothing="none")
  return BestOfN(pick(tokens, best), pick(mask, best), pick(logprobs, best),
                 pick(tokens, worst), pick(mask, worst), pick(logprobs, worst),
                 rewards, best, worst, quantiles)


def bon_records(result: BestOfN, prompt_tokens, prompt_mask,
                decode: Callable[[list[int]], Any] | None = None) -> list[dict[str, Any]]:
  """One {prompt, best, worst, rewards} dict per prompt; masked ids dropped, decoded if `decode`."""
  decode = decode or (lambda ids: ids)
  ids = lambda tok, m: decode([int(x) for x in np.asarray(tok)[np.asarray(m, bool)]])  # noqa: E731
  return [{"prompt": ids(prompt_tokens[i], prompt_mask[i]),
           "best": ids(result.best_tokens[i], result.best_mask[i]),
           "worst": ids(result.worst_tokens[i], result.worst_mask[i]),
           "rewards": [float(x) for x in np.asarray(result.rewards[i])]}
          for i in range(np.shape(prompt_tokens)[0])]


def write_bon_dataset(path: str, records: Iterable[dict[str, Any]]) -> int:
  """Writes records as JSON lines (BoNBoN's offline best/worst data); returns the line count."""
  count = 0
  with open(path, "w") as f:
    for record in records:
      f.write(json.dumps(record) + "\n")
      count += 1
  return count
