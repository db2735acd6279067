"""Objectives against independent computations.

Part 1: closed forms on small hand-sized inputs, computed in NumPy (values and gradients).
Part 2: Monte Carlo gradients on the exact toy harness: outcomes are drawn exactly from the
enumerated distributions, the estimators of the objectives are averaged over many seeds and
compared with the autodiff gradient of the exact divergence to π_BoN (or of E[r] − β·KL).
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.stats

from bond import bon, objectives, toy

# Compiles much and runs little: XLA's quicker codegen (tests/conftest.py, `quick_compiles`).
pytestmark = pytest.mark.quick_compiles

RNG = np.random.default_rng(0)


def _leave_one_out_np(x, valid, axis):
  x = np.where(valid, x, 0.0)
  others = x.sum(axis=axis, keepdims=True) - x
  count = valid.sum(axis=axis, keepdims=True) - valid
  return np.where(count > 0, others / np.maximum(count, 1), 0.0)


def _log_softmax_np(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ---------------------------------------------------------------------------------------------
# Log-probabilities.

def test_token_log_probs_match_numpy():
  logits = RNG.normal(size=(2, 4, 7)).astype(np.float32) * 3
  targets = RNG.integers(0, 7, size=(2, 4))
  expected = np.take_along_axis(_log_softmax_np(logits.astype(np.float64)), targets[..., None],
                                axis=-1)[..., 0]
  got = objectives.token_log_probs(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32), targets)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(objectives.token_log_probs(logits, targets), expected, atol=1e-5)


def test_sequence_log_probs_ignore_padding():
  b, t, v = 3, 5, 6
  logits = RNG.normal(size=(b, t, v)).astype(np.float32)
  targets = RNG.integers(0, v, size=(b, t))
  mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], bool)
  expected = np.zeros(b)
  for i in range(b):
    for j in range(t):
      if mask[i, j]:
        expected[i] += _log_softmax_np(logits[i, j].astype(np.float64))[targets[i, j]]
  # Garbage at padded positions (NaN logits, out-of-range targets) must never be scored.
  logits[~mask] = np.nan
  targets[~mask] = 10_000
  got = objectives.sequence_log_probs(logits, targets, mask)
  np.testing.assert_allclose(got, expected, atol=1e-5)
  assert got[2] == 0.0


# ---------------------------------------------------------------------------------------------
# BOND closed forms.

def test_sft_and_forward_kl_are_masked_mean_nll():
  logp = np.array([-1.0, -2.5, -4.0, -100.0], np.float32)
  mask = np.array([1, 1, 1, 0], bool)
  expected = (1.0 + 2.5 + 4.0) / 3
  for fn in (objectives.sft_loss, objectives.forward_kl_loss):
    loss, _ = fn(logp, mask)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    grad = jax.grad(lambda lp: fn(lp, mask)[0])(jnp.asarray(logp))
    np.testing.assert_allclose(grad, [-1 / 3, -1 / 3, -1 / 3, 0.0], rtol=1e-6)


def _kl_pg_reference(policy_logp, ref_logp, rewards, beta, valid):
  """Value E[−R] and d/d log π of the score-function surrogate, R = r − β(log π − log π_ref)."""
  total = rewards - beta * (policy_logp - ref_logp)
  adv = total - _leave_one_out_np(total, valid, axis=1)
  count = valid.sum()
  return -(total * valid).sum() / count, np.where(valid, -adv / count, 0.0)


def test_backward_kl_loss_closed_form():
  b, s, n = 3, 4, 4
  policy_logp = RNG.normal(size=(b, s)) - 3
  ref_logp = RNG.normal(size=(b, s)) - 3
  log_quantile = np.log(RNG.uniform(0.1, 1.0, size=(b, s)))
  mask = np.array([1, 1, 0], bool)
  valid = np.broadcast_to(mask[:, None], (b, s))
  value, grad = _kl_pg_reference(policy_logp, ref_logp, (n - 1) * log_quantile, 1.0, valid)
  fn = lambda lp: objectives.backward_kl_loss(lp, ref_logp, log_quantile, n, mask)  # noqa: E731
  loss, metrics = fn(jnp.asarray(policy_logp, jnp.float32))
  np.testing.assert_allclose(loss, value, rtol=1e-5)
  np.testing.assert_allclose(jax.grad(lambda lp: fn(lp)[0])(jnp.asarray(policy_logp, jnp.float32)),
                             grad, atol=1e-6)
  np.testing.assert_allclose(metrics["bond_reward"], log_quantile[:2].mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["kl_to_ref"], (policy_logp - ref_logp)[:2].mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["kl_to_bon"], value - math.log(n), rtol=1e-5)


def test_masked_prompts_never_reach_loss_or_gradient():
  b, s = 3, 2
  finite = [RNG.normal(size=(b, s)) - 2 for _ in range(3)]
  mask = np.array([1, 0, 1], bool)
  poisoned = [np.where(mask[:, None], x, np.nan) for x in finite]
  lp = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  for fn in (lambda p, r, q: objectives.backward_kl_loss(p, r, q, 4, mask)[0],
             lambda p, r, q: objectives.reinforce_loss(p, r, q, 0.1, mask)[0]):
    value, grad = jax.value_and_grad(fn)(lp(poisoned[0]), lp(poisoned[1]), lp(poisoned[2]))
    expected_value, expected_grad = jax.value_and_grad(fn)(*map(lp, finite))
    np.testing.assert_allclose(value, expected_value, rtol=1e-6)
    np.testing.assert_allclose(grad, expected_grad, atol=1e-7)
    assert np.all(grad[1] == 0)


def test_reinforce_loss_closed_form():
  b, s, beta_rl = 2, 3, 0.1
  policy_logp = RNG.normal(size=(b, s)) - 2
  ref_logp = RNG.normal(size=(b, s)) - 2
  rewards = RNG.normal(size=(b, s))
  valid = np.ones((b, s), bool)
  value, grad = _kl_pg_reference(policy_logp, ref_logp, rewards, beta_rl, valid)
  fn = lambda lp: objectives.reinforce_loss(lp, ref_logp, rewards, beta_rl)  # noqa: E731
  lp = jnp.asarray(policy_logp, jnp.float32)
  loss, metrics = fn(lp)
  np.testing.assert_allclose(loss, value, rtol=1e-5)
  np.testing.assert_allclose(jax.grad(lambda x: fn(x)[0])(lp), grad, atol=1e-6)
  np.testing.assert_allclose(metrics["reward"], rewards.mean(), rtol=1e-5)
  # RLOO with S samples equals S/(S−1)·(R − mean R): independent check of the baseline.
  total = rewards - beta_rl * (policy_logp - ref_logp)
  rloo = s / (s - 1) * (total - total.mean(1, keepdims=True))
  np.testing.assert_allclose(jax.grad(lambda x: fn(x)[0])(lp), -rloo / (b * s), atol=1e-6)


def test_rloo_needs_two_samples():
  x = jnp.zeros((3, 1))
  with pytest.raises(ValueError, match="at least 2 policy samples"):
    objectives.reinforce_loss(x, x, x, 0.1)


def test_jeffreys_mixes_forward_and_backward():
  b, s, n, beta = 2, 3, 8, 0.3
  lp_best = RNG.normal(size=b) - 2
  policy_logp = RNG.normal(size=(b, s)) - 3
  ref_logp = RNG.normal(size=(b, s)) - 3
  log_quantile = np.log(RNG.uniform(0.1, 1.0, size=(b, s)))
  bwd_value, bwd_grad = _kl_pg_reference(policy_logp, ref_logp, (n - 1) * log_quantile, 1.0,
                                         np.ones((b, s), bool))
  fwd_value = -lp_best.mean()
  fn = lambda best, lp: objectives.jeffreys_loss(  # noqa: E731
      best, lp, ref_logp, log_quantile, n=n, beta=beta)[0]
  args = (jnp.asarray(lp_best, jnp.float32), jnp.asarray(policy_logp, jnp.float32))
  np.testing.assert_allclose(fn(*args), (1 - beta) * fwd_value + beta * bwd_value, rtol=1e-5)
  g_best, g_lp = jax.grad(fn, argnums=(0, 1))(*args)
  np.testing.assert_allclose(g_best, -(1 - beta) / b * np.ones(b), rtol=1e-6)
  np.testing.assert_allclose(g_lp, beta * bwd_grad, atol=1e-6)


@pytest.mark.parametrize("masked", [False, True])
def test_jbond_loss_closed_form(masked):
  b, beta, gamma, penalty = 5, 0.5, 0.1, math.log(16)
  lp_best = RNG.normal(size=b) - 2
  lp_y = RNG.normal(size=b) - 2
  anchor_y = RNG.normal(size=b) - 2
  beats = np.array([True, False, True, False, True])
  mask = np.array([1, 1, 1, 1, 0], bool) if masked else np.ones(b, bool)
  log_ratio = lp_y - anchor_y
  r_bw = np.where(beats, 0.0, -penalty) - log_ratio
  r_kl = -log_ratio
  count = mask.sum()
  value = ((1 - beta) * -(lp_best * mask).sum() + beta * -(r_bw * mask).sum()
           + gamma * -(r_kl * mask).sum()) / count
  adv = lambda r: r - _leave_one_out_np(r, mask, axis=0)  # noqa: E731
  grad_y = np.where(mask, -(beta * adv(r_bw) + gamma * adv(r_kl)) / count, 0.0)
  fn = lambda best, y: objectives.jbond_loss(  # noqa: E731
      best, y, anchor_y, beats, beta=beta, gamma=gamma, penalty=penalty,
      mask=mask if masked else None)
  args = (jnp.asarray(lp_best, jnp.float32), jnp.asarray(lp_y, jnp.float32))
  loss, metrics = fn(*args)
  np.testing.assert_allclose(loss, value, rtol=1e-5)
  g_best, g_y = jax.grad(lambda *a: fn(*a)[0], argnums=(0, 1))(*args)
  np.testing.assert_allclose(g_best, np.where(mask, -(1 - beta) / count, 0.0), rtol=1e-6)
  np.testing.assert_allclose(g_y, grad_y, atol=1e-6)
  np.testing.assert_allclose(metrics["jbond_reward"], (np.where(beats, 0, -penalty) * mask).sum()
                             / count, rtol=1e-6)
  np.testing.assert_allclose(metrics["win_rate_vs_anchor"], (beats * mask).sum() / count)


# ---------------------------------------------------------------------------------------------
# Preference losses.

def _preference_inputs(b=4):
  return [jnp.asarray(RNG.normal(size=b) - 3, jnp.float32) for _ in range(4)]


def test_dpo_and_ipo_closed_form_values_and_gradients():
  pw, pl, rw, rl = _preference_inputs()
  h = np.asarray((pw - rw) - (pl - rl), np.float64)
  beta = 0.2
  sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
  cases = {
      objectives.dpo_loss: (np.log1p(np.exp(-beta * h)), -beta * sig(-beta * h)),
      objectives.ipo_loss: ((h - 1 / (2 * beta)) ** 2, 2 * (h - 1 / (2 * beta))),
  }
  for fn, (value, dloss_dh) in cases.items():
    loss, metrics = fn(pw, pl, rw, rl, beta=beta)
    np.testing.assert_allclose(loss, value.mean(), rtol=1e-5)
    gw, gl = jax.grad(lambda a, c: fn(a, c, rw, rl, beta=beta)[0], argnums=(0, 1))(pw, pl)
    np.testing.assert_allclose(gw, dloss_dh / len(h), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(gl, -dloss_dh / len(h), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(metrics["margin"], h.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], (h > 0).mean())


def test_bonbon_closed_form():
  pw, pl, rw, rl = _preference_inputs()
  alpha, beta = 0.005, bon.beta_star(8)
  h = np.asarray((pw - rw) - (pl - rl), np.float64)
  expected = alpha * -np.asarray(pw).mean() + (1 - alpha) * ((h - 1 / (2 * beta)) ** 2).mean()
  loss, metrics = objectives.bonbon_loss(pw, pl, rw, rl, alpha=alpha, beta=beta)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  gw = jax.grad(lambda a: objectives.bonbon_loss(a, pl, rw, rl, alpha=alpha, beta=beta)[0])(pw)
  np.testing.assert_allclose(gw, (-alpha + (1 - alpha) * 2 * (h - 1 / (2 * beta))) / len(h),
                             rtol=1e-4)
  np.testing.assert_allclose(metrics["sft"], -np.asarray(pw).mean(), rtol=1e-6)


def test_bonbon_dpo_closed_form():
  """The authors' code's variant: α·SFT + (1−α)·DPO, against the closed form."""
  pw, pl, rw, rl = _preference_inputs()
  alpha, beta = 0.005, bon.beta_star(8)
  h = np.asarray((pw - rw) - (pl - rl), np.float64)
  sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
  expected = alpha * -np.asarray(pw).mean() + (1 - alpha) * np.log1p(np.exp(-beta * h)).mean()
  loss, metrics = objectives.bonbon_dpo_loss(pw, pl, rw, rl, alpha=alpha, beta=beta)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  gw = jax.grad(lambda a: objectives.bonbon_dpo_loss(a, pl, rw, rl, alpha=alpha, beta=beta)[0])(pw)
  np.testing.assert_allclose(gw, (-alpha - (1 - alpha) * beta * sig(-beta * h)) / len(h),
                             rtol=1e-4, atol=1e-8)
  assert "dpo" in metrics and "ipo" not in metrics


@pytest.mark.parametrize("n", [3, 8])
def test_bon_is_stationary_for_ipo_with_beta_star(n):
  """BoNBoN §6: on best/worst-of-n pairs, π_BoN's log-ratios satisfy E[h] = 1/(2β*_n).

  Continuous rewards: log π_n/π_0 = log n + (n−1)·log U with U the reward CDF, so best and worst
  of n are the max and min of n uniforms. The IPO gradient in the direction that moves the policy
  towards π_BoN (a scalar shift of h) must vanish there, and its minimiser is h = 1/(2β*_n).
  """
  u = np.sort(np.random.default_rng(n).uniform(size=(400_000, n)), axis=1)
  log_ratio_best = math.log(n) + (n - 1) * np.log(u[:, -1])
  log_ratio_worst = math.log(n) + (n - 1) * np.log(u[:, 0])
  h = log_ratio_best - log_ratio_worst
  harmonic = sum(1 / k for k in range(1, n))
  assert abs(h.mean() - (n - 1) * harmonic) < 5 * h.std() / math.sqrt(len(h))
  beta = bon.beta_star(n)
  zeros = jnp.zeros(len(h), jnp.float32)
  shifted = lambda t: objectives.ipo_loss(  # noqa: E731
      jnp.asarray(log_ratio_best, jnp.float32) + t, jnp.asarray(log_ratio_worst, jnp.float32),
      zeros, zeros, beta=beta)[0]
  slope = jax.grad(shifted)(0.0)
  assert abs(slope) < 5 * 2 * h.std() / math.sqrt(len(h))
  # The loss is quadratic in t: its minimiser is where h averages 1/(2β).
  t_star = -slope / 2.0
  np.testing.assert_allclose(h.mean() + t_star, 1 / (2 * beta), rtol=1e-4)


def test_reward_model_loss():
  rw = jnp.asarray([2.0, 0.0, -1.0])
  rl = jnp.asarray([1.0, 0.5, -1.0])
  loss, metrics = objectives.reward_model_loss(rw, rl)
  margins = np.array([1.0, -0.5, 0.0])
  np.testing.assert_allclose(loss, np.log1p(np.exp(-margins)).mean(), rtol=1e-6)
  np.testing.assert_allclose(metrics["accuracy"], 1 / 3, rtol=1e-6)
  grad = jax.grad(lambda a: objectives.reward_model_loss(a, rl)[0])(rw)
  np.testing.assert_allclose(grad, -1 / (1 + np.exp(margins)) / 3, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Unbiasedness of the RLOO baseline (categorical policy, exact enumeration).

def test_rloo_baseline_keeps_the_expected_gradient_and_cuts_variance():
  m, s, beta_rl, seeds = 6, 4, 0.3, 40_000
  rng = np.random.default_rng(1)
  theta = jnp.asarray(rng.normal(size=m), jnp.float32)
  ref_logp = jnp.asarray(_log_softmax_np(rng.normal(size=m)), jnp.float32)
  rewards = jnp.asarray(10.0 + rng.normal(size=m), jnp.float32)   # large offset: baselines matter

  def exact_loss(th):
    logp = jax.nn.log_softmax(th)
    p = jnp.exp(logp)
    return -(p @ rewards - beta_rl * p @ (logp - ref_logp))

  def estimates(key):
    y = jax.random.categorical(key, jax.lax.stop_gradient(theta), shape=(1, s))
    def rloo(th):
      logp = jax.nn.log_softmax(th)[y]
      return objectives.reinforce_loss(logp, ref_logp[y], rewards[y], beta_rl)[0]
    def no_baseline(th):   # plain REINFORCE: −mean(sg(R)·log π)
      logp = jax.nn.log_softmax(th)[y]
      total = jax.lax.stop_gradient(rewards[y] - beta_rl * (logp - ref_logp[y]))
      return -jnp.mean(total * logp)
    return jax.grad(rloo)(theta), jax.grad(no_baseline)(theta)

  g_rloo, g_plain = jax.jit(jax.vmap(estimates))(jax.random.split(jax.random.key(0), seeds))
  exact = jax.grad(exact_loss)(theta)
  for g in (g_rloo, g_plain):
    se = np.asarray(g.std(0)) / math.sqrt(seeds)
    np.testing.assert_array_less(np.abs(np.asarray(g.mean(0) - exact)), 5 * se + 1e-6)
  assert float(jnp.sum(g_rloo.var(0))) < 0.1 * float(jnp.sum(g_plain.var(0)))


# ---------------------------------------------------------------------------------------------
# The registry.

def test_registry():
  assert set(objectives.OBJECTIVES) == {"bond_fwd", "bond_bwd", "bond_jeffreys", "jbond",
                                        "reinforce", "sft", "dpo", "ipo", "bonbon", "bonbon_dpo"}
  assert objectives.get_objective("jbond") is objectives.OBJECTIVES["jbond"]
  hp = ml_collections.ConfigDict(dict(n=8, k=16, num_policy_samples=3))
  counts = {name: (a.anchor_samples(hp), a.policy_samples(hp), a.offline)
            for name, a in objectives.OBJECTIVES.items()}
  assert counts["jbond"] == (2, 1, False)              # BOND Algorithm 2: 2 anchor + 1 policy
  assert counts["bond_jeffreys"] == (16, 3, False)     # max(N, k) anchor + S policy
  assert counts["bond_bwd"] == (16, 3, False)
  assert counts["bond_fwd"][0] == 8
  assert counts["reinforce"] == (0, 3, False)
  assert all(counts[k] == (0, 0, True) for k in ("sft", "dpo", "ipo", "bonbon", "bonbon_dpo"))
  with pytest.raises(ValueError) as e:
    objectives.get_objective("ppo")
  assert str(e.value) == ("unknown objective 'ppo'; known objectives: bonbon, bonbon_dpo, "
                          "bond_bwd, bond_fwd, bond_jeffreys, dpo, ipo, jbond, reinforce, sft")


def test_one_teacher_forced_pass_over_all_sample_sets():
  """The losses' log-prob pass with `logp.one_pass`: one logp call over the sets joined on N,
  each set's [B, N_i] (values and gradients) as a call per set gives them; sets of different T,
  or a logp without `one_pass`: a call each."""
  from bond import rollout
  table = jnp.asarray(RNG.normal(size=(2, 11)).astype(np.float32))

  def make_logp(calls):
    def logp(params, samples):   # [B, N, T] -> [B, N]: a made-up per-token score, masked sum
      calls.append(samples.tokens.shape)
      w = params[samples.tokens % 2, samples.tokens]
      return jnp.sum(jnp.where(samples.mask, w * w, 0.0), axis=-1)
    logp.one_pass = True
    return logp

  def sets(lengths):
    out = []
    for n, t in lengths:
      tokens = jnp.asarray(RNG.integers(0, 11, size=(3, n, t)))
      out.append(rollout.Samples(tokens, jnp.asarray(RNG.random((3, n, t)) < 0.7),
                                 rewards=jnp.zeros((3, n))))
    return out

  same = sets([(1, 4), (2, 4), (1, 4)])
  calls = []
  joined = lambda p: objectives._pass(p, make_logp(calls), *same)  # noqa: E731
  apart = lambda p: [make_logp([])(p, s) for s in same]  # noqa: E731
  for got, want in zip(joined(table), apart(table)):
    np.testing.assert_allclose(got, want, rtol=1e-6)
  assert calls == [(3, 4, 4)]
  weights = [1.0, -2.0, 3.0]
  loss = lambda parts: sum(w * jnp.sum(jnp.sin(x)) for w, x in zip(weights, parts))  # noqa: E731
  np.testing.assert_allclose(jax.grad(lambda p: loss(joined(p)))(table),
                             jax.grad(lambda p: loss(apart(p)))(table), rtol=1e-5, atol=1e-6)

  calls = []
  per_set = make_logp(calls)
  per_set.one_pass = False
  for got, want in zip(objectives._pass(table, per_set, *same), apart(table)):
    np.testing.assert_allclose(got, want, rtol=1e-6)
  assert calls == [(3, 1, 4), (3, 2, 4), (3, 1, 4)]

  ragged = sets([(1, 4), (1, 5)])
  calls = []
  got = objectives._pass(table, make_logp(calls), *ragged)
  assert calls == [(3, 1, 4), (3, 1, 5)]
  for g, s in zip(got, ragged):
    np.testing.assert_allclose(g, make_logp([])(table, s), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Monte Carlo gradients on the exact toy harness.
#
# Every estimator is a function loss(log π [P, M], key) that draws outcomes exactly from the
# enumerated distributions and gathers their log-probs; its gradient w.r.t. log π [P, M] is the
# cotangent W, and the parameter gradient is the VJP of W through `toy.policy_log_probs` (linear
# in W, so seeds are averaged in groups before the VJP). The spread of the group gradients gives
# the standard error `rel_se` of the mean, relative to the exact gradient's norm.

N, S, K, BETA_RL, JEFFREYS_BETA = 4, 4, 16, 0.1, 0.5
SEEDS, GROUPS = 8192, 64


@pytest.fixture(scope="module")
def harness():
  task = toy.make_task(seed=0)                      # rewards on 5 levels: many ties
  config = toy.model_config(task)
  # Weights ×3: a random policy far from uniform, so the atoms of π_ref differ.
  peaked = lambda seed: jax.tree.map(  # noqa: E731
      lambda x: 3.0 * x, toy.init_policy(task, jax.random.key(seed)))
  ref_params, params = peaked(0), peaked(1)
  ref_lp = toy.policy_log_probs(config, ref_params, task)
  log_probs = lambda p: toy.policy_log_probs(config, p, task)  # noqa: E731
  lp, vjp = jax.vjp(log_probs, params)
  ref = np.exp(np.asarray(ref_lp, np.float64))
  r = task.rewards
  p_leq = (ref[:, None, :] * (r[:, None, :] <= r[:, :, None])).sum(-1)      # [P, M], NumPy
  return dict(task=task, ref_lp=ref_lp, lp=lp, vjp=vjp, log_probs=log_probs, params=params,
              rewards=jnp.asarray(r), p_leq=np.minimum(p_leq, 1.0))


def _flat(tree):
  return jnp.concatenate([x.ravel() for x in jax.tree.leaves(tree)])


def _exact_grad(h, objective):
  """∇_θ objective(log π_θ [P, M]) by autodiff through the enumerated distribution."""
  return _flat(jax.grad(lambda p: objective(h["log_probs"](p)))(h["params"]))


def _mc_grad(h, loss):
  """(mean MC parameter gradient, its standard error as a norm) over SEEDS seeds."""
  keys = jax.random.split(jax.random.key(7), SEEDS)
  w = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(h["lp"], keys)      # [SEEDS, P, M]
  w = w.reshape((GROUPS, SEEDS // GROUPS) + w.shape[1:]).mean(1)
  grads = jax.vmap(lambda c: _flat(h["vjp"](c)[0]))(w)                       # [GROUPS, D]
  return grads.mean(0), jnp.sqrt(jnp.sum(grads.var(0, ddof=1)) / GROUPS)


def _gather(x, idx):
  """x [P, M], idx [P, ...] -> x[p, idx[p, ...]]."""
  return jax.vmap(lambda row, i: row[i])(x, idx)


def _bon_samples(h, key, g):
  """[P, g] exact π_BoN(N) samples: the first maximiser among N i.i.d. π_ref samples."""
  p = h["ref_lp"].shape[0]
  idx = jax.random.categorical(key, h["ref_lp"][:, None, None, :], shape=(p, g, N))
  best, _ = bon.select_best_worst(_gather(h["rewards"], idx).reshape(p * g, N))
  return jnp.take_along_axis(idx.reshape(p * g, N), best[:, None], axis=1).reshape(p, g)


def _policy_samples(lp, key):
  return jax.random.categorical(key, jax.lax.stop_gradient(lp)[:, None, :], shape=(lp.shape[0], S))


def _forward_estimator(h):
  def loss(lp, key):
    return objectives.forward_kl_loss(_gather(lp, _bon_samples(h, key, 4)).ravel())[0]
  return loss


def _backward_estimator(h, log_quantile):
  """log_quantile: [P, M] table, or ('clip' | 'add_one') for p̂≤ from K fresh π_ref samples."""
  def loss(lp, key):
    key_policy, key_ref = jax.random.split(key)
    y = _policy_samples(lp, key_policy)
    if isinstance(log_quantile, str):
      y_ref = jax.random.categorical(key_ref, h["ref_lp"][:, None, :], shape=(lp.shape[0], K))
      lq = bon.log_quantile_estimate(_gather(h["rewards"], y), _gather(h["rewards"], y_ref),
                                     smoothing=log_quantile)
    else:
      lq = _gather(log_quantile, y)
    return objectives.backward_kl_loss(_gather(lp, y), _gather(h["ref_lp"], y), lq, N)[0]
  return loss


def _exact_kl(log_p, log_q):
  """Mean over prompts of Σ_y p (log p − log q), written out (independent of bon.kl)."""
  return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1))


def _bon_lp(h):
  return bon.bon_log_probs(h["ref_lp"], h["rewards"], N)


def _atom_exact_log_quantile(h):
  """lq with (N−1)·lq + log N = log π_BoN/π_ref exactly (ties, discrete atoms)."""
  return (_bon_lp(h) - h["ref_lp"] - math.log(N)) / (N - 1)


def _assert_matches(name, mc, se, exact):
  norm = float(jnp.linalg.norm(exact))
  rel_err = float(jnp.linalg.norm(mc - exact)) / norm
  rel_se = float(se) / norm
  cos = float(mc @ exact) / (float(jnp.linalg.norm(mc)) * norm)
  print(f"{name}: cos {cos:.4f} rel_err {rel_err:.4f} rel_se {rel_se:.4f}")
  assert rel_se < 0.06, f"{name}: too few seeds for a meaningful check (rel_se {rel_se:.3f})"
  assert rel_err < 4 * rel_se, f"{name}: rel_err {rel_err:.4f} > 4 standard errors"
  assert cos > 0.99, f"{name}: cosine {cos:.4f}"


@pytest.mark.slow
def test_forward_kl_gradient_matches_exact(harness):
  h = harness
  mc, se = _mc_grad(h, _forward_estimator(h))
  _assert_matches("forward", mc, se, _exact_grad(h, lambda lp: _exact_kl(_bon_lp(h), lp)))


@pytest.mark.slow
def test_backward_kl_gradient_matches_exact(harness):
  """With the atom-exact BoN log-ratio, the estimator is ∇KL(π_θ ‖ π_BoN) (ties included)."""
  h = harness
  mc, se = _mc_grad(h, _backward_estimator(h, _atom_exact_log_quantile(h)))
  _assert_matches("backward", mc, se, _exact_grad(h, lambda lp: _exact_kl(lp, _bon_lp(h))))


@pytest.mark.slow
def test_backward_kl_gradient_with_exact_quantile(harness):
  """With exact log p≤ the estimator is ∇KL(π_θ ‖ π̃), π̃ ∝ π_ref·p≤^(N−1) (BOND Thm 1 without
  ties; on discrete atoms π̃ ≠ π_BoN, the gap is measured in test_convergence)."""
  h = harness
  log_leq = jnp.asarray(np.log(h["p_leq"]), jnp.float32)
  tilde = h["ref_lp"] + (N - 1) * log_leq
  tilde = tilde - jax.nn.logsumexp(tilde, axis=-1, keepdims=True)
  mc, se = _mc_grad(h, _backward_estimator(h, log_leq))
  _assert_matches("backward, exact p≤", mc, se, _exact_grad(h, lambda lp: _exact_kl(lp, tilde)))


@pytest.mark.slow
@pytest.mark.parametrize("smoothing", ["clip", "add_one"])
def test_backward_kl_quantile_estimate_bias_is_known(harness, smoothing):
  """With p̂≤ from K samples the estimator follows E_π[log π − log π_ref − (N−1)·E[log p̂≤]],
  E[log p̂≤(y)] exact under K·p̂≤ ~ Binomial(K, p≤(y)); that target stays close to the true one."""
  h = harness
  j = np.arange(K + 1)
  pmf = scipy.stats.binom.pmf(j, K, h["p_leq"][..., None])                   # [P, M, K+1]
  p_hat = (1 + j) / (K + 1) if smoothing == "add_one" else np.maximum(j / K, 1 / (K + 1))
  expected_lq = jnp.asarray(np.sum(pmf * np.log(p_hat), axis=-1), jnp.float32)
  biased = lambda lp: jnp.mean(jnp.sum(  # noqa: E731
      jnp.exp(lp) * (lp - h["ref_lp"] - (N - 1) * expected_lq), axis=-1))
  mc, se = _mc_grad(h, _backward_estimator(h, smoothing))
  exact_biased = _exact_grad(h, biased)
  _assert_matches(f"backward, p̂≤ {smoothing}", mc, se, exact_biased)
  true = _exact_grad(h, lambda lp: _exact_kl(lp, _bon_lp(h)))
  cos = float(exact_biased @ true / (jnp.linalg.norm(exact_biased) * jnp.linalg.norm(true)))
  print(f"p̂≤ {smoothing} K={K}: cos(expected gradient, ∇KL(π‖π_BoN)) = {cos:.4f}")
  assert cos > 0.9


@pytest.mark.slow
def test_jeffreys_gradient_matches_exact(harness):
  h = harness
  fwd, bwd = _forward_estimator(h), _backward_estimator(h, _atom_exact_log_quantile(h))

  def loss(lp, key):
    key_fwd, key_bwd = jax.random.split(key)
    return (1 - JEFFREYS_BETA) * fwd(lp, key_fwd) + JEFFREYS_BETA * bwd(lp, key_bwd)

  def jeffreys(lp):
    bon_lp = _bon_lp(h)
    return (1 - JEFFREYS_BETA) * _exact_kl(bon_lp, lp) + JEFFREYS_BETA * _exact_kl(lp, bon_lp)

  mc, se = _mc_grad(h, loss)
  _assert_matches("jeffreys", mc, se, _exact_grad(h, jeffreys))


@pytest.mark.slow
def test_reinforce_gradient_matches_exact(harness):
  h = harness

  def loss(lp, key):
    y = _policy_samples(lp, key)
    return objectives.reinforce_loss(_gather(lp, y), _gather(h["ref_lp"], y),
                                     _gather(h["rewards"], y), BETA_RL)[0]

  def negative_objective(lp):   # −(E_π[r] − β_RL·KL(π ‖ π_ref))
    reward = jnp.mean(jnp.sum(jnp.exp(lp) * h["rewards"], axis=-1))
    return -(reward - BETA_RL * _exact_kl(lp, h["ref_lp"]))

  mc, se = _mc_grad(h, loss)
  _assert_matches("reinforce", mc, se, _exact_grad(h, negative_objective))
