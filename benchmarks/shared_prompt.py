"""Teacher-forced log-probs with each prompt run once (packed rows) vs once per sample.

`bond.logprobs.completion_log_probs(..., share_prompt=True)` (the default, `model.share_prompt`)
runs the B rows [x; y_1; ...; y_N] (each completion attends to its prompt and itself only:
`Gemma.apply(segments=(P, N))`) instead of the B·N rows [x; y_n]. For each (prompts, prompt length, samples, new tokens) shape this times, on the same params
and samples, the fwd+bwd of Σ log-probs (what a loss's update pass runs) and the no-grad pass (a
rollout's or the held-out evaluation's scoring), packed against separate rows, calls alternated so
a busy spell of the host slows both; f32 params, bf16 compute, vocabulary chunks of 8192. Prints
medians, per-pair ratios and the largest log-prob difference between the layouts.

  python benchmarks/shared_prompt.py            # gemma3_35m
  python benchmarks/shared_prompt.py --gguf     # the real Gemma 3 270M (random samples)
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

SHAPES_35M = ((16, 16, 2, 32), (16, 64, 2, 32), (8, 64, 4, 32), (4, 16, 16, 32))
# 270M: benchmarks/train_step.py's J-BOND update, configs/gemma3_270m_jbond.py's (prompts of up
# to 32 tokens, 12 new) and its held-out scoring (16 reference samples, 2 prompts a call).
SHAPES_270M = ((4, 12, 2, 32), (4, 32, 2, 12), (2, 32, 16, 12), (2, 12, 8, 32))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--gguf", action="store_true", help="the real Gemma 3 270M (GGUF)")
  parser.add_argument("--calls", type=int, default=5, help="timed calls per side and pass")
  parser.add_argument("--shapes", default="",
                      help="B:P:N:T,... (default: four per model, the J-BOND update's first)")
  args = parser.parse_args()

  import jax
  import jax.numpy as jnp

  from bond import assets, logprobs
  from bond.models import convert, gemma, presets

  if args.gguf:
    mc, params = convert.from_gguf(assets.gemma3_270m_gguf_path())
    shapes, name = SHAPES_270M, "Gemma 3 270M"
  else:
    mc = presets.get("gemma3_35m", dtype=jnp.float32, param_dtype=jnp.float32)
    params = gemma.init_params(mc, jax.random.key(0))
    shapes, name = SHAPES_35M, "gemma3_35m"
  if args.shapes:
    shapes = [tuple(int(v) for v in s.split(":")) for s in args.shapes.split(",")]
  mc = mc.replace(dtype=jnp.bfloat16, param_dtype=jnp.float32)
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  print(f"{name}, f32 params, bf16 compute; packed = each prompt once with its N samples behind it")

  for b, p, n, t in shapes:
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(2, 1000, (b, p)).astype(np.int32))
    prompt_mask = jnp.asarray(np.arange(p)[None] >= rng.integers(0, 3, (b, 1)))
    tokens = jnp.asarray(rng.integers(2, 1000, (b, n, t)).astype(np.int32))
    mask = jnp.asarray(np.arange(t)[None, None] < rng.integers(t // 2, t + 1, (b, n, 1)))

    def lp(prm, share):
      return logprobs.completion_log_probs(mc, prm, prompt, prompt_mask, tokens, mask,
                                           share_prompt=share)
    programs = {}
    for share in (True, False):
      programs["grad", share] = jax.jit(jax.value_and_grad(
          lambda prm, share=share: jnp.sum(lp(prm, share)))).lower(params).compile()
      programs["nograd", share] = jax.jit(
          lambda prm, share=share: lp(prm, share)).lower(params).compile()
    diff = float(jnp.max(jnp.abs(programs["nograd", True](params)
                                 - programs["nograd", False](params))))

    def timed(key):
      start = time.perf_counter()
      jax.block_until_ready(programs[key](params))
      return time.perf_counter() - start

    print(f"{b} prompts x {n} samples, {p} + {t} tokens (max |log-prob difference| {diff:.3g}):")
    for kind in ("grad", "nograd"):
      timed((kind, True)), timed((kind, False))
      pairs = [(timed((kind, True)), timed((kind, False))) for _ in range(args.calls)]
      packed = statistics.median(a for a, _ in pairs) * 1e3
      rows = statistics.median(r for _, r in pairs) * 1e3
      ratio = statistics.median(r / a for a, r in pairs)
      label = "fwd+bwd" if kind == "grad" else "no-grad"
      print(f"  {label:<8} packed {packed:8.1f} ms   separate rows {rows:8.1f} ms   "
            f"rows / packed per pair {ratio:.2f}x")


if __name__ == "__main__":
  main()
