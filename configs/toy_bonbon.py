"""BoNBoN (Gui et al. 2024, §4) on the exact toy harness: offline best-vs-worst-of-8 pairs.

L = α·L_SFT(best) + (1−α)·L_IPO(best vs worst; β*_8), with the authors' α = 0.005 and
β*_8 = 1 / (2·7·H_7) = 0.0275482094 (`bond.bon.beta_star(8)`). Pairs are drawn exactly from π_ref
on the toy task. The reward has a length bonus and completions may end early (eos), so response
length is the off-target attribute the paper tracks.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.bond.objective = "bonbon"
  c.bond.anchor = "fixed"
  c.bond.n = 8
  c.bond.alpha = 0.005
  c.bond.beta_ipo = 0.0275482094
  c.task.use_eos = True
  c.task.length_bonus = 0.25
  default.toy_schedule(c)
  return c
