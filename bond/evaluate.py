"""Evaluation: the exact Best-of-N curve, sampled estimators of every metric, and the run's plots.

The BoN curve is what the papers draw next to training runs: for N = 1, 2, 4, ... the exact
KL(π_BoN(N)‖π_ref), expected reward and win rate against π_ref (algorithms.md §1, §8).

On tasks that cannot be enumerated the same quantities are estimated by sampling (§8, "by
sampling"): `reference_points` (the Best-of-N points from a cache of K reference samples per
prompt, no model calls), `policy_metrics` (the `eval/*` metrics of M policy samples per prompt,
each with a `_se` standard error), `fwd_kl_to_bon`, `empirical_effective_n`, and
`best_of_n_policy_samples` (Best-of-N sampling as the evaluated policy). tests/test_evaluate.py
proves them against the exact values on the toy harness.
"""

from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import special as _special

from bond import bon


def bon_curve(ref_log_probs, rewards, ns: Sequence[float] = (1, 2, 4, 8, 16, 32, 64),
              lengths=None) -> dict:
  """Exact BoN points averaged over prompts: {'n', 'kl', 'reward', 'win_rate'} lists, and
  'mean_length' (E_{π_BoN}[len(y)]) when `lengths` [M] of the completions is given."""
  out = {"n": [], "kl": [], "reward": [], "win_rate": []}
  if lengths is not None:
    out["mean_length"] = []
  for n in ns:
    logp = bon.bon_log_probs(ref_log_probs, rewards, n)
    out["n"].append(float(n))
    out["kl"].append(float(jnp.mean(bon.kl(logp, ref_log_probs))))
    out["reward"].append(float(jnp.mean(bon.expected_reward(logp, rewards))))
    out["win_rate"].append(float(jnp.mean(bon.win_rate_vs_ref(logp, ref_log_probs, rewards))))
    if lengths is not None:
      out["mean_length"].append(float(jnp.mean(jnp.exp(logp) @ jnp.asarray(lengths, logp.dtype))))
  return out


def plot_run(records: list[dict], out_dir: str, curve: dict | None = None,
             points: dict | None = None) -> list[str]:
  """PNG plots of a run's metrics.jsonl records; returns the written paths.

  curve: the exact Best-of-N curve (`bon_curve`, toy); points: the sampled Best-of-N reference
  points (`reference_points`). With held-out `eval/*` metrics in the records, also the papers'
  figures: win rate vs KL, length vs win rate, log-quantile and estimated KL to π_BoN vs step.
  """
  # Figure objects with no pyplot: no global backend switch (notebooks keep inline drawing).
  from matplotlib.figure import Figure

  os.makedirs(out_dir, exist_ok=True)
  paths = []
  evals = [r for r in records if r.get("eval/kl_to_ref") is not None or "eval/reward" in r]

  def col(rows, key):
    return np.asarray([np.nan if r.get(key) is None else r[key] for r in rows], np.float64)

  def sampled(ax, x, y, label="run (held-out, sampled)"):
    if evals and y in evals[0]:
      ax.errorbar(col(evals, x), col(evals, y), xerr=col(evals, x + "_se"),
                  yerr=col(evals, y + "_se"), fmt="s-", ms=3, lw=1, capsize=2, label=label)

  def bon_points(ax, x, y):
    if points is not None and x in points and y in points:
      ax.errorbar(points[x], points[y], xerr=points.get(x + "_se"), yerr=points.get(y + "_se"),
                  fmt="D:", color="tab:red", ms=4, lw=1, capsize=2, label="Best-of-N (sampled)")
      for n, a, b in zip(points["n"], points[x], points[y]):
        ax.annotate(f"N={n:g}", (a, b), fontsize=7, color="tab:red")

  def new_axes():
    fig = Figure(figsize=(5.5, 4))
    return fig, fig.subplots()

  def save(fig, name):
    for ax in fig.axes:
      if ax.get_legend_handles_labels()[0]:
          fig.tight_layout()
    paths.append(os.path.join(out_dir, name))
    fig.savefig(paths[-1], dpi=100)

  def series(key):
    return [(r["step"], r[key]) for r in records if r.get(key) is not None]

  fig, ax = new_axes()
  if series("exact/kl_to_ref"):
    rows = [r for r in records if "exact/kl_to_ref" in r]
    ax.plot(col(rows, "exact/kl_to_ref"), col(rows, "exact/reward"), "o-", ms=3,
            label="run (exact)")
  elif not evals:
    ax.plot(col(records, "kl/policy_ref"), col(records, "reward/mean"), "o-", ms=3,
            label="run (training batches)")
  sampled(ax, "eval/kl_to_ref", "eval/reward")
  if curve is not None:
    ax.plot(curve["kl"], curve["reward"], "k--", label="Best-of-N (exact)")
    for n, x, y in zip(curve["n"], curve["kl"], curve["reward"]):
      ax.annotate(f"N={n:g}", (x, y), fontsize=7)
  bon_points(ax, "kl", "reward")
  ax.set_xlabel("KL(π ‖ π_ref) (nats)")
  ax.set_ylabel("expected reward")
  ax.set_title("reward vs KL")
  save(fig, "reward_vs_kl.png")

  fig, ax = new_axes()
  drew = False
  for key in ("exact/fwd_kl_to_bon", "exact/bwd_kl_to_bon", "exact/fwd_kl_to_bon_n",
              "exact/bwd_kl_to_bon_n", "loss"):
    pts = series(key)
    if pts and (key != "loss" or not drew):
      ax.plot(*zip(*pts), label=key)
      drew = True
  ax.set_xlabel("step")
  ax.set_title("divergences to π_BoN" if drew else "loss")
  save(fig, "divergences.png")
  if not evals:
    return paths

  def versus(x, y, px, py, xlabel, title, name):
    """The run's sampled (x, y) trajectory next to the sampled Best-of-N points (px, py)."""
    fig, ax = new_axes()
    sampled(ax, x, y)
    bon_points(ax, px, py)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("win rate vs π_ref (ties ½)")
    ax.set_title(title)
    save(fig, name)

  versus("eval/kl_to_ref", "eval/win_rate", "kl", "win_rate", "KL(π ‖ π_ref), estimated (nats)",
         "win rate vs KL (held-out prompts)", "win_rate_vs_kl.png")
  versus("eval/length", "eval/win_rate", "mean_length", "win_rate", "completion length (tokens)",
         "win rate vs length (held-out prompts)", "length_vs_win_rate.png")

  fig, ax = new_axes()
  steps = col(evals, "step")
  ax.errorbar(steps, col(evals, "eval/log_quantile"), yerr=col(evals, "eval/log_quantile_se"),
              fmt="s-", ms=3, capsize=2, label="policy samples")
  if points is not None and "log_quantile" in points:
    for n, v in zip(points["n"], points["log_quantile"]):
      ax.axhline(v, color="tab:red", ls=":", lw=0.8)
      ax.annotate(f"BoN N={n:g}", (steps[0], v), fontsize=7, color="tab:red")
  ax.set_xlabel("step")
  ax.set_ylabel("E[log p̂≤(y)] vs the reference cache")
  ax.set_title("Best-of-N log-quantile")
  save(fig, "log_quantile.png")

  fig, ax = new_axes()
  for key in ("eval/bwd_kl_to_bon", "eval/fwd_kl_to_bon", "eval/bwd_kl_to_bon_n",
              "eval/fwd_kl_to_bon_n"):
    if key in evals[0]:
      ax.errorbar(steps, col(evals, key), yerr=col(evals, key + "_se"), fmt="o-", ms=3,
                  capsize=2, label=key + (" (N*)" if not key.endswith("_n") else " (target N)"))
  ax.set_xlabel("step")
  ax.set_ylabel("nats")
  ax.set_title("estimated KL to π_BoN (held-out prompts)")
  save(fig, "kl_to_bon.png")
  return paths


# ---------------------------------------------------------------------------------------------
# Sampled estimators (algorithms.md §8 "The same quantities on real tasks, by sampling").
#
# Shapes: B evaluation prompts (rows; a prompt may repeat), K cached reference samples per prompt
# y'_1..y'_K ~ π_ref (drawn once per run), M policy samples per prompt y ~ π. Every metric is an
# average over prompts of a per-prompt estimate; its standard error `<name>_se` is the standard
# deviation of the per-prompt estimates over the B prompts / sqrt(B) (a cluster standard error:
# samples of one prompt share the prompt and its reference cache, prompts are independent). It
# covers the sampling of the policy samples and of the cache, and treats the prompts as a sample
# of the prompt distribution (with a fixed, balanced prompt set it is conservative).
# Cache-side maths is NumPy float64 (runs once per evaluation, O(B·K·N) at most).
# ---------------------------------------------------------------------------------------------

# Jitted once per shape (an eager call compiles each primitive separately: several times slower).
_bond_reward = jax.jit(lambda p_lt, p_le, n: bon.bond_reward(p_lt, p_le, n))
_quantile_estimates = jax.jit(lambda r, ref_r, smoothing: bon.quantile_estimates(
    r, ref_r, smoothing=smoothing), static_argnums=2)


def _f64(x, name: str, ndim: int = 2) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim != ndim:
    raise ValueError(f"{name} must have {ndim} axes, got shape {x.shape}")
  if np.any(np.isnan(x)):
    raise ValueError(f"{name} contains NaN")
  return x


def _log_comb(n, k) -> np.ndarray:
  """log C(n, k) elementwise; −inf where k < 0 or k > n (n ≥ 0)."""
  n, k = np.asarray(n, np.float64), np.asarray(k, np.float64)
  ok = (k >= 0) & (k <= n)
  safe_k = np.where(ok, k, 0.0)
  out = _special.gammaln(n + 1) - _special.gammaln(safe_k + 1) - _special.gammaln(n - safe_k + 1)
  return np.where(ok, out, -np.inf)


def _mean_se(per_prompt: np.ndarray) -> tuple[float, float]:
  """(mean, standard error) of per-prompt values [B]; se is NaN for B = 1."""
  v = np.asarray(per_prompt, np.float64)
  mean = float(np.mean(v))
  se = float(np.std(v, ddof=1) / np.sqrt(v.size)) if v.size > 1 else float("nan")
  return mean, se


def order_statistic_weights(k: int, n: int) -> np.ndarray:
  """w [K]: w_t = C(t−1, N−1)/C(K, N), t = 1..K: the probability that the t-th smallest of K
  samples (ties broken by position in the sort) is the best of a uniformly random N-subset.

  Σ_t w_t·v_(t) over values sorted by reward is the average over all N-subsets of the value of
  the subset's best, an unbiased estimate of E[v(Best-of-N)] (a U-statistic). Needs 1 ≤ N ≤ K.
  """
  if not (isinstance(n, (int, np.integer)) and 1 <= n <= k):
    raise ValueError(f"order-statistic weights need an integer 1 <= N <= K={k}, got N={n!r}")
  t = np.arange(1, k + 1)
  return np.exp(_log_comb(t - 1, n - 1) - _log_comb(k, n))


def _sorted_cache(ref_rewards: np.ndarray):
  """Stable sort of each prompt's cache by reward: (order [B, K], sorted rewards [B, K],
  less [B, K] = #cache < s_t, leq [B, K] = #cache ≤ s_t). Ties keep cache order, so the best of a
  subset is its maximiser with the largest cache index: a rule blind to the values (any such
  rule gives π_BoN, algorithms.md §1)."""
  order = np.argsort(ref_rewards, axis=1, kind="stable")
  s = np.take_along_axis(ref_rewards, order, axis=1)
  less = np.sum(s[:, None, :] < s[:, :, None], axis=-1)
  leq = np.sum(s[:, None, :] <= s[:, :, None], axis=-1)
  return order, s, less, leq


def _smoothed(c_lt, c_le, k, smoothing: str):
  """(p̂<, p̂≤) from counts out of k references, as `bon.quantile_estimates` smooths them."""
  if smoothing not in bon.SMOOTHINGS:
    raise ValueError(f"smoothing must be one of {bon.SMOOTHINGS}, got {smoothing!r}")
  if smoothing == "add_one":
    return c_lt / (k + 1.0), (c_le + 1.0) / (k + 1.0)
  p_lt, p_le = c_lt / k, c_le / k
  if smoothing == "clip":
    p_le = np.maximum(p_le, 1.0 / (k + 1.0))
  return p_lt, p_le


def _bon_outside_mean(s, less, n: int, fn) -> np.ndarray:
  """E_t [B, K]: for the t-th sorted cache sample as the best of a random N-subset S (the other
  N−1 members uniform among the t−1 below it), the expectation over S of fn(c<, c≤, k) with the
  counts taken over the k = K − N cache samples OUTSIDE S.

  Given that y* = the best of S, the samples outside S are fresh π_ref draws independent of y*,
  so their counts are unbiased for K·p<(y*), K·p≤(y*): the only clean choice (counts from all K
  include y* itself and the N−1 members, which are ≤ y* by construction; leave-one-out still
  includes the N−1 members: p̂≤ biased up by about (N−1)(1 − p≤)/(K−1)). The member count L
  drawn from the a_t samples strictly below y* is hypergeometric(t−1, a_t, N−1).
  """
  b, kk = s.shape
  k_out = kk - n
  i = np.arange(kk)[None, :]                                     # t − 1
  a = less                                                        # strictly below, all before t
  e = i - a                                                       # ties before t
  f = np.sum(s[:, None, :] == s[:, :, None], axis=-1) - e - 1     # ties after t
  l = np.arange(n)[None, None, :]                                 # [1, 1, N]: members below
  a3, e3, f3, i3 = a[..., None], e[..., None], f[..., None], i[..., None]
  with np.errstate(invalid="ignore"):
    log_pmf = _log_comb(a3, l) + _log_comb(e3, n - 1 - l) - _log_comb(i3, n - 1)
  valid = np.isfinite(log_pmf)
  pmf = np.where(valid, np.exp(np.where(valid, log_pmf, 0.0)), 0.0)
  c_lt = np.where(valid, a3 - l, 0.0)
  c_le = np.where(valid, a3 - l + (e3 - (n - 1 - l)) + f3, 1.0)
  values = np.where(valid, fn(c_lt, c_le, k_out), 0.0)
  return np.sum(pmf * values, axis=-1)                            # [B, K] (0 where t < N)


def _log_quantile_fn(smoothing):
  def fn(c_lt, c_le, k):
    with np.errstate(divide="ignore"):
      return np.log(_smoothed(c_lt, c_le, k, smoothing)[1])
  return fn


def _bond_log_ratio_fn(n, smoothing):
  """(N−1)·r̂_BOND from counts: the estimated log π_BoN(y) − log π_ref(y) (exact under ties)."""
  def fn(c_lt, c_le, k):
    p_lt, p_le = _smoothed(c_lt, c_le, k, smoothing)
    return (n - 1) * np.asarray(_bond_reward(p_lt, p_le, float(n)), np.float64)
  return fn


def reference_points(ref_rewards, ref_lengths=None, ns: Sequence[int] = (1, 2, 4, 8, 16),
                     smoothing: str = "clip") -> dict:
  """Best-of-N reference points from the reference cache alone (no model calls), N ∈ ns, N ≤ K.

  ref_rewards, ref_lengths: [B, K] rewards and lengths of K π_ref samples for each of B prompts.
  Returns lists over the kept N (same keys as `bon_curve`, plus `_se` siblings):
    'n'             N (those ≤ K);
    'reward'        E[r(Best-of-N)]: Σ_t r_(t)·C(t−1, N−1)/C(K, N) over the sorted cache;
                    unbiased (ties included: the average over all N-subsets of the subset's max);
    'win_rate'      P[r(BoN) > r(y')] + ½P[=] against one fresh π_ref sample: for each cache
                    sample y'_j as the opponent, the exact probability over N-subsets of the
                    OTHER K−1 samples, 1 − ½[C(b_j, N) + C(a_j, N)]/C(K−1, N) (a_j, b_j = #others
                    <, ≤ r'_j), averaged over j: unbiased; NaN for N = K (no disjoint opponent);
    'mean_length'   E[len(Best-of-N)] (only with ref_lengths): Σ_t len_(t)·w_t with the cache
                    sorted stably by reward, i.e. ties go to the LAST maximiser in cache order,
                    a value-blind rule, so the selected sample is exactly π_BoN: unbiased;
    'log_quantile'  E_{π_BoN}[log p̂≤(y)] with p̂≤ from the K − N cache samples outside each
                    N-subset (smoothing as `bon.quantile_estimates`; biased like any log p̂≤,
                    more than `policy_metrics`' eval/log_quantile, which uses all K); NaN if N = K;
    'kl'            KL(π_BoN(N) ‖ π_ref) on the EMPIRICAL reward distribution (mass 1/K per sample,
                    exact tie-aware formula `bon.kl_bon_ref`), averaged over prompts: a plug-in
                    estimate, biased at finite K (O(1/K); see tests/test_evaluate.py);
    'kl_bound'      log N − (N−1)/N (the KL without ties; the empirical KL is at most this).
  Standard errors ('<key>_se') are over prompts.
  """
  r = _f64(ref_rewards, "ref_rewards")
  b, k = r.shape
  if k < 2:
    raise ValueError(f"reference_points needs K >= 2 reference samples per prompt, got K={k}")
  lengths = None if ref_lengths is None else _f64(ref_lengths, "ref_lengths")
  if lengths is not None and lengths.shape != r.shape:
    raise ValueError(f"ref_lengths shape {lengths.shape} != ref_rewards shape {r.shape}")
  order, s, less, leq = _sorted_cache(r)
  keys = ["reward", "win_rate", "log_quantile", "kl"] + (["mean_length"] if lengths is not None
                                                         else [])
  out = {"n": [], "kl_bound": []}
  for key in keys:
    out[key], out[key + "_se"] = [], []

  def put(key, per_prompt):
    mean, se = _mean_se(per_prompt)
    out[key].append(mean)
    out[key + "_se"].append(se)

  # The cache's own a_j, b_j as opponents: #others < r'_j and #others ≤ r'_j (itself excluded).
  a_opp, b_opp = less, leq - 1
  for n in ns:
    n = int(n)
    if n < 1:
      raise ValueError(f"reference_points: N must be >= 1, got {n}")
    if n > k:
      continue
    w = order_statistic_weights(k, n)
    out["n"].append(float(n))
    out["kl_bound"].append(float(bon.kl_bound(float(n))))
    put("reward", s @ w)
    if lengths is not None:
      put("mean_length", np.take_along_axis(lengths, order, axis=1) @ w)
    if n < k:
      log_total = _log_comb(k - 1, n)
      p_le = np.exp(_log_comb(b_opp, n) - log_total)
      p_lt = np.exp(_log_comb(a_opp, n) - log_total)
      put("win_rate", np.mean(1.0 - 0.5 * (p_le + p_lt), axis=1))
      put("log_quantile", _bon_outside_mean(s, less, n, _log_quantile_fn(smoothing)) @ w)
    else:
      put("win_rate", np.full(b, np.nan))
      put("log_quantile", np.full(b, np.nan))
    put("kl", _empirical_bon_kl(less, leq, float(n)))
  return out


def _fwd_kl_integer(s, less, order, cross, n: int, smoothing: str) -> np.ndarray:
  """Per-prompt KL(π_BoN(N) ‖ π) for integer N: the average over all N-subsets of the cache of
  (N−1)·r̂_BOND(y*) + log π_ref(y*) − log π(y*), y* the subset's best, p̂ from outside it."""
  k = s.shape[1]
  w = order_statistic_weights(k, n)
  cross_sorted = np.take_along_axis(cross, order, axis=1)       # log π_ref − log π, sorted
  if n == 1:
    return cross_sorted @ w
  return (_bon_outside_mean(s, less, n, _bond_log_ratio_fn(n, smoothing)) + cross_sorted) @ w


def fwd_kl_to_bon(ref_rewards, ref_policy_log_probs, ref_ref_log_probs, n: float,
                  smoothing: str = "clip") -> np.ndarray:
  """Per-prompt estimates [B] of KL(π_BoN(N) ‖ π) from the reference cache.

  ref_rewards [B, K]; ref_policy_log_probs, ref_ref_log_probs [B, K]: log π(y'_j), log π_ref(y'_j)
  of the cached samples. Integer N (1 ≤ N ≤ K − 1): the U-statistic over all N-subsets (best of
  each subset is an exact π_BoN(N) draw; `_bon_outside_mean` says why p̂ comes from the K − N
  samples outside the subset): the log π_ref − log π part is unbiased, the (N−1)·r̂_BOND part has
  the finite-(K−N) bias of a nonlinear function of p̂. Real N: linear interpolation between
  ⌊N⌋ and ⌈N⌉ (KL to π_BoN(N) is smooth in N; the interpolation error is O((⌈N⌉−⌊N⌋)²·|∂²_N|)).
  NaN when ⌈N⌉ > K − 1.
  """
  r = _f64(ref_rewards, "ref_rewards")
  lp = _f64(ref_policy_log_probs, "ref_policy_log_probs")
  lr = _f64(ref_ref_log_probs, "ref_ref_log_probs")
  if lp.shape != r.shape or lr.shape != r.shape:
    raise ValueError(f"cache log-probs {lp.shape}, {lr.shape} must match ref_rewards {r.shape}")
  n = float(n)
  if not n >= 1:
    raise ValueError(f"fwd_kl_to_bon: N must be >= 1, got {n}")
  k = r.shape[1]
  lo, hi = int(np.floor(n)), int(np.ceil(n))
  if hi > k - 1:
    return np.full(r.shape[0], np.nan)
  order, s, less, _ = _sorted_cache(r)
  est_lo = _fwd_kl_integer(s, less, order, lr - lp, lo, smoothing)
  if hi == lo:
    return est_lo
  est_hi = _fwd_kl_integer(s, less, order, lr - lp, hi, smoothing)
  return est_lo + (n - lo) * (est_hi - est_lo)


def _empirical_bon_kl(less, leq, n) -> np.ndarray:
  """Per-prompt KL(π_BoN(N) ‖ π_ref) [B] on the empirical cache distribution (mass 1/K per sample).

  less, leq [B, K]: #cache < and ≤ each sample's reward. Sample j gets π_BoN mass
  (P≤^N − P<^N)/(P≤ − P<)·(1/K), P = counts/K (BOND Thm 1 with ties, §1), so the KL is
  Σ_j mass_j·log[(P≤^N − P<^N)/(P≤ − P<)]: the same number as `bon.kl_bon_ref` with
  ref_log_probs = log(1/K) and the cache rewards (tests check it), in float64 and O(B·K).
  """
  k = less.shape[1]
  p_le, p_lt = leq / k, less / k
  with np.errstate(divide="ignore", invalid="ignore"):
    ratio = (p_le ** n - p_lt ** n) / (p_le - p_lt)
    terms = np.where(ratio > 0, ratio / k * np.log(ratio), 0.0)
  return np.sum(terms, axis=-1)


def empirical_kl_curve(ref_rewards, n) -> float:
  """KL(π_BoN(N) ‖ π_ref) on the empirical cache distribution [B, K], averaged over prompts."""
  _, _, less, leq = _sorted_cache(_f64(ref_rewards, "ref_rewards"))
  return float(np.mean(_empirical_bon_kl(less, leq, float(n))))


def empirical_effective_n(kappa: float, ref_rewards, n_max: float = 4096.0) -> tuple[float, float]:
  """(N̂*, dKL/dN at N̂*): the N in [1, n_max] whose prompt-averaged empirical
  KL(π_BoN(N) ‖ π_ref) equals κ (bisection on log N, as `bon.effective_n(..., average=True)`;
  N̂* = 1 for κ ≤ 0, n_max when κ is above the curve, which saturates near log K)."""
  _, _, less, leq = _sorted_cache(_f64(ref_rewards, "ref_rewards"))
  curve = lambda n: float(np.mean(_empirical_bon_kl(less, leq, n)))  # noqa: E731
  lo, hi = 0.0, float(np.log(n_max))
  for _ in range(bon.BISECTION_STEPS):
    mid = 0.5 * (lo + hi)
    if curve(np.exp(mid)) > kappa:
      hi = mid
    else:
      lo = mid
  n_star = 1.0 if kappa <= 0 else float(np.exp(0.5 * (lo + hi)))
  up, down = n_star * np.exp(0.02), max(n_star * np.exp(-0.02), 1.0)
  return n_star, (curve(up) - curve(down)) / (up - down)


def policy_metrics(rewards, ref_rewards, lengths=None, policy_log_probs=None,
                   ref_log_probs=None, ref_policy_log_probs=None, ref_ref_log_probs=None,
                   n: float | None = None, smoothing: str = "clip", n_max: float = 4096.0,
                   prefix: str = "eval/") -> dict[str, float]:
  """Sampled evaluation of a policy against the reference cache (algorithms.md §8).

  Per policy sample y (B prompts × M samples):  rewards [B, M], lengths [B, M] (optional),
    policy_log_probs = log π(y), ref_log_probs = log π_ref(y) [B, M] (sequence log-probs of the
    untempered distributions; optional: without them no KL metrics, e.g. for `bon:N`).
  Reference cache (K samples y'_j ~ π_ref per prompt): ref_rewards [B, K]; for the forward KL
    also ref_policy_log_probs = log π(y'_j) and ref_ref_log_probs = log π_ref(y'_j) [B, K].
  n: the run's target N (keys with suffix `_n`); smoothing: of p̂≤ (`bon.quantile_estimates`;
    'none' gives log_quantile −inf and KL-to-BoN +inf when some y loses to all K references).

  Returns floats, each with a `<key>_se` sibling (cluster standard error over prompts):
    reward, length            means (unbiased);
    win_rate                  mean of (#{j: r'_j < r(y)} + ½#{j: r'_j = r(y)})/K (unbiased);
    log_quantile              mean log p̂≤(y) (biased: Jensen and the smoothing, O(1/K));
    kl_to_ref                 mean of log π(y) − log π_ref(y) (unbiased for KL(π ‖ π_ref));
    effective_n               N̂* with the prompt-averaged empirical KL(π_BoN(N̂*) ‖ π_ref) =
                              kl_to_ref (as `bon.effective_n(..., average=True)`; on the
                              empirical distribution, so capped near the KL of N ≈ K); se by
                              the delta method through the curve's slope;
    bwd_kl_to_bon[_n]         mean of log π(y) − log π_ref(y) − (N−1)·r̂_BOND(y), r̂_BOND =
                              `bon.bond_reward(p̂<, p̂≤, N)` from all K cache samples (independent
                              of y): KL(π ‖ π_BoN(N)) up to the finite-K bias of r̂_BOND;
    fwd_kl_to_bon[_n]         `fwd_kl_to_bon` (the cache's Best-of-N draws; NaN when N > K − 1).
  Unsuffixed KL-to-BoN keys use N = N̂* (as `toy.exact_metrics` uses N*; their se ignores the
  noise of N̂*); `_n` keys use the given n.
  """
  r = _f64(rewards, "rewards")
  ref_r = _f64(ref_rewards, "ref_rewards")
  b, _ = r.shape
  if ref_r.shape[0] != b:
    raise ValueError(f"rewards {r.shape} and ref_rewards {ref_r.shape} need the same prompts B")
  k = ref_r.shape[1]
  if k < 2:
    raise ValueError(f"policy_metrics needs K >= 2 reference samples per prompt, got K={k}")
  if n is not None and not float(n) >= 1:
    raise ValueError(f"policy_metrics: the target n must be >= 1, got {n}")
  out: dict[str, float] = {}

  def put(key, per_sample):
    per_sample = np.asarray(per_sample, np.float64)
    per_prompt = per_sample if per_sample.ndim == 1 else np.mean(per_sample, axis=-1)
    out[prefix + key], out[prefix + key + "_se"] = _mean_se(per_prompt)

  def like(x, name, shape):
    x = _f64(x, name)
    if x.shape != shape:
      raise ValueError(f"{name} shape {x.shape} != {shape}")
    return x

  put("reward", r)
  if lengths is not None:
    put("length", like(lengths, "lengths", r.shape))
  below = np.sum(ref_r[:, None, :] < r[:, :, None], axis=-1)
  ties = np.sum(ref_r[:, None, :] == r[:, :, None], axis=-1)
  put("win_rate", (below + 0.5 * ties) / k)
  p_lt, p_le = _quantile_estimates(r, ref_r, smoothing)
  p_lt, p_le = np.asarray(p_lt, np.float64), np.asarray(p_le, np.float64)
  with np.errstate(divide="ignore"):
    put("log_quantile", np.log(p_le))
  if policy_log_probs is None or ref_log_probs is None:
    return out
  log_ratio = like(policy_log_probs, "policy_log_probs", r.shape) - like(
      ref_log_probs, "ref_log_probs", r.shape)
  put("kl_to_ref", log_ratio)
  kappa, kappa_se = out[prefix + "kl_to_ref"], out[prefix + "kl_to_ref_se"]
  n_star, slope = empirical_effective_n(kappa, ref_r, n_max)
  # Delta method: se(N̂*) = se(κ̂) / (dKL/dN at N̂*).
  out[prefix + "effective_n"] = n_star
  out[prefix + "effective_n_se"] = float(kappa_se / slope) if slope > 0 else float("inf")
  fwd = ref_policy_log_probs is not None and ref_ref_log_probs is not None
  targets = [("", n_star)] + ([("_n", float(n))] if n is not None else [])
  for suffix, target in targets:
    with np.errstate(divide="ignore", invalid="ignore"):
      r_bond = np.asarray(_bond_reward(p_lt, p_le, float(target)), np.float64)
    put("bwd_kl_to_bon" + suffix, log_ratio - (target - 1.0) * r_bond)
    if fwd:
      put("fwd_kl_to_bon" + suffix,
          fwd_kl_to_bon(ref_r, ref_policy_log_probs, ref_ref_log_probs, target, smoothing))
  return out


def best_of_n_policy_samples(rewards, *others):
  """Best-of-N as the evaluated policy (`eval.policy = "bon:N"`): from rewards [B, M, N] of N
  fresh π_ref samples for each of M evaluation draws, the best (first maximiser; any value-blind
  tie rule gives π_BoN) -> rewards [B, M] and each of `others` [B, M, N] (e.g. lengths) gathered
  at the best. Feed them to `policy_metrics` without log-probs; its reward, win rate and length
  then estimate `reference_points` at N (tests/test_evaluate.py checks the agreement)."""
  r = _f64(rewards, "rewards", ndim=3)
  best = np.argmax(r == np.max(r, axis=-1, keepdims=True), axis=-1)[..., None]   # [B, M, 1]
  pick = lambda x: np.take_along_axis(np.asarray(x), best, axis=-1)[..., 0]  # noqa: E731
  return (pick(r),) + tuple(pick(x) for x in others)
