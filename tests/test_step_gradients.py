"""The online steps' gradients, through the real rollout and update, against exact expectations.

For each online objective: the mean over R independent rollouts (real sampler, real reward
function, the registered loss) of ∇loss equals the exact expected gradient, written here by
enumerating every completion of the toy task (`toy.policy_log_probs`), with p< and p≤ computed
directly in NumPy and the finite-k quantile estimates averaged exactly over their multinomial
distribution. Tolerance: 4 Monte-Carlo standard errors of the mean, estimated from the draws.
A mutated target (the other BOND reward, or the wrong β) must fall outside that tolerance, so
each test shows it can fail. Also: the update stage traces no sampler (no `while` in its jaxpr).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from bond import rollout as rollout_lib
from bond import steps, toy, train
from configs import toy_jbond

REPS = 1024    # copies of each of the 4 toy prompts per rollout: B = 4096 prompts
DRAWS = 16     # independent rollouts


def _config(objective, **bond):
  c = toy_jbond.get_config()
  c.bond.objective = objective
  c.bond.anchor = "ema" if objective == "jbond" else "fixed"   # at step 0 the anchor is π_ref
  c.bond.update(n=4, k=4, num_policy_samples=2, beta=0.5, gamma=0.1, **bond)
  return c


@functools.lru_cache(maxsize=None)
def _experiment():
  return train.build(_config("jbond"))


def _exact_tables(exp):
  """(ref π [P, M], rewards [P, M], p< [P, M], p≤ [P, M]) in float64, written out in NumPy."""
  task = exp.task
  ref_lp = np.asarray(toy.policy_log_probs(exp.model_config, exp.params, task), np.float64)
  ref = np.exp(ref_lp)
  ref /= ref.sum(-1, keepdims=True)
  r = np.asarray(task.rewards, np.float64)
  below = (r[:, None, :] < r[:, :, None])                                   # [P, M(y), M(y')]
  p_lt = np.einsum("pyz,pz->py", below, ref)
  p_le = np.einsum("pyz,pz->py", r[:, None, :] <= r[:, :, None], ref)
  return ref, r, p_lt, p_le


def _bond_reward_np(p_lt, p_le, n):
  """BOND Eq. 8 by its explicit sum: log p≤ + log Σ_{i=1..n} (p</p≤)^(i−1) / (n − 1)."""
  ratio = p_lt / p_le
  return np.log(p_le) + np.log(sum(ratio ** (i - 1) for i in range(1, n + 1))) / (n - 1)


def _expected_bond_reward(p_lt, p_le, k, n, kind):
  """E over k i.i.d. π_ref rewards of the step's BOND reward ('clip' smoothing) for each y."""
  out = np.zeros_like(p_le)
  p_eq = p_le - p_lt
  for a in range(k + 1):                         # a references strictly below, b tied with y
    for b in range(k + 1 - a):
      prob = stats.multinomial.pmf([a, b, k - a - b], k, np.stack(
          [p_lt, p_eq, np.clip(1 - p_le, 0, 1)], -1).reshape(-1, 3)).reshape(p_le.shape)
      hat_le = max((a + b) / k, 1 / (k + 1))
      value = (np.log(hat_le) if kind == "log_quantile"
               else _bond_reward_np(a / k, hat_le, n))
      out += prob * value
  return out


def _bon_probs(ref, p_lt, p_le, n):
  """π_BoN(n) with ties (BOND Thm 1): π_ref·(p≤^n − p<^n)/(p≤ − p<), no-ties limit n·π_ref·p≤^(n−1)."""
  tie = np.isclose(p_le, p_lt)
  safe = np.where(tie, 1.0, p_le - p_lt)
  return ref * np.where(tie, n * p_le ** (n - 1), (p_le ** n - p_lt ** n) / safe)


@functools.lru_cache(maxsize=None)
def _policy_params():
  """The policy under test: the same architecture as π_ref with sharper logits (π ≠ π_ref, so
  KL terms have a gradient); π_ref (= the step-0 anchor) is the experiment's params."""
  exp = _experiment()
  return toy.init_policy(exp.task, jax.random.PRNGKey(0), exp.model_config, logit_scale=0.09)


def _exact_grad(exp, surrogate):
  """∇ of surrogate(lp [P, M]) at the policy params, flattened."""
  mc, task = exp.model_config, exp.task
  grads = jax.grad(lambda p: surrogate(toy.policy_log_probs(mc, p, task)))(_policy_params())
  return np.concatenate([np.asarray(g, np.float64).ravel() for g in jax.tree.leaves(grads)])


def _score_surrogate(advantage):
  """E_π[A(y)·∇log π(y)] as the gradient of mean_p Σ_y sg(π A)·log π (A a [P, M] table)."""
  def surrogate(lp):
    weight = jax.lax.stop_gradient(jnp.exp(lp)) * jnp.asarray(advantage(lp), jnp.float32)
    return jnp.mean(jnp.sum(jax.lax.stop_gradient(weight) * lp, axis=-1))
  return surrogate


def _targets(objective, hp, exp):
  """The exact expected gradient of the step's loss, by objective (a dict: name -> vector)."""
  ref, r, p_lt, p_le = _exact_tables(exp)
  ref_lp = jnp.asarray(np.log(ref), jnp.float32)
  nll = lambda probs: lambda lp: -jnp.mean(jnp.sum(jnp.asarray(probs, jnp.float32) * lp, -1))  # noqa: E731
  if objective == "reinforce":
    # ∇ −(E_π[r] − β_RL·KL(π‖π_ref)).
    def value(lp, reward_scale):
      pi = jnp.exp(lp)
      reward = reward_scale * jnp.asarray(r, jnp.float32)
      return -jnp.mean(jnp.sum(pi * (reward - hp["beta_rl"] * (lp - ref_lp)), -1))
    return {"exact": _exact_grad(exp, lambda lp: value(lp, 1.0)),
            "reward halved": _exact_grad(exp, lambda lp: value(lp, 0.5))}
  if objective == "bond_fwd":   # KL(π_BoN(n) ‖ π) = −E_{π_BoN}[log π] + const
    return {"exact": _exact_grad(exp, nll(_bon_probs(ref, p_lt, p_le, hp["n"]))),
            "n=2": _exact_grad(exp, nll(_bon_probs(ref, p_lt, p_le, 2)))}
  if objective in ("bond_bwd", "bond_jeffreys"):
    n = hp["n"]
    def bwd(kind):
      rbar = _expected_bond_reward(p_lt, p_le, hp["k"], n, kind)
      return _exact_grad(exp, _score_surrogate(lambda lp: lp - ref_lp - (n - 1) * rbar))
    kinds = ("exact_ties", "log_quantile")
    if objective == "bond_bwd":
      return {kind: bwd(kind) for kind in kinds}
    fwd = _exact_grad(exp, nll(_bon_probs(ref, p_lt, p_le, n)))
    return {kind: (1 - hp["beta"]) * fwd + hp["beta"] * bwd(kind) for kind in kinds}
  assert objective == "jbond"   # anchor = π_ref at step 0
  fwd = _exact_grad(exp, nll(_bon_probs(ref, p_lt, p_le, 2)))
  # r_J(y) = −penalty·P[both anchor samples beat y] = −penalty·(1 − p≤(y))².
  r_j = -hp["jbond_penalty"] * (1 - p_le) ** 2
  bwd = lambda sign: _exact_grad(exp, _score_surrogate(lambda lp: -sign * r_j + lp - ref_lp))  # noqa: E731
  kl = _exact_grad(exp, _score_surrogate(lambda lp: lp - ref_lp))
  mix = lambda sign: (1 - hp["beta"]) * fwd + hp["beta"] * bwd(sign) + hp["gamma"] * kl  # noqa: E731
  return {"exact": mix(1.0), "r_J sign flipped": mix(-1.0)}


def _step_grads(config, exp):
  """[DRAWS, D] gradients of the registered loss, each on a fresh rollout of B = 4·REPS prompts."""
  optimizer = steps.make_optimizer(config.optim)
  state = steps.init_state(_policy_params(), optimizer, seed=0, ref_params=exp.params)
  task = exp.task
  batch = {"prompt_tokens": jnp.tile(jnp.asarray(task.prompts), (REPS, 1)),
           "prompt_mask": jnp.ones((4 * REPS, task.prompts.shape[1]), bool)}
  rollout_fn = jax.jit(rollout_lib.make_rollout_fn(config, exp.model_config, exp.reward_fn))
  loss_fn = steps.make_loss_fn(config, exp.model_config)
  grad_fn = jax.jit(jax.grad(lambda p, ro: loss_fn(p, ro)[0]))
  out = []
  for i in range(DRAWS):
    grads = grad_fn(state.params, rollout_fn(state, batch, jax.random.PRNGKey(100 + i)))
    out.append(np.concatenate([np.asarray(g, np.float64).ravel() for g in jax.tree.leaves(grads)]))
  return np.stack(out)


CASES = [
    ("reinforce", {"beta_rl": 1.0}, "exact", "reward halved"),
    ("bond_fwd", {}, "exact", "n=2"),
    ("bond_bwd", {"bond_reward": "exact_ties"}, "exact_ties", "log_quantile"),
    ("bond_bwd", {"bond_reward": "log_quantile"}, "log_quantile", "exact_ties"),
    ("bond_jeffreys", {"bond_reward": "exact_ties"}, "exact_ties", "log_quantile"),
    ("jbond", {}, "exact", "r_J sign flipped"),
]


@pytest.mark.slow
@pytest.mark.parametrize("objective,overrides,target,mutant", CASES,
                         ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_mean_step_gradient_matches_the_exact_expected_gradient(objective, overrides, target,
                                                                 mutant):
  config = _config(objective, **overrides)
  exp = _experiment()
  grads = _step_grads(config, exp)
  mean = grads.mean(0)
  se = math.sqrt(np.sum(grads.var(0, ddof=1)) / DRAWS)
  hp = config.bond.to_dict()
  targets = _targets(objective, hp, exp)
  want, wrong = targets[target], targets[mutant]
  norm = np.linalg.norm(want)
  err, err_wrong = np.linalg.norm(mean - want), np.linalg.norm(mean - wrong)
  cos = float(mean @ want / (np.linalg.norm(mean) * norm))
  print(f"{objective}/{target}: rel_err {err / norm:.4f} rel_se {se / norm:.4f} cos {cos:.4f}; "
        f"vs {mutant}: rel_err {err_wrong / norm:.4f}")
  assert se < 0.1 * norm, "too few draws for a meaningful check"
  assert err < 4 * se, (err / norm, se / norm)
  assert err_wrong > 4 * se, f"the check cannot tell {target} from {mutant}"


def _primitives(jaxpr) -> set[str]:
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for sub in jax.core.jaxprs_in_params(eqn.params):
      names |= _primitives(sub)
  return names


@pytest.mark.parametrize("objective", ["jbond", "reinforce"])
def test_update_stage_traces_no_sampler(objective):
  """The update differentiates the loss only: the sampler's while_loop lives in the rollout."""
  config = _config(objective)
  exp = _experiment()
  optimizer = steps.make_optimizer(config.optim)
  state = steps.init_state(exp.params, optimizer, seed=0)
  batch = {"prompt_tokens": jnp.asarray(exp.task.prompts),
           "prompt_mask": jnp.ones(exp.task.prompts.shape, bool)}
  rollout_fn = rollout_lib.make_rollout_fn(config, exp.model_config, exp.reward_fn)
  rollout = jax.jit(rollout_fn)(state, batch)
  update = jax.make_jaxpr(steps.make_update_fn(config, exp.model_config, optimizer))
  assert "while" not in _primitives(update(state, rollout).jaxpr)
  # Control: the composed step (rollout, then update) does contain the sampler's loop.
  composed = jax.make_jaxpr(steps.make_train_step(config, exp.model_config, exp.reward_fn,
                                                  optimizer))
  assert "while" in _primitives(composed(state, batch).jaxpr)
