"""BOND (§3) on the exact toy harness: distil Best-of-4 of the fixed reference policy.

Variants, selected as `--config=configs/toy_bond.py:VARIANT`:
  fwd       forward KL(π_BoN ‖ π): SFT on the best of N anchor samples (mode covering);
  bwd       backward KL(π ‖ π_BoN): policy gradient with reward (N−1)·log p̂≤ and an RLOO baseline;
  jeffreys  (default) (1−β)·fwd + β·bwd with the paper's β = 0.5.
N = 4, p̂≤ estimated from k = 4 anchor samples (clipped at 1/(k+1)), anchor = π_ref (fixed).
The exact metrics measure KL to π_BoN(N=4) itself.
"""

from configs import default

VARIANTS = {"fwd": "bond_fwd", "bwd": "bond_bwd", "jeffreys": "bond_jeffreys"}


def get_config(arg=None):
  variant = arg or "jeffreys"
  if variant not in VARIANTS:
    raise ValueError(f"configs/toy_bond.py variant must be one of {list(VARIANTS)}, got {arg!r}")
  c = default.get_config()
  c.bond.objective = VARIANTS[variant]
  c.bond.n = 4
  c.bond.k = 4
  c.bond.num_policy_samples = 2
  c.bond.beta = 0.5
  c.bond.anchor = "fixed"
  default.toy_schedule(c)
  return c
