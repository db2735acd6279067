"""Reward-model training (`--mode=train_rm`): Bradley–Terry, −log σ(r(x, y_w) − r(x, y_l)).

The RM is the configured Gemma (`model.checkpoint`, or a preset with random init) as backbone with
a scalar head on the last real token. It trains with Adam (`optim.lr`) for `train.num_steps`
steps of `data.batch_size` pairs from `data.path` ({prompt, chosen, rejected} or {prompt, best,
worst} lines, e.g. the output of `--mode=bon`), and writes `WORKDIR/rm`: an HF Gemma directory
plus `reward_head.safetensors`, which `reward.kind='model'` with `reward.checkpoint=WORKDIR/rm`
loads.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.model.preset = "gemma_2b"
  c.model.checkpoint = "/path/to/gemma-2b-hf"
  c.data.source = "pairs_jsonl"
  c.data.path = "/path/to/preference_pairs.jsonl"
  c.data.max_prompt_len = 512
  c.data.batch_size = 64
  c.reward.kind = "length"          # unused by train_rm; declared so the config validates
  c.sampling.max_new_tokens = 256   # completion length of the pairs
  c.bond.objective = "sft"          # unused by train_rm
  c.bond.anchor = "fixed"
  c.optim.lr = 1e-5
  c.train.num_steps = 2000
  c.train.log_every = 50
  c.train.checkpoint_every = 2000
  return c
