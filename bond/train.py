"""The training loop: build state, jit the step with shardings, log, evaluate, checkpoint, resume.

Everything stateful lives here (and in `checkpoint.py`/`data.py`); the maths is in pure modules.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import importlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from bond import aot
from bond import bon
from bond import checkpoint as ckpt_lib
from bond import config as config_lib
from bond import data as data_lib
from bond import evaluate
from bond import heldout
from bond import lora as lora_lib
from bond import objectives
from bond import rollout as rollout_lib
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
  eval_prompts: dict[str, np.ndarray] | None = None   # held-out [E, P] (eval.sampled)
  base_id: dict | None = None    # LoRA: the frozen base's identity (checkpoint meta "base")


def _model_dtypes(config) -> dict:
  return dict(dtype=DTYPES[config.model.dtype], param_dtype=DTYPES[config.model.param_dtype],
              remat=config.model.remat, scan_layers=config.model.scan_layers)


def _checkpoint_path(checkpoint: str) -> str:
  """model.checkpoint as a path: 'gemma3_270m' is the installed GGUF asset's file."""
  if checkpoint == "gemma3_270m":
    from bond import assets
    return assets.gemma3_270m_gguf_path()
  return checkpoint


def load_model(config, task: toy.ToyTask | None):
  """(GemmaConfig, params) from config.model: toy size, a preset, an HF dir or a GGUF file."""
  mc = config.model
  if mc.checkpoint:
    from bond.models import convert
    path = _checkpoint_path(mc.checkpoint)
    dtypes = _model_dtypes(config)
    load = convert.from_gguf if path.endswith(".gguf") else convert.from_hf
    model_config, params = load(path, dtype=dtypes["dtype"], param_dtype=dtypes["param_dtype"])
    model_config = model_config.replace(**dtypes)
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


def build(config, held_out: bool = False) -> Experiment:
  """Model, data table and reward function from a validated config.

  held_out: also split off the held-out evaluation prompts (`eval_prompts`; on text data they
  leave the training table). Training and `--mode=eval` do when `eval.sampled`; the sample,
  bon and train_rm modes see the whole table.
  """
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
    eval_prompts = None
    if held_out:
      table, eval_prompts = heldout.held_out_split(config, table, task=task)
    return Experiment(model_config, params, table, reward_fn, task=task, eval_prompts=eval_prompts)
  from bond import rewards as rewards_lib
  from bond import tokenizer as tokenizer_lib
  tok_path = config.tokenizer.path or _checkpoint_path(config.model.checkpoint)
  if not tok_path:
    raise ValueError("tokenizer.path must be set when model.checkpoint is empty and "
                     f"data.source={config.data.source!r} (text data needs a tokenizer)")
  tok = tokenizer_lib.load(tok_path)
  dc = config.data
  if dc.source == "pairs_jsonl":
    table = data_lib.pairs_table(data_lib.read_jsonl(dc.path), tok, dc.max_prompt_len,
                                 config.sampling.max_new_tokens)
  else:
    texts = (data_lib.jsonl_prompts(dc.path, dc.prompt_key) if dc.source == "jsonl" else
             data_lib.tfds_prompts(dc.tfds_name, dc.tfds_split, dc.prompt_key, dc.tfds_data_dir))
    table = data_lib.prompt_table(texts, tok, dc.max_prompt_len, dc.prompt_template,
                                  dc.prompt_truncation)
  eval_prompts = None
  if held_out:   # before any training row is used: the held-out slice is never trained on
    table, eval_prompts = heldout.held_out_split(config, table, tokenizer=tok)
  reward_fn = rewards_lib.from_config(config.reward, tokenizer=tok, policy_config=model_config,
                                      max_prompt_len=dc.max_prompt_len,
                                      max_completion_len=config.sampling.max_new_tokens)
  return Experiment(model_config, params, table, reward_fn, tokenizer=tok,
                    eval_prompts=eval_prompts)


class _Preemption:
  """SIGTERM (a preemption notice) -> checkpoint at the next step boundary, then a clean return.

  One process: a Python SIGTERM handler sets a flag. Several: all must save the same step, so
  JAX's preemption service (started by `jax.distributed.initialize`, it catches SIGTERM on any
  host) agrees on one; `reached` must then be called at every step by every process.
  """

  def __init__(self):
    self.multiprocess = jax.process_count() > 1
    self.flag = False
    if not self.multiprocess:
      self._old = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.flag = True

  def reached(self, step: int) -> bool:
    if self.multiprocess:
      self.flag = self.flag or multihost_utils.reached_preemption_sync_point(step)
    return self.flag

  def restore(self):
    if not self.multiprocess:
      signal.signal(signal.SIGTERM, self._old)


class NonFiniteError(FloatingPointError):
  """The loss or a global norm became NaN/inf; that state is never saved."""


GUARDED = ("loss", "grads/global_norm", "params/global_norm")


def _guarded(update_fn):
  """`update_fn` that also returns one on-device flag: are all GUARDED metrics finite."""

  def step(state, rollout):
    state, metrics = update_fn(state, rollout)
    return state, metrics, jnp.all(jnp.isfinite(jnp.stack([metrics[k] for k in GUARDED])))

  return step


def _host_reward(config, exp: Experiment):
  """The reward's numpy scorer when the rollout can run it between two jits (online objective,
  one process, a host-side reward such as VADER), else None."""
  host = getattr(exp.reward_fn, "host", None)
  online = not objectives.get_objective(config.bond.objective).offline
  return host if online and jax.process_count() == 1 else None


def _program_dir(config) -> str | None:
  """Where the loop's compiled programs are kept (bond/aot.py): `bond_programs` in JAX's
  persistent compilation cache directory when one is set (the CLI sets train.compilation_cache)
  and train.program_cache is on; else None."""
  cache_dir = jax.config.jax_compilation_cache_dir
  if not (config.train.program_cache and cache_dir):
    return None
  return os.path.join(os.path.expanduser(cache_dir), "bond_programs")


def _program_cache(config) -> tuple[aot.ProgramCache | None, str]:
  """(the run's `aot.ProgramCache` or None, its key), its stored programs already loading.

  The key is a function of the config, the files it names (the model's checkpoint included), the
  bond source and the installation (`aot.fingerprint`): so are the state's and the batch's
  shapes and shardings. A stored program whose arguments differ anyway is traced again (aot).
  Loading starts here, before the model loads, so that the two overlap.
  """
  directory = _program_dir(config)
  if not directory or jax.process_count() > 1:
    return None, ""
  files = []
  if config.model.checkpoint:   # an asset name is no path: key the file it names
    try:
      files.append(_checkpoint_path(config.model.checkpoint))
    except ImportError:   # load_model reports it
      pass
  cache = aot.ProgramCache(directory)
  key = aot.fingerprint(config, files=files)
  cache.prefetch(key, ("sample", "rollout", "finish", "update"))
  return cache, key


def _programs(config, mc, exp: Experiment, state, abstract_batch, state_sh, batch_sh, mesh,
              optimizer, cache: aot.ProgramCache | None = None, key: str = ""):
  """The loop's compiled stages: (rollout(state, batch), update program, programs to compile
  ahead with their abstract arguments).

  Two jitted stages (design.md): rollout (sampling, rewards, no-grad log-probs), then update.
  With a host reward on one process the rollout is two jits with the reward between them
  (`rollout.Stages`): no jit has a host callback, so every program can be stored. Each is an
  `aot.Program`: given a `cache` (`_program_cache`) a rerun of the config loads it instead of
  tracing it, and the abstract evaluations that only tracing needs are skipped too.
  """
  rep = sharding.replicated(mesh)
  with_sh = lambda tree, sh: jax.tree.map(   # noqa: E731
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s,
                                        weak_type=getattr(x, "weak_type", False)), tree, sh)
  abstract_state = with_sh(state, state_sh)
  batch_args = with_sh(abstract_batch, batch_sh)
  rollout_fn = rollout_lib.make_rollout_fn(config, mc, exp.reward_fn)
  update_fn = steps.make_update_fn(config, mc, optimizer)

  batch_sharded = lambda tree: jax.tree.map(   # noqa: E731
      lambda x: sharding.batch_sharding(mesh, x.ndim), tree)
  abstract_rollout = functools.cache(lambda: jax.eval_shape(rollout_fn, abstract_state,
                                                            batch_args))
  rollout_sh = functools.cache(lambda: batch_sharded(abstract_rollout()))

  def logged_rollout(state, batch):
    # Metric-only passes (π_ref on J-BOND's policy samples) run on the steps that are logged.
    return rollout_fn(state, batch, None, _logged(state.step + 1, config))

  program = lambda name, make: aot.Program(name, make, cache, key)   # noqa: E731
  update = program("update", lambda: jax.jit(
      _guarded(update_fn), in_shardings=(state_sh, rollout_sh()),
      out_shardings=(state_sh, rep, rep), donate_argnums=0))
  ahead = []
  host = _host_reward(config, exp)
  if host is None:
    jit_rollout = program("rollout", lambda: jax.jit(
        logged_rollout, in_shardings=(state_sh, batch_sh), out_shardings=rollout_sh()))
  else:
    stages = rollout_lib.make_rollout_stages(config, mc, exp.reward_fn)

    abstract_samples = functools.cache(lambda: jax.eval_shape(stages.sample, abstract_state,
                                                              batch_args))
    samples_sh = functools.cache(lambda: batch_sharded(abstract_samples()))

    sample = program("sample", lambda: jax.jit(
        stages.sample, in_shardings=(state_sh, batch_sh), out_shardings=samples_sh()))
    r_sh = sharding.batch_sharding(mesh, 2)
    finish = program("finish", lambda: jax.jit(
        lambda state, batch, samples, r: stages.finish(state, batch, samples, r,
                                                       _logged(state.step + 1, config)),
        in_shardings=(state_sh, batch_sh, samples_sh(), r_sh), out_shardings=rollout_sh()))

    def finish_args():
      samples = with_sh(abstract_samples(), samples_sh())
      b, n = samples.tokens.shape[:2]
      return (abstract_state, batch_args, samples,
              jax.ShapeDtypeStruct((b, n), np.float32, sharding=r_sh))

    ahead.append((finish, finish_args))

    def jit_rollout(state, batch):
      samples = sample(state, batch)
      r = rollout_lib.score_samples(host, batch, samples).astype(np.float32)
      return finish(state, batch, samples, r)

  ahead.append((update, lambda: (abstract_state, with_sh(abstract_rollout(), rollout_sh()))))
  return jit_rollout, update, ahead


def _compile_ahead(programs) -> threading.Thread:
  """Starts compiling (or loading) each `(aot.Program, args)` on a thread, in order, and returns
  it; join it before the first call of the last one (calls reuse the executable).

  The update program is the largest: on a rerun, loading it takes seconds of C++ that run
  without the GIL, so it overlaps the first rollout instead of following it. An error here is
  dropped: the first call compiles again and raises it.
  """

  def compile_():
    for program, args in programs:
      try:
        program.compile(args)
      except Exception as e:   # pylint: disable=broad-except
        logging.info("compiling %s ahead failed (the first call will retry): %s", program.name, e)

  thread = threading.Thread(target=compile_, name="bond-compile-ahead", daemon=True)
  thread.start()
  return thread


def _logged(done, config):
  """Is the step that completes `done` steps logged (an int, or a traced int inside the rollout:
  both use this one rule): every train.log_every, every eval.every, and the last."""
  tc = config.train
  return (done % tc.log_every == 0) | (done % config.eval.every == 0) | (done == tc.num_steps)


def _check_finite(finite, step: int, checkpointer: ckpt_lib.Checkpointer) -> None:
  if not bool(finite):
    checkpointer.wait()
    raise NonFiniteError(
        f"{', '.join(GUARDED)}: not all finite after step {step}; stopping without saving it. "
        f"The last good checkpoint (step {checkpointer.latest_step()}) in "
        f"{checkpointer.directory} is intact. Lower optim.lr or set optim.grad_clip > 0.")


def _to_float(tree) -> dict:
  return {k: float(v) for k, v in jax.device_get(tree).items()}


def _is_local(path: epath.Path) -> bool:
  return "://" not in os.fspath(path)


class MetricsLog:
  """`workdir/metrics.jsonl`: one JSON object per log step (process 0 writes it).

  Opening it for a run that starts at `start` drops the records after `start` (the resumed run
  recomputes them) and a torn last line left by a killed writer. Object stores (gs://) cannot
  append, so there the whole file is rewritten at each record.
  """

  def __init__(self, path: epath.Path, start: int):
    self.path = path
    text = path.read_text() if path.exists() else ""
    complete = text[:text.rfind("\n") + 1]
    self.records = [r for r in map(json.loads, complete.splitlines()) if r["step"] <= start]
    self._rewrite()

  def append(self, record: dict) -> None:
    self.records.append(record)
    if _is_local(self.path):
      with self.path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    else:
      self._rewrite()

  def _rewrite(self) -> None:
    tmp = self.path.parent / (self.path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
    tmp.replace(self.path)


# Remote schemes tensorboardX writes to, and the package each needs.
_TB_SCHEMES = {"gs": "google.cloud.storage", "s3": "boto3"}


def _import_tensorboardx():
  """tensorboardX, imported without importing torch when nothing has yet (its writer imports
  torch only to accept torch tensors; that import is 1.5 s of a rerun's start)."""
  if "tensorboardX" in sys.modules or "torch" in sys.modules:
    return importlib.import_module("tensorboardX")
  sys.modules["torch"] = None   # `import torch` raises ImportError, which tensorboardX allows
  try:
    return importlib.import_module("tensorboardX")
  finally:
    del sys.modules["torch"]


def _summary_writer(logdir: epath.Path, start: int):
  """A tensorboardX writer that hides events at steps >= `start` left by an earlier attempt, or
  None (with a warning) when it cannot write `logdir`: metrics.jsonl has every record anyway."""
  SummaryWriter = _import_tensorboardx().SummaryWriter   # noqa: N806
  scheme = os.fspath(logdir).split("://")[0] if not _is_local(logdir) else None
  if scheme is not None:
    try:
      importlib.import_module(_TB_SCHEMES[scheme])
    except (KeyError, ImportError):
      logging.warning("no TensorBoard logs: tensorboardX cannot write %s (it writes %s with %s)",
                      logdir, ", ".join(f"{s}://" for s in _TB_SCHEMES),
                      ", ".join(_TB_SCHEMES.values()))
      return None
  return SummaryWriter(os.fspath(logdir), purge_step=start)


@contextlib.contextmanager
def _local_dir(dest: epath.Path) -> Iterator[str]:
  """A local directory whose files end up in `dest`: `dest` itself, or a temporary directory
  copied there on exit when `dest` is remote (matplotlib and safetensors write local files)."""
  if _is_local(dest):
    dest.mkdir(parents=True, exist_ok=True)
    yield os.fspath(dest)
    return
  with tempfile.TemporaryDirectory() as tmp:
    yield tmp
    dest.mkdir(parents=True, exist_ok=True)
    for name in sorted(os.listdir(tmp)):
      with open(os.path.join(tmp, name), "rb") as src, (dest / name).open("wb") as dst:
        shutil.copyfileobj(src, dst)


def _config_changes(saved_json: str, config: ml_collections.ConfigDict) -> list[str]:
  """'key: old -> new' for each config value that differs from the one saved in a checkpoint."""
  flat = config_lib._flat  # pylint: disable=protected-access
  old, new = (flat(ml_collections.ConfigDict(json.loads(c)))
              for c in (saved_json, config.to_json()))
  return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
          if old.get(k) != new.get(k)]


def _setup(config):
  """(experiment, mesh, optimizer, initial TrainState placed with its shardings, the shardings).

  With LoRA the state holds the frozen base (sharded like the params) and replicated adapters,
  and `exp.base_id` identifies the base. `exp.params` is dropped either way: the state holds
  the model (a full fine-tuning's `ref_params`, a LoRA base), and the loaded copy would stay
  alive for the whole run (1.07 GB of f32 on the Gemma 3 270M).
  """
  exp = build(config, held_out=config.eval.sampled)
  spec = lora_lib.spec_from_config(config, exp.model_config)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  optimizer = steps.make_optimizer(config.optim)
  param_sh = sharding.param_shardings(exp.model_config, mesh)
  if spec is not None:
    exp.base_id = {"model": config.model.checkpoint or
                   f"preset={config.model.preset} init_seed={config.model.init_seed}",
                   "fingerprint": lora_lib.fingerprint(exp.params)}
  params = jax.device_put(exp.params, param_sh)
  state = steps.init_state(params, optimizer, config.train.seed, lora=spec)
  del params
  exp.params = None
  state_sh = state_shardings(state, optimizer, mesh, param_sh)
  return exp, mesh, optimizer, jax.device_put(state, state_sh), state_sh


def state_shardings(state: steps.TrainState, optimizer, mesh, param_sh) -> steps.TrainState:
  """The shardings of a TrainState: model params (and a LoRA base) follow `param_sh`, the
  optimizer state follows what it tracks, LoRA adapters and scalars are replicated."""
  rep = sharding.replicated(mesh)
  abstract = jax.eval_shape(lambda s: s, state)
  if state.lora is None:
    trained_sh = ref_sh = param_sh
  else:
    trained_sh = jax.tree.map(lambda _: rep, abstract.params)
    ref_sh = lora_lib.base_shardings(abstract.ref_params, param_sh, rep)
  opt_sh = optax.tree_map_params(optimizer, lambda _, s: s, abstract.opt_state, trained_sh,
                                 transform_non_params=lambda _: rep)
  return steps.TrainState(step=rep, params=trained_sh, opt_state=opt_sh, anchor_params=trained_sh,
                          ref_params=ref_sh, rng=rep, lora=state.lora)


def _saved(state: steps.TrainState) -> dict:
  """What a checkpoint holds: the whole state, or with LoRA everything but the frozen base."""
  fields = ("step", "params", "opt_state", "anchor_params", "rng")
  if state.lora is None:
    fields += ("ref_params",)
  return {f: getattr(state, f) for f in fields}


def _restore(checkpointer: ckpt_lib.Checkpointer, state: steps.TrainState, step: int,
             base_id: dict | None) -> tuple[steps.TrainState, dict]:
  """Restores `step` into `state`; with LoRA, first checks the checkpoint's base is this one."""
  saved_base = checkpointer.meta(step).get("base")
  if base_id != saved_base:
    raise ValueError(
        f"checkpoint step {step} in {checkpointer.directory} was trained on base "
        f"{(saved_base or {}).get('model', 'none (full fine-tuning)')!r} "
        f"(fingerprint {(saved_base or {}).get('fingerprint', '-')[:12]}), this run's is "
        f"{(base_id or {}).get('model', 'none (full fine-tuning)')!r} "
        f"(fingerprint {(base_id or {}).get('fingerprint', '-')[:12]}): resume with the same "
        "model.checkpoint/preset and model.lora, or use a new workdir")
  restored, meta = checkpointer.restore(_saved(state), step)
  return state.replace(**restored), meta


def _meta(exp: Experiment, **meta) -> dict:
  return meta if exp.base_id is None else dict(meta, base=exp.base_id)


def _evaluator(config, exp: Experiment, state, workdir: epath.Path):
  """The held-out evaluator with its reference cache (workdir/eval/reference.npz), or None."""
  if not config.eval.sampled:
    return None
  if jax.process_count() > 1:
    logging.warning("eval.sampled: the held-out evaluation runs in single-process jobs only; "
                    "skipped in this %d-process run", jax.process_count())
    return None
  evaluator = heldout.Evaluator(config, exp.model_config, exp.reward_fn, exp.eval_prompts,
                                exp.tokenizer)
  evaluator.load_or_draw_cache(state.reference(), workdir / "eval")
  return evaluator


def _evaluate(evaluator, config, state, step: int, workdir: epath.Path, writer) -> dict:
  """eval/* metrics at `step`; the sample table goes to workdir/samples and TensorBoard."""
  metrics, records = evaluator(state.policy(), state.reference(), heldout.eval_rng(config, step))
  if jax.process_index() == 0:
    heldout.write_samples(workdir / "samples", step, records)
    if writer is not None:
      writer.add_text("eval/samples", "\n\n".join(
          f"**prompt** {r['prompt']}  \n**reference** ({r['reference_reward']:.3g}) "
          f"{r['reference']}  \n**policy** ({r['policy_reward']:.3g}) {r['policy']}"
          for r in records), step)
  return metrics


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) the experiment in `workdir` (a local path or e.g. gs://); returns the last
  logged metrics.

  A workdir holding a complete checkpoint resumes from it. The batch of a step, every PRNG key
  (state.rng folded with the step) and the exact metrics are functions of (config, state, step),
  so a resumed run logs exactly what an uninterrupted one does. SIGTERM checkpoints at the next
  step boundary and returns normally (`bond.main` exits 0; rerun the same command to continue).
  A non-finite loss or norm raises `NonFiniteError` (checked every step, one step late so the
  device never waits) before that state can be saved.
  """
  config_lib.validate(config)
  programs, key = _program_cache(config)
  exp, mesh, optimizer, state, state_sh = _setup(config)
  mc, tc = exp.model_config, config.train

  is_main = jax.process_index() == 0
  workdir = epath.Path(workdir)
  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
  checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", tc.keep_checkpoints)
  start = 0
  if (latest := checkpointer.latest_step()) is not None:
    saved_config = checkpointer.meta(latest)["config"]
    if is_main:  # printed before restoring, which fails if the model or optimizer changed
      for change in _config_changes(saved_config, config):
        print(f"config differs from the checkpoint's: {change}")
    state, meta = _restore(checkpointer, state, latest, exp.base_id)
    start = int(meta["data_step"])
    if is_main:
      print(f"resumed from step {start} in {workdir}")

  t_cache = time.time()
  evaluator = _evaluator(config, exp, state, workdir)
  if evaluator is not None and is_main:
    print(f"held-out evaluation: {config.eval.num_prompts} prompts, reference cache of "
          f"{config.eval.ref_samples} samples each ready in {time.time() - t_cache:.1f} s")

  batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in exp.table.columns.items()}
  abstract_batch = {k: jax.ShapeDtypeStruct((config.data.batch_size,) + v.shape[1:], v.dtype)
                    for k, v in exp.table.columns.items()}
  jit_rollout, jit_update, ahead = _programs(config, mc, exp, state, abstract_batch, state_sh,
                                             batch_sh, mesh, optimizer, programs, key)

  exact_fn = None
  if exp.task is not None:
    task = exp.task
    ref_lp = toy.policy_log_probs(mc, state.reference(), task)
    n_target = config.bond.n if config.bond.objective not in ("jbond", "reinforce") else None
    if config.bond.anchor != "fixed":
      n_target = None
    exact_fn = jax.jit(lambda p: toy.exact_metrics(task, toy.policy_log_probs(mc, p, task),
                                                   ref_lp, n=n_target))

  metrics_log = writer = None
  if is_main:
    metrics_log = MetricsLog(workdir / "metrics.jsonl", start)
    writer = _summary_writer(workdir / "tb", start)
  preemption = _Preemption()
  preempted = False
  last: dict = {}
  bar = tqdm.tqdm(range(start, tc.num_steps), initial=start, total=tc.num_steps,
                  disable=not is_main, dynamic_ncols=True)
  # The update (and a staged rollout's second jit) compile or load while the first rollout runs.
  update_ready = _compile_ahead(ahead) if start < tc.num_steps else None
  try:
    t0 = time.time()
    previous = None
    for step in bar:
      local = data_lib.get_batch(exp.table, step, config.data.batch_size, config.data.shuffle_seed,
                                 jax.process_index(), jax.process_count())
      rollout = jit_rollout(state, sharding.to_global_batch(local, mesh))
      if update_ready is not None:
        update_ready.join()
        update_ready = None
      state, metrics, finite = jit_update(state, rollout)
      done = step + 1
      if previous is not None:
        _check_finite(*previous, checkpointer)
      previous = (finite, done)
      preempted = preemption.reached(done)
      evaluate_now = done % config.eval.every == 0 or done == tc.num_steps
      log = bool(_logged(done, config))
      save = tc.checkpoint_every > 0 and (
          done % tc.checkpoint_every == 0 or done == tc.num_steps or preempted)
      if log or save:
        _check_finite(finite, done, checkpointer)
      if log:
        record = {"step": done, **_to_float(metrics)}
        if exact_fn is not None and evaluate_now:
          record.update(_to_float(exact_fn(state.policy())))
        if evaluator is not None and evaluate_now:
          t_eval = time.time()
          record.update(_evaluate(evaluator, config, state, done, workdir, writer))
          record["time/eval_s"] = time.time() - t_eval
        record["time/elapsed_s"] = time.time() - t0
        last = record
        if is_main:
          _publish(record, metrics_log, writer, bar)
      if save:
        checkpointer.save(done, _saved(state),
                          _meta(exp, data_step=done, config=config.to_json()))
      if preempted:
        if is_main:
          print(f"SIGTERM: checkpoint written at step {done}; exiting" if save else
                f"SIGTERM: stopped at step {done}; train.checkpoint_every=0, so no checkpoint")
        break
  finally:
    bar.close()
    preemption.restore()
    checkpointer.close()
    if writer is not None:
      writer.close()

  if not preempted:
    # Params may be sharded across hosts: every process joins this gather (a collective), then
    # only process 0 writes. Only what `_finish` reads is gathered.
    host = multihost_utils.process_allgather(
        {"ref": state.reference() if exp.task is not None else None,
         "params": state.policy() if config.train.export_hf else None,
         "adapters": state.params if config.train.export_adapters else None}, tiled=True)
    if is_main:
      points = None if evaluator is None else evaluator.reference_points()
      _finish(config, workdir, exp, host["ref"], host["params"], metrics_log.records, points)
      if config.train.export_adapters:
        with _local_dir(workdir / "adapters") as out:
          lora_lib.save_adapters(state.lora, host["adapters"], out, exp.base_id)
        print(f"adapters: {workdir / 'adapters'}")
  return last


def _publish(record: dict, metrics_log: MetricsLog, writer, bar: tqdm.tqdm) -> None:
  """Process 0: one JSON line, TensorBoard scalars, the progress bar's summary."""
  metrics_log.append(record)
  if writer is not None:
    for k, v in record.items():
      writer.add_scalar(k, v, record["step"])
  bar.set_postfix({k.split("/")[-1]: f"{record[k]:.3g}" for k in
                   ("loss", "reward/mean", "exact/reward", "exact/effective_n") if k in record})


def _finish(config, workdir: epath.Path, exp: Experiment, ref_params, params,
            records: list[dict], points: dict | None = None) -> None:
  """Plots and HF export on process 0, from host-local (gathered) params. `points`: the sampled
  Best-of-N reference points (also written to workdir/eval/reference_points.json)."""
  curve = None
  if exp.task is not None:
    ref_lp = toy.policy_log_probs(exp.model_config, ref_params, exp.task)
    curve = evaluate.bon_curve(ref_lp, jnp.asarray(exp.task.rewards))
  if points is not None:
    (workdir / "eval").mkdir(parents=True, exist_ok=True)
    (workdir / "eval" / "reference_points.json").write_text(json.dumps(points))
  with _local_dir(workdir / "plots") as out:
    names = [os.path.basename(p) for p in evaluate.plot_run(records, out, curve, points)]
  print(f"metrics: {workdir / 'metrics.jsonl'}")
  print("plots: " + ", ".join(str(workdir / "plots" / name) for name in names))
  if config.train.export_hf:
    from bond.models import convert
    with _local_dir(workdir / "hf") as out:
      convert.to_hf(exp.model_config, params, out)
    print(f"HF export: {workdir / 'hf'}")


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        checkpoint: str = "") -> dict:
  """`--mode=eval`: the held-out evaluation (and the exact metrics on the toy task) of one policy.

  checkpoint: '' = the latest checkpoint in workdir/checkpoints; a checkpoint directory; or
  'none' = the config's model itself (e.g. an HF/GGUF model, or with eval.policy='bon:N' Best-of-N
  sampling of it). Writes workdir/eval/metrics.jsonl (one record per call), the sample table in
  workdir/samples/ and the plots in workdir/eval/plots/; returns the record.
  """
  config_lib.validate(config)
  if jax.process_count() > 1:
    raise ValueError("--mode=eval runs in a single process")
  workdir = epath.Path(workdir)
  checkpointer, step = None, 0
  if checkpoint != "none":   # found (or not) before any model is loaded
    directory = epath.Path(checkpoint) if checkpoint else workdir / "checkpoints"
    if not directory.exists():
      raise FileNotFoundError(f"--mode=eval: no checkpoint in {directory}: train there first, pass "
                              "--checkpoint=DIR, or --checkpoint=none for the config's model")
    checkpointer = ckpt_lib.Checkpointer(directory, config.train.keep_checkpoints)
    step = checkpointer.latest_step()
    if step is None:
      checkpointer.close()
      raise FileNotFoundError(f"--mode=eval: no complete checkpoint in {directory}")
  config = copy.deepcopy(config)
  config.eval.sampled = True
  exp, _, _, state, _ = _setup(config)
  if checkpointer is not None:
    state, _ = _restore(checkpointer, state, step, exp.base_id)
    checkpointer.close()
  evaluator = _evaluator(config, exp, state, workdir)
  record = {"step": step, "checkpoint": checkpoint or "latest",
            **_evaluate(evaluator, config, state, step, workdir, None)}
  if exp.task is not None:
    ref_lp = toy.policy_log_probs(exp.model_config, state.reference(), exp.task)
    record.update(_to_float(toy.exact_metrics(
        exp.task, toy.policy_log_probs(exp.model_config, state.policy(), exp.task), ref_lp,
        n=heldout.target_n(config))))
  points = evaluator.reference_points()
  (workdir / "eval").mkdir(parents=True, exist_ok=True)
  (workdir / "eval" / "reference_points.json").write_text(json.dumps(points))
  with (workdir / "eval" / "metrics.jsonl").open("a") as f:
    f.write(json.dumps(record) + "\n")
  with _local_dir(workdir / "eval" / "plots") as out:
    evaluate.plot_run([record], out, None, points)
  for key in sorted(k for k in record if k.startswith("eval/") and not k.endswith("_se")):
    print(f"{key:28s} {record[key]:10.4f} ± {record.get(key + '_se', float('nan')):.4f}")
  print(f"Best-of-N points (from the cache): " + ", ".join(
      f"N={n:g}: reward {r:.3f}, win {w:.3f}, KL {k:.3f}"
      for n, r, w, k in zip(points["n"], points["reward"], points["win_rate"], points["kl"])))
  print(f"eval: {workdir / 'eval' / 'metrics.jsonl'}")
  return record
