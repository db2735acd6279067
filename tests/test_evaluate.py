"""The sampled evaluation estimators of bond/evaluate.py against exact values (algorithms.md §8).

Acceptance of issue 15, phase 1: on the exact toy harness every sampled `eval/*` metric (and every
sampled Best-of-N reference point) agrees with its exact counterpart within Z = 4 standard errors,
or, for the estimators that are biased at finite K, within 4 standard errors of the EXACT
expectation of the estimator (computed here by enumerating the multinomial reference counts), whose
distance to the exact value (the bias) is stated, bounded and shown to shrink with K = 8, 32, 128.

Samples are exact draws over the 85 enumerated completions; each of the 4 toy prompts is evaluated
REPS = 64 times (B = 256 rows, each with its own reference cache), which the estimators do not see.
The subset U-statistics are also checked against brute-force enumeration of all subsets.
"""

import itertools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from bond import bon, evaluate, toy

# Compiles much and runs little: XLA's quicker codegen (tests/conftest.py, `quick_compiles`).
pytestmark = pytest.mark.quick_compiles

Z = 4.0            # agreement within Z standard errors
REPS = 64          # replicas of each toy prompt: B = 4 * REPS
N = 4              # the target N of the `_n` metrics
M = 4              # policy samples per prompt
NS = (1, 2, 4, 8, 16)
SEEDS = {"ref": 1, "tilt1": 2, "tilt3": 3, "bon4": 4}


# ---------------------------------------------------------------------------------------------
# The harness: exact tables and exact sampling.


@pytest.fixture(scope="module")
def h():
  task = toy.make_task()
  mc = toy.model_config(task)
  ref = np.asarray(toy.policy_log_probs(mc, toy.init_policy(task, jax.random.PRNGKey(0), mc), task),
                   np.float64)
  ref = ref - special.logsumexp(ref, axis=1, keepdims=True)        # exact normalisation in f64
  rewards = np.asarray(task.rewards, np.float64)
  p = np.exp(ref)
  # p<(y), p=(y) under π_ref for every (prompt, completion) [P, M].
  p_lt = np.einsum("pj,pij->pi", p, rewards[:, None, :] < rewards[:, :, None])
  p_eq = np.einsum("pj,pij->pi", p, rewards[:, None, :] == rewards[:, :, None])
  return types.SimpleNamespace(task=task, ref=ref, rewards=rewards, lengths=task.lengths,
                               p_lt=p_lt, p_eq=p_eq, num_prompts=rewards.shape[0])


def _normalise(x):
  return x - special.logsumexp(x, axis=1, keepdims=True)


def _tilted(h, lam):
  """π ∝ π_ref·exp(λ·r), exact."""
  return _normalise(h.ref + lam * h.rewards)


def _bon_policy(h, n):
  return _normalise(np.asarray(bon.bon_log_probs(h.ref, h.rewards, float(n)), np.float64))


def _policies(h):
  return {"ref": h.ref, "tilt1": _tilted(h, 1.0), "tilt3": _tilted(h, 3.0),
          "bon4": _bon_policy(h, 4)}


def _draw(seed, log_probs, num, reps=REPS):
  """(rows [B] prompt index, idx [B, num] completion index) with idx ~ π(·|prompt) exactly
  (inverse CDF over the enumerated completions, float64)."""
  rows = np.tile(np.arange(log_probs.shape[0]), reps)
  cdf = np.cumsum(np.exp(log_probs), axis=1)
  cdf /= cdf[:, -1:]
  u = np.random.default_rng(seed).random((rows.size, num))
  idx = np.stack([np.searchsorted(cdf[p], u[rows == p], side="right") for p in range(cdf.shape[0])])
  out = np.empty((rows.size, num), np.int64)
  for p in range(cdf.shape[0]):
    out[rows == p] = idx[p]
  return rows, np.minimum(out, cdf.shape[1] - 1)


def _cache(h, seed, k):
  rows, idx = _draw(seed, h.ref, k)
  return rows, idx, h.rewards[rows[:, None], idx]


def _evaluate(h, policy, k, seed, n=N):
  """policy_metrics of π (exact log-probs) with a fresh reference cache of K samples per row."""
  rows, ci, ref_rewards = _cache(h, (seed, 0), k)
  _, pi = _draw((seed, 1), policy, M)
  at = lambda table, idx: table[rows[:, None], idx]  # noqa: E731
  out = evaluate.policy_metrics(
      at(h.rewards, pi), ref_rewards, lengths=h.lengths[pi], policy_log_probs=at(policy, pi),
      ref_log_probs=at(h.ref, pi), ref_policy_log_probs=at(policy, ci),
      ref_ref_log_probs=at(h.ref, ci), n=n)
  return out, ref_rewards


def _close(value, se, target, slack=0.0, what=""):
  """|value − target| ≤ Z·se + slack (+ float round-off)."""
  tol = Z * se + abs(slack) + 1e-6
  assert np.isfinite(value) and abs(value - target) <= tol, (
      f"{what}: estimate {value:.5f} (se {se:.5f}) vs target {target:.5f}: "
      f"|diff| {abs(value - target):.5f} > {tol:.5f}")


# ---------------------------------------------------------------------------------------------
# Exact expectations of the finite-K estimators: the counts of K references below / at-or-below a
# completion y are Multinomial(K; p<(y), p=(y), p>(y)).


def _count_expectation(h, k, fn):
  """E[fn(c<, c≤, k)] [P, M] with (c<, c=, c>) ~ Multinomial(k; p<(y), p=(y), p>(y)), computed
  once per distinct reward level (p<, p=)."""
  levels, inverse = np.unique(np.stack([h.p_lt.ravel(), h.p_eq.ravel()], axis=1), axis=0,
                              return_inverse=True)
  c_lt, c_eq = np.meshgrid(np.arange(k + 1.0), np.arange(k + 1.0), indexing="ij")
  ok = c_lt + c_eq <= k
  c_gt = np.where(ok, k - c_lt - c_eq, 0.0)
  pl, pe = levels[:, 0, None, None], levels[:, 1, None, None]
  pg = np.clip(1.0 - pl - pe, 0.0, 1.0)
  log_pmf = (special.gammaln(k + 1.0) - special.gammaln(c_lt + 1) - special.gammaln(c_eq + 1)
             - special.gammaln(c_gt + 1) + special.xlogy(c_lt, pl) + special.xlogy(c_eq, pe)
             + special.xlogy(c_gt, pg))
  pmf = np.where(ok, np.exp(log_pmf), 0.0)                      # [levels, k+1, k+1]
  values = fn(c_lt[ok], np.where(ok, c_lt + c_eq, c_lt)[ok], k)  # [#valid]
  per_level = np.sum(pmf[:, ok] * values, axis=-1)
  return per_level[np.ravel(inverse)].reshape(h.p_lt.shape)


def _log_ratio_fn(n):
  """(n−1)·r̂_BOND from counts, computed here independently of bond/evaluate.py."""
  def fn(c_lt, c_le, k):
    p_lt, p_le = c_lt / k, np.maximum(c_le / k, 1.0 / (k + 1.0))        # 'clip' smoothing
    return (n - 1) * np.asarray(_bond_reward(p_lt, p_le, n), np.float64)
  return fn


_bond_reward = jax.jit(bon.bond_reward)


def _log_quantile_fn(c_lt, c_le, k):
  return np.log(np.maximum(c_le / k, 1.0 / (k + 1.0)))


def _mean(prob, values):
  """Σ_y π(y)·values(y), averaged over prompts."""
  return float(np.mean(np.sum(prob * values, axis=1)))


def _exact_bwd(h, policy, n):
  return float(np.mean(bon.kl(policy, _bon_policy(h, n))))


def _exact_fwd(h, policy, n):
  return float(np.mean(bon.kl(_bon_policy(h, n), policy)))


def _expected_bwd(h, policy, k, n):
  """E[eval/bwd_kl_to_bon] at n with K references: p̂ from all K, independent of y."""
  return _mean(np.exp(policy), policy - h.ref - _count_expectation(h, k, _log_ratio_fn(n)))


def _expected_fwd_integer(h, policy, k, n):
  """E[eval/fwd_kl_to_bon] at integer n: y* ~ π_BoN(n), p̂ from the K − n outside samples."""
  bon_lp = _bon_policy(h, n)
  ratio = _count_expectation(h, k - n, _log_ratio_fn(n)) if n > 1 else 0.0
  return _mean(np.exp(bon_lp), ratio + h.ref - policy)


def _expected_fwd(h, policy, k, n):
  """Real n: the estimator interpolates linearly between ⌊n⌋ and ⌈n⌉."""
  lo, hi = int(np.floor(n)), int(np.ceil(n))
  e_lo = _expected_fwd_integer(h, policy, k, lo)
  return e_lo if hi == lo else e_lo + (n - lo) * (_expected_fwd_integer(h, policy, k, hi) - e_lo)


def _expected_log_quantile(h, policy, k):
  return _mean(np.exp(policy), _count_expectation(h, k, _log_quantile_fn))


def _exact(h, policy, n=N):
  metrics = toy.exact_metrics(h.task, jnp.asarray(policy, jnp.float32),
                              jnp.asarray(h.ref, jnp.float32), n=n)
  return {key: float(v) for key, v in metrics.items()}


# Stated bias bounds (|E[estimator] − exact|, E computed exactly above): the second-order
# (delta-method) bias of a function of p̂ from k references is O(1/k); on this task
#   log-quantile (k = K):              |bias| ≤ 1/K
#   bwd KL to π_BoN(N) (k = K):        |bias| ≤ (N−1)/K
#   fwd KL to π_BoN(N) (k = K − N):    |bias| ≤ (N−1)/(K − N)
#   empirical KL(π_BoN(N) ‖ π_ref):    |bias| ≤ (N−1)/(4K)   (plug-in on K atoms)
def _bias_bound(what, k, n=N):
  return {"log_quantile": 1.0 / k, "bwd": (n - 1) / k, "fwd": (n - 1) / (k - n),
          "ref_kl": (n - 1) / (4.0 * k)}[what]


# ---------------------------------------------------------------------------------------------
# 1. The subset U-statistics equal brute-force enumeration of every subset (exact identities).


def _brute_force(r, lengths, lp, lr, n, smoothing):
  """Per-prompt averages over all n-subsets S (best = last maximiser in cache order) and, for the
  win rate, over every opponent j and n-subset of the others."""
  k = r.size
  rew, ln, lq, fwd, win = [], [], [], [], []
  for s in itertools.combinations(range(k), n):
    top = max(r[list(s)])
    best = max(i for i in s if r[i] == top)
    rew.append(r[best])
    ln.append(lengths[best])
    if n < k:
      out = [j for j in range(k) if j not in s]
      c_lt = sum(r[j] < r[best] for j in out)
      c_le = sum(r[j] <= r[best] for j in out)
      kk = k - n
      if smoothing == "clip":
        p_lt, p_le = c_lt / kk, max(c_le / kk, 1.0 / (kk + 1.0))
      else:
        p_lt, p_le = c_lt / (kk + 1.0), (c_le + 1.0) / (kk + 1.0)
      lq.append(np.log(p_le))
      ratio = (n - 1) * float(bon.bond_reward(p_lt, p_le, n)) if n > 1 else 0.0
      fwd.append(ratio + lr[best] - lp[best])
  for j in range(k):
    others = [i for i in range(k) if i != j]
    for s in itertools.combinations(others, n):
      m = max(r[list(s)])
      win.append(1.0 if m > r[j] else 0.5 if m == r[j] else 0.0)
  mean = lambda x: float(np.mean(x)) if x else float("nan")  # noqa: E731
  return dict(reward=mean(rew), mean_length=mean(ln), log_quantile=mean(lq), fwd=mean(fwd),
              win_rate=mean(win))


@pytest.mark.parametrize("smoothing", ["clip", "add_one"])
def test_subset_estimators_equal_brute_force(smoothing):
  rng = np.random.default_rng(3)
  k = 7
  r = rng.integers(0, 3, (3, k)).astype(float)        # many ties
  r[2] = 1.0                                          # a prompt where every reward ties
  lengths = rng.integers(0, 6, (3, k)).astype(float)
  lp, lr = rng.normal(size=(3, k)), rng.normal(size=(3, k))
  ns = (1, 2, 3, 6, 7)
  pts = evaluate.reference_points(r, lengths, ns=ns, smoothing=smoothing)
  assert pts["n"] == [float(n) for n in ns]
  for i, n in enumerate(ns):
    brute = [_brute_force(r[b], lengths[b], lp[b], lr[b], n, smoothing) for b in range(3)]
    for key in ("reward", "mean_length", "win_rate", "log_quantile"):
      want = np.mean([x[key] for x in brute])
      np.testing.assert_allclose(pts[key][i], want, atol=1e-6, err_msg=f"{key} N={n}")
    fwd = evaluate.fwd_kl_to_bon(r, lp, lr, n, smoothing)
    np.testing.assert_allclose(fwd, [x["fwd"] for x in brute], atol=2e-5, err_msg=f"fwd N={n}")
  # Real N interpolates the integer U-statistics linearly.
  mid = evaluate.fwd_kl_to_bon(r, lp, lr, 2.25, smoothing)
  lo, hi = (evaluate.fwd_kl_to_bon(r, lp, lr, n, smoothing) for n in (2, 3))
  np.testing.assert_allclose(mid, lo + 0.25 * (hi - lo), atol=1e-9)


def test_empirical_kl_and_effective_n_match_bon():
  """The cache-side KL curve is `bon.kl_bon_ref` on the empirical distribution (mass 1/K), and
  the effective N is `bon.effective_n(..., average=True)` on it."""
  rng = np.random.default_rng(0)
  r = rng.integers(0, 4, (6, 16)).astype(np.float32)
  r[0] = np.arange(16)                                # no ties
  r[1] = 2.0                                          # all tied: KL 0 for every N
  uniform = np.full(r.shape, -np.log(16.0), np.float32)
  _, _, less, leq = evaluate._sorted_cache(r.astype(np.float64))
  for n in (1.0, 2.0, 2.5, 4.0, 16.0):
    np.testing.assert_allclose(evaluate._empirical_bon_kl(less, leq, n),
                               np.asarray(bon.kl_bon_ref(uniform, r, n)), atol=2e-5)
  kappa = 0.4
  n_star, slope = evaluate.empirical_effective_n(kappa, r)
  want = float(bon.effective_n(np.float32(kappa), uniform, r, average=True))
  np.testing.assert_allclose(n_star, want, rtol=1e-3)
  np.testing.assert_allclose(evaluate.empirical_kl_curve(r, n_star), kappa, atol=1e-6)
  assert slope > 0
  assert evaluate.empirical_effective_n(-0.1, r)[0] == 1.0


# ---------------------------------------------------------------------------------------------
# 2. The Best-of-N reference points (cache only) against the exact Best-of-N curve.


def test_reference_points_match_exact_bon_curve(h):
  k = 32
  rows, ci, ref_rewards = _cache(h, 11, k)
  pts = evaluate.reference_points(ref_rewards, h.lengths[ci], NS)
  curve = evaluate.bon_curve(h.ref, h.rewards, NS, h.lengths)
  assert pts["n"] == [float(n) for n in NS]
  for i, n in enumerate(NS):
    for key in ("reward", "win_rate", "mean_length"):        # unbiased
      _close(pts[key][i], pts[key + "_se"][i], curve[key][i], what=f"BoN {key} N={n}")
    # Plug-in KL on the empirical distribution: biased low at finite K, bounded.
    _close(pts["kl"][i], pts["kl_se"][i], curve["kl"][i], _bias_bound("ref_kl", k, n),
           what=f"BoN kl N={n}")
    assert pts["kl"][i] <= pts["kl_bound"][i] + 1e-9
    np.testing.assert_allclose(pts["kl_bound"][i], np.log(n) - (n - 1) / n, atol=1e-6)
    # log-quantile of BoN draws, p̂ from the K − N outside samples: its exact expectation.
    want = _mean(np.exp(_bon_policy(h, n)), _count_expectation(h, k - n, _log_quantile_fn))
    _close(pts["log_quantile"][i], pts["log_quantile_se"][i], want, what=f"BoN log_q N={n}")


# ---------------------------------------------------------------------------------------------
# 3. Policy metrics against the exact metrics, for π_ref, tilted policies and an exact BoN policy.


@pytest.mark.parametrize("name", ["ref", "tilt1", "tilt3", "bon4"])
def test_policy_metrics_match_exact(h, name):
  k = 32
  policy = _policies(h)[name]
  got, ref_rewards = _evaluate(h, policy, k, seed=SEEDS[name])
  exact = _exact(h, policy)
  e = lambda key: (got["eval/" + key], got["eval/" + key + "_se"])  # noqa: E731
  # Unbiased estimators.
  for key, exact_key in (("reward", "reward"), ("length", "mean_length"),
                         ("win_rate", "win_rate"), ("kl_to_ref", "kl_to_ref")):
    _close(*e(key), exact["exact/" + exact_key], what=f"{name} {key}")
  # Finite-K estimators: within Z se of their exact expectation, which is within the stated
  # bias bound of the exact value.
  finite = {
      "log_quantile": (_expected_log_quantile(h, policy, k), exact["exact/log_quantile"],
                       _bias_bound("log_quantile", k)),
      "bwd_kl_to_bon_n": (_expected_bwd(h, policy, k, N), exact["exact/bwd_kl_to_bon_n"],
                          _bias_bound("bwd", k)),
      "fwd_kl_to_bon_n": (_expected_fwd(h, policy, k, N), exact["exact/fwd_kl_to_bon_n"],
                          _bias_bound("fwd", k)),
  }
  for key, (expected, true, bound) in finite.items():
    _close(*e(key), expected, what=f"{name} {key} vs its finite-K expectation")
    assert abs(expected - true) <= bound, f"{name} {key}: bias {expected - true} > {bound}"
    _close(*e(key), true, bound, what=f"{name} {key} vs exact")
  # Effective N: N̂* solves (empirical curve)(N) = κ̂; the curve's deviation Δ from the exact
  # curve at N* (this cache) is the stated bias, in N units Δ/slope.
  n_hat, n_se = e("effective_n")
  n_star = exact["exact/effective_n"]
  _, slope = evaluate.empirical_effective_n(got["eval/kl_to_ref"], ref_rewards)
  delta = evaluate.empirical_kl_curve(ref_rewards, n_star) - float(
      np.mean(bon.kl_bon_ref(h.ref, h.rewards, n_star)))
  _close(n_hat, n_se, n_star, delta / slope if slope > 0 else 0.0, what=f"{name} effective_n")
  # KL to π_BoN(N̂*): against the exact KLs at N̂* (the se is conditional on N̂*).
  bwd_expected = _expected_bwd(h, policy, k, n_hat)
  _close(*e("bwd_kl_to_bon"), bwd_expected, what=f"{name} bwd_kl_to_bon(N̂*)")
  _close(*e("bwd_kl_to_bon"), _exact_bwd(h, policy, n_hat), _bias_bound("bwd", k, n_hat),
         what=f"{name} bwd_kl_to_bon(N̂*) vs exact")
  fwd_expected = _expected_fwd(h, policy, k, n_hat)
  fwd_bias = fwd_expected - _exact_fwd(h, policy, n_hat)
  print(f"{name}: N* {n_star:.3f} N̂* {n_hat:.3f}±{n_se:.3f}  "
        f"bwd(N̂*) {got['eval/bwd_kl_to_bon']:.4f} E {bwd_expected:.4f} exact {_exact_bwd(h, policy, n_hat):.4f}  fwd(N̂*) "
        f"{got['eval/fwd_kl_to_bon']:.4f} E {fwd_expected:.4f} bias {fwd_bias:+.4f}")
  _close(*e("fwd_kl_to_bon"), fwd_expected, what=f"{name} fwd_kl_to_bon(N̂*)")
  assert abs(fwd_bias) <= _bias_bound("fwd", k, np.ceil(n_hat)) + 1e-6


# ---------------------------------------------------------------------------------------------
# 4. The finite-K bias shrinks with K.


def test_finite_k_bias_shrinks_with_k(h):
  policy = _tilted(h, 1.0)
  exact = _exact(h, policy)
  curve_kl = evaluate.bon_curve(h.ref, h.rewards, (N,))["kl"][0]
  table, biases = [], {"log_quantile": [], "bwd": [], "fwd": [], "ref_kl": []}
  for k in (8, 32, 128):
    got, ref_rewards = _evaluate(h, policy, k, seed=100 + k)
    rows = [("log_quantile", "log_quantile", _expected_log_quantile(h, policy, k),
             exact["exact/log_quantile"]),
            ("bwd", "bwd_kl_to_bon_n", _expected_bwd(h, policy, k, N),
             exact["exact/bwd_kl_to_bon_n"]),
            ("fwd", "fwd_kl_to_bon_n", _expected_fwd(h, policy, k, N),
             exact["exact/fwd_kl_to_bon_n"])]
    for what, key, expected, true in rows:
      value, se = got["eval/" + key], got["eval/" + key + "_se"]
      _close(value, se, expected, what=f"K={k} {key} vs its finite-K expectation")
      bias = expected - true
      assert abs(bias) <= _bias_bound(what, k), f"K={k} {key}: |bias| {bias} above the bound"
      biases[what].append(abs(bias))
      table.append(f"K={k:3d} {key:16s} est {value:+.4f}±{se:.4f}  E_K {expected:+.4f}  "
                   f"exact {true:+.4f}  bias {bias:+.5f}  bound {_bias_bound(what, k):.4f}")
    # The plug-in KL of the reference point: its mean over the B independent caches estimates
    # E[KL_emp]; the bias is estimated within Z se.
    pts = evaluate.reference_points(ref_rewards, None, (N,))
    bias, se = pts["kl"][0] - curve_kl, pts["kl_se"][0]
    assert abs(bias) <= _bias_bound("ref_kl", k) + Z * se, f"K={k} ref kl bias {bias}"
    biases["ref_kl"].append(abs(bias))
    table.append(f"K={k:3d} {'bon_ref_kl':16s} est {pts['kl'][0]:+.4f}±{se:.4f}  "
                 f"exact {curve_kl:+.4f}  bias {bias:+.5f}  bound {_bias_bound('ref_kl', k):.4f}")
  print("\n" + "\n".join(table))
  for what, b in biases.items():
    assert b[0] > b[1] > b[2], f"{what} bias does not shrink with K: {b}"


# ---------------------------------------------------------------------------------------------
# 5. Best-of-N sampling as the evaluated policy agrees with the reference points.


@pytest.mark.parametrize("n", [4, 8])
def test_best_of_n_policy_agrees_with_reference_points(h, n):
  k = 32
  rows, ci, ref_rewards = _cache(h, (7, n, 0), k)
  _, fresh = _draw((7, n, 1), h.ref, M * n)                             # [B, M·N] fresh π_ref draws
  fresh = fresh.reshape(rows.size, M, n)
  best_r, best_len = evaluate.best_of_n_policy_samples(
      h.rewards[rows[:, None, None], fresh], h.lengths[fresh])
  assert best_r.shape == best_len.shape == (rows.size, M)
  got = evaluate.policy_metrics(best_r, ref_rewards, lengths=best_len)
  assert "eval/kl_to_ref" not in got and "eval/fwd_kl_to_bon" not in got
  pts = evaluate.reference_points(ref_rewards, h.lengths[ci], (n,))
  curve = evaluate.bon_curve(h.ref, h.rewards, (n,), h.lengths)
  for key, ref_key in (("reward", "reward"), ("win_rate", "win_rate"), ("length", "mean_length")):
    a, a_se = got["eval/" + key], got["eval/" + key + "_se"]
    b, b_se = pts[ref_key][0], pts[ref_key + "_se"][0]
    _close(a, np.hypot(a_se, b_se), b, what=f"bon:{n} {key} vs reference point")
    _close(a, a_se, curve[ref_key][0], what=f"bon:{n} {key} vs exact")


# ---------------------------------------------------------------------------------------------
# 6. Bad input.


def test_bad_inputs():
  r = np.zeros((2, 4))
  with pytest.raises(ValueError, match="K >= 2"):
    evaluate.reference_points(np.zeros((2, 1)))
  with pytest.raises(ValueError, match="K >= 2"):
    evaluate.policy_metrics(r, np.zeros((2, 1)))
  with pytest.raises(ValueError, match="same prompts"):
    evaluate.policy_metrics(np.zeros((3, 4)), r)
  with pytest.raises(ValueError, match="NaN"):
    evaluate.policy_metrics(r, np.full((2, 4), np.nan))
  with pytest.raises(ValueError, match="shape"):
    evaluate.policy_metrics(r, r, policy_log_probs=np.zeros((2, 3)), ref_log_probs=r)
  with pytest.raises(ValueError, match="n must be >= 1"):
    evaluate.policy_metrics(r, r, policy_log_probs=r, ref_log_probs=r, n=0.5)
  with pytest.raises(ValueError, match="smoothing"):
    evaluate.reference_points(np.arange(8.0).reshape(2, 4), smoothing="bogus")
  assert evaluate.reference_points(r, ns=(1, 2, 8))["n"] == [1.0, 2.0]    # N > K skipped
  assert np.isnan(evaluate.fwd_kl_to_bon(r, r, r, 4)).all()                # needs N ≤ K − 1
