"""Baselines on the exact toy harness (BOND §5 / BoNBoN §5), one per variant:

  reinforce_0.001 | reinforce_0.01 | reinforce_0.1 | reinforce_1
      REINFORCE with KL penalty β_RL (the BOND paper's sweep), RLOO baseline over 2 samples;
  dpo | ipo
      DPO / IPO on best-vs-worst-of-8 pairs of π_ref with β = β*_8 = 0.0275482094;
  sft
      SFT on the best of 8 (forward-KL BOND on a fixed dataset).

Select with `--config=configs/toy_baselines.py:reinforce_0.01`.
"""

from configs import default

REINFORCE_BETAS = ("0.001", "0.01", "0.1", "1")
VARIANTS = tuple(f"reinforce_{b}" for b in REINFORCE_BETAS) + ("dpo", "ipo", "sft")


def get_config(arg=None):
  if arg not in VARIANTS:
    raise ValueError(f"configs/toy_baselines.py needs a variant, one of {list(VARIANTS)}, "
                     f"got {arg!r} (e.g. --config=configs/toy_baselines.py:dpo)")
  c = default.get_config()
  c.bond.anchor = "fixed"          # every baseline is measured against π_ref
  if arg.startswith("reinforce_"):
    c.bond.objective = "reinforce"
    c.bond.beta_rl = float(arg.removeprefix("reinforce_"))
    c.bond.num_policy_samples = 2
  else:
    c.bond.objective = arg
    c.bond.n = 8
    c.bond.beta_ipo = 0.0275482094
  default.toy_schedule(c)
  return c
