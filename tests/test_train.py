"""The training loop's reliability: exact resume after SIGKILL and SIGTERM, partial checkpoints,
the non-finite guard, HF export, remote (gs://) workdir I/O.

End-to-end tests run `python -m bond.main` as subprocesses on the toy J-BOND job (80 steps,
checkpoint every 10, log every 5) and compare against an uninterrupted run of the same command;
they share the CLI's persistent compilation cache (`train.compilation_cache`, every program in it:
`aot.enable_compilation_cache`), so that only the first run compiles.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from etils.epath import testing as epath_testing

from bond import checkpoint as ckpt_lib
from bond import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_STEPS, CKPT_EVERY, LOG_EVERY = 80, 10, 5
FLAGS = [f"--config.train.num_steps={NUM_STEPS}", f"--config.train.checkpoint_every={CKPT_EVERY}",
         f"--config.train.log_every={LOG_EVERY}", f"--config.eval.every={LOG_EVERY}",
         "--config.data.batch_size=8", "--verbosity=-1"]
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def launch():
  """`launch(workdir, *flags) -> (process, log)` starts `python -m bond.main` on `workdir`
  (stdout+stderr to a log file beside it); runs still alive at teardown are killed."""
  procs = []

  def start(workdir, *extra):
    log = pathlib.Path(f"{workdir}.{time.monotonic_ns()}.log")
    env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
    with open(log, "w") as f:
      procs.append(subprocess.Popen(
          [sys.executable, "-m", "bond.main", f"--workdir={workdir}", *FLAGS, *extra], cwd=ROOT,
          env=env, stdout=f, stderr=subprocess.STDOUT))
    return procs[-1], log

  yield start
  for proc in procs:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def finish(proc, log) -> tuple[int, str]:
  return proc.wait(TIMEOUT_S), log.read_text()


def wait_for(path: pathlib.Path, proc, log) -> None:
  """Polls until `path` exists; fails if the run ends first."""
  deadline = time.monotonic() + TIMEOUT_S
  while not path.exists():
    assert proc.poll() is None, f"run ended ({proc.returncode}) before {path}:\n{log.read_text()}"
    assert time.monotonic() < deadline, f"timeout waiting for {path}"
    time.sleep(0.01)


def committed(workdir, step) -> pathlib.Path:
  return pathlib.Path(workdir) / "checkpoints" / str(step) / ckpt_lib.COMMIT_MARKER


def records(workdir) -> list[dict]:
  """metrics.jsonl without timings."""
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [{k: v for k, v in json.loads(l).items() if not k.startswith("time/")} for l in lines]


def saved_steps(workdir) -> list[int]:
  return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir()
                if p.name.isdigit())


def restore_raw(workdir, step) -> dict:
  """The saved TrainState as a dict of arrays, read by orbax alone (no bond code)."""
  return ocp.StandardCheckpointer().restore(pathlib.Path(workdir) / "checkpoints" / str(step)
                                            / "state")


def leaves(tree) -> dict:
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def assert_trees_equal(a, b):
  a, b = leaves(a), leaves(b)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, launch):
  """An uninterrupted run (with HF export): its workdir."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  rc, out = finish(*launch(workdir, "--config.train.export_hf=True"))
  assert rc == 0, out
  return workdir


@pytest.mark.slow
def test_killed_then_preempted_run_resumes_exactly(tmp_path, reference, launch):
  workdir = tmp_path / "run"
  expected = records(reference)
  assert [r["step"] for r in expected] == list(range(LOG_EVERY, NUM_STEPS + 1, LOG_EVERY))

  # 1. SIGKILL once the step-20 checkpoint is complete.
  proc, log = launch(workdir)
  wait_for(committed(workdir, 20), proc, log)
  proc.send_signal(signal.SIGKILL)
  rc, out = finish(proc, log)
  assert rc == -signal.SIGKILL, out
  killed_at = max(saved_steps(workdir))
  assert 20 <= killed_at < NUM_STEPS - 10

  # 2. Partial checkpoints beyond it, as a killed orbax writer or an interrupted copy leaves them.
  ckpts = workdir / "checkpoints"
  (ckpts / f"{killed_at + 20}{ckpt_lib.TMP_SUFFIX}-123" / "state").mkdir(parents=True)
  shutil.copytree(ckpts / str(killed_at), ckpts / str(killed_at + 10))
  for marker in (ckpts / str(killed_at + 10)).rglob(ckpt_lib.COMMIT_MARKER):
    marker.unlink()

  # 3. Restart (it must discard both); SIGTERM once it has saved a checkpoint of its own.
  proc, log = launch(workdir)
  wait_for(committed(workdir, killed_at + 10), proc, log)
  proc.send_signal(signal.SIGTERM)
  rc, out = finish(proc, log)
  assert rc == 0, out
  assert f"resumed from step {killed_at} " in out
  preempted_at = int(re.search(r"SIGTERM: checkpoint written at step (\d+)", out).group(1))
  assert killed_at + 10 <= preempted_at < NUM_STEPS
  assert committed(workdir, preempted_at).exists()
  assert max(saved_steps(workdir)) == preempted_at
  assert not (workdir / "plots").exists()

  # 4. Restart to the end: same records as the uninterrupted run, each step logged once.
  rc, out = finish(*launch(workdir))
  assert rc == 0, out
  assert f"resumed from step {preempted_at} " in out
  got = records(workdir)
  assert [r["step"] for r in got] == [r["step"] for r in expected]
  assert got == expected
  assert saved_steps(workdir) == [NUM_STEPS - 20, NUM_STEPS - 10, NUM_STEPS]   # keep 3
  assert_trees_equal(restore_raw(workdir, NUM_STEPS), restore_raw(reference, NUM_STEPS))
  assert sorted(p.name for p in (workdir / "plots").iterdir()) == [
      "divergences.png", "kl_to_bon.png", "length_vs_win_rate.png", "log_quantile.png",
      "reward_vs_kl.png", "win_rate_vs_kl.png"]


@pytest.mark.slow
def test_non_finite_update_stops_and_keeps_last_good_checkpoint(tmp_path, reference, launch):
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  before = saved_steps(workdir)
  # A real divergence: Adam steps of size ~lr = 1e30 overflow the parameter norm at once.
  rc, out = finish(*launch(workdir, f"--config.train.num_steps={NUM_STEPS + 20}",
                           "--config.optim.lr=1e30"))
  assert rc != 0
  from configs import toy_jbond
  assert f"optim.lr: {toy_jbond.get_config().optim.lr!r} -> 1e+30" in out   # diff on resume
  assert f"NonFiniteError: loss, grads/global_norm, params/global_norm: not all finite after " \
         f"step {NUM_STEPS + 1}" in out
  assert f"last good checkpoint (step {NUM_STEPS})" in out
  assert saved_steps(workdir) == before
  state = restore_raw(workdir, NUM_STEPS)
  assert_trees_equal(state, restore_raw(reference, NUM_STEPS))
  assert all(np.isfinite(v).all() for v in leaves(state).values())
  assert records(workdir) == records(reference)


@pytest.mark.slow   # the reference run
def test_hf_export_and_saved_config(reference):
  from bond.models import convert
  _, params = convert.from_hf(str(reference / "hf"))
  final = restore_raw(reference, NUM_STEPS)["params"]
  exported, final = leaves(params), leaves(final)
  assert exported.keys() == final.keys()
  for k in final:
    np.testing.assert_allclose(exported[k], final[k], rtol=0, atol=1e-6, err_msg=k)

  from configs import toy_jbond
  config = toy_jbond.get_config()
  config.train.num_steps, config.train.checkpoint_every = NUM_STEPS, CKPT_EVERY
  config.train.log_every = config.eval.every = LOG_EVERY
  config.data.batch_size, config.train.export_hf = 8, True
  meta = json.loads((reference / "checkpoints" / str(NUM_STEPS) / "meta" / "metadata").read_text())
  assert meta["data_step"] == NUM_STEPS
  assert json.loads(meta["config"]) == json.loads(config.to_json())


def test_checkpointer_keeps_last_and_ignores_partial(tmp_path):
  value = lambda step: {"w": jnp.arange(3.0) + step, "step": jnp.int32(step)}  # noqa: E731
  ckpt = ckpt_lib.Checkpointer(tmp_path / "c", keep=3)
  for step in (10, 20):
    ckpt.save(step, value(step), {"data_step": step})
  ckpt.close()
  (tmp_path / "c" / f"30{ckpt_lib.TMP_SUFFIX}-7").mkdir()
  shutil.copytree(tmp_path / "c" / "20", tmp_path / "c" / "40")
  for marker in (tmp_path / "c" / "40").rglob(ckpt_lib.COMMIT_MARKER):
    marker.unlink()

  ckpt = ckpt_lib.Checkpointer(tmp_path / "c", keep=3)
  assert ckpt.latest_step() == 20
  state, meta = ckpt.restore(value(0))
  assert meta == {"data_step": 20}
  np.testing.assert_array_equal(state["w"], [20.0, 21.0, 22.0])
  for step in (30, 40, 50):
    ckpt.save(step, value(step), {"data_step": step})
  ckpt.close()
  assert sorted(os.listdir(tmp_path / "c")) == ["30", "40", "50"]
  state, _ = ckpt_lib.Checkpointer(tmp_path / "c").restore(value(0))
  np.testing.assert_array_equal(state["w"], [50.0, 51.0, 52.0])


def test_metrics_log_resume_drops_later_and_torn_records(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in (5, 10, 15))
                  + '{"step": 20, "lo')
  log = train.MetricsLog(epath.Path(path), start=10)
  log.append({"step": 15, "loss": -1.0})
  assert [json.loads(l) for l in path.read_text().splitlines()] == [
      {"step": 5, "loss": 0.5}, {"step": 10, "loss": 1.0}, {"step": 15, "loss": -1.0}]
  assert log.records[-1] == {"step": 15, "loss": -1.0}


@pytest.fixture
def fake_bucket(tmp_path):
  """gs://bucket/... is served from tmp_path/bucket/... through epath; records each call."""
  calls = []

  def local(path):
    path = os.fspath(path)
    return path.replace("gs://", f"{tmp_path}/") if path.startswith("gs://") else path

  def remap(name):
    def fn(original, path, *args, **kwargs):
      calls.append((name, os.fspath(path), args))
      args = tuple(local(a) if isinstance(a, (str, os.PathLike)) else a for a in args)
      return original(local(path), *args, **kwargs)
    return fn

  names = ("copy", "exists", "glob", "isdir", "listdir", "makedirs", "mkdir", "open", "remove",
           "rename", "replace", "rmtree", "stat", "walk")
  with epath_testing.mock_epath(**{n: remap(n) for n in names}):
    yield tmp_path / "bucket", calls


def test_remote_workdir_goes_through_epath(fake_bucket, monkeypatch):
  bucket, calls = fake_bucket
  (bucket / "run").mkdir(parents=True)
  (bucket / "run" / "metrics.jsonl").write_text('{"step": 5}\n{"step": 10}\n')
  log = train.MetricsLog(epath.Path("gs://bucket/run/metrics.jsonl"), start=5)
  log.append({"step": 10, "loss": 2.0})
  assert ((bucket / "run" / "metrics.jsonl").read_text()
          == '{"step": 5}\n{"step": 10, "loss": 2.0}\n')
  opens = [(path, args[0]) for name, path, args in calls if name == "open"]
  assert opens and all(path.startswith("gs://") and mode != "a" for path, mode in opens)

  with train._local_dir(epath.Path("gs://bucket/run/plots")) as out:
    assert not out.startswith("gs:") and not out.startswith(str(bucket))
    pathlib.Path(out, "a.png").write_bytes(b"\x89PNG")
  assert (bucket / "run" / "plots" / "a.png").read_bytes() == b"\x89PNG"

  # As without google-cloud-storage: no TensorBoard, a warning, nothing written.
  monkeypatch.setitem(train._TB_SCHEMES, "gs", "bond_no_such_module")
  assert train._summary_writer(epath.Path("gs://bucket/run/tb"), 0) is None
  assert not (bucket / "run" / "tb").exists()


def test_config_changes():
  a = ml_collections.ConfigDict({"optim": {"lr": 0.1, "b1": 0.9}, "train": {"num_steps": 5}})
  b = ml_collections.ConfigDict({"optim": {"lr": 0.2, "b1": 0.9}, "train": {"num_steps": 5}})
  assert train._config_changes(a.to_json(), b) == ["optim.lr: 0.1 -> 0.2"]


@pytest.mark.fresh_compiles
def test_update_compiles_once_ahead_of_the_first_rollout(tmp_path, monkeypatch):
  """The update program is compiled on the compile-ahead thread while the first rollout runs,
  and the loop's first update call reuses it: one compile of `jit(step)` in the whole run. (A
  lowering whose abstract rollout lacks the arrays' shardings compiles a second program.)
  The run also has `train.checkpoint_every=0`, which writes no checkpoint, not even the last
  step's (the loop's other runs here, with it > 0, write theirs)."""
  from jax._src import monitoring
  from configs import toy_jbond
  config = toy_jbond.get_config()
  config.train.update(num_steps=2, log_every=1, checkpoint_every=0, compilation_cache="")
  config.eval.sampled = False
  compiles = []

  def listen(name, seconds, fun_name=None, **_):
    if name == "/jax/core/compile/backend_compile_duration":
      compiles.append((fun_name, threading.current_thread().name))

  monitoring.register_event_duration_secs_listener(listen)
  try:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  finally:
    monitoring.unregister_event_duration_listener(listen)
  update = [thread for fun, thread in compiles if fun == "jit(step)"]
  assert update == ["bond-compile-ahead"], compiles
  assert len(records(tmp_path / "run")) == 2
  assert saved_steps(tmp_path / "run") == []


def test_setup_drops_the_loaded_model_once_the_state_holds_it():
  """`_setup` keeps no second copy of the model alive for the run (1.07 GB of f32 on the Gemma 3
  270M): the loaded params are dropped, and the state's reference, policy and anchor are them."""
  from configs import toy_jbond
  config = toy_jbond.get_config()
  loaded = train.build(config).params
  exp, _, _, state, _ = train._setup(config)   # pylint: disable=protected-access
  assert exp.params is None
  for tree in (state.ref_params, state.params, state.anchor_params):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(tree), jax.device_get(loaded))
