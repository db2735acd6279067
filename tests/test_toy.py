"""The exact harness against brute force: enumeration, per-prefix log-probs, exact metrics."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from bond import bon, toy
from bond.models import gemma


@pytest.fixture(scope="module")
def setup():
  task = toy.make_task(num_prompts=4, num_content_tokens=4, completion_len=3, seed=0)
  config = toy.model_config(task)
  params = toy.init_policy(task, jax.random.key(0))
  ref = np.asarray(toy.policy_log_probs(config, params, task), np.float64)
  return task, config, params, ref


def test_enumeration_is_every_completion():
  task = toy.make_task()
  assert task.completions.shape == (85, 3) and task.vocab_size == 5
  # Brute force: every token string of length <= 3 over {0..4} that is a completion.
  expected = set()
  for k in range(4):
    for seq in itertools.product(range(5), repeat=k):
      eos_at_end = k >= 1 and seq[-1] == 0 and 0 not in seq[:-1]
      if eos_at_end or (k == 3 and 0 not in seq):
        expected.add(seq)
  got = {tuple(int(t) for t, m in zip(row, mask) if m)
         for row, mask in zip(task.completions, task.completion_mask)}
  assert got == expected and len(expected) == 85
  assert np.all(task.completions[~task.completion_mask] == 0)
  np.testing.assert_array_equal(task.lengths,
                                (task.completion_mask & (task.completions != 0)).sum(1))
  assert len({tuple(p) for p in task.prompts}) == 4 and task.prompts.min() >= 1


def test_rewards_have_ties_and_length_bonus():
  task = toy.make_task(length_bonus=1.0, num_reward_levels=3)
  for row in task.rewards:
    assert len(np.unique(row)) < len(row)
  assert np.corrcoef(task.rewards.ravel(), np.tile(task.lengths, 4))[0, 1] > 0.5


def test_reference_sums_to_one(setup):
  np.testing.assert_allclose(np.exp(setup[3]).sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("use_eos,c,length", [(True, 3, 2), (False, 3, 3)])
def test_probabilities_sum_to_one(use_eos, c, length):
  task = toy.make_task(num_prompts=3, num_content_tokens=c, completion_len=length, use_eos=use_eos)
  expected_m = sum(c ** k for k in range(length)) * use_eos + c ** length
  assert task.num_completions == expected_m
  lp = toy.policy_log_probs(toy.model_config(task), toy.init_policy(task, jax.random.key(1)), task)
  np.testing.assert_allclose(np.exp(np.asarray(lp, np.float64)).sum(-1), 1.0, atol=1e-5)


def test_log_probs_match_prefix_by_prefix_forward(setup):
  """Independent path: one unpadded forward per prefix, next-token softmax, chain rule."""
  task, config, params, ref = setup
  model = gemma.Gemma(config)
  for p, m in [(0, 0), (1, 7), (2, 30), (3, 84)]:
    tokens = list(task.prompts[p])
    total = 0.0
    for tok, real in zip(task.completions[m], task.completion_mask[m]):
      if not real:
        break
      logits = np.asarray(model.apply({"params": params}, jnp.asarray([tokens])), np.float64)[0, -1]
      total += logits[tok] - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
      tokens.append(int(tok))
    np.testing.assert_allclose(ref[p, m], total, atol=1e-4)


def test_init_policy_is_diverse(setup):
  _, _, _, ref = setup
  assert np.exp(ref).max() < 0.5 and (-(np.exp(ref) * ref).sum(-1)).min() > 2.0


def test_grad_through_policy_log_probs(setup):
  task, config, params, ref = setup
  target = lambda prm: toy.policy_log_probs(config, prm, task)[1, 42]  # noqa: E731
  grads = jax.grad(target)(params)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  stepped = jax.tree.map(lambda p, g: p + 1e-2 * g, params, grads)
  assert float(target(stepped)) > ref[1, 42] + 1e-4


def test_completion_index_is_a_bijection(setup):
  task = setup[0]
  perm = np.random.default_rng(0).permutation(task.num_completions)
  idx = jax.jit(lambda t, m: toy.completion_index(task, t, m))(task.completions[perm],
                                                             task.completion_mask[perm])
  np.testing.assert_array_equal(idx, perm)
  bad_tokens = np.array([[0, 1, 0], [1, 2, 0], [1, 0, 0]], np.int32)
  bad_mask = np.array([[1, 1, 1], [1, 1, 0], [1, 1, 0]], bool)   # content after eos; no eos; ok
  np.testing.assert_array_equal(toy.completion_index(task, bad_tokens, bad_mask)[:2], [-1, -1])
  assert int(toy.completion_index(task, bad_tokens, bad_mask)[2]) == 1   # [1, eos]
  np.testing.assert_array_equal(toy.prompt_index(task, task.prompts[::-1]), [3, 2, 1, 0])


def test_reward_fn_reads_the_table(setup):
  task = setup[0]
  rows = np.array([0, 3, 2, 1])
  cols = np.array([5, 84, 0, 17])
  reward = jax.jit(toy.reward_fn(task))
  got = reward(task.prompts[rows], task.prompt_mask[rows], task.completions[cols],
               task.completion_mask[cols])
  np.testing.assert_array_equal(got, task.rewards[rows, cols])
  invalid = reward(task.prompts[:1], task.prompt_mask[:1], np.array([[0, 1, 0]]),
                   np.ones((1, 3), bool))
  assert np.isnan(invalid[0])


def _numpy_metrics(task, pol, ref):
  p = np.exp(pol)
  return {"exact/reward": np.mean((p * task.rewards).sum(-1)),
          "exact/kl_to_ref": np.mean((p * (pol - ref)).sum(-1)),
          "exact/mean_length": np.mean(p @ task.lengths)}


def test_exact_metrics_of_the_reference(setup):
  task, _, _, ref = setup
  m = {k: float(v) for k, v in toy.exact_metrics(task, ref, ref, n=4).items()}
  assert m["exact/kl_to_ref"] == 0.0 and m["exact/effective_n"] == 1.0
  assert abs(m["exact/win_rate"] - 0.5) < 1e-6
  for key in ("fwd_kl_to_bon", "bwd_kl_to_bon", "reward_gap_to_bon"):
    assert abs(m[f"exact/{key}"]) < 1e-6
  assert m["exact/fwd_kl_to_bon_n"] > 0.01 and m["exact/reward_gap_to_bon_n"] < -0.1
  for key, value in _numpy_metrics(task, ref, ref).items():
    assert abs(m[key] - value) < 1e-5


def test_exact_metrics_of_best_of_4(setup):
  task, _, _, ref = setup
  pol = np.asarray(bon.bon_log_probs(ref, task.rewards, 4), np.float64)
  m = {k: float(v) for k, v in jax.jit(lambda a, b: toy.exact_metrics(task, a, b, n=4))(
      pol, ref).items()}
  assert abs(m["exact/effective_n"] - 4.0) < 1e-2
  for key in ("fwd_kl_to_bon", "bwd_kl_to_bon", "fwd_kl_to_bon_n", "bwd_kl_to_bon_n"):
    assert abs(m[f"exact/{key}"]) < 1e-5, key
  assert m["exact/win_rate"] > 0.6
  for key, value in _numpy_metrics(task, pol, ref).items():
    assert abs(m[key] - value) < 1e-5


def test_effective_n_is_shared_across_prompts(setup):
  """π = BoN(8) on prompt 0, π_ref elsewhere: N* matches the prompt-averaged KL."""
  task, _, _, ref = setup
  pol = ref.copy()
  pol[0] = np.asarray(bon.bon_log_probs(ref[0], task.rewards[0], 8))
  m = toy.exact_metrics(task, pol, ref)
  n_star = float(m["exact/effective_n"])
  assert 1.0 < n_star < 8.0
  bon_kl = np.asarray(bon.kl_bon_ref(ref, task.rewards, n_star))
  np.testing.assert_allclose(bon_kl.mean(), float(m["exact/kl_to_ref"]), rtol=1e-4)
  assert float(m["exact/bwd_kl_to_bon"]) > 0.01   # not on the frontier for every prompt


def test_best_of_n_on_the_toy_matches_exact_bon(setup):
  """Empirical law of `bon.best_of_n` outputs vs exact π_BoN.

  Every outcome count must lie in its exact binomial interval of level 1 − 1e-4/(P·M)
  (Bonferroni: the whole test fails by chance with probability < 1e-4).
  """
  task, _, _, ref = setup
  n, draws = 4, 4000
  sample_fn = toy.categorical_sampler(task, ref)
  prompts = np.repeat(task.prompts, draws, axis=0)
  out = jax.jit(lambda rng: bon.best_of_n(sample_fn, toy.reward_fn(task), prompts,
                                          np.ones(prompts.shape, bool), rng, n))(jax.random.key(3))
  idx = np.asarray(toy.completion_index(task, out.best_tokens, out.best_mask)).reshape(4, draws)
  assert idx.min() >= 0
  exact = np.exp(np.asarray(bon.bon_log_probs(ref, task.rewards, n), np.float64))
  for p in range(4):
    counts = np.bincount(idx[p], minlength=task.num_completions)
    lo, hi = scipy.stats.binom.interval(1 - 1e-4 / exact.size, draws, exact[p])
    assert np.all((counts >= lo) & (counts <= hi)), (counts, draws * exact[p])


def test_bad_inputs():
  with pytest.raises(ValueError, match="num_prompts must be >= 1"):
    toy.make_task(num_prompts=0)
  with pytest.raises(ValueError, match="distinct prompts"):
    toy.make_task(num_prompts=10, num_content_tokens=2, prompt_len=2)
  task = toy.make_task()
  with pytest.raises(ValueError, match=r"\[P, M\]"):
    toy.exact_metrics(task, np.zeros((4, 84)), np.zeros((4, 85)))
  with pytest.raises(ValueError, match="completion tokens and mask"):
    toy.completion_index(task, np.zeros((2, 4), np.int32), np.ones((2, 4), bool))


def test_real_sampler_best_of_n_matches_exact_bon(setup):
  """`bond.sampling.sample` on the toy Gemma, then `bon.best_of_n`: the law of the best output
  is exact π_BoN(n) of the enumerated policy, and the sampler's token log-probs sum to it."""
  from bond import sampling
  task, config, params, ref = setup
  n, draws = 3, 2000
  sample_fn = lambda x, m, rng, k: sampling.sample(  # noqa: E731
      config, params, x, m, rng, max_new_tokens=task.completion_len, num_samples=k)
  prompts = np.repeat(task.prompts, draws, axis=0)
  out = bon.best_of_n(sample_fn, toy.reward_fn(task), prompts, np.ones(prompts.shape, bool),
                      jax.random.key(5), n)
  idx = np.asarray(toy.completion_index(task, out.best_tokens, out.best_mask))
  assert idx.min() >= 0
  rows = np.repeat(np.arange(4), draws)
  np.testing.assert_allclose(np.asarray(out.best_logprobs).sum(-1), ref[rows, idx], atol=1e-4)
  exact = np.exp(np.asarray(bon.bon_log_probs(ref, task.rewards, n), np.float64))
  for p in range(4):
    counts = np.bincount(idx.reshape(4, draws)[p], minlength=task.num_completions)
    lo, hi = scipy.stats.binom.interval(1 - 1e-4 / exact.size, draws, exact[p])
    assert np.all((counts >= lo) & (counts <= hi)), (counts, draws * exact[p])
