"""J-BOND (BOND Algorithm 2, §6) on a Gemma policy with the paper's hyperparameters.

Batch 128 prompts, Adam with lr 3e-6 after 100 linear warm-up steps, Jeffreys β = 0.5, EMA
anchor η = 0.02, 2 anchor samples + 1 policy sample per prompt, J-BOND reward −log 16 when the
policy sample loses to both anchor samples. γ (KL to the anchor) is 0 here.

Placeholders to set: `model.checkpoint` (HF Gemma directory, the SFT policy π_ref),
`reward.checkpoint` (RM directory) and `data.path` (JSONL prompts, one {"prompt": ...} a line).
"""

from configs import default


def get_config():
  c = default.get_config()
  c.model.preset = "gemma_7b"
  c.model.checkpoint = "/path/to/gemma-7b-sft-hf"
  c.model.dtype = "bfloat16"
  c.model.remat = True
  c.reward.kind = "model"
  c.reward.checkpoint = "/path/to/gemma-rm"
  c.data.source = "jsonl"
  c.data.path = "/path/to/prompts.jsonl"
  c.data.max_prompt_len = 512
  c.data.batch_size = 128
  c.sampling.max_new_tokens = 256
  c.sampling.temperature = 1.0
  c.bond.objective = "jbond"
  c.bond.anchor = "ema"
  c.bond.beta = 0.5
  c.bond.eta = 0.02
  c.bond.gamma = 0.0
  c.optim.lr = 3e-6
  c.optim.warmup_steps = 100
  c.train.num_steps = 5000
  c.train.log_every = 10
  c.train.checkpoint_every = 500
  c.eval.every = 100
  return c
