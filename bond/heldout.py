"""Held-out evaluation of a run against a sampled Best-of-N reference (algorithms.md §8).

The loop's side of `bond/evaluate.py`. An `Evaluator` holds E held-out prompts and the reference
cache: K samples of π_ref per prompt with their rewards, lengths and log-probs, drawn once per
run (a function of `train.seed`) and stored in `workdir/eval/reference.npz`, which a resumed run
reuses. Each evaluation draws M policy samples per prompt (or, for `eval.policy = "bon:N"`,
Best-of-N of fresh π_ref samples), scores them, teacher-forces π_ref on them and π on the cached
samples, and returns the `eval/*` metrics of `evaluate.policy_metrics` (each with a `_se`)
plus a few decoded samples. Every model call runs in fixed-size chunks of prompts, so memory is
bounded by `eval.chunk_rows` sequences whatever E and K are.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from bond import data as data_lib
from bond import evaluate
from bond import rollout as rollout_lib
from bond import sampling
from bond.models import backends, gemma

REFERENCE_NS = (1, 2, 4, 8, 16, 32)
# Folded into the run's seed for the reference cache: independent of every training draw.
_CACHE_SALT = 0x5EED


def target_n(config) -> int | None:
  """The run's fixed Best-of-N target (BOND with a fixed anchor, the offline pairs' n), else None
  (J-BOND, REINFORCE, moving anchors: compare at the effective N* only)."""
  if config.bond.objective in ("jbond", "reinforce") or config.bond.anchor != "fixed":
    return None
  return int(config.bond.n)


def held_out_split(config, table: data_lib.Table, tokenizer=None, task=None
                   ) -> tuple[data_lib.Table, dict[str, np.ndarray]]:
  """(training table, evaluation prompts {prompt_tokens, prompt_mask} [E, P]).

  Toy: the task's prompts cycled to eval.num_prompts (the enumerable task has no held-out
  split; the exact metrics use the same prompts). `eval.path`: its first eval.num_prompts
  prompts. Otherwise the last eval.num_prompts rows of the table are held out and never trained
  on. Fails with one line naming eval.num_prompts when there are not enough prompts.
  """
  e = config.eval.num_prompts
  if task is not None:
    idx = np.arange(e) % task.num_prompts
    return table, {"prompt_tokens": task.prompts[idx], "prompt_mask": task.prompt_mask[idx]}
  dc = config.data
  if config.eval.path:
    texts = data_lib.jsonl_prompts(config.eval.path, dc.prompt_key)
    if len(texts) < e:
      raise ValueError(f"eval.num_prompts={e} is larger than the {len(texts)} prompts of "
                       f"eval.path={config.eval.path!r}")
    held = data_lib.prompt_table(texts[:e], tokenizer, dc.max_prompt_len, dc.prompt_template,
                                 dc.prompt_truncation)
    return table, {k: held.columns[k] for k in ("prompt_tokens", "prompt_mask")}
  if len(table) <= e:
    raise ValueError(f"eval.num_prompts={e} leaves no training data: the data has {len(table)} "
                     "rows and the held-out slice is taken from its end (lower eval.num_prompts "
                     "or set eval.path)")
  train_rows = {k: v[:-e] for k, v in table.columns.items()}
  prompts = {k: table.columns[k][-e:] for k in ("prompt_tokens", "prompt_mask")}
  return data_lib.Table(train_rows), prompts


def _lengths(tokens, mask, eos: tuple[int, ...]) -> np.ndarray:
  """Completion length in tokens, eos excluded (the toy task's `lengths`)."""
  tokens, mask = np.asarray(tokens), np.asarray(mask, bool)
  return np.sum(mask & ~np.isin(tokens, np.asarray(eos, np.int64)), axis=-1)


def _chunks(total: int, size: int):
  for start in range(0, total, size):
    yield start, min(start + size, total)


def _pad_rows(x: np.ndarray, size: int) -> np.ndarray:
  """x [b, ...] with b ≤ size, padded to [size, ...] by repeating its last row (fixed shapes)."""
  if x.shape[0] == size:
    return x
  return np.concatenate([x, np.repeat(x[-1:], size - x.shape[0], axis=0)], axis=0)


@functools.partial(jax.jit, static_argnames=("model_config", "max_new_tokens", "n", "cpu_kernels",
                                             "backend"))
def _draw(params, prompts, rng, *, model_config: gemma.GemmaConfig, max_new_tokens: int, n: int,
          cpu_kernels: bool | None, backend: str):
  """`backend` (the decode backend `cpu_kernels` selects, resolved outside the trace) only keys
  the compiled program: a change of what can run (BOND_CPU_KERNELS, devices) traces again."""
  del backend
  out = sampling.sample_fn(model_config, params, prompts["prompt_tokens"], prompts["prompt_mask"],
                           rng, max_new_tokens=max_new_tokens, num_samples=n, temperature=1.0,
                           eos_id=model_config.eos_id, cpu_kernels=cpu_kernels)
  return out.tokens, out.mask, jnp.sum(out.logprobs, axis=-1)


@functools.partial(jax.jit, static_argnames=("model_config", "chunk_size", "share_prompt"))
def _score(params, prompts, tokens, mask, *, model_config: gemma.GemmaConfig, chunk_size: int,
           share_prompt: bool):
  return rollout_lib.completion_log_probs(model_config, params, prompts["prompt_tokens"],
                                          prompts["prompt_mask"], tokens, mask,
                                          chunk_size=chunk_size, share_prompt=share_prompt)


class Evaluator:
  """Held-out evaluation for one run (see the module doc)."""

  def __init__(self, config, model_config: gemma.GemmaConfig, reward_fn: Callable,
               prompts: dict[str, np.ndarray], tokenizer: Any = None):
    self.config, self.model_config, self.tokenizer = config, model_config, tokenizer
    self.reward_fn = reward_fn
    self.prompts = {k: np.asarray(v) for k, v in prompts.items()}
    ec = config.eval
    self.num_prompts, self.k, self.m = ec.num_prompts, ec.ref_samples, ec.policy_samples
    self.bon = int(ec.policy.split(":")[1]) if ec.policy.startswith("bon:") else None
    self.n = target_n(config)
    self.t = config.sampling.max_new_tokens
    self.eos = sampling._eos_tuple(model_config, model_config.eos_id)  # pylint: disable=protected-access
    # Prompts per model call: at most eval.chunk_rows sequences of [P + T] tokens.
    self.chunk = min(self.num_prompts,
                     max(1, ec.chunk_rows // max(self.k, self.m * (self.bon or 1))))
    self._reward = jax.jit(self._reward_impl)
    self.cache: dict[str, np.ndarray] | None = None

  # --- jitted pieces (fixed shapes: `chunk` prompts) ---------------------------------------
  # Sampling and scoring are module-level jits keyed by the model config and static options
  # (the decode backend resolved here, outside any trace, like `sampling.sample`), so every
  # Evaluator of the same model in a process (runs in a notebook or a sweep) shares their
  # compiled programs. The reward is the run's own function, jitted per Evaluator.

  def _draw(self, params, prompts, rng, n):
    """n samples per prompt of the untempered model: tokens, mask [c, n, T], log-probs [c, n]."""
    option = rollout_lib.cpu_kernels(self.config)
    # What can run here (True where it cannot raises in the trace, as in `sampling.sample_fn`).
    backend = type(backends.select(self.model_config, None if option else option)).__name__
    return _draw(params, prompts, rng, model_config=self.model_config, max_new_tokens=self.t,
                 n=n, cpu_kernels=option, backend=backend)

  def _score(self, params, prompts, tokens, mask):
    options = rollout_lib.logprob_options(self.config)
    return _score(params, prompts, tokens, mask, model_config=self.model_config,
                  chunk_size=int(options["chunk_size"]), share_prompt=options["share_prompt"])

  def _reward_impl(self, prompts, tokens, mask):
    c, n, t = tokens.shape
    rep = lambda x: jnp.repeat(x, n, axis=0)  # noqa: E731
    return self.reward_fn(rep(prompts["prompt_tokens"]), rep(prompts["prompt_mask"]),
                              tokens.reshape(c * n, t), mask.reshape(c * n, t)).reshape(c, n)

  # --- chunked drivers ------------------------------------------------------------------

  def _prompt_chunk(self, lo, hi, size):
    return {k: jnp.asarray(_pad_rows(v[lo:hi], size)) for k, v in self.prompts.items()}

  def _sample(self, params, rng, n) -> dict[str, np.ndarray]:
    """tokens, mask [E, n, T], rewards, logp, lengths [E, n] for all evaluation prompts."""
    parts = []
    for i, (lo, hi) in enumerate(_chunks(self.num_prompts, self.chunk)):
      prompts = self._prompt_chunk(lo, hi, self.chunk)
      tokens, mask, logp = self._draw(params, prompts, jax.random.fold_in(rng, i), n)
      rewards = self._reward(prompts, tokens, mask)
      parts.append({k: np.asarray(v)[:hi - lo] for k, v in
                    dict(tokens=tokens, mask=mask, logp=logp, rewards=rewards).items()})
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    out["lengths"] = _lengths(out["tokens"], out["mask"], self.eos)
    return out

  def _log_probs(self, params, tokens, mask) -> np.ndarray:
    """Teacher-forced log π(y) [E, n] of samples [E, n, T] (in chunks of prompts)."""
    n = tokens.shape[1]
    per_call = max(1, min(self.chunk, self.config.eval.chunk_rows // n))
    out = []
    for lo, hi in _chunks(self.num_prompts, per_call):
      prompts = self._prompt_chunk(lo, hi, per_call)
      lp = self._score(params, prompts, jnp.asarray(_pad_rows(tokens[lo:hi], per_call)),
                       jnp.asarray(_pad_rows(mask[lo:hi], per_call)))
      out.append(np.asarray(lp)[:hi - lo])
    return np.concatenate(out)

  # --- the reference cache --------------------------------------------------------------

  def _cache_meta(self) -> dict:
    return {"seed": int(self.config.train.seed), "num_prompts": self.num_prompts, "k": self.k,
            "max_new_tokens": self.t, "prompts_sum": int(self.prompts["prompt_tokens"].sum())}

  def load_or_draw_cache(self, ref_params, directory: epath.Path | None) -> dict[str, np.ndarray]:
    """The K reference samples per prompt: loaded from `directory` if drawn there before for the
    same seed, prompts and sizes, else drawn (and saved when `directory` is given)."""
    path = None if directory is None else directory / "reference.npz"
    meta = self._cache_meta()
    if path is not None and path.exists():
      with path.open("rb") as f:
        saved = dict(np.load(f, allow_pickle=False))
      if json.loads(str(saved.pop("meta"))) == meta:
        self.cache = saved
        return saved
    rng = jax.random.fold_in(jax.random.PRNGKey(self.config.train.seed), _CACHE_SALT)
    self.cache = self._sample(ref_params, rng, self.k)
    if path is not None and jax.process_index() == 0:
      directory.mkdir(parents=True, exist_ok=True)
      tmp = directory / "reference.npz.tmp"
      with tmp.open("wb") as f:
        np.savez(f, meta=json.dumps(meta), **self.cache)
      tmp.replace(path)
    return self.cache

  def reference_points(self) -> dict:
    ns = tuple(n for n in REFERENCE_NS if n <= self.k)
    return evaluate.reference_points(self.cache["rewards"], self.cache["lengths"], ns=ns,
                                     smoothing=self.config.bond.quantile_smoothing)

  # --- one evaluation -------------------------------------------------------------------

  def __call__(self, params, ref_params, rng) -> tuple[dict[str, float], list[dict]]:
    """(eval/* metrics, sample records) of `params` (the policy) on the held-out prompts."""
    if self.cache is None:
      raise RuntimeError("Evaluator: call load_or_draw_cache first")
    cache, smoothing = self.cache, self.config.bond.quantile_smoothing
    if self.bon is not None:   # Best-of-N sampling of π_ref as the evaluated policy
      s = self._sample(ref_params, rng, self.m * self.bon)
      shape = (self.num_prompts, self.m, self.bon)
      rewards, lengths, idx = evaluate.best_of_n_policy_samples(
          s["rewards"].reshape(shape), s["lengths"].reshape(shape),
          np.broadcast_to(np.arange(self.m * self.bon).reshape(1, self.m, self.bon), shape))
      pick = lambda x: np.take_along_axis(x, idx[..., None] if x.ndim == 3 else idx, axis=1)  # noqa: E731
      policy = {"tokens": pick(s["tokens"]), "mask": pick(s["mask"]), "rewards": rewards}
      metrics = evaluate.policy_metrics(rewards, cache["rewards"], lengths, n=self.bon,
                                        smoothing=smoothing)
    else:
      policy = self._sample(params, rng, self.m)
      ref_lp = self._log_probs(ref_params, policy["tokens"], policy["mask"])
      cache_lp = self._log_probs(params, cache["tokens"], cache["mask"])
      metrics = evaluate.policy_metrics(
          policy["rewards"], cache["rewards"], policy["lengths"], policy["logp"], ref_lp,
          cache_lp, cache["logp"], n=self.n, smoothing=smoothing)
    return metrics, self._records(policy)

  def _records(self, policy, count: int = 4) -> list[dict]:
    """A few held-out prompts with one reference and one policy completion and their rewards."""
    decode = ((lambda ids: self.tokenizer.decode(ids)) if self.tokenizer is not None
              else (lambda ids: ids))
    ids = lambda tok, m: [int(x) for x in np.asarray(tok)[np.asarray(m, bool)]]  # noqa: E731
    out = []
    for i in range(min(count, self.num_prompts)):
      out.append({
          "prompt": decode(ids(self.prompts["prompt_tokens"][i], self.prompts["prompt_mask"][i])),
          "reference": decode(ids(self.cache["tokens"][i, 0], self.cache["mask"][i, 0])),
          "reference_reward": float(self.cache["rewards"][i, 0]),
          "policy": decode(ids(policy["tokens"][i, 0], policy["mask"][i, 0])),
          "policy_reward": float(policy["rewards"][i, 0])})
    return out


def eval_rng(config, step: int):
  """The PRNG key of the evaluation at `step`: a function of (seed, step), so resumes agree."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(config.train.seed),
                                               _CACHE_SALT + 1), step)


def write_samples(directory: epath.Path, step: int, records: list[dict]) -> epath.Path:
  directory.mkdir(parents=True, exist_ok=True)
  path = directory / f"step_{step}.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path
