"""`python -m launch.tpu_vm ... --dry-run` prints the exact gcloud command lines.

The CLI runs as a subprocess, as a user would run it; the expected argv lists are written out by
hand from the gcloud reference (`gcloud compute tpus tpu-vm create|ssh|scp|delete`,
`gcloud compute tpus queued-resources create|delete`), and the chip/host counts come from the
Cloud TPU slice tables (e.g. v5p 2x4x4: 64 TensorCores, 32 chips, 8 hosts).
"""

import os
import shlex
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
V5E = ["bond-v5e", "--zone", "us-west4-a"]
V5P = ["bond-pod", "--zone", "us-east5-a", "--project", "my-proj"]


def cli(*argv, env=None):
  return subprocess.run([sys.executable, "-m", "launch.tpu_vm", *argv], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=30, check=False)


def dry_run(*argv):
  """Returns (comment lines, commands as argv lists)."""
  out = cli(*argv, "--dry-run")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  return ([l for l in lines if l.startswith("# ")],
          [shlex.split(l) for l in lines if not l.startswith("# ")])


def remote(cmd):
  """The shell words of an ssh `--command`."""
  return shlex.split(cmd[cmd.index("--command") + 1])


def test_v5e_single_host():
  notes, cmds = dry_run("create", *V5E, "--accelerator-type", "v5litepod-8")
  assert notes == ["# v5litepod-8: TPU v5e, 8 chips, 1 host (single host)"]
  assert cmds == [["gcloud", "compute", "tpus", "tpu-vm", "create", "bond-v5e", "--zone",
                   "us-west4-a", "--accelerator-type", "v5litepod-8",
                   "--version", "v2-alpha-tpuv5-lite"]]

  _, cmds = dry_run("setup", *V5E)
  tarball = os.path.join(tempfile.gettempdir(), "bond-bond-v5e.tar.gz")
  assert cmds[:2] == [
      ["git", "-C", ROOT, "archive", "--format=tar.gz", "--prefix=bond/", "-o", tarball, "HEAD"],
      ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "bond-v5e:bond.tar.gz",
       "--zone", "us-west4-a", "--worker=all"]]
  assert cmds[2][:-1] == SSH + V5E + ["--worker=all", "--command"]
  words = remote(cmds[2])
  assert words[:8] == ["rm", "-rf", "~/bond", "&&", "tar", "-xzf", "~/bond.tar.gz", "-C"]
  assert words[-6:] == ["&&", "~/bond-venv/bin/pip", "install", "-q", "-e", ".[tpu]"]

  notes, cmds = dry_run("run", *V5E, "--accelerator-type", "v5litepod-8",
                        "--config", "configs/toy_jbond.py", "--workdir", "/home/me/runs/a",
                        "--config.optim.lr=1e-3", "--config.data.prompt_template=it's {x}")
  assert notes[0] == "# v5litepod-8: TPU v5e, 8 chips, 1 host (single host)"
  assert len(cmds) == 1 and cmds[0][:-1] == SSH + V5E + ["--worker=all", "--command"]
  assert remote(cmds[0]) == [
      "set", "-o", "pipefail", "&&", "cd", "~/bond", "&&", ".", "~/bond-venv/bin/activate", "&&",
      "python", "-m", "bond.main", "--config=configs/toy_jbond.py", "--workdir=/home/me/runs/a",
      "--config.optim.lr=1e-3", "--config.data.prompt_template=it's {x}",
      "2>&1", "|", "tee", "~/bond-run.log"]

  _, cmds = dry_run("delete", *V5E)
  assert cmds == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "bond-v5e", "--zone",
                   "us-west4-a", "--quiet"]]


def test_v5p_pod():
  notes, cmds = dry_run("create", *V5P, "--accelerator-type", "v5p-64", "--spot")
  assert notes == ["# v5p-64: TPU v5p, 32 chips, 8 hosts (pod slice, one process per host)"]
  assert cmds == [["gcloud", "compute", "tpus", "tpu-vm", "create", "bond-pod", "--zone",
                   "us-east5-a", "--project", "my-proj", "--accelerator-type", "v5p-64",
                   "--version", "v2-alpha-tpuv5", "--spot"]]

  _, cmds = dry_run("create", *V5P, "--accelerator-type", "v5p-64", "--queued", "--spot",
                    "--runtime-version", "v2-alpha-tpuv5-custom")
  assert cmds == [["gcloud", "compute", "tpus", "queued-resources", "create", "bond-pod",
                   "--node-id", "bond-pod", "--zone", "us-east5-a", "--project", "my-proj",
                   "--accelerator-type", "v5p-64", "--runtime-version", "v2-alpha-tpuv5-custom",
                   "--spot"]]

  _, cmds = dry_run("setup", *V5P, "--repo", "https://github.com/me/bond.git", "--ref", "v1")
  assert len(cmds) == 1 and cmds[0][:-1] == SSH + V5P + ["--worker=all", "--command"]
  assert remote(cmds[0])[:13] == [
      "rm", "-rf", "~/bond", "&&", "git", "clone", "-q", "https://github.com/me/bond.git",
      "~/bond", "&&", "git", "-C", "~/bond"]

  notes, cmds = dry_run("run", *V5P, "--accelerator-type", "v5p-64", "--background",
                        "--config", "configs/toy_jbond.py", "--workdir", "gs://bkt/bond/run1",
                        "--config.train.num_steps=1000")
  assert notes == ["# v5p-64: TPU v5p, 32 chips, 8 hosts (pod slice, one process per host)",
                   "# rerun with the same --workdir to resume from its latest checkpoint"]
  assert len(cmds) == 1 and cmds[0][:-1] == SSH + V5P + ["--worker=all", "--command"]
  assert remote(cmds[0]) == [
      "set", "-o", "pipefail", "&&", "cd", "~/bond", "&&", ".", "~/bond-venv/bin/activate", "&&",
      "BOND_MULTIHOST=1", "nohup", "python", "-m", "bond.main", "--config=configs/toy_jbond.py",
      "--workdir=gs://bkt/bond/run1", "--config.train.num_steps=1000",
      ">", "~/bond-run.log", "2>&1", "<", "/dev/null", "&"]

  _, cmds = dry_run("logs", *V5P, "--worker", "3", "-f")
  assert cmds == [SSH + V5P + ["--worker=3", "--command", "tail -n 100 -f ~/bond-run.log"]]

  _, cmds = dry_run("delete", *V5P, "--queued")
  assert cmds == [["gcloud", "compute", "tpus", "queued-resources", "delete", "bond-pod",
                   "--zone", "us-east5-a", "--project", "my-proj", "--force", "--quiet"]]


@pytest.mark.parametrize("accelerator,chips,hosts,runtime", [
    ("v4-8", 4, 1, "tpu-ubuntu2204-base"),
    ("v4-32", 16, 4, "tpu-ubuntu2204-base"),
    ("v5p-8", 4, 1, "v2-alpha-tpuv5"),
    ("v5p-128", 64, 16, "v2-alpha-tpuv5"),
    ("v5litepod-1", 1, 1, "v2-alpha-tpuv5-lite"),
    ("v5litepod-16", 16, 4, "v2-alpha-tpuv5-lite"),
    ("v5litepod-256", 256, 64, "v2-alpha-tpuv5-lite"),
    ("v6e-8", 8, 1, "v2-alpha-tpuv6e"),
    ("v6e-64", 64, 16, "v2-alpha-tpuv6e"),
])
def test_chip_and_host_counts(accelerator, chips, hosts, runtime):
  notes, cmds = dry_run("create", *V5E, "--accelerator-type", accelerator)
  assert notes[0].startswith(f"# {accelerator}: ")
  assert f", {chips} chips, {hosts} host{'s' if hosts > 1 else ''} (" in notes[0]
  assert cmds[0][cmds[0].index("--version") + 1] == runtime


@pytest.mark.parametrize("accelerator,message", [
    ("v5e-8", "v5e slices are named v5litepod-N"),
    ("tpu-8", "unknown accelerator type 'tpu-8'"),
    ("v5litepod-12", "must be one of 1, 4, 8, 16, 32, 64, 128, 256"),
    ("v5p-12", "counts TensorCores (2 per chip, 8 per host) and must be a positive multiple of 8"),
])
def test_bad_accelerator_type(accelerator, message):
  out = cli("create", *V5E, "--accelerator-type", accelerator, "--dry-run")
  assert out.returncode == 2 and out.stdout == ""
  assert message in out.stderr
  if "unknown" in message:
    assert "v5litepod-8" in out.stderr and "v5p-64" in out.stderr


@pytest.mark.parametrize("argv,message", [
    (["create", "bond-v5e", "--accelerator-type", "v5litepod-8"],
     "the following arguments are required: --zone"),
    (["run", *V5E, "--accelerator-type", "v5litepod-8", "--config", "configs/toy_jbond.py"],
     "the following arguments are required: --workdir"),
    (["run", *V5E, "--accelerator-type", "v5p-64", "--config", "c.py", "--workdir", "/w"],
     "--workdir must be on gs://"),
    (["run", *V5E, "--accelerator-type", "v5litepod-8", "--config", "c.py", "--workdir", "runs"],
     "absolute path on the workers"),
    (["run", *V5E, "--accelerator-type", "v5litepod-8", "--config", "c.py", "--workdir", "/w",
      "--config.optim.lr", "1e-3"], "config overrides look like --config.train.num_steps=1000"),
    (["create", *V5E, "--accelerator-type", "v5p-8", "--queued", "--preemptible"],
     "--preemptible is not available for queued resources; use --spot"),
    (["delete", "Bond_1", "--zone", "z"], "TPU name must be lowercase"),
])
def test_usage_errors(argv, message):
  out = cli(*argv, "--dry-run")
  assert out.returncode == 2 and out.stdout == ""
  assert message in out.stderr


def test_missing_gcloud_is_a_clear_error(tmp_path):
  out = cli("delete", *V5E, env={**os.environ, "PATH": str(tmp_path)})
  assert out.returncode == 1
  assert "gcloud not found on PATH" in out.stderr and "--dry-run" in out.stderr


def test_remote_scripts_are_valid_bash():
  odd = "--config.data.prompt_template=it's \"{x}\" $HOME"
  for argv in (["setup", *V5E],
               ["run", *V5P, "--accelerator-type", "v5p-64", "--config", "c.py",
                "--workdir", "gs://b/w", odd]):
    cmd = dry_run(*argv)[1][-1]
    script = cmd[cmd.index("--command") + 1]
    check = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True,
                           check=False)
    assert check.returncode == 0, (script, check.stderr)
  words = remote(cmd)
  assert odd in words
  assert words[words.index("python") - 1] == "BOND_MULTIHOST=1"   # a pod, in the foreground


def test_launch_imports_nothing_from_bond():
  code = ("import sys, launch.tpu_vm; "
          "sys.exit(' '.join(m for m in sys.modules if m.split('.')[0] == 'bond') or None)")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       check=False)
  assert out.returncode == 0, out.stderr
