"""BOND (§3, §5) on XSum summarization with a Gemma policy and a Gemma reward model.

Prompts: the TFDS `xsum` train split through `tfds.data_source` (no TensorFlow), field
`document`, formatted as "Summarize:\\n{document}\\n". Objective: Jeffreys BOND with the paper's
β = 0.5 against Best-of-N of the fixed reference policy (N = 8 here), p̂≤ from k = 16 reference
samples per prompt; N and k are this file's defaults, not the paper's sweep.

Set the two checkpoints before running (they are placeholders):
  --config.model.checkpoint=/path/to/gemma-2b-hf      an HF Gemma directory (the policy, π_ref)
  --config.reward.checkpoint=/path/to/gemma-2b-rm     an RM directory (`--mode=train_rm`, or an
                                                      HF Gemma *ForSequenceClassification dir)
TFDS must have prepared `xsum` under `data.tfds_data_dir` (`tfds build xsum`).
"""

from configs import default


def get_config():
  c = default.get_config()
  c.model.preset = "gemma_2b"
  c.model.checkpoint = "/path/to/gemma-2b-hf"
  c.model.dtype = "bfloat16"
  c.reward.kind = "model"
  c.reward.checkpoint = "/path/to/gemma-2b-rm"
  c.data.source = "tfds"
  c.data.tfds_name = "xsum"
  c.data.tfds_split = "train"
  c.data.prompt_key = "document"
  c.data.prompt_template = "Summarize:\n{}\n"
  c.data.prompt_truncation = "keep_start"   # articles: keep the lead, drop the tail
  c.data.max_prompt_len = 1024
  c.data.batch_size = 128
  c.sampling.max_new_tokens = 64
  c.sampling.temperature = 1.0
  c.bond.objective = "bond_jeffreys"
  c.bond.n = 8
  c.bond.k = 16
  c.bond.num_policy_samples = 2
  c.bond.beta = 0.5
  c.bond.anchor = "fixed"
  c.optim.lr = 3e-6
  c.optim.warmup_steps = 100
  c.train.num_steps = 5000
  c.train.log_every = 10
  c.train.checkpoint_every = 500
  c.eval.every = 100
  return c
