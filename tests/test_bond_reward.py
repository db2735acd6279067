"""The tie-exact BOND reward (BOND Eq. 8, algorithms.md §1-§3) on the exact harness.

  r_BOND(y) = log p≤(y) + (1/(N−1))·log Σ_{i=1..N} (p<(y)/p≤(y))^(i−1)

makes log π_BoN − log π_ref = (N−1)·r_BOND exactly, ties included, so the backward-KL BOND
score-function gradient E_{y∼π}[∇log π(y)·(log π(y) − log π_ref(y) − (N−1)·r(y))] is exactly
∇_θ KL(π_θ ‖ π_BoN); with the paper's r = log p≤ it is not when rewards tie. All references here
are written independently in NumPy float64 (explicit sums, brute-force loops, enumeration).

Run `python tests/test_bond_reward.py` (or pytest -s -m slow) for the finite-k bias table.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from bond import bon, objectives, toy

# Compiles much and runs little: XLA's quicker codegen (tests/conftest.py, `quick_compiles`).
pytestmark = pytest.mark.quick_compiles

# ---------------------------------------------------------------------------------------------
# Independent NumPy references.


def _np_bond_reward(p_lt, p_le, n):
  """Eq. 8 by the explicit sum over i of (p</p≤)^(i−1), float64 (0^0 = 1)."""
  p_lt, p_le = np.broadcast_arrays(np.asarray(p_lt, np.float64), np.asarray(p_le, np.float64))
  if n == 1:
    return np.log(p_le)
  ratio = p_lt / p_le
  terms = ratio[..., None] ** np.arange(n, dtype=np.float64)
  return np.log(p_le) + np.log(terms.sum(-1)) / (n - 1)


def _np_quantiles(ref_p, rewards):
  """(p< [P, M], p≤ [P, M]) under π_ref [P, M] by explicit sums over outcomes."""
  below = rewards[:, None, :] < rewards[:, :, None]                 # [P, M(y), M(y')]
  at_or_below = rewards[:, None, :] <= rewards[:, :, None]
  return (ref_p[:, None, :] * below).sum(-1), (ref_p[:, None, :] * at_or_below).sum(-1)


def _np_bon(ref_p, rewards, n):
  """π_BoN [P, M] from the level form: BoN puts F(v)^N − F(v−)^N on reward level v, shared in
  proportion to π_ref within the level (F the reward CDF under π_ref)."""
  p_lt, p_le = _np_quantiles(ref_p, rewards)
  level = p_le - p_lt
  return ref_p * (p_le ** n - p_lt ** n) / level


def _np_quantile_loop(rewards, ref_rewards, ref_mask, smoothing):
  """Brute-force (p̂<, p̂≤) with Python loops (algorithms.md §2)."""
  b, s = rewards.shape
  p_lt, p_le = np.zeros((b, s)), np.zeros((b, s))
  for i in range(b):
    refs = [ref_rewards[i, j] for j in range(ref_rewards.shape[1]) if ref_mask[i, j]]
    k = len(refs)
    for t in range(s):
      less = sum(1 for v in refs if v < rewards[i, t])
      leq = sum(1 for v in refs if v <= rewards[i, t])
      if smoothing == "add_one":
        p_lt[i, t], p_le[i, t] = less / (k + 1), (1 + leq) / (k + 1)
      elif smoothing == "clip":
        p_lt[i, t], p_le[i, t] = less / k, max(leq / k, 1 / (k + 1))
      else:
        p_lt[i, t], p_le[i, t] = less / k, leq / k
  return p_lt, p_le


def _rel_cos(g, exact):
  g, exact = np.asarray(g, np.float64).ravel(), np.asarray(exact, np.float64).ravel()
  norm = np.linalg.norm(exact)
  return (float(np.linalg.norm(g - exact) / norm),
          float(g @ exact / (np.linalg.norm(g) * norm)))


# ---------------------------------------------------------------------------------------------
# 1. bond_reward against the explicit sum.

NS = (1, 2, 3, 4, 8, 64, 1000)


def _random_probs(seed, shape=(200,)):
  rng = np.random.default_rng(seed)
  p_le = rng.uniform(1e-4, 1.0, shape)
  p_lt = p_le * rng.uniform(0.0, 1.0, shape)
  # Exact edges: the lowest level (p< = 0), no mass on the level (p< = p≤), p≤ = 1, tiny p≤.
  p_lt[:4], p_le[:4] = [0.0, 0.3, 0.0, 0.999999], [0.3, 0.3, 1.0, 1.0]
  p_lt[4:6], p_le[4:6] = [1e-12, 1e-12 * (1 - 1e-9)], [1e-12, 1e-12]
  return p_lt, p_le


@pytest.mark.parametrize("n", NS)
def test_bond_reward_matches_explicit_sum_float64(n):
  p_lt, p_le = _random_probs(n)
  with jax.enable_x64(True):
    got = bon.bond_reward(p_lt, p_le, n)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got), _np_bond_reward(p_lt, p_le, n),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", NS)
def test_bond_reward_matches_explicit_sum_float32(n):
  p_lt, p_le = _random_probs(n)
  got = bon.bond_reward(p_lt.astype(np.float32), p_le.astype(np.float32), n)
  assert got.dtype == jnp.float32
  # Reference on the f32-rounded inputs; f32 round-off only.
  ref = _np_bond_reward(p_lt.astype(np.float32), p_le.astype(np.float32), n)
  np.testing.assert_allclose(np.asarray(got), ref, rtol=2e-6, atol=2e-6)


def test_bond_reward_large_n():
  p_lt, p_le = _random_probs(5, (20,))
  with jax.enable_x64(True):
    for n in (10_000, 100_000):
      np.testing.assert_allclose(np.asarray(bon.bond_reward(p_lt, p_le, n)),
                                 _np_bond_reward(p_lt, p_le, n), rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("n", (2, 4, 8, 100))
def test_bond_reward_limits(n):
  p_le = np.array([1e-6, 0.01, 0.3, 0.7, 1.0])
  with jax.enable_x64(True):
    # No mass on y's level (p< = p≤): the no-ties value log p≤ + log N/(N−1).
    np.testing.assert_allclose(np.asarray(bon.bond_reward(p_le, p_le, n)),
                               np.log(p_le) + math.log(n) / (n - 1), rtol=1e-13)
    # The lowest level (p< = 0): no correction.
    np.testing.assert_allclose(np.asarray(bon.bond_reward(0.0, p_le, n)), np.log(p_le),
                               rtol=1e-13)
    # N = 1: r = log p≤ whatever p<.
    np.testing.assert_allclose(np.asarray(bon.bond_reward(0.5 * p_le, p_le, 1)), np.log(p_le),
                               rtol=1e-13)
    # In between, the correction is increasing in p< and lies in [0, log N/(N−1)].
    ratio = np.linspace(0.0, 1.0, 101)
    corr = np.asarray(bon.bond_reward(0.4 * ratio, 0.4, n)) - math.log(0.4)
    assert corr[0] == 0.0 and corr[-1] == pytest.approx(math.log(n) / (n - 1), rel=1e-13)
    assert np.all(np.diff(corr) > 0)


def test_bond_reward_broadcasts_jits_and_keeps_dtype():
  p_le = np.array([[0.2], [0.5], [1.0]])                    # [3, 1]
  ratio = np.array([[0.0, 0.25, 0.5, 0.9, 1.0]])            # [1, 5]
  got = bon.bond_reward(ratio * p_le, p_le, 4)
  assert got.shape == (3, 5) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), _np_bond_reward(ratio * p_le, p_le, 4), rtol=1e-6)
  jitted = jax.jit(bon.bond_reward)(jnp.asarray(ratio * p_le), jnp.asarray(p_le), 4)
  np.testing.assert_allclose(np.asarray(jitted), np.asarray(got), rtol=1e-6)
  # A scalar p≤ against an array of p<, and an array n (elementwise).
  np.testing.assert_allclose(np.asarray(bon.bond_reward(np.array([0.0, 0.1]), 0.2, 3)),
                             _np_bond_reward([0.0, 0.1], 0.2, 3), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(bon.bond_reward(0.1, 0.2, np.array([2.0, 8.0]))),
                             [_np_bond_reward(0.1, 0.2, 2), _np_bond_reward(0.1, 0.2, 8)],
                             rtol=1e-6)


def test_bond_reward_zero_quantile_is_minus_inf_eager_and_jitted():
  """p≤ = 0 (smoothing='none', y below every reference) gives −inf like log p̂≤, not NaN."""
  p_lt, p_le = jnp.array([0.0, 0.0, 0.25]), jnp.array([0.0, 0.5, 0.5])
  for fn in (bon.bond_reward, jax.jit(bon.bond_reward)):
    got = np.asarray(fn(p_lt, p_le, 4))
    assert got[0] == -np.inf and not np.any(np.isnan(got))
    np.testing.assert_allclose(got[1:], _np_bond_reward(p_lt[1:], p_le[1:], 4), rtol=1e-6)


def test_bond_reward_accepts_round_off_from_exact_quantiles():
  """p< above p≤ (or p≤ above 1) by a few ulps, as exp of `bon.log_quantiles` can give, is read
  as p< = p≤ (the no-ties limit)."""
  p_le = np.float32(0.3)
  p_lt = np.nextafter(p_le, np.float32(1.0))
  assert float(bon.bond_reward(p_lt, p_le, 4)) == pytest.approx(
      math.log(0.3) + math.log(4) / 3, rel=1e-6)
  assert np.isfinite(float(bon.bond_reward(0.5, np.nextafter(np.float32(1), np.float32(2)), 4)))


@pytest.mark.parametrize("p_lt, p_le, n, match", [
    (0.5, 0.4, 4, "p_less <= p_less_equal"),       # p< > p≤
    (-0.1, 0.4, 4, "p_less <= p_less_equal"),      # negative
    (0.1, 1.5, 4, "p_less <= p_less_equal"),       # p≤ > 1
    (0.1, -0.2, 4, "p_less <= p_less_equal"),      # negative p≤
    (np.nan, 0.4, 4, "no NaN"),
    (0.1, np.nan, 4, "no NaN"),
    (0.1, 0.4, 0, "n must be >= 1"),
    (0.1, 0.4, 0.5, "n must be >= 1"),
    (0.1, 0.4, np.nan, "n must be >= 1"),
])
def test_bond_reward_rejects_bad_input(p_lt, p_le, n, match):
  with pytest.raises(ValueError, match=match):
    bon.bond_reward(np.array([0.0, p_lt]), np.array([0.5, p_le]), n)


# ---------------------------------------------------------------------------------------------
# 2. quantile_estimates against a brute-force loop; unbiasedness of 'none'.

@pytest.mark.parametrize("smoothing", bon.SMOOTHINGS)
@pytest.mark.parametrize("masked", [False, True])
def test_quantile_estimates_match_brute_force(smoothing, masked):
  rng = np.random.default_rng(1)
  b, s, k = 6, 9, 7
  rewards = rng.integers(0, 4, (b, s)).astype(np.float32)          # small grid: many ties
  ref_rewards = rng.integers(0, 4, (b, k)).astype(np.float32)
  rewards[0, 0], rewards[0, 1] = -1.0, 9.0                          # below / above every ref
  ref_mask = rng.uniform(size=(b, k)) < 0.6 if masked else np.ones((b, k), bool)
  ref_mask[:, 0] = True                                             # k ≥ 1 everywhere
  p_lt, p_le = bon.quantile_estimates(rewards, ref_rewards, ref_mask if masked else None,
                                      smoothing=smoothing)
  want_lt, want_le = _np_quantile_loop(rewards, ref_rewards, ref_mask, smoothing)
  np.testing.assert_allclose(np.asarray(p_lt), want_lt, rtol=1e-6, atol=0)
  np.testing.assert_allclose(np.asarray(p_le), want_le, rtol=1e-6, atol=0)
  assert np.all(np.asarray(p_lt) <= np.asarray(p_le))
  assert np.all(np.asarray(p_le) <= 1.0) and np.all(np.asarray(p_lt) >= 0.0)
  if smoothing != "none":
    assert np.all(np.asarray(p_le) > 0)       # log p̂≤ finite
  if smoothing == "add_one":
    assert np.all(np.asarray(p_lt) < np.asarray(p_le))
  np.testing.assert_array_equal(
      np.asarray(bon.quantile_estimate(rewards, ref_rewards, ref_mask, smoothing)),
      np.asarray(p_le))
  # The estimates feed bond_reward without complaint, and jit agrees.
  r = np.asarray(bon.bond_reward(p_lt, p_le, 4))
  assert np.all(np.isfinite(r)) or smoothing == "none"
  jitted = jax.jit(bon.quantile_estimates, static_argnames="smoothing")(
      rewards, ref_rewards, ref_mask, smoothing=smoothing)
  np.testing.assert_array_equal(np.asarray(jitted[0]), np.asarray(p_lt))
  np.testing.assert_array_equal(np.asarray(jitted[1]), np.asarray(p_le))


def test_quantile_estimates_keep_float64_and_reject_bad_input():
  with jax.enable_x64(True):
    p_lt, p_le = bon.quantile_estimates(np.zeros((2, 3)), np.ones((2, 4)))
    assert p_lt.dtype == p_le.dtype == jnp.float64
  with pytest.raises(ValueError, match="smoothing"):
    bon.quantile_estimates(np.zeros((2, 3)), np.ones((2, 4)), smoothing="bogus")
  with pytest.raises(ValueError, match="k >= 1"):
    bon.quantile_estimates(np.zeros((2, 3)), np.ones((2, 4)), np.zeros((2, 4), bool))


def test_unsmoothed_estimates_are_unbiased():
  """E[p̂<] = p<, E[p̂≤] = p≤ for smoothing='none' (tolerance: 5 standard errors)."""
  ref_p = np.array([0.05, 0.1, 0.2, 0.15, 0.25, 0.1, 0.15])
  r = np.array([0.0, 1.0, 1.0, 2.0, 2.0, 2.0, 3.0])
  exact_lt, exact_le = _np_quantiles(ref_p[None], r[None])
  draws, k = 20_000, 5
  idx = np.random.default_rng(2).choice(7, size=(draws, k), p=ref_p)
  p_lt, p_le = bon.quantile_estimates(np.broadcast_to(r, (draws, 7)), r[idx], smoothing="none")
  for est, exact in ((p_lt, exact_lt[0]), (p_le, exact_le[0])):
    est = np.asarray(est, np.float64)
    se = est.std(0, ddof=1) / math.sqrt(draws) + 1e-12
    assert np.all(np.abs(est.mean(0) - exact) < 5 * se), (est.mean(0), exact, se)
  # Against that, 'clip' is biased up on the lowest level, where p≤ is small.
  clip_le = np.asarray(bon.quantile_estimates(np.broadcast_to(r, (draws, 7)), r[idx])[1])
  assert clip_le[:, 0].mean() > exact_le[0, 0] + 0.05


# ---------------------------------------------------------------------------------------------
# 3. The exact harness: tabular π_θ = softmax(θ) [P, M], exact p<, p≤ under π_ref, rewards with ties.

def _hand_table():
  """Two prompts, 7 outcomes, rewards with ties: 4 levels, and a binary verifier."""
  ref_p = np.array([[0.05, 0.1, 0.2, 0.15, 0.25, 0.1, 0.15],
                    [0.3, 0.05, 0.05, 0.2, 0.1, 0.2, 0.1]])
  rewards = np.array([[0.0, 1.0, 1.0, 2.0, 2.0, 2.0, 3.0],
                      [0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0]])
  return ref_p, rewards


def _toy_table():
  """`toy.make_task()` (4 prompts, 85 completions, rewards on 5 integer levels) with the toy π_ref."""
  task = toy.make_task()
  config = toy.model_config(task)
  ref_lp = toy.policy_log_probs(config, toy.init_policy(task, jax.random.PRNGKey(0)), task)
  ref_lp = np.asarray(ref_lp, np.float64)
  ref_p = np.exp(ref_lp - scipy.special.logsumexp(ref_lp, axis=-1, keepdims=True))
  return ref_p, task.rewards.astype(np.float64)


def _make_harness(ref_p, rewards, seed):
  p_lt, p_le = _np_quantiles(ref_p, rewards)
  # Policy: π_ref tilted by noise (early in training), so both the reward term and
  # log π/π_ref matter.
  theta = np.log(ref_p) + np.random.default_rng(seed).normal(0.0, 0.2, ref_p.shape)
  return dict(ref_p=ref_p, ref_lp=np.log(ref_p), rewards=rewards, p_lt=p_lt, p_le=p_le,
              theta=theta)


@pytest.fixture(scope="module", params=["hand7", "toy"])
def harness(request):
  table = _hand_table() if request.param == "hand7" else _toy_table()
  return _make_harness(*table, seed=3)


def _reward_table(h, kind, n):
  if kind == "exact_ties":
    return np.asarray(bon.bond_reward(h["p_lt"], h["p_le"], n))
  return np.log(h["p_le"])                                        # "log_quantile"


def _kl_grad(h, target_lp):
  """∇_θ of the mean over prompts of Σ_y π_θ (log π_θ − log q), written out."""
  def kl(theta):
    lp = jax.nn.log_softmax(theta, axis=-1)
    return jnp.mean(jnp.sum(jnp.exp(lp) * (lp - target_lp), axis=-1))
  return np.asarray(jax.grad(kl)(jnp.asarray(h["theta"])))


def _score_grad(h, reward, n):
  """E_{y∼π_θ}[∇log π_θ(y)·(log π_θ(y) − log π_ref(y) − (N−1)·r(y))] by enumeration (every
  outcome weighted by π_θ(y); the baseline's expectation is 0 and is left out), prompt mean."""
  return np.asarray(_score_grad_jit(jnp.asarray(h["theta"]), jnp.asarray(h["ref_lp"]),
                                    jnp.asarray(reward), n))


@functools.partial(jax.jit, static_argnums=3)
def _score_grad_jit(theta, ref_lp, reward, n):
  sg = jax.lax.stop_gradient
  def surrogate(theta):
    lp = jax.nn.log_softmax(theta, axis=-1)
    return jnp.mean(jnp.sum(sg(jnp.exp(lp) * (lp - ref_lp - (n - 1) * reward)) * lp, axis=-1))
  return jax.grad(surrogate)(theta)


def _loss_grad(h, reward, n):
  """The exact expected gradient of `objectives.backward_kl_loss` itself, RLOO baseline
  included: two policy samples per prompt, every pair (y1, y2) enumerated with weight
  π_θ(y1)·π_θ(y2); the reward enters as the loss uses it (scaled by N−1 inside the loss)."""
  return np.asarray(_loss_grad_jit(jnp.asarray(h["theta"]), jnp.asarray(h["ref_lp"]),
                                   jnp.asarray(reward), n))


@functools.partial(jax.jit, static_argnums=3)
def _loss_grad_jit(theta, ref_lp, reward, n):
  m = theta.shape[-1]
  pairs = jnp.stack(jnp.meshgrid(jnp.arange(m), jnp.arange(m), indexing="ij"), -1).reshape(-1, 2)

  def expected_loss(theta):
    lp = jax.nn.log_softmax(theta, axis=-1)
    def one_prompt(lp_row, ref_row, reward_row):
      def one_pair(pair):
        return objectives.backward_kl_loss(lp_row[pair][None], ref_row[pair][None],
                                           reward_row[pair][None], n)[0]
      w = jax.lax.stop_gradient(jnp.exp(lp_row[pairs[:, 0]] + lp_row[pairs[:, 1]]))
      return jnp.sum(w * jax.vmap(one_pair)(pairs))
    return jnp.mean(jax.vmap(one_prompt)(lp, ref_lp, reward))
  return jax.grad(expected_loss)(theta)


@pytest.mark.parametrize("n", (2, 4, 8))
def test_exact_ties_reward_gives_the_exact_backward_kl_gradient(harness, n):
  """With exact p<, p≤ under π_ref, r = bond_reward (Eq. 8) makes the BOND backward-KL gradient
  exactly ∇_θ KL(π_θ ‖ π_BoN); the paper's r = log p≤ does not when rewards tie."""
  h = harness
  with jax.enable_x64(True):
    bon_lp = np.asarray(bon.bon_log_probs(h["ref_lp"], h["rewards"], n))
    # π_BoN of the library = the independent level form; and Eq. 8 is its exact log-ratio
    # (N−1)·r_BOND = log π_BoN − log π_ref, with no additive constant.
    np.testing.assert_allclose(np.exp(bon_lp), _np_bon(h["ref_p"], h["rewards"], n),
                               rtol=1e-10, atol=1e-15)
    r_exact = _reward_table(h, "exact_ties", n)
    np.testing.assert_allclose((n - 1) * r_exact, bon_lp - h["ref_lp"], rtol=1e-10, atol=1e-12)

    target = _kl_grad(h, bon_lp)
    results = {}
    for kind in ("exact_ties", "log_quantile"):
      reward = _reward_table(h, kind, n)
      direct, via_loss = _score_grad(h, reward, n), _loss_grad(h, reward, n)
      # backward_kl_loss rounds its reward input to f32: agreement to f32 precision only.
      assert _rel_cos(via_loss, direct)[0] < 2e-6
      results[kind] = _rel_cos(direct, target), _rel_cos(via_loss, target)
    print(f"N={n}: " + "  ".join(f"{k}: rel {v[0][0]:.2e} cos {v[0][1]:.6f} (loss: rel "
                                  f"{v[1][0]:.2e})" for k, v in results.items()))
    (rel, cos), (rel_loss, _) = results["exact_ties"]
    assert rel < 1e-10 and cos > 1 - 1e-12
    assert rel_loss < 1e-5
    (rel, cos), (rel_loss, _) = results["log_quantile"]
    assert rel > 0.05 and rel_loss > 0.05, f"log_quantile unexpectedly exact: rel {rel:.3g}"
    # ... and log p≤ is exact for its own target π̃ ∝ π_ref·p≤^(N−1) (BOND Thm 1 without ties).
    tilde = h["ref_lp"] + (n - 1) * np.log(h["p_le"])
    tilde = tilde - scipy.special.logsumexp(tilde, axis=-1, keepdims=True)
    assert _rel_cos(_score_grad(h, np.log(h["p_le"]), n), _kl_grad(h, tilde))[0] < 1e-10


def test_exact_ties_reward_from_library_quantiles(harness):
  """The same with p<, p≤ from `bon.log_quantiles` (f32 round-off tolerated by bond_reward)."""
  h = harness
  log_le, log_lt = bon.log_quantiles(h["ref_lp"].astype(np.float32),
                                     h["rewards"].astype(np.float32))
  r = np.asarray(bon.bond_reward(jnp.exp(log_lt), jnp.exp(log_le), 4), np.float64)
  np.testing.assert_allclose(r, _reward_table(h, "exact_ties", 4), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 4. Finite-k bias: p̂<, p̂≤ from k i.i.d. π_ref samples.
#
# Given the counts (#<, #=, #>) ~ Multinomial(k; p<, p≤ − p<, 1 − p≤) of the k references, the
# estimators are deterministic; the reference draws are independent of the policy samples and
# the RLOO baseline has zero mean, so the expected gradient is the score-function gradient with
# r(y) replaced by E[r̂(y)], which we compute exactly by enumerating every count vector and
# evaluating the library (quantile_estimates → bond_reward / log) on synthetic references.

def _count_table(k, n, smoothing):
  """(counts [C, 3], r̂ [C] per reward kind) over all count vectors (#<, #=, #>) summing to k."""
  counts = np.array([(a, b, k - a - b) for a in range(k + 1) for b in range(k + 1 - a)])
  refs = np.stack([np.concatenate([np.full(c[0], -1.0), np.full(c[1], 0.0), np.full(c[2], 1.0)])
                   for c in counts])                                      # [C, k]
  p_lt, p_le = bon.quantile_estimates(np.zeros((len(counts), 1)), refs, smoothing=smoothing)
  table = {"exact_ties": np.asarray(bon.bond_reward(p_lt, p_le, n), np.float64)[:, 0],
           "log_quantile": np.log(np.asarray(p_le, np.float64))[:, 0]}
  return counts, table


def _expected_estimated_reward(h, k, n, smoothing):
  """E over k π_ref samples of r̂(y) [P, M] for both reward kinds, exact."""
  counts, table = _count_table(k, n, smoothing)
  probs = np.stack([h["p_lt"], h["p_le"] - h["p_lt"], 1.0 - h["p_le"]], axis=-1)   # [P, M, 3]
  probs = np.clip(probs, 0.0, 1.0)
  log_pmf = (scipy.special.gammaln(k + 1) - scipy.special.gammaln(counts + 1).sum(-1)
             + scipy.special.xlogy(counts, probs[..., None, :]).sum(-1))          # [P, M, C]
  pmf = np.exp(log_pmf)
  np.testing.assert_allclose(pmf.sum(-1), 1.0, rtol=1e-10)
  return {kind: pmf @ values for kind, values in table.items()}


def _bias_rows(h, ks, n, smoothings):
  rows = []
  with jax.enable_x64(True):
    target = _kl_grad(h, np.asarray(bon.bon_log_probs(h["ref_lp"], h["rewards"], n)))
    for kind in ("exact_ties", "log_quantile"):
      rows.append((kind, "exact", "inf") + _rel_cos(_score_grad(h, _reward_table(h, kind, n), n),
                                                    target))
    for smoothing in smoothings:
      for k in ks:
        expected = _expected_estimated_reward(h, k, n, smoothing)
        for kind in ("exact_ties", "log_quantile"):
          rows.append((kind, smoothing, str(k))
                      + _rel_cos(_score_grad(h, expected[kind], n), target))
  return rows


def _print_rows(title, rows):
  print(f"\n{title}\n{'reward':<13}{'p̂ smoothing':<13}{'k':>5}{'rel err':>10}{'cosine':>10}")
  for kind, smoothing, k, rel, cos in rows:
    print(f"{kind:<13}{smoothing:<13}{k:>5}{rel:>10.4f}{cos:>10.4f}")


@pytest.mark.slow
def test_finite_k_bias_report(harness):
  """Expected gradient with p̂<, p̂≤ from k π_ref samples vs the exact ∇KL(π_θ ‖ π_BoN), N = 4."""
  h = harness
  n, ks = 4, (4, 16, 64)
  # The count-enumeration expectation agrees with Monte Carlo through the library (k = 4, clip).
  with jax.enable_x64(True):
    exact = _expected_estimated_reward(h, 4, n, "clip")["exact_ties"]
    p, m = h["theta"].shape
    draws = 4000
    rng = np.random.default_rng(4)
    idx = np.stack([rng.choice(m, size=(draws, 4), p=h["ref_p"][i]) for i in range(p)])
    ref_r = np.take_along_axis(h["rewards"][:, None, :], idx.reshape(p, 1, -1), -1)
    ref_r = ref_r.reshape(p * draws, 4)
    pol_r = np.repeat(h["rewards"], draws, axis=0)                              # [P·D, M]
    p_lt, p_le = bon.quantile_estimates(pol_r, ref_r, smoothing="clip")
    mc = np.asarray(bon.bond_reward(p_lt, p_le, n)).reshape(p, draws, m)
    se = mc.std(1, ddof=1) / math.sqrt(draws) + 1e-9
    assert np.all(np.abs(mc.mean(1) - exact) < 5 * se)

  rows = _bias_rows(h, ks, n, ("clip", "add_one"))
  _print_rows(f"finite-k bias, N={n}, harness {h['theta'].shape}", rows)
  rel = {(kind, s, k): r for kind, s, k, r, _ in rows}
  tie_gap = rel[("log_quantile", "exact", "inf")]
  for s in ("clip", "add_one"):
    # Estimated from k samples, both rewards are biased. The tie-exact reward's bias shrinks with
    # k towards 0; log p̂≤'s tends to the tie gap, not monotonically (at moderate k the finite-k
    # bias can partly offset it), and stays above half of it.
    assert rel[("exact_ties", s, "4")] > rel[("exact_ties", s, "16")] > rel[("exact_ties", s, "64")]
    assert rel[("exact_ties", s, "4")] > 0.05
    for k in ks:
      assert rel[("log_quantile", s, str(k))] > 0.5 * tie_gap
    for k in ("16", "64"):
      assert rel[("exact_ties", s, k)] < rel[("log_quantile", s, k)]

if __name__ == "__main__":
  for name, table in (("hand7", _hand_table()), ("toy", None)):
    h = _make_harness(*(table or _toy_table()), seed=3)
    _print_rows(f"finite-k bias, N=4, harness {name} {h['theta'].shape}",
                _bias_rows(h, (4, 16, 64), 4, ("clip", "add_one")))
