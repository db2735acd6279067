"""Teacher-forced log-probs with gradients: full [rows, P+T, V] logits vs the chunked vocab path.

`bond.logprobs.completion_log_probs_full` (the model's f32 logits at every position, then
`objectives.sequence_log_probs`) against `bond.logprobs.completion_log_probs` (final hidden
states, then the vocab projection at the T completion positions only, chunk by chunk, with a
custom VJP). Both are timed as one jitted value_and_grad of Σ w·log π(y|x) in the params,
bf16 compute and f32 params, random weights; rows = B·N sequences of P prompt + T completion
tokens. `--floor` adds the model alone (final hidden states, no vocab projection): what no log-prob
path can beat. Each (shape, path) runs in its own child process, so its peak RSS is its own.

Printed per run: median step time and its process CPU time (after one warm-up call; the CPU
time is the steadier figure on a shared machine), compile time, XLA's temp buffer
bytes (`compiled.memory_analysis()`), the peak RSS over the process's RSS before compiling (the
compiler included), and the loss each side computed (they must agree).

  python benchmarks/logprobs.py --floor     # gemma3_35m 48 x 48; gemma3_270m 12 x 28, 24 x 40
  python benchmarks/logprobs.py --quick     # tiny_gemma3, a smoke run
  python benchmarks/logprobs.py --case gemma3_270m:12:28 --chunks 4096,8192,16384
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

PROMPT_LEN = 16
SAMPLES = 4     # completions per prompt: rows = B prompts x SAMPLES
CASES = ["gemma3_35m:48:48", "gemma3_270m:12:28", "gemma3_270m:24:40"]
QUICK_CASES = ["tiny_gemma3:8:8"]


def rss_now_gb() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def rss_peak_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB on Linux


def hidden_only(config, params, prompt, prompt_mask, tokens, mask):
  """A stand-in [B, N] for the log-probs that needs the same pass to the final hidden states."""
  import jax.numpy as jnp

  from bond.models import gemma
  b, n, t = tokens.shape
  seq = jnp.concatenate([jnp.repeat(prompt, n, axis=0), tokens.reshape(b * n, t)], axis=1)
  seq_mask = jnp.concatenate([jnp.repeat(prompt_mask, n, axis=0), mask.reshape(b * n, t)], axis=1)
  hidden = gemma.Gemma(config).apply({"params": params}, seq, attention_mask=seq_mask,
                                     return_hidden=True)
  return jnp.sum(hidden[:, -t:].astype(jnp.float32) ** 2, axis=(1, 2)).reshape(b, n)


def child(spec: dict) -> dict:
  """Times one path on one shape in this process; returns the figures."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from bond import logprobs
  from bond.models import gemma, presets

  config = presets.get(spec["preset"], dtype=jnp.bfloat16, param_dtype=jnp.float32)
  rows, t, p = spec["rows"], spec["tokens"], spec["prompt_len"]
  n = SAMPLES if rows % SAMPLES == 0 else 1
  b = rows // n
  params = gemma.init_params(config, jax.random.key(0))
  rng = np.random.default_rng(0)
  prompt = jnp.asarray(rng.integers(3, config.vocab_size, (b, p)), jnp.int32)
  prompt_mask = jnp.asarray(np.arange(p)[None, :] >= rng.integers(0, p // 2, (b, 1)))  # left pad
  tokens = jnp.asarray(rng.integers(3, config.vocab_size, (b, n, t)), jnp.int32)
  mask = jnp.asarray(np.arange(t) < rng.integers(t // 2, t + 1, (b, n, 1)))             # right pad
  weights = jnp.asarray(rng.normal(size=(b, n)), jnp.float32)

  if spec["path"] == "full":
    fn = logprobs.completion_log_probs_full
  elif spec["path"] == "hidden":   # the floor: the model without any vocab projection
    fn = hidden_only
  else:
    fn = lambda *a: logprobs.completion_log_probs(*a, chunk_size=spec["chunk"])  # noqa: E731
  logp = lambda q: fn(config, q, prompt, prompt_mask, tokens, mask)  # noqa: E731
  step = jax.jit(jax.value_and_grad(lambda q: jnp.sum(weights * logp(q))))

  jax.block_until_ready(params)
  rss_base = rss_now_gb()
  start = time.perf_counter()
  compiled = step.lower(params).compile()
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  loss, grads = compiled(params)
  jax.block_until_ready(grads)
  times, cpu_times = [], []
  for _ in range(spec["repeats"]):
    start, cpu_start = time.perf_counter(), time.process_time()
    jax.block_until_ready(compiled(params))
    times.append(time.perf_counter() - start)
    cpu_times.append(time.process_time() - cpu_start)
  grad_norm = float(jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads))))
  return {"time_s": statistics.median(times), "cpu_s": statistics.median(cpu_times),
          "compile_s": compile_s,
          "temp_gb": mem.temp_size_in_bytes / 2**30 if mem else float("nan"),
          "rss_gb": rss_peak_gb() - rss_base, "loss": float(loss), "grad_norm": grad_norm}


def run_child(spec: dict) -> dict:
  out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], check=True,
                       capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny_gemma3 only, a smoke run")
  parser.add_argument("--case", action="append", default=None,
                      help="preset:rows:tokens (repeatable); default " + " ".join(CASES))
  parser.add_argument("--chunks", default="", help="chunk sizes to time (default: the module's)")
  parser.add_argument("--prompt-len", type=int, default=PROMPT_LEN)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--skip-full", action="store_true")
  parser.add_argument("--floor", action="store_true",
                      help="also time the model to its final hidden states, no vocab projection")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(child(json.loads(args.child))))
    return
  cases = args.case or (QUICK_CASES if args.quick else CASES)
  chunks = [int(c) for c in args.chunks.split(",") if c] or [None]
  print(f"load {os.getloadavg()[0]:.1f}; prompt {args.prompt_len} tokens; value_and_grad of "
        "Σ w·log π(y|x), bf16 compute, f32 params; median of "
        f"{args.repeats} after a warm-up", flush=True)
  print(f"{'preset':<12} {'rows x T':>9} {'path':<14} | {'step s':>7} {'CPU s':>6} "
        f"{'compile s':>9} {'temp GB':>8} {'RSS GB':>7} | {'loss':>12} {'|grad|':>10} | "
        "speedup (CPU)  temp ratio", flush=True)
  for case in cases:
    preset, rows, tokens = case.split(":")
    base = dict(preset=preset, rows=int(rows), tokens=int(tokens), prompt_len=args.prompt_len,
                repeats=args.repeats)
    full = None if args.skip_full else run_child({**base, "path": "full", "chunk": None})
    runs = [("full", full)] if full else []
    if args.floor:
      runs.append(("hidden only", run_child({**base, "path": "hidden", "chunk": None})))
    runs += [(f"chunked {c or 'dflt'}", run_child({**base, "path": "chunked", "chunk": c}))
             for c in chunks]
    for name, r in runs:
      ratio = (f"{full['time_s'] / r['time_s']:5.2f}x ({full['cpu_s'] / r['cpu_s']:4.2f}x)  "
               f"{full['temp_gb'] / r['temp_gb']:6.1f}x"
               if full and name.startswith("chunked") else "")
      print(f"{preset:<12} {rows + ' x ' + tokens:>9} {name:<14} | {r['time_s']:7.3f} "
            f"{r['cpu_s']:6.2f} {r['compile_s']:9.1f} {r['temp_gb']:8.3f} {r['rss_gb']:7.2f} | "
            f"{r['loss']:12.5g} {r['grad_norm']:10.5g} | {ratio}", flush=True)


if __name__ == "__main__":
  main()
