"""Training with the Monte Carlo objectives reaches Best-of-N on the exact toy harness.

A tiny random Gemma is π_ref; the policy starts at π_ref and is trained with Adam on the sampled
objectives of `bond.objectives`. Outcomes are drawn exactly from the enumerated distributions
(categorical over the M completions, no LM sampler); divergences to π_BoN are exact.

Backward BOND uses the exact log p≤ under the anchor, so its optimum is π̃ ∝ π_anchor·p≤^(N−1)
(BOND Thm 1 in the continuous limit). On this toy, whose completions are heavy atoms with tied
rewards, π̃ is ~0.03 nats from π_BoN: `test_backward_target_gap` measures it, and it is the floor
the backward run reaches.
"""

import time

import jax
import jax.numpy as jnp
import optax
import pytest

from bond import anchor, bon, objectives, toy

pytestmark = pytest.mark.slow

N = 4
GROUPS = 256      # Best-of-N groups per prompt and step (forward part)
SAMPLES = 256     # policy samples per prompt and step (backward part)
LR = 5e-3         # Adam peak, cosine decay to 5% over each block of steps (1e-2 is unstable)
STEPS = 800


@pytest.fixture(scope="module")
def setup():
  # Completions of at most 2 tokens (M = 21): the tiny Gemma fits them in a few hundred steps
  # (M = 85 needs several times more).
  task = toy.make_task(seed=0, completion_len=2)
  config = toy.model_config(task)
  ref_params = toy.init_policy(task, jax.random.key(0))
  log_probs = lambda p: toy.policy_log_probs(config, p, task)  # noqa: E731
  return dict(task=task, ref_params=ref_params, log_probs=log_probs,
              ref_lp=log_probs(ref_params), rewards=jnp.asarray(task.rewards))


def _gather(x, idx):
  """x [P, M], idx [P, ...] -> x[p, idx[p, ...]]."""
  return jax.vmap(lambda row, i: row[i])(x, idx)


def _best_and_worst_of(key, log_probs, rewards, groups, n):
  """([P, groups], [P, groups]) best and worst (first extremes) of n i.i.d. samples of log_probs."""
  p = log_probs.shape[0]
  idx = jax.random.categorical(key, log_probs[:, None, None, :], shape=(p, groups, n))
  best, worst = bon.select_best_worst(_gather(rewards, idx).reshape(p * groups, n))
  pick = lambda i: jnp.take_along_axis(  # noqa: E731
      idx.reshape(p * groups, n), i[:, None], axis=1).reshape(p, groups)
  return pick(best), pick(worst)


def _bond_loss(lp, anchor_lp, rewards, key, n, beta):
  """Jeffreys BOND (β = 0: forward, β = 1: backward) against Best-of-n of the anchor."""
  key_anchor, key_policy = jax.random.split(key)
  y_best, _ = _best_and_worst_of(key_anchor, anchor_lp, rewards, GROUPS, n)
  y = jax.random.categorical(key_policy, jax.lax.stop_gradient(lp)[:, None, :],
                             shape=(lp.shape[0], SAMPLES))
  log_leq, _ = bon.log_quantiles(anchor_lp, rewards)
  return objectives.jeffreys_loss(_gather(lp, y_best).ravel(), _gather(lp, y),
                                  _gather(anchor_lp, y), _gather(log_leq, y), n=n, beta=beta)[0]


def _train(s, loss_fn, steps, block, lr=LR, swap=False):
  """Adam on loss_fn(log π [P, M], log π_anchor [P, M], key) from π_ref, also the first anchor:
  fixed (plain BOND) or, with swap, hard-swapped to the policy every `block` steps (iterative).

  The learning rate restarts its cosine decay every block. Returns the params after each block.
  """
  cosine = optax.cosine_decay_schedule(lr, block, alpha=0.05)
  optimizer = optax.adam(lambda t: cosine(t % block))

  def step(carry, key):
    params, opt_state, anchor_params, t = carry
    anchor_lp = jax.lax.stop_gradient(s["log_probs"](anchor_params))
    grads = jax.grad(lambda p: loss_fn(s["log_probs"](p), anchor_lp, key))(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    t = t + 1
    if swap:
      anchor_params = anchor.maybe_swap(anchor_params, params, t, block)
    return (params, opt_state, anchor_params, t), None

  @jax.jit
  def run_block(carry, keys):
    return jax.lax.scan(step, carry, keys)[0]

  params = s["ref_params"]
  carry = (params, optimizer.init(params), params, jnp.zeros((), jnp.int32))
  snapshots = []
  for keys in jax.random.split(jax.random.key(1), steps).reshape(steps // block, block):
    carry = run_block(carry, keys)
    snapshots.append(carry[0])
  return snapshots


def _kls(s, lp, n):
  """(KL(π_BoN(n) ‖ π), KL(π ‖ π_BoN(n))), exact, averaged over prompts."""
  bon_lp = bon.bon_log_probs(s["ref_lp"], s["rewards"], n)
  return float(jnp.mean(bon.kl(bon_lp, lp))), float(jnp.mean(bon.kl(lp, bon_lp)))


def _backward_target(s, n):
  """log π̃ ∝ log π_ref + (n−1)·log p≤ [P, M], the exact optimum of backward BOND."""
  log_leq, _ = bon.log_quantiles(s["ref_lp"], s["rewards"])
  return jax.nn.log_softmax(s["ref_lp"] + (n - 1) * log_leq, axis=-1)


def test_backward_target_gap(setup):
  fwd, bwd = _kls(setup, _backward_target(setup, N), N)
  print(f"π̃ vs π_BoN({N}): KL(π_BoN‖π̃) {fwd:.4f}, KL(π̃‖π_BoN) {bwd:.4f}")
  assert fwd < 0.04 and bwd < 0.04


@pytest.mark.parametrize("name,beta", [("forward", 0.0), ("backward", 1.0), ("jeffreys", 0.5)])
def test_bond_reaches_best_of_n(setup, name, beta):
  s = setup
  fwd0, bwd0 = _kls(s, s["ref_lp"], N)
  start = time.time()
  [params] = _train(s, lambda lp, a, k: _bond_loss(lp, a, s["rewards"], k, N, beta), STEPS, STEPS)
  lp = s["log_probs"](params)
  fwd, bwd = _kls(s, lp, N)
  to_tilde = float(jnp.mean(bon.kl(lp, _backward_target(s, N))))
  print(f"{name}: KL(π_BoN‖π) {fwd0:.4f} -> {fwd:.4f}, KL(π‖π_BoN) {bwd0:.4f} -> {bwd:.4f}, "
        f"KL(π‖π̃) {to_tilde:.4f} ({time.time() - start:.1f} s)")
  assert fwd < max(0.05, 0.05 * fwd0)
  assert bwd < max(0.05, 0.05 * bwd0)
  if name == "backward":
    assert to_tilde < 0.01


def test_iterative_bond_tracks_best_of_2_to_the_m(setup):
  """BOND Algorithm 1, Jeffreys β = 0.5, n = 2: after the m-th hard swap π ≈ Best-of-2^m(π_ref)."""
  s = setup
  start = time.time()
  snapshots = _train(s, lambda lp, a, k: _bond_loss(lp, a, s["rewards"], k, 2, 0.5),
                     3 * STEPS, STEPS, swap=True)
  for m, params in enumerate(snapshots, start=1):
    fwd, bwd = _kls(s, s["log_probs"](params), 2 ** m)
    kl_ref = float(jnp.mean(bon.kl(bon.bon_log_probs(s["ref_lp"], s["rewards"], 2 ** m),
                                   s["ref_lp"])))
    print(f"iterative m={m}: KL(π_BoN(2^m)‖π) {fwd:.4f}, KL(π‖π_BoN(2^m)) {bwd:.4f} "
          f"(KL(π_BoN(2^m)‖π_ref) {kl_ref:.4f})")
    assert fwd < 0.03 * m and bwd < 0.03 * m
  print(f"iterative: {time.time() - start:.1f} s")


def test_bonbon_moves_towards_best_of_8(setup):
  """BoNBoN on 512 fixed best-and-worst-of-8 pairs of π_ref per prompt, α = 0.005, β = β*_8.

  IPO fits every pair's log-ratio margin to 1/(2β*_8) ≈ 18, the continuous-reward BoN value; on
  this discrete toy π_BoN(8)'s margins average ~11, so BoNBoN's optimum is not π_BoN(8) (a
  tabular policy minimising the same loss stops at KL(π_BoN(8) ‖ π) ≈ 0.3 from 1.06).
  """
  s = setup
  n = 8
  y_best, y_worst = _best_and_worst_of(jax.random.key(2), s["ref_lp"], s["rewards"], 512, n)

  def loss(lp, ref_lp, key):
    del key
    return objectives.bonbon_loss(
        _gather(lp, y_best).ravel(), _gather(lp, y_worst).ravel(),
        _gather(ref_lp, y_best).ravel(), _gather(ref_lp, y_worst).ravel(),
        alpha=0.005, beta=bon.beta_star(n))[0]

  fwd0, bwd0 = _kls(s, s["ref_lp"], n)
  start = time.time()
  [params] = _train(s, loss, 2000, 2000, lr=2e-3)
  fwd, bwd = _kls(s, s["log_probs"](params), n)
  print(f"bonbon: KL(π_BoN(8)‖π) {fwd0:.4f} -> {fwd:.4f}, KL(π‖π_BoN(8)) {bwd0:.4f} -> {bwd:.4f} "
        f"({time.time() - start:.1f} s)")
  assert fwd < 0.5 * fwd0
