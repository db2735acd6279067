"""BoNBoN on the real Gemma 3 270M: offline best-vs-worst-of-8 VADER pairs of π_0 itself.

α = 0.005, β*_8 = 0.0275482094. The pairs are read from `data/pairs/gemma3_270m_bon8.jsonl` in
the repository (not shipped: made from the model itself). Make them first (8 samples for each of
the 40 prompts of `gemma3_270m_jbond.py`, scored by VADER, best and worst kept), then train:

  python -m bond.main --config=configs/gemma3_270m_jbond.py --config.bond.n=8 \\
      --mode=bon --out=data/pairs/gemma3_270m_bon8.jsonl
  python -m bond.main --config=configs/gemma3_270m_bonbon.py --workdir=/tmp/g270_bonbon

Without the file, start-up fails with that command. Pairs elsewhere: `--config.data.path=PATH`.
"""

import os

from configs import gemma3_270m_jbond

PAIRS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "data", "pairs", "gemma3_270m_bon8.jsonl")


def get_config():
  c = gemma3_270m_jbond.get_config()
  c.data.source = "pairs_jsonl"
  c.data.path = PAIRS
  c.bond.objective = "bonbon"
  c.bond.anchor = "fixed"
  c.bond.n = 8
  c.bond.alpha = 0.005
  c.bond.beta_ipo = 0.0275482094
  return c
