"""The non-training modes of `bond.main`: sample, bon (best/worst-of-N dataset) and train_rm.

Each builds the configured experiment (`train.build`: model, prompt or pair data, tokenizer,
reward) and runs one pass over it; like `train.py` this is shell, not maths.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import ml_collections
import numpy as np

from bond import bon
from bond import rewards
from bond import sampling
from bond import train


def _sampling_kw(config: ml_collections.ConfigDict) -> dict:
  sc = config.sampling
  return dict(max_new_tokens=sc.max_new_tokens, temperature=sc.temperature, top_k=sc.top_k,
              top_p=sc.top_p)


def sample(config: ml_collections.ConfigDict, prompts: Sequence[str]) -> list:
  """Prints and returns `eval.num_samples` completions [B][N] of each prompt.

  `prompts` are texts; none means the first `eval.num_samples` prompts of the configured data.
  Text models return strings (`sampling.generate_text`); the toy task, which has no text,
  returns token-id lists of its own prompts.
  """
  exp = train.build(config)
  rng = jax.random.PRNGKey(config.train.seed)
  kw = dict(_sampling_kw(config), num_samples=config.eval.num_samples)
  prompt_tokens = exp.table.columns["prompt_tokens"][:config.eval.num_samples]
  prompt_mask = exp.table.columns["prompt_mask"][:config.eval.num_samples]
  if exp.tokenizer is None:
    if prompts:
      raise ValueError("the toy task has no text: drop --prompt to sample its own prompts")
    out = sampling.sample(exp.model_config, exp.params, prompt_tokens, prompt_mask, rng, **kw)
    shown = [t[m].tolist() for t, m in zip(prompt_tokens, prompt_mask)]
    completions = [[row[m].tolist() for row, m in zip(rows, masks)]
                   for rows, masks in zip(np.asarray(out.tokens), np.asarray(out.mask))]
  else:
    shown = list(prompts) or [exp.tokenizer.decode(t[m])
                              for t, m in zip(prompt_tokens, prompt_mask)]
    completions = sampling.generate_text(exp.model_config, exp.params, exp.tokenizer, shown, rng,
                                         **kw)
  for prompt, outs in zip(shown, completions):
    print(f"=== {prompt!r}")
    for i, completion in enumerate(outs):
      print(f"  [{i}] {completion!r}")
  return completions


def write_bon(config: ml_collections.ConfigDict, out_path: str) -> int:
  """Writes best-and-worst-of-N records {prompt, best, worst, rewards} for every prompt.

  N = `bond.n` samples per prompt from the configured model with `config.sampling`, scored by the
  configured reward (BoNBoN's offline data; `data.source='pairs_jsonl'` reads it back). Text is
  decoded (eos dropped); the toy task writes token-id lists. Returns the number of records.
  """
  exp = train.build(config)
  n, mc = config.bond.n, exp.model_config
  kw = _sampling_kw(config)

  # The params are an argument, not a closed-over constant: XLA would otherwise embed (and
  # constant-fold through) the whole model in the program.
  @jax.jit
  def step(params, pt, pm, rng):
    def draw(prompt_tokens, prompt_mask, rng, num_samples):
      return sampling.sample_fn(mc, params, prompt_tokens, prompt_mask, rng,
                                num_samples=num_samples, **kw)
    return bon.best_of_n(draw, exp.reward_fn, pt, pm, rng, n)

  decode = None if exp.tokenizer is None else (
      lambda ids: exp.tokenizer.decode(ids, stop_at_eos=True))
  tokens, mask = exp.table.columns["prompt_tokens"], exp.table.columns["prompt_mask"]
  rng = jax.random.PRNGKey(config.train.seed)
  records = []
  for start in range(0, len(tokens), config.data.batch_size):
    pt, pm = (x[start:start + config.data.batch_size] for x in (tokens, mask))
    result = step(exp.params, pt, pm, jax.random.fold_in(rng, start))
    records += bon.bon_records(jax.device_get(result), pt, pm, decode)
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  count = bon.write_bon_dataset(out_path, records)
  print(f"best/worst-of-{n} dataset ({count} prompts): {out_path}")
  return count


def train_rm(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Bradley–Terry reward model on the configured preference pairs; returns its directory.

  Backbone: the configured model (checkpoint or preset); Adam with `optim.lr` for
  `train.num_steps` steps of `data.batch_size` pairs. Writes `workdir/rm`
  (`rewards.save_reward_model`) and `workdir/rm_metrics.jsonl` (loss every `train.log_every`
  steps, final pairwise accuracy on up to 512 training pairs).
  """
  exp = train.build(config)
  cols = exp.table.columns
  if "chosen_tokens" not in cols:
    raise ValueError("--mode=train_rm needs preference pairs: data.source='pairs_jsonl' (or the "
                     "toy task with an offline bond.objective)")
  mc = exp.model_config
  params = rewards.init_reward_model(mc, jax.random.PRNGKey(config.model.init_seed),
                                     backbone=exp.params)
  batch_size = min(config.data.batch_size, len(exp.table))
  params, losses = rewards.train_reward_model(
      mc, params, cols, jax.random.PRNGKey(config.train.seed), steps=config.train.num_steps,
      batch_size=batch_size, learning_rate=config.optim.lr)
  head = {k: v[:512] for k, v in cols.items()}
  accuracy = float(rewards.pairwise_accuracy(*rewards.pair_rewards(mc, params, head)))
  losses = np.asarray(losses)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "rm_metrics.jsonl"), "w") as f:
    for step in range(config.train.log_every, len(losses) + 1, config.train.log_every):
      f.write(json.dumps({"step": step, "rm/loss": float(losses[step - 1])}) + "\n")
    f.write(json.dumps({"step": len(losses), "rm/train_accuracy": accuracy}) + "\n")
  out = os.path.join(workdir, "rm")
  rewards.save_reward_model(mc, params, out)
  print(f"reward model: {out} (final loss {losses[-1]:.4f}, train pair accuracy {accuracy:.3f})")
  return out
