"""Multi-host correctness with `launch/local.py`: P CPU processes under `jax.distributed`.

The reference is the same job on ONE process with the same number of devices (no
`jax.distributed`): same global batch, same mesh size, so the trained state must agree to float
rounding (gradient all-reduces sum in another order). Checkpoints are read back with orbax as
NumPy, independently of the trainer.
"""

import io
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from launch import local

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 4
STEPS = 4
# A few J-BOND steps on the toy task; batch 8 splits over 2 processes × 2 devices. The sampled
# held-out evaluation runs in single-process jobs only, so it is off on both sides (it cost each
# one-process run 6-7 s cold and never touches the trained state).
FLAGS = ("--config=configs/toy_jbond.py", "--config.data.batch_size=8",
         "--config.train.log_every=1", "--config.eval.every=2", "--config.optim.warmup_steps=1",
         "--config.train.checkpoint_every=100", "--config.eval.sampled=False")
TOL = 1e-5
RUN_TIMEOUT_S = 300


def run_one_process(workdir, num_steps: int, *extra: str) -> str:
  """The reference: `python -m bond.main` on one process with DEVICES CPU devices."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("BOND_")}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}")
  proc = subprocess.run(local.main_command([*FLAGS, f"--workdir={workdir}",
                                            f"--config.train.num_steps={num_steps}", *extra]),
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout + proc.stderr


def run_two_processes(workdir, num_steps: int, *extra: str) -> str:
  out = io.StringIO()
  code = local.launch([*FLAGS, f"--workdir={workdir}", f"--config.train.num_steps={num_steps}",
                       *extra],
                      num_processes=2, devices_per_process=DEVICES // 2,
                      timeout_s=RUN_TIMEOUT_S, out=out, cwd=REPO)
  assert code == 0, out.getvalue()[-5000:]
  return out.getvalue()


def load_state(workdir, step: int) -> dict:
  """The TrainState saved at `step`, as a dict of host NumPy arrays (any process count)."""
  import jax
  import orbax.checkpoint as ocp
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return checkpointer.restore(path, restore_args=args)


def max_abs_diff(a, b) -> float:
  import jax
  assert jax.tree.structure(a) == jax.tree.structure(b)
  diffs = jax.tree.leaves(jax.tree.map(
      lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)),
                                initial=0.0)), a, b))
  return max(diffs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """STEPS steps on 1 process × 4 devices and on 2 processes × 2 devices."""
  root = tmp_path_factory.mktemp("multihost")
  one, two = root / "one", root / "two"
  return {"one": (one, run_one_process(one, STEPS)), "two": (two, run_two_processes(two, STEPS))}


@pytest.mark.slow
def test_two_processes_train_like_one(runs):
  one, two = load_state(runs["one"][0], STEPS), load_state(runs["two"][0], STEPS)
  assert int(one["step"]) == int(two["step"]) == STEPS
  moved = max_abs_diff(one["params"], one["ref_params"])
  assert moved > 100 * TOL, f"params barely moved ({moved}); the comparison would be vacuous"
  for key in ("params", "opt_state", "anchor_params", "rng"):
    assert max_abs_diff(one[key], two[key]) <= TOL, key
  # The 2-process checkpoint really was written by two processes.
  metadata = os.path.join(runs["two"][0], "checkpoints", str(STEPS), "state", "array_metadatas")
  assert sorted(os.listdir(metadata)) == ["process_0", "process_1"]


@pytest.mark.slow
def test_only_process_0_writes_metrics_and_plots(runs):
  workdir, out = runs["two"]
  with open(workdir / "metrics.jsonl") as f:
    steps = [int(json.loads(line)["step"]) for line in f if line.strip()]
  assert steps == list(range(1, STEPS + 1))    # one record per step: one writer
  assert sorted(os.listdir(workdir / "plots")) == ["divergences.png", "reward_vs_kl.png"]
  assert len(os.listdir(workdir / "tb")) == 1
  writers = {line.split()[0] for line in out.splitlines() if " metrics: " in line or " plots: " in line}
  assert writers == {"[p0]"}


@pytest.mark.slow
def test_checkpoints_restore_across_process_counts(runs, tmp_path):
  """2-process checkpoint -> continue on 1 process, 1-process checkpoint -> continue on 2."""
  from_two, from_one = tmp_path / "from_two", tmp_path / "from_one"
  shutil.copytree(runs["two"][0], from_two)
  shutil.copytree(runs["one"][0], from_one)
  more = STEPS + 2
  out_one = run_one_process(from_two, more)
  out_two = run_two_processes(from_one, more)
  assert f"resumed from step {STEPS}" in out_one
  assert f"[p0] resumed from step {STEPS}" in out_two
  a, b = load_state(from_two, more), load_state(from_one, more)
  assert int(a["step"]) == int(b["step"]) == more
  assert max_abs_diff(a["params"], load_state(from_two, STEPS)["params"]) > 100 * TOL
  for key in ("params", "opt_state", "anchor_params"):
    assert max_abs_diff(a[key], b[key]) <= TOL, key


LORA = ("--config.model.lora.rank=4", "--config.model.lora.targets=embed,attn,mlp",
        "--config.optim.lr=5e-3")


@pytest.mark.slow
def test_two_processes_train_like_one_with_lora(tmp_path):
  """LoRA: replicated adapters on a sharded frozen base; the checkpoint holds no base."""
  one, two = tmp_path / "one", tmp_path / "two"
  run_one_process(one, STEPS, *LORA)
  run_two_processes(two, STEPS, *LORA)
  a, b = load_state(one, STEPS), load_state(two, STEPS)
  assert "ref_params" not in a and "ref_params" not in b
  moved = max(float(np.max(np.abs(x["b"]))) for layer in a["params"].values()
              for x in layer.values())
  assert moved > 100 * TOL, f"adapters barely moved ({moved})"
  for key in ("params", "opt_state", "anchor_params", "rng"):
    assert max_abs_diff(a[key], b[key]) <= TOL, key


def test_process_env():
  env = local.process_env({"XLA_FLAGS": "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=8",
                           "HOME": "/h"}, "127.0.0.1:1234", 3, 2, 4)
  assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=4"
  assert (env["BOND_COORDINATOR"], env["BOND_NUM_PROCESSES"], env["BOND_PROCESS_ID"]) == (
      "127.0.0.1:1234", "3", "2")
  assert env["JAX_PLATFORMS"] == "cpu" and env["HOME"] == "/h"


def test_parse_args_splits_at_double_dash():
  args, rest = local.parse_args(["--num_processes", "3", "--devices_per_process", "2", "--",
                                 "--config=configs/toy_jbond.py", "--workdir=/tmp/w"])
  assert (args.num_processes, args.devices_per_process, args.timeout) == (3, 2, None)
  assert rest == ["--config=configs/toy_jbond.py", "--workdir=/tmp/w"]


def fake_main(monkeypatch, script: str):
  """Replace `python -m bond.main` by a script that sees the same environment."""
  monkeypatch.setattr(local, "main_command", lambda args: [sys.executable, "-c", script, *args])


def test_one_failure_stops_the_others(monkeypatch):
  fake_main(monkeypatch, "import os, sys, time\n"
                         "print('rank', os.environ['BOND_PROCESS_ID'], flush=True)\n"
                         "if os.environ['BOND_PROCESS_ID'] == '1': sys.exit(3)\n"
                         "time.sleep(60)")
  out = io.StringIO()
  start = time.monotonic()
  code = local.launch([], num_processes=3, out=out)
  assert code == 3
  assert time.monotonic() - start < 30
  text = out.getvalue()
  assert "[p1] rank 1" in text and "process 1 exited with 3" in text


def test_timeout_stops_everything(monkeypatch):
  fake_main(monkeypatch, "import time; time.sleep(60)")
  out = io.StringIO()
  start = time.monotonic()
  assert local.launch([], num_processes=2, timeout_s=1.0, out=out) == local.TIMEOUT_EXIT
  assert time.monotonic() - start < 30
  assert "timeout" in out.getvalue()


def test_success_and_arguments_reach_every_process(monkeypatch):
  fake_main(monkeypatch, "import os, sys; print(os.environ['BOND_PROCESS_ID'], "
                         "os.environ['BOND_NUM_PROCESSES'], sys.argv[1:])")
  out = io.StringIO()
  assert local.launch(["--workdir=/w"], num_processes=2, out=out) == 0
  lines = sorted(out.getvalue().splitlines())
  assert lines == ["[p0] 0 2 ['--workdir=/w']", "[p1] 1 2 ['--workdir=/w']"]
