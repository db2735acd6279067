"""First step of a config, cold and warm: how long a rerun takes to reach its first step.

Runs `python -m bond.main --config=CONFIG` in fresh processes, a pair sharing one new persistent
compilation cache directory (`train.compilation_cache`, which also holds bond's stored programs,
bond/aot.py): cold (empty cache), then warm; then the same pair with
`train.program_cache=False` in a cache directory of its own (the baseline: JAX's persistent
cache alone), and the warm runs' ratios. For each it prints the first step's
`time/elapsed_s` (from the training loop's start, i.e. after loading the model: trace + compile
or load + the step itself), the time from the process's start to the first step's record ("to
it": the issue's "first step within 10 s of process start plus model load" compares it minus
"load", the seconds in `train.load_model`), the process wall time, and, from `jax.monitoring`,
the time spent tracing jaxprs, compiling, loading JAX's cached executables and loading bond's
stored programs.

  python benchmarks/first_step.py                                   # Gemma 3 270M LoRA J-BOND
  python benchmarks/first_step.py --config configs/toy_jbond.py
  python benchmarks/first_step.py -- --config.model.scan_layers=True   # extra bond.main flags
  python benchmarks/first_step.py --prefault-gib 6   # the host's memory backed before each run
  python benchmarks/first_step.py --no-baseline      # only bond's stored programs
  python benchmarks/first_step.py --no-baseline --threshold-baseline --config configs/toy_jbond.py \
      -- --config.train.num_steps=180 --config.eval.sampled=True   # README's job, vs JAX's 1 s

It also prints each run's user and system CPU seconds, and measures how long this host takes to
first-touch fresh memory (a child touching 512 MiB). On this project's VMs the hypervisor backs
guest memory on demand and takes freed memory back, so a process's first touch of memory can
cost seconds per GiB (measured 3.9-6.7 s/GiB in session 16, against about 0.15 s/GiB for memory
the host still backs); the warm first step's system time is then mostly that, not bond's work.
`--prefault-gib G` touches G GiB in a throwaway process right before each run, so that the run
reuses memory the host has just backed: the first step as a host with memory backed ahead (a
TPU VM) would see it.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time

PROBE = """
import numpy as np, sys, time
t = time.perf_counter()
a = np.ones(int(float(sys.argv[1]) * 2**28), np.float32)
print(time.perf_counter() - t)
"""

EVENTS = {"trace": "/jax/core/compile/jaxpr_trace_duration",
          "compile": "/jax/core/compile/backend_compile_duration",
          "cache load": "/jax/compilation_cache/cache_retrieval_time_sec",
          "program load": "/bond/program_cache/load_sec"}


def child(out: str, argv: list[str], jax_threshold: bool = False) -> None:
  """Runs bond.main with duration listeners; writes their totals to `out` as JSON.
  jax_threshold: JAX's cache keeps only programs that took >= 1 s to compile (JAX's default, and
  the CLI's before session 29) instead of every program (`aot.enable_compilation_cache`)."""
  start = time.perf_counter()
  from jax import monitoring
  totals = collections.defaultdict(lambda: [0, 0.0])

  def listen(name, seconds, **_):
    totals[name][0] += 1
    totals[name][1] += seconds

  monitoring.register_event_duration_secs_listener(listen)
  sys.argv = [sys.argv[0], *argv]   # ml_collections reads the --config.* overrides at import
  from absl import app
  from bond import main as bond_main
  from bond import train as bond_train
  if jax_threshold:
    import jax
    from bond import aot
    every = aot.enable_compilation_cache

    def one_second(path):
      every(path)
      if path:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    aot.enable_compilation_cache = one_second
  load = [0.0]
  real_load = bond_train.load_model

  def timed_load(*args, **kwargs):
    t = time.perf_counter()
    try:
      return real_load(*args, **kwargs)
    finally:
      load[0] += time.perf_counter() - t

  bond_train.load_model = timed_load
  started = time.time()

  def run(args):
    try:
      bond_main.main(args)
    finally:
      from bond import hugepages
      import resource
      usage = resource.getrusage(resource.RUSAGE_SELF)   # survives hugepages' re-exec
      metrics = [a for a in argv if a.startswith("--workdir=")][0].split("=", 1)[1]
      first = os.path.getmtime(os.path.join(metrics, "metrics.jsonl")) - started
      with open(out, "w") as f:
        json.dump({"wall": time.perf_counter() - start, "events": dict(totals),
                   "to_first": first, "load": load[0],
                   "user": usage.ru_utime, "sys": usage.ru_stime,
                   "hugepages": hugepages.status()}, f)

  app.run(run, argv=sys.argv, flags_parser=bond_main.parse_flags)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="configs/gemma3_270m_jbond_lora.py")
  parser.add_argument("--prefault-gib", type=float, default=0.0,
                      help="touch this many GiB in a throwaway process right before each run")
  parser.add_argument("--no-baseline", action="store_true",
                      help="skip the baseline runs (train.program_cache=False)")
  parser.add_argument("--threshold-baseline", action="store_true",
                      help="also run a cold/warm pair whose JAX cache keeps only programs that "
                      "took >= 1 s to compile (JAX's default) instead of every program")
  parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--child-jax-threshold", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("extra", nargs="*", help="more bond.main flags, after --")
  args = parser.parse_args()
  flags = [f"--config={args.config}", "--config.train.num_steps=1",
           "--config.eval.sampled=False", *args.extra]
  if args.child_out:
    child(args.child_out, flags, args.child_jax_threshold)
    return
  if not os.path.exists(args.config):
    parser.error(f"--config: no such file {args.config!r}")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get(
      "PYTHONPATH")])))
  if args.prefault_gib < 0:
    parser.error(f"--prefault-gib must be >= 0, got {args.prefault_gib}")

  def touch(gib):   # seconds for a fresh process to first-touch `gib` GiB
    return float(subprocess.run([sys.executable, "-c", PROBE, str(gib)], check=True,
                                capture_output=True, text=True).stdout)

  probe = touch(0.5) / 0.5
  print(f"config {args.config} {' '.join(args.extra)}  load average {os.getloadavg()[0]:.2f}  "
        f"fresh memory first touch: {probe:.2f} s/GiB")
  print(f"{'run':>5} {'first step s':>12} {'to it s':>7} {'load s':>6} {'process s':>9} "
        f"{'user s':>7} {'sys s':>6} "
        + " ".join(f"{k + ' s (n)':>16}" for k in EVENTS))
  warm = {}
  with tempfile.TemporaryDirectory() as tmp:
    # bond's stored programs (the default), then the baseline: JAX's persistent cache alone, in
    # a cache directory of its own; then (--threshold-baseline) JAX's cache keeping only the
    # programs that took >= 1 s to compile.
    variants = [("programs", [])]
    if not args.no_baseline:
      variants.append(("jax", ["--config.train.program_cache=False"]))
    if args.threshold_baseline:
      variants.append(("1s", ["--child-jax-threshold"]))
    for variant, flags in variants:
      child_flags = [f for f in flags if f.startswith("--child-")]
      flags = [f for f in flags if not f.startswith("--child-")]
      cache = os.path.join(tmp, variant, "cache")
      for run in ("cold", "warm"):
        workdir = os.path.join(tmp, variant, run)
        out = workdir + ".json"
        cmd = [sys.executable, os.path.abspath(__file__), "--config", args.config,
               "--child-out", out, *child_flags, "--", *args.extra, *flags, f"--workdir={workdir}",
               f"--config.train.compilation_cache={cache}"]
        if args.prefault_gib:
          seconds = touch(args.prefault_gib)
          print(f"      (prefault: {args.prefault_gib:g} GiB touched in {seconds:.1f} s)",
                flush=True)
        proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True)
        if proc.returncode:
          sys.exit(f"{variant} {run} run failed:\n{proc.stderr[-3000:]}")
        with open(out) as f:
          report = json.load(f)
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
          first = json.loads(f.readline())["time/elapsed_s"]
        if run == "warm":
          warm[variant] = (first, report["to_first"] - report["load"], report["wall"])
        cells = []
        for name in EVENTS.values():
          n, seconds = report["events"].get(name, [0, 0.0])
          cells.append(f"{seconds:>10.2f} ({n:>3})")
        label = {"programs": run, "jax": f"{run}*", "1s": f"{run}+"}[variant]
        print(f"{label:>5} {first:>12.2f} {report['to_first']:>7.2f} {report['load']:>6.2f} "
              f"{report['wall']:>9.1f} {report['user']:>7.1f} "
              f"{report['sys']:>6.1f} " + " ".join(cells)
              + f"   {report['hugepages']}", flush=True)
  baselines = {"jax": "* baseline: --config.train.program_cache=False (JAX's persistent cache "
                       "alone)",
               "1s": "+ baseline: JAX's cache keeps only programs that took >= 1 s to compile"}
  p_first, p_beyond, p_wall = warm["programs"]
  for variant, label in baselines.items():
    if variant in warm:
      b_first, b_beyond, b_wall = warm[variant]
      print(f"{label}. Warm first step {p_first:.2f} s vs {b_first:.2f} s: "
            f"{b_first / p_first:.2f}x; process start to first step beyond the model's load "
            f"{p_beyond:.2f} s vs {b_beyond:.2f} s: {b_beyond / p_beyond:.2f}x; process "
            f"{p_wall:.1f} s vs {b_wall:.1f} s: {b_wall / p_wall:.2f}x")


if __name__ == "__main__":
  main()
