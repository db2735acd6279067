"""The default job: J-BOND (BOND Algorithm 2) on the exact toy harness with a tiny Gemma.

2 anchor samples + 1 policy sample per prompt, EMA anchor. Finishes in a few minutes on 2 CPU
cores and logs exact reward, KL, win rate and effective N against the exact Best-of-N curve.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.bond.objective = "jbond"
  c.bond.anchor = "ema"
  c.bond.eta = 0.05
  c.bond.beta = 0.5
  c.bond.gamma = 0.0
  default.toy_schedule(c)
  return c
