"""Where the J-BOND fwd+bwd's time goes: every XLA:CPU thunk of the compiled program, by kind.

The same fwd+bwd as `benchmarks/train_step.py` times (J-BOND loss on a rollout of 2 anchor + 1
policy sample per prompt; f32 params, bf16 compute), traced with XLA:CPU's TraceMe annotations
(`--xla_cpu_enable_xprof_traceme=true`, set here) under `jax.profiler.trace`. Printed per call:
the thread-time of each kind of thunk (YNNPACK dot fusions, elementwise fusions by their name
stem), the largest single thunks with their HLO shapes, and how busy each XLA thread was against
the call's wall time. A busy fraction well under 100% means one thread waits while the other runs
a single-threaded fusion on the critical path.

  python benchmarks/fwd_bwd_profile.py                  # gemma3_35m, 16 prompts x 16 + 32 tokens
  python benchmarks/fwd_bwd_profile.py --gguf           # real Gemma 3 270M, 4 prompts x 12 + 32
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

_FLAG = "--xla_cpu_enable_xprof_traceme=true"
_SKIP = ("ThunkExecutor", "$", "SlinkyThreadPool", "end: ", "PjitFunction",
         "CommonPjRtLoadedExecutable", "ParseArguments")


def thunk_table(trace_path: str, calls: int, hlo: str, top: int) -> collections.Counter:
  """Prints the thunk kinds and the largest thunks per call; returns each thread's busy time
  (microseconds over all calls)."""
  events = json.load(gzip.open(trace_path))["traceEvents"]
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  leaves = [e for e in events if e.get("ph") == "X" and not e["name"].startswith(_SKIP)]
  kinds, counts, single, busy = (collections.Counter() for _ in range(4))
  for e in leaves:
    kind = re.sub(r"\.\d+$", "", e["name"])
    kinds[kind] += e["dur"]
    counts[kind] += 1
    single[e["name"]] += e["dur"]
    busy[threads.get((e["pid"], e["tid"]), str(e["tid"]))] += e["dur"]
  ms = lambda us: us / 1e3 / calls  # noqa: E731
  print(f"\nthunk thread-time per call: {ms(sum(kinds.values())):.1f} ms")
  print(f"{'kind':<32} {'ms':>8} {'thunks':>7}")
  for kind, us in kinds.most_common(top):
    print(f"{kind:<32} {ms(us):8.1f} {counts[kind] // calls:7d}")
  shapes = {}
  for line in hlo.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ", line)
    if m:
      shapes[m.group(1)] = m.group(2)
  print("\nlargest thunks (ms per call, result shape):")
  for name, us in single.most_common(top):
    print(f"  {ms(us):6.1f}  {name:<28} {shapes.get(name, '')}")
  return busy


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="gemma3_35m")
  parser.add_argument("--gguf", action="store_true", help="the real Gemma 3 270M (GGUF)")
  parser.add_argument("--calls", type=int, default=3, help="traced calls")
  parser.add_argument("--top", type=int, default=12, help="rows of each table")
  args = parser.parse_args()
  from bond import hugepages       # bond's malloc setting, as train_step.py and the CLI run
  hugepages.maybe_reexec(True)
  if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

  import jax
  import jax.numpy as jnp
  import numpy as np

  import sampler      # benchmarks/sampler.py
  import train_step   # benchmarks/train_step.py
  from bond import rewards, rollout as rollout_lib, steps
  from bond.models import convert, gemma, presets

  if args.gguf:
    from bond import assets
    mc, params = convert.from_gguf(assets.gemma3_270m_gguf_path())
    mc = mc.replace(dtype=jnp.bfloat16, param_dtype=jnp.float32)
    b, p = 4, 12
  else:
    mc = presets.get(args.preset, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    params = gemma.init_params(mc.replace(dtype=jnp.float32), jax.random.key(0))
    b, p = 16, 16
  t = 32
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  mc = mc.replace(eos_id=-1)            # every row has t new tokens, as in train_step.py
  config = train_step.jbond_config(args.preset, t)
  tokens, _ = sampler.prompts(mc, b, p)
  reward_fn = rewards.bag_of_tokens_reward(train_step.reward_weights(mc.vocab_size))
  optimizer = steps.make_optimizer(config.optim)
  batch = {"prompt_tokens": jnp.asarray(tokens), "prompt_mask": jnp.ones(tokens.shape, bool)}
  state = steps.init_state(params, optimizer, seed=0)
  rollout_fn = rollout_lib.make_rollout_fn(config, mc, reward_fn)
  rollout = jax.jit(lambda s, x: rollout_fn(s, x, None, False))(state, batch)
  grad_fn = jax.jit(jax.value_and_grad(steps.make_loss_fn(config, mc), has_aux=True))
  block = lambda tree: jax.tree.map(lambda x: x.block_until_ready(), tree)  # noqa: E731
  hlo = grad_fn.lower(state.params, rollout).compile().as_text()
  block(grad_fn(state.params, rollout))
  walls = []
  for _ in range(5):
    start = time.perf_counter()
    block(grad_fn(state.params, rollout))
    walls.append(time.perf_counter() - start)
  wall = float(np.median(walls))
  n_params = sum(x.size for x in jax.tree.leaves(params))
  print(f"{'Gemma 3 270M (GGUF)' if args.gguf else args.preset}: {n_params / 1e6:.1f}M params, "
        f"{b} prompts x ({p} + {t}) tokens; fwd+bwd untraced: best {min(walls) * 1e3:.1f} ms, "
        f"median {wall * 1e3:.1f} ms (5 calls); load average {os.getloadavg()[0]:.2f}")
  with tempfile.TemporaryDirectory() as out:
    with jax.profiler.trace(out, create_perfetto_trace=True):
      start = time.perf_counter()
      for _ in range(args.calls):
        block(grad_fn(state.params, rollout))
      traced = (time.perf_counter() - start) / args.calls
    path, = glob.glob(os.path.join(out, "**", "perfetto_trace.json.gz"), recursive=True)
    busy = thunk_table(path, args.calls, hlo, args.top)
  print(f"\nthreads, busy ms per call against the traced call's wall time {traced * 1e3:.1f} ms:")
  for name, us in busy.most_common():
    if us / 1e3 / args.calls >= 1.0:
      print(f"  {name:<44} {us / 1e3 / args.calls:7.1f} ms  {us / 1e6 / args.calls / traced:5.0%}")


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  main()
