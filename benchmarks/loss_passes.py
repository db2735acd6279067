"""A loss's sample sets in one teacher-forced pass vs a pass per set (`objectives._pass`).

J-BOND's loss scores two sets per prompt (the best of 2 anchor samples and the policy sample).
Where the vocabulary projection is chunked, `steps.make_loss_fn` joins them into one pass (the
tied embedding is streamed once instead of once per set); the baseline here is the same jitted
value_and_grad with `objectives._pass` patched to a pass per set. Same params, same rollout (one
J-BOND rollout of the bond side of benchmarks/train_step.py), f32 params, bf16 compute; calls
alternate between the two programs so a busy spell of the host slows both. Prints the median and
best per side, and the per-pair ratio.

  python benchmarks/loss_passes.py            # gemma3_35m, 16 prompts x (16 + 32) tokens
  python benchmarks/loss_passes.py --gguf     # real Gemma 3 270M, 4 prompts x (12 + 32) tokens
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--gguf", action="store_true", help="the real Gemma 3 270M (GGUF)")
  parser.add_argument("--calls", type=int, default=6, help="timed calls per side")
  parser.add_argument("--malloc-hugepages", choices=("on", "off"), default="on",
                      help="glibc huge pages and freed memory kept, as `python -m bond.main` "
                           "does for full fine-tuning (bond/hugepages.py)")
  args = parser.parse_args()
  from bond import hugepages
  hugepages.maybe_reexec(args.malloc_hugepages == "on")

  import jax
  import jax.numpy as jnp

  from bond import assets, defaults, objectives, rewards, rollout as rollout_lib, steps
  from bond.models import convert, gemma, presets

  if args.gguf:
    mc, params = convert.from_gguf(assets.gemma3_270m_gguf_path())
    b, p, t = 4, 12, 32
  else:
    mc = presets.get("gemma3_35m", dtype=jnp.bfloat16, param_dtype=jnp.float32)
    params = gemma.init_params(mc.replace(dtype=jnp.float32), jax.random.key(0))
    b, p, t = 16, 16, 32
  mc = mc.replace(dtype=jnp.bfloat16, param_dtype=jnp.float32, eos_id=-1)
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  config = defaults.get_config()
  config.bond.objective, config.bond.anchor = "jbond", "ema"
  config.sampling.max_new_tokens = t
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(2, 1000, size=(b, p)).astype(np.int32))
  weights = jnp.asarray(rng.normal(size=(mc.vocab_size,)).astype(np.float32))
  batch = {"prompt_tokens": tokens, "prompt_mask": jnp.ones(tokens.shape, bool)}
  optimizer = steps.make_optimizer(config.optim)
  state = steps.init_state(params, optimizer, seed=0)
  rollout_fn = rollout_lib.make_rollout_fn(config, mc, rewards.bag_of_tokens_reward(weights))
  rollout = jax.block_until_ready(
      jax.jit(lambda s, b: rollout_fn(s, b, None, False))(state, batch))
  loss_fn = steps.make_loss_fn(config, mc)

  one = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  joined = one.lower(state.params, rollout).compile()
  real_pass = objectives._pass
  objectives._pass = lambda params, logp, *samples: [logp(params, s) for s in samples]
  try:
    per_set = jax.jit(jax.value_and_grad(loss_fn, has_aux=True)).lower(
        state.params, rollout).compile()
  finally:
    objectives._pass = real_pass

  def timed(fn):
    start = time.perf_counter()
    jax.block_until_ready(fn(state.params, rollout))
    return time.perf_counter() - start

  (l1, _), _ = joined(state.params, rollout)
  (l2, _), _ = per_set(state.params, rollout)
  timed(joined), timed(per_set)
  pairs = [(timed(joined), timed(per_set)) for _ in range(args.calls)]
  name = "Gemma 3 270M" if args.gguf else "gemma3_35m"
  print(f"{name}: J-BOND loss fwd+bwd, {b} prompts x 2 sets x ({p} + {t}) tokens, vocab "
        f"{mc.vocab_size} in chunks of {config.model.logprob_chunk}; loss {float(l1):.6f} "
        f"(one pass) vs {float(l2):.6f} (per set); {hugepages.status()}")
  for label, i in (("one pass", 0), ("a pass per set", 1)):
    ms = [x[i] * 1e3 for x in pairs]
    print(f"  {label:<15} median {statistics.median(ms):8.1f} ms   best {min(ms):8.1f} ms   "
          f"calls {', '.join(f'{m:.0f}' for m in ms)}")
  ratio = statistics.median(b / a for a, b in pairs)
  print(f"per set / one pass, per-pair median: {ratio:.2f}x")


if __name__ == "__main__":
  main()
