"""Iterative BOND (BOND Algorithm 1, §4) on the exact toy harness.

Each phase distils Best-of-2 of the current anchor with the Jeffreys objective (β = 0.5), and the
anchor is hard-swapped to the policy every `bond.swap_every` steps: after M phases the policy
approaches Best-of-2^M of π_ref without ever sampling a large N.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.bond.objective = "bond_jeffreys"
  c.bond.n = 2
  c.bond.k = 4
  c.bond.num_policy_samples = 2
  c.bond.beta = 0.5
  c.bond.anchor = "swap"
  c.bond.swap_every = 40
  c.data.batch_size = 64
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 10
  c.train.num_steps = 200
  c.train.log_every = 10
  c.train.checkpoint_every = 40
  c.eval.every = 10
  return c
