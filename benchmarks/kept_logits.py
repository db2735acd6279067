"""J-BOND's update jit with the vocabulary logits kept for the backward against recomputed.

`model.logprob_keep_mb` (bond/logprobs.py `keeps_logits`): under autodiff the chunked log-probs'
forward keeps its [rows, V] f32 logits for the backward while they fit in that many MiB, so the
backward does not run the vocabulary matmul again; 0 recomputes them chunk by chunk (the code
before session 30). The update is `benchmarks/train_step.py`'s (J-BOND loss on the policy's
sample and the best anchor sample, Adam, EMA anchor; f32 params, bf16 compute) on one rollout
drawn once; the two jits are alternated call by call, and each call's result is checked to be
the other's bit for bit. Prints best and median ms of each, their ratios, and XLA's temporaries.

  python benchmarks/kept_logits.py [REPEATS]                 # gemma3_35m, 16 prompts x (16 + 32)
  python benchmarks/kept_logits.py [REPEATS] --gguf          # the real Gemma 3 270M, 4 x (12 + 32)
  python benchmarks/kept_logits.py [REPEATS] --gguf --lora   # the same, LoRA rank 8 on a bf16 base
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import train_step as ts  # noqa: E402
from bond import logprobs, lora as lora_lib, rollout as rl, steps  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("repeats", type=int, nargs="?", default=8, help="calls of each jit")
  parser.add_argument("--gguf", action="store_true", help="the real Gemma 3 270M (GGUF)")
  parser.add_argument("--lora", action="store_true",
                      help="LoRA rank 8 on every projection, bf16 frozen base (as "
                           "configs/gemma3_270m_jbond_lora.py)")
  parser.add_argument("--keep-mb", type=float, default=None,
                      help="the kept side's budget (default: bond's, model.logprob_keep_mb)")
  args = parser.parse_args()
  preset, mc, params, batch, reward_fn = ts.jbond_setup(args.gguf)
  b, p, t = *batch["prompt_tokens"].shape, 32
  configs = {}
  for name in ("recomputed", "kept"):
    config = ts.jbond_config(preset, t)
    if args.lora:
      config.model.lora.update(rank=8, alpha=16.0, targets="attn,mlp", base_dtype="bfloat16")
    if name == "recomputed":
      config.model.logprob_keep_mb = 0
    elif args.keep_mb is not None:
      config.model.logprob_keep_mb = args.keep_mb
    configs[name] = config
  keep_mb = configs["kept"].model.logprob_keep_mb
  rows = b * 2 * t
  print(f"{preset}{' LoRA r 8' if args.lora else ''}: {b} prompts x ({p} + {t}), {rows} graded "
        f"rows x V {mc.vocab_size}: {rows * mc.vocab_size * 4 / 2**20:.0f} MiB of f32 logits; "
        f"budget {keep_mb:g} MiB -> kept: {logprobs.keeps_logits(rows, mc.vocab_size, keep_mb)}")
  opt = steps.make_optimizer(configs["kept"].optim)
  spec = lora_lib.spec_from_config(configs["kept"], mc)
  state = steps.init_state(params, opt, seed=0, lora=spec)
  rollout = jax.jit(lambda s, bt: rl.make_rollout_fn(configs["kept"], mc, reward_fn)(
      s, bt, None, False))(state, batch)
  fns = {k: jax.jit(steps.make_update_fn(c, mc, opt)) for k, c in configs.items()}
  for k, f in fns.items():
    compiled = f.lower(state, rollout).compile()
    print(f"{k}: XLA temporaries {compiled.memory_analysis().temp_size_in_bytes / 2**20:.0f} MiB, "
          f"{compiled.as_text().count(' dot(')} dots in the program")
  # The two updates: the params' steps (new - old) and the loss, compared.
  steps_of = lambda out: [np.asarray(n, np.float64) - np.asarray(o, np.float64)  # noqa: E731
                          for n, o in zip(jax.tree.leaves(out[0].params),
                                          jax.tree.leaves(state.params))]
  out = fns["kept"](state, rollout)
  kept_steps, kept_loss = steps_of(out), float(out[1]["loss"])
  out = fns["recomputed"](state, rollout)
  rec_steps, rec_loss = steps_of(out), float(out[1]["loss"])
  del out
  diff = max(float(np.abs(a - b_).max()) for a, b_ in zip(kept_steps, rec_steps))
  scale = max(float(np.abs(b_).max()) for b_ in rec_steps)
  equal = all(np.array_equal(a, b_) for a, b_ in zip(kept_steps, rec_steps))
  print(f"loss {kept_loss!r} vs {rec_loss!r}; params' step bit for bit equal: {equal}, max |diff| "
        f"{diff:.3g} of a largest step {scale:.3g}")
  del kept_steps, rec_steps
  # Timed as bond/train.py runs the update: donated, each side stepping its own copy of the state
  # (a fresh output state per call would time this VM's first touch of gigabytes instead).
  donated = {k: jax.jit(steps.make_update_fn(c, mc, opt), donate_argnums=0)
             for k, c in configs.items()}
  states = {"recomputed": jax.tree.map(jnp.copy, state), "kept": state}
  del state, params, fns

  def step(k):
    states[k] = jax.block_until_ready(donated[k](states[k], rollout))[0]
  for k in donated:          # the first donated call touches its output buffers for the first time
    step(k)
  res = ts.alternated({k: lambda k=k: step(k) for k in donated}, args.repeats)
  ts.print_alternated(res, "update jit, logits ", "recomputed", "kept")

if __name__ == "__main__":
  main()
