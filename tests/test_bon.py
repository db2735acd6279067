"""Best-of-N maths against brute force, closed forms and seeded Monte Carlo."""

import fractions
import itertools
import json
import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from bond import bon


def _case(seed, m=5, levels=3):
  """π_ref [M] (f64) and integer rewards with ties."""
  rng = np.random.default_rng(seed)
  p = rng.dirichlet(np.ones(m))
  return p, rng.integers(0, levels, m).astype(np.float64)


def _brute_force_bon(p, r, n):
  """Law of the best of n i.i.d. draws, ties broken uniformly among the maximisers."""
  out = np.zeros(len(p))
  for tup in itertools.product(range(len(p)), repeat=n):
    prob = np.prod(p[list(tup)])
    top = max(r[i] for i in tup)
    winners = [i for i in tup if r[i] == top]
    for i in winners:
      out[i] += prob / len(winners)
  return out


def _brute_force_win_rate(p, r, n):
  """P[r(best of n) > r(y_ref)] + ½ P[=], enumerating (n+1)-tuples."""
  total = 0.0
  for tup in itertools.product(range(len(p)), repeat=n + 1):
    prob = np.prod(p[list(tup)])
    best, ref = max(r[i] for i in tup[:n]), r[tup[n]]
    total += prob * (1.0 if best > ref else 0.5 if best == ref else 0.0)
  return total


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_theorem_1_with_ties_matches_brute_force(seed, n):
  p, r = _case(seed)
  exact = _brute_force_bon(p, r, n)
  got = np.exp(np.asarray(bon.bon_log_probs(np.log(p), r, n), np.float64))
  assert np.max(np.abs(got - exact)) <= 1e-6


@pytest.mark.parametrize("n", [1, 2, 3])
def test_win_rate_with_ties_matches_brute_force(n):
  p, r = _case(4)
  assert abs(float(bon.win_rate(np.log(p), r, n)) - _brute_force_win_rate(p, r, n)) <= 1e-6


def test_batched_outcomes_on_the_last_axis():
  cases = [_case(s) for s in range(3)]
  logp = np.log(np.stack([c[0] for c in cases]))
  r = np.stack([c[1] for c in cases])
  got = np.exp(np.asarray(bon.bon_log_probs(logp, r, 3)))
  for i, (p, ri) in enumerate(cases):
    np.testing.assert_allclose(got[i], _brute_force_bon(p, ri, 3), atol=1e-6)


@pytest.mark.parametrize("n", [16, 64])
def test_large_n_matches_monte_carlo(n):
  """Seeded draws of n-tuples, first maximiser; counts inside Bonferroni binomial intervals."""
  p, r = _case(5, m=8, levels=4)
  draws = 20_000
  rng = np.random.default_rng(0)
  samples = rng.choice(len(p), size=(draws, n), p=p)
  best = samples[np.arange(draws), np.argmax(r[samples], axis=1)]
  counts = np.bincount(best, minlength=len(p))
  exact = np.exp(np.asarray(bon.bon_log_probs(np.log(p), r, n), np.float64))
  lo, hi = scipy.stats.binom.interval(1 - 1e-4 / len(p), draws, exact)
  assert np.all((counts >= lo) & (counts <= hi)), (counts, draws * exact)


def test_real_n_gives_distributions_and_matches_integer_n():
  p, r = _case(6, m=7)
  for n in [1.0, 1.5, 2.7, 10.3, 1000.0]:
    total = np.exp(np.asarray(bon.bon_log_probs(np.log(p), r, n), np.float64)).sum()
    assert abs(total - 1.0) < 1e-5, n
  np.testing.assert_allclose(np.exp(bon.bon_log_probs(np.log(p), r, 1)), p, rtol=1e-6)


def test_no_ties_limit_win_rate_and_kl():
  """Many equally likely distinct outcomes: win rate n/(n+1), KL log n − (n−1)/n, to O(n/M)."""
  m = 4000
  logp = np.full(m, -np.log(m))
  r = np.random.default_rng(0).permutation(m).astype(np.float64)
  for n in [2, 4, 8]:
    assert abs(float(bon.win_rate(logp, r, n)) - n / (n + 1)) < 2 * n / m
    assert abs(float(bon.kl_bon_ref(logp, r, n)) - (math.log(n) - (n - 1) / n)) < 2 * n / m
    assert float(bon.kl_bound(n)) == pytest.approx(math.log(n) - (n - 1) / n, rel=1e-6)


def test_no_ties_factor_is_n():
  p = np.random.default_rng(1).dirichlet(np.ones(6))
  r = np.arange(6.0)
  cdf = np.cumsum(p)
  expected = cdf ** 4 - np.concatenate([[0.0], cdf[:-1]]) ** 4      # P[max index = i]
  np.testing.assert_allclose(np.exp(bon.bon_log_probs(np.log(p), r, 4)), expected, atol=1e-6)


def test_ties_make_the_bound_loose():
  """Binary reward, P_ref[r = 1] = ½: KL(π_BoN(n) ‖ π_ref) = KL(Bern(1 − 2^−n) ‖ Bern(½)).

  n = 16: KL = 0.6929 against the bound log 16 − 15/16 = 1.8351 (2.6 times smaller).
  """
  p = np.array([0.2, 0.3, 0.1, 0.4])
  r = np.array([0.0, 0.0, 1.0, 1.0])
  for n in [2, 4, 16]:
    q = 1 - 0.5 ** n
    closed = q * math.log(q / 0.5) + (1 - q) * math.log((1 - q) / 0.5)
    got = float(bon.kl_bon_ref(np.log(p), r, n))
    assert got == pytest.approx(closed, abs=1e-6)
    assert got < float(bon.kl_bound(n))
  assert float(bon.kl_bon_ref(np.log(p), r, 16)) == pytest.approx(0.6929, abs=1e-4)
  assert float(bon.kl_bound(16)) == pytest.approx(1.8351, abs=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ties_kl_is_below_the_bound(seed):
  p, r = _case(seed, m=6)
  for n in [2, 4, 8]:
    assert float(bon.kl_bon_ref(np.log(p), r, n)) < float(bon.kl_bound(n))


def test_log_space_stability():
  """Tiny levels next to big ones, f32: finite, sums to 1, agrees with f64 NumPy."""
  logp = np.array([-0.1, -3.0, -60.0, -80.0, -2.5], np.float32)
  logp = logp - np.log(np.exp(logp.astype(np.float64)).sum())
  r = np.array([1.0, 0.0, 2.0, 2.0, 3.0])
  got = np.asarray(bon.bon_log_probs(logp.astype(np.float32), r, 8.0))
  assert np.all(np.isfinite(got))
  p = np.exp(logp.astype(np.float64))
  lower = np.array([p[r < ri].sum() for ri in r])
  level = np.array([p[r == ri].sum() for ri in r])
  # The level mass is tiny: the no-ties limit n·p≤^(n−1) is exact to 1e-26 for r = 2.
  with np.errstate(divide="ignore"):
    expected = np.log(p) + np.log(((lower + level) ** 8 - lower ** 8) / level)
  expected[2:4] = np.log(p[2:4]) + np.log(8) + 7 * np.log(lower[2] + level[2])
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_float64_is_respected():
  p, r = _case(0)
  with jax.enable_x64(True):
    out = bon.bon_log_probs(np.log(p), r, 3)
    assert out.dtype == jnp.float64
    np.testing.assert_allclose(np.exp(out), _brute_force_bon(p, r, 3), atol=1e-13)
    assert bon.kl_bon_ref(np.log(p), r, 3).dtype == jnp.float64


def test_quantiles_kl_reward_and_cdf_against_numpy():
  p, r = _case(3, m=6)
  leq, lt = bon.log_quantiles(np.log(p), r)
  np.testing.assert_allclose(np.exp(leq), [p[r <= ri].sum() for ri in r], atol=1e-6)
  np.testing.assert_allclose(np.exp(lt), [p[r < ri].sum() for ri in r], atol=1e-6)
  np.testing.assert_allclose(bon.reward_cdf(np.log(p), r, [-1.0, 0.5, 1.0, 9.0]),
                             [0.0, p[r <= 0.5].sum(), p[r <= 1].sum(), 1.0], atol=1e-6)
  q = np.random.default_rng(9).dirichlet(np.ones(6))
  assert float(bon.kl(np.log(q), np.log(p))) == pytest.approx(np.sum(q * np.log(q / p)), abs=1e-6)
  assert float(bon.kl(np.log(p), np.log(p))) == 0.0
  q0 = np.where(np.arange(6) == 0, 0.0, q / q[1:].sum())
  with np.errstate(divide="ignore"):
    log_q0 = np.log(q0)
  assert float(bon.kl(log_q0, np.log(p))) == pytest.approx(
      np.sum(q0[1:] * np.log(q0[1:] / p[1:])), abs=1e-6)
  assert float(bon.expected_reward(np.log(q), r)) == pytest.approx(q @ r, abs=1e-6)


@pytest.mark.parametrize("n", [1.0, 1.7, 4.0, 12.5, 30.0])
def test_effective_n_inverts_kl(n):
  p, r = _case(7, m=8, levels=6)
  kappa = bon.kl_bon_ref(np.log(p), r, n)
  assert float(bon.effective_n(kappa, np.log(p), r)) == pytest.approx(n, rel=1e-3)


def test_effective_n_edges_and_batches():
  p, r = _case(7, m=8, levels=6)
  logp = np.log(p)
  assert float(bon.effective_n(0.0, logp, r)) == 1.0
  assert float(bon.effective_n(50.0, logp, r, n_max=64.0)) == pytest.approx(64.0)
  logps = np.stack([logp, np.log(_case(8, m=8)[0])])
  rs = np.stack([r, _case(8, m=8)[1]])
  kappas = np.asarray(bon.kl_bon_ref(logps, rs, np.array([3.0, 5.0])))
  np.testing.assert_allclose(bon.effective_n(kappas, logps, rs), [3.0, 5.0], rtol=1e-3)
  mean_kl = np.asarray(bon.kl_bon_ref(logps, rs, 6.0)).mean()
  assert float(bon.effective_n(mean_kl, logps, rs, average=True)) == pytest.approx(6.0, rel=1e-3)
  with pytest.raises(ValueError, match="n_max must be >= 1"):
    bon.effective_n(0.1, logp, r, n_max=0.5)


def test_quantile_estimate_is_unbiased_before_smoothing():
  """Mean of p̂≤ over many seeded reference draws equals p≤, within 5 standard errors."""
  p, r = _case(10, m=6, levels=4)
  k, seeds = 4, 20_000
  ref = r[np.random.default_rng(0).choice(len(p), size=(seeds, k), p=p)]     # [seeds, k]
  queries = np.tile(np.unique(r), (seeds, 1))                                # [seeds, S]
  est = np.asarray(bon.quantile_estimate(queries, ref, smoothing="none"), np.float64)
  true = np.array([p[r <= q].sum() for q in np.unique(r)])
  se = np.sqrt(true * (1 - true) / k / seeds) + 1e-12
  assert np.all(np.abs(est.mean(0) - true) <= 5 * se)


def test_quantile_estimate_smoothing_and_mask():
  rewards = np.array([[0.0, 1.0, 5.0]])
  ref = np.array([[1.0, 2.0, 3.0, 9.0]])
  np.testing.assert_allclose(bon.quantile_estimate(rewards, ref, smoothing="none"),
                             [[0.0, 0.25, 0.75]])
  np.testing.assert_allclose(bon.quantile_estimate(rewards, ref, smoothing="clip"),
                             [[0.2, 0.25, 0.75]])
  np.testing.assert_allclose(bon.quantile_estimate(rewards, ref, smoothing="add_one"),
                             [[0.2, 0.4, 0.8]])
  mask = np.array([[True, False, True, False]])          # k = 2: refs {1, 3}
  np.testing.assert_allclose(bon.quantile_estimate(rewards, ref, mask, smoothing="clip"),
                             [[1 / 3, 0.5, 1.0]])
  assert np.isneginf(bon.log_quantile_estimate(rewards, ref, smoothing="none")[0, 0])
  assert np.isfinite(bon.log_quantile_estimate(rewards, ref)).all()


def test_beta_star_closed_form_and_order_statistics():
  h7 = sum(fractions.Fraction(1, k) for k in range(1, 8))
  assert h7 == fractions.Fraction(363, 140)
  assert bon.beta_star(8) == pytest.approx(float(1 / (2 * 7 * h7)), rel=1e-12)
  assert round(bon.beta_star(8), 4) == 0.0275 and abs(bon.beta_star(8) - 0.0276) < 1e-4
  # E[log U_(n) − log U_(1)] = H_{n−1} for n uniforms (BoNBoN §4), so β* = 1 / (2 (n−1) E[·]).
  u = np.random.default_rng(0).uniform(size=(200_000, 8))
  gap = np.log(u.max(1)) - np.log(u.min(1))
  assert abs(gap.mean() - float(h7)) < 5 * gap.std() / np.sqrt(len(gap))
  with pytest.raises(ValueError, match="n >= 2"):
    bon.beta_star(1)


def test_select_best_worst_brute_force():
  rng = np.random.default_rng(0)
  r = rng.integers(0, 3, (50, 6)).astype(np.float32)
  r[0, 2] = np.inf
  r[1, :] = -np.inf
  mask = rng.random((50, 6)) < 0.7
  mask[:, 0] = True
  mask[0, 2] = False                                      # a masked +inf is never best
  best, worst = bon.select_best_worst(r, mask)
  for i in range(50):
    valid = [j for j in range(6) if mask[i, j]]
    top, bottom = max(r[i, valid]), min(r[i, valid])
    assert best[i] == next(j for j in valid if r[i, j] == top)
    assert worst[i] == next(j for j in valid if r[i, j] == bottom)
  assert best.dtype == jnp.int32


@pytest.mark.parametrize("rewards,mask,match", [
    (np.zeros((2, 3)), np.array([[1, 1, 1], [0, 0, 0]], bool), "at least one unmasked"),
    (np.array([[0.0, np.nan]]), None, "NaN"),
    (np.zeros((2, 3)), np.ones((2, 2), bool), r"\[B, N\]"),
])
def test_select_best_worst_errors(rewards, mask, match):
  with pytest.raises(ValueError, match=match):
    bon.select_best_worst(rewards, mask)


def test_quantile_estimate_errors():
  with pytest.raises(ValueError, match="smoothing must be one of"):
    bon.quantile_estimate(np.zeros((1, 2)), np.zeros((1, 3)), smoothing="laplace")
  with pytest.raises(ValueError, match="k >= 1"):
    bon.quantile_estimate(np.zeros((1, 2)), np.zeros((1, 3)), np.zeros((1, 3), bool))
  with pytest.raises(ValueError, match=r"\[B, S\]"):
    bon.quantile_estimate(np.zeros((2, 2)), np.zeros((1, 3)))


def _fake_sampler(rewards_table):
  """sample_fn whose sample j of prompt b is the single token rewards_table[b, j] (as an id)."""
  def sample_fn(prompt_tokens, prompt_mask, rng, num_samples):
    del prompt_mask, rng
    b = prompt_tokens.shape[0]
    tokens = jnp.broadcast_to(jnp.arange(num_samples)[None, :, None], (b, num_samples, 2))
    logprobs = -jnp.ones((b, num_samples, 2)) * jnp.arange(num_samples)[None, :, None]
    return SimpleNamespace(tokens=tokens, mask=jnp.ones(tokens.shape, bool), logprobs=logprobs)

  def reward_fn(prompt_tokens, prompt_mask, completion_tokens, completion_mask):
    b = prompt_tokens.shape[0] // rewards_table.shape[1]
    rows = jnp.repeat(jnp.arange(b), rewards_table.shape[1])
    return jnp.asarray(rewards_table)[rows, completion_tokens[:, 0]]

  return sample_fn, reward_fn


def test_best_of_n_picks_and_records(tmp_path):
  table = np.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]], np.float32)
  sample_fn, reward_fn = _fake_sampler(table)
  prompts, pmask = np.array([[5, 6], [0, 7]]), np.array([[1, 1], [0, 1]], bool)
  out = bon.best_of_n(sample_fn, reward_fn, prompts, pmask, jax.random.key(0), 4)
  np.testing.assert_array_equal(out.best_idx, [1, 0])
  np.testing.assert_array_equal(out.worst_idx, [3, 0])
  np.testing.assert_array_equal(out.best_tokens, [[1, 1], [0, 0]])
  np.testing.assert_array_equal(out.worst_logprobs, [[-3, -3], [0, 0]])
  np.testing.assert_array_equal(out.rewards, table)
  np.testing.assert_allclose(out.quantiles, [[0.5, 1.0, 1.0, 0.25], [1.0] * 4])
  jitted = jax.jit(lambda k: bon.best_of_n(sample_fn, reward_fn, prompts, pmask, k, 4))
  np.testing.assert_array_equal(jitted(jax.random.key(0)).best_idx, [1, 0])
  records = bon.bon_records(out, prompts, pmask)
  path = tmp_path / "bon.jsonl"
  assert bon.write_bon_dataset(str(path), records) == 2
  lines = [json.loads(line) for line in path.read_text().splitlines()]
  assert lines[1] == {"prompt": [7], "best": [0, 0], "worst": [0, 0], "rewards": [2.0] * 4}
  assert lines[0]["best"] == [1, 1] and lines[0]["worst"] == [3, 3]


def test_best_of_n_errors():
  table = np.zeros((1, 3), np.float32)
  sample_fn, reward_fn = _fake_sampler(table)
  prompts, pmask = np.ones((1, 2), np.int32), np.ones((1, 2), bool)
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="n must be an integer >= 1"):
    bon.best_of_n(sample_fn, reward_fn, prompts, pmask, key, 0)
  with pytest.raises(ValueError, match=r"prompt_tokens must be \[B, P\]"):
    bon.best_of_n(sample_fn, reward_fn, prompts, pmask[:, :1], key, 3)
  with pytest.raises(ValueError, match=r"tokens \[B=1, N=2, T\]"):
    bon.best_of_n(lambda *a: sample_fn(*a[:3], 3), reward_fn, prompts, pmask, key, 2)
  def bad_mask(*args):
    return SimpleNamespace(**{**vars(sample_fn(*args)), "mask": jnp.ones((1, 3, 1))})

  with pytest.raises(ValueError, match="sample mask"):
    bon.best_of_n(bad_mask, reward_fn, prompts, pmask, key, 3)
  nan_fn, _ = _fake_sampler(table)
  nan_reward = lambda *a: reward_fn(*a) * jnp.nan  # noqa: E731
  with pytest.raises(ValueError, match="NaN rewards"):
    bon.best_of_n(nan_fn, nan_reward, prompts, pmask, key, 3)
  with pytest.raises(ValueError, match=r"\[B\*N=3\]"):
    bon.best_of_n(sample_fn, lambda *a: reward_fn(*a)[:2], prompts, pmask, key, 3)
