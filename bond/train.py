"""The training loop: build state, jit the step with shardings, log, evaluate, checkpoint, resume.

Everything stateful lives here (and in `checkpoint.py`/`data.py`); the maths is in pure modules.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from bond import bon
from bond import checkpoint as ckpt_lib
from bond import config as config_lib
from bond import data as data_lib
from bond import evaluate
from bond import sharding
from bond import steps
from bond import toy
from bond.models import gemma, presets

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class Experiment:
  """Everything a run needs besides the TrainState."""

  model_config: gemma.GemmaConfig
  params: Any
  table: data_lib.Table
  reward_fn: Callable | None
  task: toy.ToyTask | None = None
  tokenizer: Any = None


def _model_dtypes(config) -> dict:
  return dict(dtype=DTYPES[config.model.dtype], param_dtype=DTYPES[config.model.param_dtype],
              remat=config.model.remat)


def load_model(config, task: toy.ToyTask | None):
  """(GemmaConfig, params) from config.model: toy size, a preset, an HF dir or a GGUF file."""
  mc = config.model
  if mc.checkpoint:
    from bond.models import convert
    path = mc.checkpoint
    if path == "gemma3_270m":
      from bond import assets
      path = assets.gemma3_270m_gguf_path()
    model_config, params = (convert.from_gguf(path) if path.endswith(".gguf")
                            else convert.from_hf(path))
    model_config = model_config.replace(**_model_dtypes(config))
    dtype = model_config.param_dtype
    return model_config, jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
  if mc.preset == "toy":
    if task is None:
      raise ValueError("model.preset='toy' needs data.source='toy'")
    model_config = toy.model_config(task, **_model_dtypes(config))
    return model_config, toy.init_policy(task, jax.random.PRNGKey(mc.init_seed), model_config)
  else:
    model_config = presets.get(mc.preset, **_model_dtypes(config))
  return model_config, gemma.init_params(model_config, jax.random.PRNGKey(mc.init_seed))


def make_task(config) -> toy.ToyTask:
  t = config.task
  task = toy.make_task(num_prompts=t.num_prompts, num_content_tokens=t.num_content_tokens,
                       completion_len=t.completion_len, use_eos=t.use_eos,
                       length_bonus=t.length_bonus, seed=t.seed)
  if t.reward_transform == "exp3":   # a strictly increasing transform (invariance checks)
    task = dataclasses.replace(task, rewards=np.exp(3.0 * task.rewards).astype(np.float32))
  return task


def toy_pairs(task: toy.ToyTask, ref_log_probs: np.ndarray, n: int, num_pairs: int,
              seed: int) -> data_lib.Table:
  """Best- and worst-of-n pairs drawn exactly from π_ref on the toy task (BoNBoN/DPO/IPO data)."""
  rng = np.random.default_rng(seed)
  p = task.num_prompts
  prompt_idx = np.arange(num_pairs) % p
  probs = np.exp(np.asarray(ref_log_probs, np.float64))
  probs /= probs.sum(-1, keepdims=True)
  draws = np.stack([rng.choice(task.num_completions, size=n, p=probs[i]) for i in prompt_idx])
  rewards = task.rewards[prompt_idx[:, None], draws]                        # [num_pairs, n]
  best, worst = bon.select_best_worst(rewards)
  best = draws[np.arange(num_pairs), np.asarray(best)]
  worst = draws[np.arange(num_pairs), np.asarray(worst)]
  return data_lib.Table({
      "prompt_tokens": task.prompts[prompt_idx], "prompt_mask": np.ones_like(task.prompts[prompt_idx], bool),
      "chosen_tokens": task.completions[best], "chosen_mask": task.completion_mask[best],
      "rejected_tokens": task.completions[worst], "rejected_mask": task.completion_mask[worst]})


def build(config) -> Experiment:
  """Model, data table and reward function from a validated config."""
  task = make_task(config) if config.data.source == "toy" else None
  model_config, params = load_model(config, task)
  if task is not None:
    reward_fn = toy.reward_fn(task)
    if config.bond.objective in steps.OFFLINE:
      ref_lp = toy.policy_log_probs(model_config, params, task)
      table = toy_pairs(task, ref_lp, config.bond.n, num_pairs=1024, seed=config.data.shuffle_seed)
    else:
      table = data_lib.Table({"prompt_tokens": task.prompts,
                              "prompt_mask": np.ones(task.prompts.shape, bool)})
    return Experiment(model_config, params, table, reward_fn, task=task)
  from bond import rewards as rewards_lib
  from bond import tokenizer as tokenizer_lib
  tok = tokenizer_lib.load(config.tokenizer.path or config.model.checkpoint
                           if config.model.checkpoint != "gemma3_270m" else _gguf_path())
  dc = config.data
  if dc.source == "pairs_jsonl":
    table = data_lib.pairs_table(data_lib.read_jsonl(dc.path), tok, dc.max_prompt_len,
                                 config.sampling.max_new_tokens)
  else:
    texts = (data_lib.jsonl_prompts(dc.path, dc.prompt_key) if dc.source == "jsonl" else
             data_lib.tfds_prompts(dc.tfds_name, dc.tfds_split, dc.prompt_key, dc.tfds_data_dir))
    table = data_lib.prompt_table(texts, tok, dc.max_prompt_len, dc.prompt_template)
  reward_fn = rewards_lib.from_config(config.reward, tokenizer=tok, policy_config=model_config)
  return Experiment(model_config, params, table, reward_fn, tokenizer=tok)


def _gguf_path() -> str:
  from bond import assets
  return assets.gemma3_270m_gguf_path()


class _Preempted:
  """SIGTERM sets a flag; the loop checkpoints and exits cleanly at the next step boundary."""

  def __init__(self):
    self.flag = False
    self._old = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.flag = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._old)


class NonFiniteError(FloatingPointError):
  pass


def _to_float(tree) -> dict:
  return {k: float(v) for k, v in jax.device_get(tree).items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) the experiment in `workdir`; returns the last logged metrics."""
  config_lib.validate(config)
  exp = build(config)
  mc, tc = exp.model_config, config.train
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  optimizer = steps.make_optimizer(config.optim)

  param_sh = sharding.param_shardings(mc, mesh)
  params = jax.device_put(exp.params, param_sh)
  state = steps.init_state(params, optimizer, tc.seed)
  abstract = jax.eval_shape(lambda s: s, state)
  opt_sh = optax.tree_map_params(optimizer, lambda _, s: s, abstract.opt_state, param_sh,
                                 transform_non_params=lambda _: sharding.replicated(mesh))
  state_sh = steps.TrainState(step=sharding.replicated(mesh), params=param_sh, opt_state=opt_sh,
                              anchor_params=param_sh, ref_params=param_sh,
                              rng=sharding.replicated(mesh))
  state = jax.device_put(state, state_sh)

  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), tc.keep_checkpoints)
  start = 0
  if checkpointer.latest_step() is not None:
    state, meta = checkpointer.restore(state)
    start = int(meta["data_step"])
    if is_main:
      print(f"resumed from step {start} in {workdir}")

  train_step = steps.make_train_step(config, mc, exp.reward_fn, optimizer)
  batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in exp.table.columns.items()}
  jit_step = jax.jit(train_step, in_shardings=(state_sh, batch_sh),
                     out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)

  exact_fn = None
  if exp.task is not None:
    task = exp.task
    ref_lp = toy.policy_log_probs(mc, exp.params, task)
    n_target = config.bond.n if config.bond.objective not in ("jbond", "reinforce") else None
    if config.bond.anchor != "fixed":
      n_target = None
    exact_fn = jax.jit(lambda p: toy.exact_metrics(task, toy.policy_log_probs(mc, p, task),
                                                   ref_lp, n=n_target))

  metrics_path = os.path.join(workdir, "metrics.jsonl")
  writer = None
  if is_main:
    from tensorboardX import SummaryWriter
    writer = SummaryWriter(os.path.join(workdir, "tb"))
    if start == 0 and os.path.exists(metrics_path):
      os.remove(metrics_path)
    _truncate_metrics(metrics_path, start)
  preempt = _Preempted()
  last: dict = {}
  try:
    from tqdm import tqdm
    bar = tqdm(range(start, tc.num_steps), initial=start, total=tc.num_steps, disable=not is_main,
               dynamic_ncols=True)
    t0 = time.time()
    for step in bar:
      local = data_lib.get_batch(exp.table, step, config.data.batch_size, config.data.shuffle_seed,
                                 jax.process_index(), jax.process_count())
      batch = sharding.to_global_batch(local, mesh)
      new_state, metrics = jit_step(state, batch)
      done = step + 1
      if done % tc.log_every == 0 or done == tc.num_steps or preempt.flag:
        record = {"step": done, **_to_float(metrics)}
        bad = [k for k in ("loss", "grads/global_norm") if not math.isfinite(record[k])]
        if bad:
          raise NonFiniteError(f"non-finite {bad} at step {done}: {record}; the last good "
                               f"checkpoint in {workdir}/checkpoints is left intact")
        if exact_fn is not None and (done % config.eval.every == 0 or done == tc.num_steps):
          record.update(_to_float(exact_fn(new_state.params)))
        record["time/elapsed_s"] = time.time() - t0
        last = record
        if is_main:
          with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
          for k, v in record.items():
            writer.add_scalar(k, v, done)
          bar.set_postfix({k.split("/")[-1]: f"{record[k]:.3g}" for k in
                           ("loss", "reward/mean", "exact/reward", "exact/effective_n")
                           if k in record})
      state = new_state
      if done % tc.checkpoint_every == 0 or done == tc.num_steps or preempt.flag:
        checkpointer.save(done, state, {"data_step": done, "config": config.to_json()})
      if preempt.flag:
        if is_main:
          print(f"SIGTERM: checkpoint written at step {done}; exiting")
        break
  finally:
    preempt.restore()
    checkpointer.close()
    if writer is not None:
      writer.close()

  if is_main and not preempt.flag:
    _finish(config, workdir, exp, state, metrics_path)
  return last


def _truncate_metrics(path: str, step: int) -> None:
  """On resume, drop records logged after the restored step (they will be recomputed)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
  with open(path, "w") as f:
    f.writelines(keep)


def _finish(config, workdir: str, exp: Experiment, state, metrics_path: str) -> None:
  records = []
  if os.path.exists(metrics_path):
    with open(metrics_path) as f:
      records = [json.loads(line) for line in f if line.strip()]
  curve = None
  if exp.task is not None:
    ref_lp = toy.policy_log_probs(exp.model_config, jax.device_get(state.ref_params), exp.task)
    curve = evaluate.bon_curve(ref_lp, jnp.asarray(exp.task.rewards))
  plots = evaluate.plot_run(records, os.path.join(workdir, "plots"), curve)
  print(f"metrics: {metrics_path}")
  print("plots: " + ", ".join(plots))
  if config.train.export_hf:
    from bond.models import convert
    out = os.path.join(workdir, "hf")
    convert.to_hf(exp.model_config, jax.device_get(state.params), out)
    print(f"HF export: {out}")
