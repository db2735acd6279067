r"""Run bond on Cloud TPU VMs and pod slices: create, setup, run, logs, ssh, delete.

Stdlib only. Each subcommand builds `gcloud compute tpus ...` command lines with a pure function
(`create_commands(args) -> list[list[str]]`, ...) and runs them, or prints them with `--dry-run`.
Nothing from `bond/` is imported: the job is `python -m bond.main` on every worker at once
(`--worker=all`), and on a pod JAX finds the other hosts through the TPU metadata.

  python -m launch.tpu_vm create bond-1 --zone us-west4-a --accelerator-type v5litepod-8 --dry-run
  python -m launch.tpu_vm run bond-1 --zone us-west4-a --accelerator-type v5litepod-8 \
      --config configs/toy_jbond.py --workdir gs://my-bucket/runs/a --config.optim.lr=1e-3 --dry-run
"""

import argparse
import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Remote paths are spliced into the remote shell unquoted so that `~` expands there.
REMOTE_DIR = "~/bond"
REMOTE_VENV = "~/bond-venv"
REMOTE_LOG = "~/bond-run.log"
TPU_VM = ["gcloud", "compute", "tpus", "tpu-vm"]
QUEUED = ["gcloud", "compute", "tpus", "queued-resources"]
EXAMPLES = "v4-8, v4-32, v5p-8, v5p-64, v5litepod-8, v5litepod-16, v6e-8, v6e-16"
INSTALL_HINTS = {
    "gcloud": "install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)",
    "git": "install git",
}
NAME_RE = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
OVERRIDE_RE = re.compile(r"--config\.[A-Za-z_][\w.]*=.*", re.DOTALL)
# v4/v5p hosts hold 4 chips; v5e/v6e hosts hold up to 8 chips, but multi-host slices use 4-chip
# hosts (v5litepod-8 is one host, v5litepod-16 is four).
CHIPS_PER_HOST = 4
MAX_SINGLE_HOST_CHIPS = 8


@dataclasses.dataclass(frozen=True)
class Generation:
  """How one TPU generation names its slices: `{prefix}-{count}`."""
  name: str                       # e.g. "v5e"
  prefix: str                     # accelerator-type prefix, e.g. "v5litepod"
  counts_cores: bool              # the suffix counts TensorCores (2 per chip), not chips
  sizes: tuple[int, ...] | None   # allowed chip-counted suffixes; None: multiples of 8 cores
  runtime: str                    # default TPU VM software version


GENERATIONS = (
    Generation("v4", "v4", True, None, "tpu-ubuntu2204-base"),
    Generation("v5p", "v5p", True, None, "v2-alpha-tpuv5"),
    Generation("v5e", "v5litepod", False, (1, 4, 8, 16, 32, 64, 128, 256), "v2-alpha-tpuv5-lite"),
    Generation("v6e", "v6e", False, (1, 4, 8, 16, 32, 64, 128, 256), "v2-alpha-tpuv6e"),
)


@dataclasses.dataclass(frozen=True)
class Slice:
  """A validated accelerator type with its chip and host counts."""
  accelerator_type: str
  generation: Generation
  chips: int
  hosts: int

  def describe(self) -> str:
    kind = "pod slice, one process per host" if self.hosts > 1 else "single host"
    host_word = "host" if self.hosts == 1 else "hosts"
    return (f"{self.accelerator_type}: TPU {self.generation.name}, {self.chips} chips, "
            f"{self.hosts} {host_word} ({kind})")


def parse_slice(accelerator_type: str) -> Slice:
  """`v5p-64` -> 32 chips on 8 hosts; `v5litepod-8` -> 8 chips on 1 host.

  v4 and v5p suffixes count TensorCores (2 per chip, 4 chips = 8 cores per host); v5e
  (`v5litepod-N`) and v6e suffixes count chips.
  """
  prefix, _, count = accelerator_type.rpartition("-")
  gen = next((g for g in GENERATIONS if g.prefix == prefix), None)
  if gen is None or not count.isdigit():
    hint = " (v5e slices are named v5litepod-N)" if prefix == "v5e" else ""
    raise ValueError(f"unknown accelerator type {accelerator_type!r}{hint}; "
                     f"expected one of {', '.join(g.prefix + '-N' for g in GENERATIONS)}, "
                     f"e.g. {EXAMPLES}")
  n = int(count)
  if gen.counts_cores:
    if n <= 0 or n % (2 * CHIPS_PER_HOST):
      raise ValueError(f"{accelerator_type}: the {gen.name} suffix counts TensorCores (2 per "
                       f"chip, 8 per host) and must be a positive multiple of 8, "
                       f"e.g. {gen.prefix}-8, {gen.prefix}-32, {gen.prefix}-64")
    chips = n // 2
    return Slice(accelerator_type, gen, chips, chips // CHIPS_PER_HOST)
  if n not in gen.sizes:
    raise ValueError(f"{accelerator_type}: the {gen.name} suffix counts chips and must be one of "
                     f"{', '.join(map(str, gen.sizes))}")
  hosts = 1 if n <= MAX_SINGLE_HOST_CHIPS else n // CHIPS_PER_HOST
  return Slice(accelerator_type, gen, n, hosts)


def _where(args) -> list[str]:
  return ["--zone", args.zone] + (["--project", args.project] if args.project else [])


def _ssh(args, worker: str, command: str | None = None) -> list[str]:
  cmd = TPU_VM + ["ssh", args.name] + _where(args) + [f"--worker={worker}"]
  return cmd if command is None else cmd + ["--command", command]


def create_commands(args) -> list[list[str]]:
  """A TPU VM (`tpu-vm create`) or, with --queued, a queued resource holding one node."""
  runtime = args.runtime_version or args.accelerator_type.generation.runtime
  if args.queued:
    cmd = (QUEUED + ["create", args.qr_id or args.name, "--node-id", args.name] + _where(args) +
           ["--accelerator-type", args.accelerator_type.accelerator_type,
            "--runtime-version", runtime])
  else:
    cmd = (TPU_VM + ["create", args.name] + _where(args) +
           ["--accelerator-type", args.accelerator_type.accelerator_type, "--version", runtime])
  return [cmd + (["--spot"] if args.spot else []) + (["--preemptible"] if args.preemptible else [])]


def setup_commands(args) -> list[list[str]]:
  """Ships the code to every worker (git archive + scp, or git clone) and installs `.[tpu]`."""
  py = shlex.quote(args.python)
  apt = "sudo apt-get -qq -o DPkg::Lock::Timeout=600"
  install = " && ".join([
      f"(command -v {py} >/dev/null || ({apt} update && {apt} install -y {py} {py}-venv))",
      f"{py} -m venv {REMOTE_VENV}",
      f"{REMOTE_VENV}/bin/pip install -q -U pip",
      f"cd {REMOTE_DIR}",
      f"{REMOTE_VENV}/bin/pip install -q -e '.[tpu]'",
  ])
  if args.repo:
    fetch = f"rm -rf {REMOTE_DIR} && git clone -q {shlex.quote(args.repo)} {REMOTE_DIR}"
    if args.ref:
      fetch += f" && git -C {REMOTE_DIR} checkout -q {shlex.quote(args.ref)}"
    return [_ssh(args, "all", f"{fetch} && {install}")]
  tarball = os.path.join(tempfile.gettempdir(), f"bond-{args.name}.tar.gz")
  return [
      ["git", "-C", REPO_ROOT, "archive", "--format=tar.gz", "--prefix=bond/", "-o", tarball,
       args.ref or "HEAD"],
      TPU_VM + ["scp", tarball, f"{args.name}:bond.tar.gz"] + _where(args) + ["--worker=all"],
      _ssh(args, "all", f"rm -rf {REMOTE_DIR} && tar -xzf ~/bond.tar.gz -C ~ && {install}"),
  ]


def run_commands(args) -> list[list[str]]:
  """`python -m bond.main` on every worker at once; output streams back and goes to a log."""
  job = shlex.join(["python", "-m", "bond.main", f"--config={args.config}",
                    f"--workdir={args.workdir}", *args.overrides])
  # bond.sharding calls jax.distributed.initialize() when BOND_MULTIHOST is set; JAX then finds
  # the coordinator and process ids of a pod slice from the TPU metadata.
  env = "BOND_MULTIHOST=1 " if args.accelerator_type.hosts > 1 else ""
  if args.background:
    body = f"{env}nohup {job} > {REMOTE_LOG} 2>&1 < /dev/null &"
  else:
    body = f"{env}{job} 2>&1 | tee {REMOTE_LOG}"
  return [_ssh(args, "all",
               f"set -o pipefail && cd {REMOTE_DIR} && . {REMOTE_VENV}/bin/activate && {body}")]


def logs_commands(args) -> list[list[str]]:
  follow = " -f" if args.follow else ""
  return [_ssh(args, args.worker, f"tail -n {args.lines}{follow} {REMOTE_LOG}")]


def ssh_commands(args) -> list[list[str]]:
  return [_ssh(args, args.worker, args.remote_command)]


def delete_commands(args) -> list[list[str]]:
  """Deletes the TPU VM, or with --queued the queued resource and its node (--force)."""
  if args.queued:
    return [QUEUED + ["delete", args.qr_id or args.name] + _where(args) + ["--force", "--quiet"]]
  return [TPU_VM + ["delete", args.name] + _where(args) + ["--quiet"]]


def notes(args) -> list[str]:
  """Comment lines printed before the commands."""
  lines = [args.accelerator_type.describe()] if hasattr(args, "accelerator_type") else []
  if args.subcommand == "create" and args.queued:
    lines.append(f"wait for state ACTIVE: gcloud compute tpus queued-resources describe "
                 f"{args.qr_id or args.name} --zone {args.zone}")
  if args.subcommand == "setup" and not args.repo:
    lines.append(f"ships {args.ref or 'HEAD'} of {REPO_ROOT} (uncommitted changes are not sent)")
  if args.subcommand == "run":
    lines.append("rerun with the same --workdir to resume from its latest checkpoint")
  return lines


COMMANDS = {"create": create_commands, "setup": setup_commands, "run": run_commands,
            "logs": logs_commands, "ssh": ssh_commands, "delete": delete_commands}


def _slice_arg(value: str) -> Slice:
  try:
    return parse_slice(value)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


def _name_arg(value: str) -> str:
  if not NAME_RE.fullmatch(value):
    raise argparse.ArgumentTypeError(
        f"TPU name must be lowercase letters, digits and '-', start with a letter and have at "
        f"most 63 characters, got {value!r}")
  return value


def _worker_arg(value: str) -> str:
  if value != "all" and not value.isdigit():
    raise argparse.ArgumentTypeError(f"--worker must be 'all' or a worker index, got {value!r}")
  return value


def build_parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  common.add_argument("name", type=_name_arg, help="TPU VM (node) name")
  common.add_argument("--zone", required=True, help="e.g. us-west4-a")
  common.add_argument("--project", help="GCP project (default: gcloud's configured project)")
  common.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")

  parser = argparse.ArgumentParser(prog="python -m launch.tpu_vm", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   allow_abbrev=False)
  sub = parser.add_subparsers(dest="subcommand", required=True)

  def add(name: str, help_: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, parents=[common], help=help_, allow_abbrev=False)

  accel_help = f"accelerator type, e.g. {EXAMPLES}"
  p = add("create", "create a TPU VM or pod slice")
  p.add_argument("--accelerator-type", type=_slice_arg, required=True, help=accel_help)
  p.add_argument("--runtime-version", help="TPU software version (default: per generation: "
                 + ", ".join(f"{g.name} {g.runtime}" for g in GENERATIONS) + ")")
  capacity = p.add_mutually_exclusive_group()
  capacity.add_argument("--spot", action="store_true", help="Spot capacity (can be preempted)")
  capacity.add_argument("--preemptible", action="store_true", help="preemptible TPU VM")
  p.add_argument("--queued", action="store_true", help="request it as a queued resource")
  p.add_argument("--qr-id", help="queued resource id (default: the node name)")

  p = add("setup", "copy the code to every worker and pip install -e '.[tpu]'")
  p.add_argument("--repo", help="git URL to clone on the workers (default: ship a git archive "
                 "of this checkout)")
  p.add_argument("--ref", help="commit, tag or branch (default: HEAD, or the clone's default)")
  p.add_argument("--python", default="python3.11", help="interpreter for the venv (>= 3.11; "
                 "installed with apt when missing)")

  p = add("run", "python -m bond.main on all workers; extra --config.key=value are passed on")
  p.add_argument("--accelerator-type", type=_slice_arg, required=True, help=accel_help)
  p.add_argument("--config", required=True, help="config file, relative to the repo root")
  p.add_argument("--workdir", required=True, help="gs://bucket/path (required on pods) or an "
                 "absolute path on the workers")
  p.add_argument("--background", action="store_true",
                 help="detach with nohup; follow with `logs -f`")

  for name, help_ in (("logs", f"tail {REMOTE_LOG} on a worker"), ("ssh", "ssh to a worker")):
    p = add(name, help_)
    p.add_argument("--worker", type=_worker_arg, default="0", help="index or 'all' (default 0)")
    if name == "logs":
      p.add_argument("--lines", type=int, default=100)
      p.add_argument("-f", "--follow", action="store_true")
    else:
      p.add_argument("--command", dest="remote_command",
                     help="run this instead of an interactive shell")

  p = add("delete", "delete the TPU VM (or the queued resource)")
  p.add_argument("--queued", action="store_true", help="delete the queued resource and its node")
  p.add_argument("--qr-id", help="queued resource id (default: the node name)")
  return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
  """Parses and cross-checks flags; `run` keeps `--config.key=value` overrides in `overrides`."""
  args, extra = parser.parse_known_args(argv)
  if args.subcommand != "run" and extra:
    parser.error(f"unrecognized arguments: {' '.join(extra)}")
  if args.subcommand == "run":
    for x in extra:
      if not OVERRIDE_RE.fullmatch(x):
        parser.error(f"unrecognized argument {x!r}: config overrides look like "
                     f"--config.train.num_steps=1000")
    args.overrides = extra
    if not (args.workdir.startswith("gs://") or os.path.isabs(args.workdir)):
      parser.error(f"--workdir must be gs://bucket/path or an absolute path on the workers, "
                   f"got {args.workdir!r}")
    if args.accelerator_type.hosts > 1 and not args.workdir.startswith("gs://"):
      parser.error(f"{args.accelerator_type.describe()}: every host writes the same checkpoint, "
                   f"so --workdir must be on gs://, got {args.workdir!r}")
  if args.subcommand == "create" and args.queued and args.preemptible:
    parser.error("--preemptible is not available for queued resources; use --spot")
  if args.subcommand in ("create", "delete") and args.qr_id and not args.queued:
    parser.error("--qr-id needs --queued")
  return args


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args = parse_args(parser, argv)
  commands = COMMANDS[args.subcommand](args)
  comments = [f"# {line}" for line in notes(args)]
  if args.dry_run:
    print("\n".join(comments + [shlex.join(c) for c in commands]))
    return 0
  missing = sorted({c[0] for c in commands if shutil.which(c[0]) is None})
  if missing:
    for tool in missing:
      print(f"tpu_vm: {tool} not found on PATH; {INSTALL_HINTS[tool]}, or add --dry-run to print "
            f"the commands", file=sys.stderr)
    return 1
  for line in comments:
    print(line, file=sys.stderr)
  for c in commands:
    print(f"+ {shlex.join(c)}", file=sys.stderr, flush=True)
    rc = subprocess.run(c, check=False).returncode
    if rc:
      print(f"tpu_vm: {shlex.join(c[:5])} ... failed with exit status {rc}", file=sys.stderr)
      return rc
  return 0


if __name__ == "__main__":
  sys.exit(main())
