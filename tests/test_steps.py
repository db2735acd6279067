"""Train steps (bond/steps.py) on the exact toy harness, through the real sampler.

Independent checks: exact metrics by enumeration (`toy.exact_metrics`), a 1-device run of the
same step (sharding), NumPy arithmetic on the returned params (anchors), a hand-written Adam
step on enumerated log-probs (offline objectives), and reward-transform invariance (J-BOND and
BOND see rewards only through comparisons; REINFORCE does not).

The sharding test runs this file as a script in a subprocess with 8 fake CPU devices
(`XLA_FLAGS` must be set before JAX starts), so the rest of the session keeps one device.
Compiling an online step (sampler + several model passes + grads) dominates the time, so each
objective's step is compiled once per session (`runner`) and shared between tests.
"""

import dataclasses
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bond import data as data_lib
from bond import lora, sharding, steps, toy, train
from configs import toy_jbond
from conftest import QUICK_COMPILE_XLA_FLAGS

# Compiles much and runs little: XLA's quicker codegen (tests/conftest.py, `quick_compiles`).
pytestmark = pytest.mark.quick_compiles

SWAP_EVERY = 2


def canonical_config(objective: str, transform: str = "identity"):
  """The config each objective is tested with: configs/toy_jbond.py itself for J-BOND (the
  default job); for the others the same sizes with the full lr from the first update and
  fixed anchor (BOND), hard swap every 2 steps with n = 2 (iterative BOND, Jeffreys), or
  best/worst-of-8 pairs (offline)."""
  c = toy_jbond.get_config()
  c.task.reward_transform = transform
  c.bond.objective = objective
  if objective != "jbond":
    c.optim.warmup_steps = 0
    c.bond.anchor = "fixed"
  if objective == "bond_jeffreys":
    c.bond.update(n=2, anchor="swap", swap_every=SWAP_EVERY)
  if objective in steps.OFFLINE:
    c.bond.n = 8
  return c


class Runner:
  """The train loop's ingredients, without its I/O: build, init, jitted step, batches."""

  def __init__(self, config):
    self.config = config
    self.exp = train.build(config)
    self.optimizer = steps.make_optimizer(config.optim)
    self.step = jax.jit(steps.make_train_step(config, self.exp.model_config, self.exp.reward_fn,
                                              self.optimizer))

  def init(self) -> steps.TrainState:
    return steps.init_state(self.exp.params, self.optimizer, self.config.train.seed,
                            lora=lora.spec_from_config(self.config, self.exp.model_config))

  def batch(self, i: int) -> dict:
    return data_lib.get_batch(self.exp.table, i, self.config.data.batch_size,
                              self.config.data.shuffle_seed)

  def run(self, num_steps: int):
    """([state_0 .. state_T] on the host, per-step metrics as floats)."""
    state = self.init()
    states, history = [jax.device_get(state)], []
    for i in range(num_steps):
      state, metrics = self.step(state, self.batch(i))
      states.append(jax.device_get(state))
      history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    return states, history

  def exact(self, params) -> dict:
    task, mc = self.exp.task, self.exp.model_config
    ref_lp = toy.policy_log_probs(mc, self.exp.params, task)
    m = toy.exact_metrics(task, toy.policy_log_probs(mc, params, task), ref_lp)
    return {k: float(v) for k, v in m.items()}


@functools.lru_cache(maxsize=None)
def runner(objective: str, transform: str = "identity") -> Runner:
  return Runner(canonical_config(objective, transform))


def max_abs_diff(a, b) -> float:
  return max(float(jnp.max(jnp.abs(jnp.asarray(x) - jnp.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ---------------------------------------------------------------------------------------------
# Sharding: 8 fake CPU devices against 1, in a subprocess.

SHARDING_CASES = [  # (objective, (data, fsdp, tensor)); online steps are the costly compiles
    ("jbond", (2, 2, 2)),
    ("bonbon", (8, 1, 1)),
    ("bonbon", (1, 4, 2)),
    ("jbond+lora", (2, 2, 2)),   # LoRA: sharded frozen base, replicated adapters
]
SHARDING_STEPS = 3
# Adam turns a gradient g into lr·g/(|g|+ε): entries with |g| near float noise move by O(lr)
# under any reordering of a reduction, so the tolerance is relative to lr (1e-5 = 0.7% of the
# 3-step move at lr 5e-4).
SHARDING_LR = 5e-4
SHARDING_TOL = 1e-5


def _sharded_params(objective: str, mesh_shape, devices) -> tuple:
  """Params after SHARDING_STEPS jitted steps with train.py's in/out shardings on `devices`."""
  objective, _, with_lora = objective.partition("+")
  config = canonical_config(objective)
  config.optim.update(lr=SHARDING_LR, warmup_steps=0)
  config.bond.update(anchor="ema", eta=0.1)
  config.data.batch_size = 16
  if with_lora:
    config.model.lora.update(rank=4, targets="embed,all")
  runner = Runner(config)
  mesh = sharding.make_mesh(*mesh_shape, devices=devices)
  param_sh = sharding.param_shardings(runner.exp.model_config, mesh)
  state = runner.init()
  initial = jax.device_get(state.params)
  state_sh = train.state_shardings(state, runner.optimizer, mesh, param_sh)
  batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in runner.exp.table.columns.items()}
  step = jax.jit(steps.make_train_step(config, runner.exp.model_config, runner.exp.reward_fn,
                                       runner.optimizer),
                 in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None))
  state = jax.device_put(state, state_sh)
  for i in range(SHARDING_STEPS):
    state, _ = step(state, sharding.to_global_batch(runner.batch(i), mesh))
  sharded_leaves = sum(not leaf.sharding.is_fully_replicated     # (LoRA: the frozen base)
                       for leaf in jax.tree.leaves(state.ref_params if with_lora else state.params))
  moved = max_abs_diff(jax.device_get(state.params), initial)
  return jax.device_get(state.params), jax.device_get(state.anchor_params), sharded_leaves, moved


def _sharding_worker() -> None:
  """Prints one JSON line per case: max |Δparams|, |Δanchor| between 8 devices and 1."""
  assert len(jax.devices()) == 8, jax.devices()
  single = {}
  for objective, mesh_shape in SHARDING_CASES:
    if objective not in single:
      single[objective] = _sharded_params(objective, (1, 1, 1), jax.devices()[:1])
    one, one_anchor, _, moved = single[objective]
    many, many_anchor, sharded, _ = _sharded_params(objective, mesh_shape, jax.devices())
    print(json.dumps({"objective": objective, "mesh": mesh_shape, "sharded_leaves": sharded,
                      "moved": moved, "params": max_abs_diff(one, many),
                      "anchor": max_abs_diff(one_anchor, many_anchor)}))


@pytest.mark.slow
def test_sharded_step_matches_one_device():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {QUICK_COMPILE_XLA_FLAGS}",
             PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=root,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  assert len(results) == len(SHARDING_CASES), proc.stdout
  for r in results:
    assert r["moved"] > SHARDING_LR, r       # the steps did something
    if r["mesh"][1] * r["mesh"][2] > 1:
      assert r["sharded_leaves"] > 0, r      # fsdp/tensor really split some params
    assert r["params"] <= SHARDING_TOL, r
    assert r["anchor"] <= SHARDING_TOL, r


# ---------------------------------------------------------------------------------------------
# J-BOND (BOND Algorithm 2) on the exact harness: the default job, sampler inside the step.

def _train_jbond(r: Runner) -> dict:
  """r's config trained for its num_steps; exact metrics every 10 steps."""
  task, mc = r.exp.task, r.exp.model_config
  ref_lp = toy.policy_log_probs(mc, r.exp.params, task)
  exact = jax.jit(lambda p: toy.exact_metrics(task, toy.policy_log_probs(mc, p, task), ref_lp))
  state, records = r.init(), []
  for i in range(r.config.train.num_steps):
    state, metrics = r.step(state, r.batch(i))
    if (i + 1) % 10 == 0:
      records.append({k: float(v) for k, v in {**metrics, **exact(state.params)}.items()})
  return dict(state=state, records=records)


@pytest.fixture(scope="module")
def jbond_run():
  """configs/toy_jbond.py (β = 0.5) trained for its 180 steps."""
  return _train_jbond(runner("jbond"))


@pytest.fixture(scope="module")
def jbond_forward_only_run():
  """The control: the same job and seeds with the backward half off (β = 0)."""
  config = canonical_config("jbond")
  config.bond.beta = 0.0
  return _train_jbond(Runner(config))


def _window(records, key, lo, hi):
  return float(np.mean([r[key] for r in records[lo:hi]]))


@pytest.mark.slow
def test_jbond_improves_reward_and_kl_and_passes_best_of_4(jbond_run, jbond_forward_only_run):
  records = jbond_run["records"]
  assert all(np.isfinite(r["loss"]) for r in records)
  # Exact (enumerated) reward and KL(π‖π_ref): first 3 evaluations (steps 10-30) vs last 3.
  early_r, late_r = (_window(records, "exact/reward", 0, 3),
                     _window(records, "exact/reward", -3, None))
  early_kl, late_kl = (_window(records, "exact/kl_to_ref", 0, 3),
                       _window(records, "exact/kl_to_ref", -3, None))
  assert late_r > early_r + 0.3, (early_r, late_r)
  assert late_kl > early_kl + 0.3, (early_kl, late_kl)
  final = records[-1]
  assert final["exact/effective_n"] >= 4.0, final     # as far from π_ref as Best-of-4
  assert final["exact/win_rate"] > 0.6, final
  # J-BOND pays for its KL: at most the reward of Best-of-N* (the BoN curve is the frontier).
  assert final["exact/reward_gap_to_bon"] < 0.0, final
  # The backward half matters: against the forward-only control (same seeds, same steps) the
  # full J-BOND ends with a clearly higher reward, win rate and effective N (last 3 evaluations).
  control = jbond_forward_only_run["records"]
  for key, margin in (("exact/reward", 0.05), ("exact/win_rate", 0.01),
                      ("exact/effective_n", 0.5)):
    ours, theirs = _window(records, key, -3, None), _window(control, key, -3, None)
    assert ours > theirs + margin, (key, ours, theirs)


@pytest.mark.slow
def test_step_kl_estimate_agrees_with_exact_kl(jbond_run):
  """kl/policy_ref = mean over y ~ π of log π(y) − log π_ref(y): unbiased for the exact KL.

  Averaged over R independent draws of the step (fresh state.rng, state not advanced); the
  tolerance is 4 standard errors of that average, estimated from the draws themselves.
  """
  r, state = runner("jbond"), jbond_run["state"]
  exact_kl = r.exact(state.params)["exact/kl_to_ref"]
  batch = r.batch(0)             # 64 prompts: each of the 4 toy prompts 16 times
  draws = [float(r.step(state.replace(rng=jax.random.PRNGKey(seed)), batch)[1]["kl/policy_ref"])
           for seed in range(24)]
  stderr = np.std(draws, ddof=1) / np.sqrt(len(draws))
  assert abs(np.mean(draws) - exact_kl) < 4 * stderr, (np.mean(draws), exact_kl, stderr)


@pytest.mark.parametrize("objective,ref_for_loss", [("jbond", False), ("reinforce", True)])
def test_metric_only_ref_pass_runs_on_logged_steps_only(objective, ref_for_loss, monkeypatch):
  """with_metrics=False drops J-BOND's π_ref pass on the policy sample (it only feeds
  kl/policy_ref, then NaN) and changes nothing else; REINFORCE's loss reads that pass, so it
  always runs. A traced flag (one compiled rollout) picks the same values as the Python bools."""
  from bond import logprobs
  from bond import rollout as rollout_lib
  r = runner(objective)
  config = r.config
  fn = rollout_lib.make_rollout_fn(config, r.exp.model_config, r.exp.reward_fn)
  state, batch, rng = r.init(), r.batch(0), jax.random.PRNGKey(3)
  calls = []
  for name in ("completion_log_probs", "completion_log_probs_full"):   # either path counts
    real = getattr(logprobs, name)
    monkeypatch.setattr(logprobs, name,
                        lambda *a, real=real, **k: calls.append(1) or real(*a, **k))
  # Counted at trace time (a static flag: one trace each); compiled, not run op by op.
  static = jax.jit(fn, static_argnums=3)
  on = static(state, batch, rng, True)
  passes_on = len(calls)
  off = static(state, batch, rng, False)
  passes_off = len(calls) - passes_on
  assert passes_on - passes_off == (0 if ref_for_loss else 1), calls
  traced = jax.jit(fn)
  t_on, t_off = traced(state, batch, rng, jnp.asarray(True)), traced(state, batch, rng, jnp.asarray(False))
  for a, b in ((on, t_on), (off, t_off)):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5), a, b)
  assert np.all(np.isfinite(on.policy.ref_logp))
  assert np.all(np.isnan(off.policy.ref_logp)) != ref_for_loss
  # Everything but the metric-only field is identical.
  strip = lambda ro: ro.replace(policy=ro.policy.replace(ref_logp=None))  # noqa: E731
  jax.tree.map(np.testing.assert_array_equal, strip(on), strip(off))
  if not ref_for_loss:
    update = jax.jit(steps.make_update_fn(config, r.exp.model_config, r.optimizer))
    (_, m_on), (_, m_off) = update(state, on), update(state, off)
    assert np.isnan(m_off["kl/policy_ref"]) and np.isfinite(m_on["kl/policy_ref"])
    assert float(m_on["loss"]) == float(m_off["loss"])


@pytest.mark.parametrize("objective", ["jbond", "bond_jeffreys"])
def test_anchor_logp_from_the_decode_loop_equals_the_teacher_forced_pass(objective, monkeypatch):
  """bond.anchor_logp='decode' (the default, moving anchors): the anchor's decode loop scores the
  policy's samples beside its own, so the rollout traces no teacher-forced anchor pass; the
  samples are those of 'pass', log π_anchor of the policy samples is the pass's, and the loss,
  whose log π_θ/π_anchor then comes from the two samplers, has the pass's value and gradient."""
  from bond import logprobs
  from bond import rollout as rollout_lib
  r = runner(objective)
  assert r.config.bond.anchor in ("ema", "swap") and r.config.bond.anchor_logp == "decode"
  mc = r.exp.model_config
  state, batch, rng = r.init(), r.batch(0), jax.random.PRNGKey(3)
  # An anchor away from the policy, so that log π_θ/π_anchor is not 0.
  noise = jax.tree.map(lambda x: 0.3 * jax.random.normal(jax.random.PRNGKey(1), x.shape),
                       state.anchor_params)
  state = state.replace(anchor_params=jax.tree.map(jnp.add, state.anchor_params, noise))
  calls = []
  for name in ("completion_log_probs", "completion_log_probs_full"):   # either path counts
    real = getattr(logprobs, name)
    monkeypatch.setattr(logprobs, name,
                        lambda *a, real=real, **k: calls.append(1) or real(*a, **k))
  out = {}
  for mode in ("decode", "pass"):
    config = r.config.copy_and_resolve_references()
    config.bond.anchor_logp = mode
    calls.clear()
    ro = jax.jit(rollout_lib.make_rollout_fn(config, mc, r.exp.reward_fn), static_argnums=3)(
        state, batch, rng, False)
    passes = len(calls)        # at trace time
    loss_fn = jax.jit(jax.value_and_grad(steps.make_loss_fn(config, mc), has_aux=True))
    # The sampler's log π_θ(y) shifted by 1: the loss reads it only where the ratio comes from
    # the samplers.
    shifted = ro.replace(policy=ro.policy.replace(logp=ro.policy.logp + 1.0))
    moved = float(loss_fn(state.params, shifted)[0][0] - loss_fn(state.params, ro)[0][0])
    out[mode] = ro, passes, loss_fn(state.params, ro), moved
  (dec, dec_passes, ((dec_loss, _), dec_grads), dec_moved), (
      pas, pas_passes, ((pas_loss, _), pas_grads), pas_moved) = out["decode"], out["pass"]
  assert abs(dec_moved) > 0.1 and pas_moved == 0.0, (dec_moved, pas_moved)
  assert (dec_passes, pas_passes) == (0, 1)
  for field in ("tokens", "mask"):
    np.testing.assert_array_equal(getattr(dec.policy, field), getattr(pas.policy, field))
    np.testing.assert_array_equal(getattr(dec.anchor, field), getattr(pas.anchor, field))
  np.testing.assert_allclose(dec.policy.anchor_logp, pas.policy.anchor_logp, atol=1e-4)
  assert np.abs(np.asarray(pas.policy.logp - pas.policy.anchor_logp)).max() > 0.1
  np.testing.assert_allclose(dec_loss, pas_loss, rtol=1e-4)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-6),
               dec_grads, pas_grads)


@pytest.mark.parametrize("objective", ["jbond", "bonbon"])
def test_loss_scores_all_sample_sets_in_one_pass_where_the_head_is_chunked(objective, monkeypatch):
  """make_loss_fn with the chunked head (model.logprob_chunk < V): one teacher-forced pass over
  the loss's sample sets joined; with the full logits (chunk 0): a pass per set. Loss and
  gradients agree (f32 toy model; the two head paths are compared in tests/test_logprobs.py)."""
  from bond import logprobs
  from bond import rollout as rollout_lib
  r = runner(objective)
  state, batch = r.init(), r.batch(0)
  # Compiled, not run op by op (the calls are counted at trace time: one trace each).
  ro = jax.jit(rollout_lib.make_rollout_fn(r.config, r.exp.model_config, r.exp.reward_fn),
               static_argnums=3)(state, batch, jax.random.PRNGKey(3), True)
  calls = []
  for name in ("completion_log_probs", "completion_log_probs_full"):
    real = getattr(logprobs, name)
    monkeypatch.setattr(logprobs, name, lambda *a, real=real, name=name, **k:
                        calls.append((name, a[4].shape)) or real(*a, **k))
  out = {}
  for chunk in (0, 2):                      # the toy vocabulary has 5 tokens
    config = r.config.copy_and_resolve_references()
    config.model.logprob_chunk = chunk
    loss_fn = steps.make_loss_fn(config, r.exp.model_config)
    calls.clear()
    out[chunk] = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(state.params, ro)
    out[chunk, "calls"] = list(calls)
  b = batch["prompt_tokens"].shape[0]
  t = r.config.sampling.max_new_tokens
  assert out[0, "calls"] == [("completion_log_probs_full", (b, 1, t))] * 2, out[0, "calls"]
  assert out[2, "calls"] == [("completion_log_probs", (b, 2, t))], out[2, "calls"]
  (loss0, _), grads0 = out[0]
  (loss2, _), grads2 = out[2]
  np.testing.assert_allclose(loss2, loss0, rtol=1e-5)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), grads2, grads0)


def test_logged_steps_rule():
  config = toy_jbond.get_config()
  config.train.update(log_every=10, num_steps=95)
  config.eval.every = 25
  logged = [d for d in range(1, 96) if train._logged(d, config)]
  assert logged == [10, 20, 25, 30, 40, 50, 60, 70, 75, 80, 90, 95]
  assert bool(train._logged(jnp.asarray(25), config)) and not bool(train._logged(jnp.asarray(26), config))


# ---------------------------------------------------------------------------------------------
# Invariance: BOND-family objectives see rewards only through comparisons.

INVARIANCE_STEPS = 6


@pytest.mark.slow
@pytest.mark.parametrize("objective,invariant", [("jbond", True), ("reinforce", False)])
def test_trajectory_under_monotone_reward_transform(objective, invariant):
  """r -> exp(3r) keeps every comparison, so the J-BOND trajectory is identical (same seed);
  REINFORCE's advantages change, and so do its params."""
  states, _ = runner(objective).run(INVARIANCE_STEPS)
  states_exp, history_exp = runner(objective, "exp3").run(INVARIANCE_STEPS)
  assert history_exp[-1]["reward/mean"] > 3.0, history_exp[-1]   # the step saw exp(3r)
  diff = max_abs_diff(states[-1].params, states_exp[-1].params)
  if invariant:
    assert diff <= 1e-6, diff
  else:
    assert diff > 1e-4, diff


# ---------------------------------------------------------------------------------------------
# Every objective runs; anchors move as specified.

@pytest.mark.slow
@pytest.mark.parametrize("objective", steps.ONLINE + steps.OFFLINE)
def test_every_objective_trains(objective):
  r = runner(objective)
  states, history = r.run(3)
  assert int(states[-1].step) == 3
  for m in history:
    assert np.isfinite(m["loss"]) and np.isfinite(m["grads/global_norm"]), m
    assert m["grads/global_norm"] > 0.0, m
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(states[-1].params))
  assert max_abs_diff(states[-1].params, r.exp.params) > 1e-4


def _assert_tree_close(a, b, tol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                               rtol=0, atol=tol)


@pytest.mark.slow
@pytest.mark.parametrize("mode,objective", [
    ("fixed", "bond_fwd"), ("ema", "jbond"), ("swap", "bond_jeffreys")])
def test_anchor_modes(mode, objective):
  """fixed: anchor = π_ref always; ema: θa ← (1−η)θa + ηθ after each update; swap: θa ← θ after
  updates K, 2K, ... and untouched in between."""
  r = runner(objective)
  assert r.config.bond.anchor == mode
  states, _ = r.run(5)
  ref = jax.device_get(r.exp.params)
  for t in range(1, len(states)):
    old_anchor, params = states[t - 1].anchor_params, states[t].params
    new_anchor = states[t].anchor_params
    if mode == "fixed":
      _assert_tree_close(new_anchor, ref, 0.0)
    elif mode == "ema":
      eta = r.config.bond.eta
      expected = jax.tree.map(lambda a, p: (1 - eta) * np.asarray(a, np.float64)
                              + eta * np.asarray(p, np.float64), old_anchor, params)
      _assert_tree_close(new_anchor, expected, 1e-7)
    else:
      _assert_tree_close(new_anchor, params if t % SWAP_EVERY == 0 else old_anchor, 0.0)
    _assert_tree_close(states[t].ref_params, ref, 0.0)
  # The policy moved away from its previous anchor, so the checks above could fail.
  assert max_abs_diff(states[-1].params, states[-2].anchor_params) > 1e-4


# ---------------------------------------------------------------------------------------------
# Offline steps against a hand-written loss on enumerated log-probs and a NumPy Adam step.

def _adam_first_update(grads, lr, clip):
  """optax chain(clip_by_global_norm, adamw(wd=0)) at step 1: m̂ = g, v̂ = g², Δ = −lr·g/(|g|+ε)."""
  leaves = [np.asarray(g, np.float64) for g in jax.tree.leaves(grads)]
  norm = np.sqrt(sum(np.sum(g * g) for g in leaves))
  scale = min(1.0, clip / norm) if clip > 0 else 1.0
  return jax.tree.map(lambda g: -lr * scale * np.asarray(g, np.float64)
                      / (np.abs(scale * np.asarray(g, np.float64)) + 1e-8), grads)


@pytest.mark.parametrize("objective", steps.OFFLINE)
def test_offline_step_matches_enumerated_loss(objective):
  """One step = Adam(∇L) with L written here from exact log π over all completions (P×M table,
  `toy.policy_log_probs`), not from the step's teacher-forced pass over the batch."""
  r = runner(objective)
  task, mc, bc, oc = r.exp.task, r.exp.model_config, r.config.bond, r.config.optim
  batch = r.batch(0)
  prompt = np.asarray(toy.prompt_index(task, batch["prompt_tokens"]))
  chosen = np.asarray(toy.completion_index(task, batch["chosen_tokens"], batch["chosen_mask"]))
  rejected = np.asarray(toy.completion_index(task, batch["rejected_tokens"],
                                             batch["rejected_mask"]))
  assert (prompt >= 0).all() and (chosen >= 0).all() and (rejected >= 0).all()
  # best/worst-of-8 pairs: chosen never has a lower reward than rejected.
  assert (task.rewards[prompt, chosen] >= task.rewards[prompt, rejected]).all()
  ref_lp = toy.policy_log_probs(mc, r.exp.params, task)

  def loss(params):
    lp = toy.policy_log_probs(mc, params, task)
    h = ((lp[prompt, chosen] - ref_lp[prompt, chosen])
         - (lp[prompt, rejected] - ref_lp[prompt, rejected]))
    sft = -jnp.mean(lp[prompt, chosen])
    ipo = jnp.mean((h - 1.0 / (2.0 * bc.beta_ipo)) ** 2)
    dpo = jnp.mean(jnp.log1p(jnp.exp(-bc.beta_ipo * h)))
    return {"sft": sft, "ipo": ipo, "dpo": dpo, "bonbon": bc.alpha * sft + (1 - bc.alpha) * ipo,
            "bonbon_dpo": bc.alpha * sft + (1 - bc.alpha) * dpo}[objective]

  value, grads = jax.value_and_grad(loss)(r.exp.params)
  state, metrics = r.step(r.init(), batch)
  np.testing.assert_allclose(float(metrics["loss"]), float(value), rtol=1e-5)
  expected = jax.tree.map(lambda p, d: np.asarray(p, np.float64) + d, r.exp.params,
                          _adam_first_update(grads, oc.lr, oc.grad_clip))
  # Entries whose gradient is near float noise can take any Adam step in [−lr, lr]; compare
  # the entries with a gradient well above it (and require most entries to be such).
  compared = total = 0
  for got, want, g in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected),
                          jax.tree.leaves(grads)):
    g = np.abs(np.asarray(g))
    big = g > 1e-4 * g.max()
    compared, total = compared + big.sum(), total + big.size
    np.testing.assert_allclose(np.asarray(got, np.float64)[big], want[big], rtol=0,
                               atol=1e-3 * oc.lr)
  assert compared > 0.5 * total, (compared, total)


if __name__ == "__main__":
  _sharding_worker()


# ---------------------------------------------------------------------------------------------
# A host-side reward between two jits (rollout.Stages): the same rollout, the same run.


def _with_host(reward_fn):
  """reward_fn with a numpy `.host` scorer, as rewards.text_reward builds for VADER."""
  def reward(*args):
    return reward_fn(*args)
  reward.host = lambda *args: np.asarray(reward_fn(*args))
  return reward


@pytest.mark.parametrize("objective", ["jbond", "reinforce"])
def test_staged_rollout_equals_the_one_jit_rollout(objective):
  """sample -> host reward -> finish, jitted apart, gives the rollout_fn's Rollout."""
  from bond import rollout as rollout_lib
  r = runner(objective)
  config, state, batch = r.config, r.init(), r.batch(0)
  stages = rollout_lib.make_rollout_stages(config, r.exp.model_config, r.exp.reward_fn)
  want = jax.jit(rollout_lib.make_rollout_fn(config, r.exp.model_config, r.exp.reward_fn))(
      state, batch)
  samples = jax.jit(stages.sample)(state, batch)
  b, n, t = samples.tokens.shape
  rep = lambda x: np.repeat(np.asarray(x), n, axis=0)  # noqa: E731
  rewards = np.asarray(r.exp.reward_fn(rep(batch["prompt_tokens"]), rep(batch["prompt_mask"]),
                                       np.asarray(samples.tokens).reshape(b * n, t),
                                       np.asarray(samples.mask).reshape(b * n, t))).reshape(b, n)
  got = jax.jit(stages.finish)(state, batch, samples, rewards)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6), got, want)


@pytest.mark.slow
def test_training_loop_with_a_host_reward_runs_the_same_job(tmp_path, monkeypatch):
  """A reward with `.host` takes the staged path in bond/train.py (no callback in any jitted
  rollout program); its run logs the same metrics as the one-jit rollout's run."""
  from bond import rollout as rollout_lib
  config = toy_jbond.get_config()
  config.train.update(num_steps=6, log_every=2, checkpoint_every=6)
  config.eval.sampled = False
  train.train_and_evaluate(config, str(tmp_path / "one_jit"))
  real_build, staged = train.build, []
  monkeypatch.setattr(train, "build", lambda *a, **k: (lambda e: dataclasses.replace(
      e, reward_fn=_with_host(e.reward_fn)))(real_build(*a, **k)))
  real_stages = rollout_lib.make_rollout_stages
  monkeypatch.setattr(rollout_lib, "make_rollout_stages",
                      lambda *a: staged.append(1) or real_stages(*a))
  train.train_and_evaluate(config, str(tmp_path / "staged"))
  assert staged, "the host reward did not take the staged path"
  read = lambda w: [{k: v for k, v in json.loads(l).items() if not k.startswith("time/")}  # noqa: E731
                    for l in (tmp_path / w / "metrics.jsonl").read_text().splitlines()]
  one, two = read("one_jit"), read("staged")
  assert [r["step"] for r in one] == [r["step"] for r in two] == [2, 4, 6]
  for a, b in zip(one, two):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_sampling_cpu_kernels_key_reaches_every_sampler_call(monkeypatch):
  """`sampling.cpu_kernels` (auto | on | off) is the decode backend choice of the rollout's and
  the held-out evaluation's sampler calls."""
  from bond import heldout, sampling
  from bond import rollout as rollout_lib
  seen = []
  real = sampling.sample_fn
  def spy(*args, cpu_kernels=None, **kwargs):
    seen.append(cpu_kernels)
    return real(*args, **kwargs)              # the toy computes in f32: XLA either way
  monkeypatch.setattr(sampling, "sample_fn", spy)
  heldout._draw.clear_cache()     # a module-level jit: trace it again, through the spy
  r = runner("jbond")
  for value, expected in (("auto", None), ("on", True), ("off", False)):
    config = canonical_config("jbond")
    config.sampling.cpu_kernels = value
    config.eval.update(num_prompts=4, ref_samples=2, policy_samples=1)
    seen.clear()
    rollout_lib.make_rollout_fn(config, r.exp.model_config, r.exp.reward_fn)(r.init(), r.batch(0))
    exp = train.build(config, held_out=True)
    heldout.Evaluator(config, exp.model_config, exp.reward_fn, exp.eval_prompts
                      ).load_or_draw_cache(exp.params, None)
    assert len(seen) == 3 and set(seen) == {expected}, (value, seen)   # anchor, policy, cache
