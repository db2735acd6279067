"""J-BOND's rollout jit with `bond.anchor_logp='decode'` against `'pass'`, in one process.

'decode': the anchor's sampling loop scores the policy's sample as forced rows beside its own two
samples; 'pass': a teacher-forced pass of the anchor over the policy's sample after sampling. The
rollout is `benchmarks/train_step.py`'s (2 anchor + 1 policy samples per prompt, 32 new tokens,
bag-of-tokens reward, a step not logged), the two jits alternated call by call; prints best and
median ms of each and their ratios (pass / decode).

  python benchmarks/anchor_logp.py [REPEATS]           # gemma3_35m, 16 prompts x 16 tokens
  python benchmarks/anchor_logp.py [REPEATS] --gguf    # the real Gemma 3 270M, 4 x 12
"""
import os
import argparse
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jax  # noqa: E402

import train_step as ts  # noqa: E402
from bond import rollout as rl, steps  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("repeats", type=int, nargs="?", default=8, help="calls of each jit")
  parser.add_argument("--gguf", action="store_true", help="the real Gemma 3 270M (GGUF)")
  args = parser.parse_args()
  preset, mc, params, batch, reward_fn = ts.jbond_setup(args.gguf)
  fns = {}
  for mode in ("decode", "pass"):
    config = ts.jbond_config(preset, 32, mode)
    fn = rl.make_rollout_fn(config, mc, reward_fn)
    fns[mode] = jax.jit(lambda s, bt, fn=fn: fn(s, bt, None, False))
  opt = steps.make_optimizer(config.optim)
  state = steps.init_state(params, opt, seed=0)
  for f in fns.values():
    jax.block_until_ready(f(state, batch))
  res = ts.alternated({k: lambda f=f: jax.block_until_ready(f(state, batch))
                       for k, f in fns.items()}, args.repeats)
  ts.print_alternated(res, f"{preset} rollout jit, anchor_logp=", "pass", "decode")

if __name__ == "__main__":
  main()
