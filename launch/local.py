r"""Run bond as P local processes on CPU, the way a multi-host pod runs it: tests and debugging.

Stdlib only; nothing from `bond/` is imported. Every process runs `python -m bond.main` with the
same flags; `bond.sharding.maybe_initialize_distributed` reads BOND_COORDINATOR (127.0.0.1 and a
free port), BOND_NUM_PROCESSES and BOND_PROCESS_ID and calls `jax.distributed.initialize`, so
the P processes see P × D CPU devices (D per process, via XLA_FLAGS) and each feeds its slice of
the global batch. Cross-process collectives on CPU go through gloo. Output is streamed with a
`[pI]` prefix; if one process fails (or the timeout passes) the others are stopped and the
launcher exits non-zero.

  python -m launch.local --num_processes 2 --devices_per_process 2 -- \
      --config=configs/toy_jbond.py --workdir=/tmp/w --config.train.num_steps=4
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence, TextIO

TIMEOUT_EXIT = 124        # like coreutils `timeout`
STOP_GRACE_S = 5.0        # SIGTERM first (the trainer checkpoints at the next step), then SIGKILL
POLL_S = 0.2
DEVICE_COUNT_RE = re.compile(r"--xla_force_host_platform_device_count=\S*")


def free_port() -> int:
  """A TCP port that was free on 127.0.0.1 a moment ago (the coordinator binds it next)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(base: dict[str, str], coordinator: str, num_processes: int, process_id: int,
                devices_per_process: int) -> dict[str, str]:
  """The environment of process `process_id`: CPU only, D host devices, the coordinator."""
  flags = DEVICE_COUNT_RE.sub("", base.get("XLA_FLAGS", "")).split()
  flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
  return {
      **base,
      "JAX_PLATFORMS": "cpu",
      "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",   # cross-process all-reduce on CPU
      "XLA_FLAGS": " ".join(flags),
      "BOND_COORDINATOR": coordinator,
      "BOND_NUM_PROCESSES": str(num_processes),
      "BOND_PROCESS_ID": str(process_id),
  }


def main_command(main_args: Sequence[str]) -> list[str]:
  return [sys.executable, "-m", "bond.main", *main_args]


def _stream(proc: subprocess.Popen, prefix: str, out: TextIO, lock: threading.Lock) -> None:
  for line in proc.stdout:
    with lock:
      out.write(f"{prefix} {line}" if line.endswith("\n") else f"{prefix} {line}\n")
      out.flush()


def _stop(procs: Sequence[subprocess.Popen]) -> None:
  """SIGTERM every live process, SIGKILL those still alive after STOP_GRACE_S."""
  live = [p for p in procs if p.poll() is None]
  for p in live:
    p.terminate()
  deadline = time.monotonic() + STOP_GRACE_S
  for p in live:
    try:
      p.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def launch(main_args: Sequence[str], num_processes: int = 2, devices_per_process: int = 1,
           timeout_s: float | None = None, out: TextIO | None = None,
           cwd: str | None = None) -> int:
  """Runs `python -m bond.main *main_args` on `num_processes` local processes; returns the exit
  code: 0 if all succeeded, the first failure's code otherwise, TIMEOUT_EXIT on timeout."""
  if num_processes < 1:
    raise ValueError(f"num_processes must be >= 1, got {num_processes}")
  if devices_per_process < 1:
    raise ValueError(f"devices_per_process must be >= 1, got {devices_per_process}")
  out = out or sys.stdout
  coordinator = f"127.0.0.1:{free_port()}"
  lock = threading.Lock()
  procs, threads = [], []
  for i in range(num_processes):
    env = process_env(dict(os.environ), coordinator, num_processes, i, devices_per_process)
    proc = subprocess.Popen(main_command(main_args), env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    procs.append(proc)
    threads.append(threading.Thread(target=_stream, args=(proc, f"[p{i}]", out, lock),
                                    daemon=True))
    threads[-1].start()

  deadline = None if timeout_s is None else time.monotonic() + timeout_s
  code = 0
  try:
    while code == 0 and any(p.poll() is None for p in procs):
      failed = [(i, p.returncode) for i, p in enumerate(procs) if p.poll() not in (None, 0)]
      if failed:
        i, code = failed[0]
        out.write(f"[launch] process {i} exited with {code}; stopping the others\n")
      elif deadline is not None and time.monotonic() > deadline:
        code = TIMEOUT_EXIT
        out.write(f"[launch] timeout after {timeout_s:g} s; stopping all processes\n")
      else:
        time.sleep(POLL_S)
    if code == 0:
      code = next((p.returncode for p in procs if p.returncode != 0), 0)
  except KeyboardInterrupt:
    code = 130
  finally:
    _stop(procs)
    for t in threads:
      t.join()
  return code


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  """Launcher flags before `--`, `bond.main` flags after it."""
  argv = list(argv)
  split = argv.index("--") if "--" in argv else len(argv)
  parser = argparse.ArgumentParser(
      prog="python -m launch.local",
      description="Run python -m bond.main on several local CPU processes (jax.distributed).",
      epilog="Everything after `--` is passed to every bond.main process.")
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=1,
                      help="fake CPU devices per process (XLA_FLAGS)")
  parser.add_argument("--timeout", type=float, default=None, help="seconds; default none")
  return parser.parse_args(argv[:split]), argv[split + 1:]


def main(argv: Sequence[str] | None = None) -> int:
  args, main_args = parse_args(sys.argv[1:] if argv is None else argv)
  return launch(main_args, args.num_processes, args.devices_per_process, args.timeout)


if __name__ == "__main__":
  sys.exit(main())
