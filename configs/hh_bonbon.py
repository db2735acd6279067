"""BoNBoN (Gui et al. 2024) on Anthropic HH single-turn prompts: offline best/worst-of-8 pairs.

L = α·L_SFT(best) + (1−α)·L_IPO(best vs worst; β*_8) with the authors' α = 0.005 and
β*_8 = 0.0275482094; batch 64, 20k steps, as in their public code. The pairs come from the
reference policy at temperature 1 and are made with the BoN mode on a prompt config, e.g.

  python -m bond.main --config=configs/gemma_jbond.py --config.data.path=hh_prompts.jsonl \\
      --config.bond.n=8 --mode=bon --out=/data/hh_bon8.jsonl

Placeholders to set: `model.checkpoint` (π_0, HF Gemma directory) and `data.path`.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.model.preset = "gemma_2b"
  c.model.checkpoint = "/path/to/gemma-2b-sft-hf"
  c.model.dtype = "bfloat16"
  c.data.source = "pairs_jsonl"
  c.data.path = "/path/to/hh_bon8.jsonl"
  c.data.max_prompt_len = 256
  c.data.batch_size = 64
  c.reward.kind = "length"          # only logged: offline objectives do not sample
  c.sampling.max_new_tokens = 256   # completion length of the pairs
  c.bond.objective = "bonbon"
  c.bond.anchor = "fixed"
  c.bond.n = 8
  c.bond.alpha = 0.005
  c.bond.beta_ipo = 0.0275482094
  c.optim.lr = 5e-7
  c.optim.warmup_steps = 150
  c.train.num_steps = 20000
  c.train.log_every = 50
  c.train.checkpoint_every = 1000
  c.eval.every = 1000
  return c
