"""The papers' claims on the real Gemma 3 270M (issue 18): one resumable runner, tables, figures,
a claims table.

    python experiments/real.py --out /tmp/bond_real                      # the must-have grid
    python experiments/real.py --out /tmp/bond_real --experiment 1       # one experiment
    python experiments/real.py --out /tmp/bond_real --only jbond_eta0.1,reinforce_0.01
    python experiments/real.py --out /tmp/bond_real --reuse --write-docs # tables, figures, claims
    python experiments/real.py --plan                                    # the grid and its time
    python experiments/real.py --out /tmp/bond_real_smoke --smoke        # 2 steps a run, tiny eval
    python experiments/real.py --out /tmp/s --smoke --model tiny         # CI smoke, random model

Task: the pretrained Gemma 3 270M (Q4_K_M GGUF from PyPI, dequantized; bf16 compute; trained with
LoRA rank 8 on every attention and MLP projection, one frozen f32 base shared by the policy, the
EMA anchor and π_ref; adapters and Adam in f32) continues neutral openings (`data/prompts/real_train.jsonl`, 203 prompts; held-out
`data/prompts/real_eval.jsonl`, 64 prompts; written for this project: reviews, stories, messages,
emails, news, diary) with 16 new tokens at temperature 1; reward = VADER compound sentiment of the
completion. Every run starts from `configs/gemma3_270m_jbond.py` and shares: the prompts, 4
prompts a step, LoRA r 8 / alpha 16, Adam lr 2e-4 (see LR below) with 5 warm-up steps, grad clip 1, train.seed (0; 1 for the `_s1` runs), and the
held-out evaluation (64 prompts, K = 16 cached π_ref samples each, M = 4 policy samples). The
reference cache is drawn once (by the first run) and installed in every run's workdir, so every
run is compared with the same π_ref samples and the same sampled Best-of-N points.

Runs (workdir OUT/runs/NAME; experiments in brackets; * = off by default, `--experiment should`),
with the steps and evaluations of each and the estimated wall time (`--plan`):

  [1,2] jbond_eta0.1        J-BOND β=0.5, EMA η=0.1 (the "fast η"; headline)  30 st, 2 ev   9 min
  [1]   jbond_eta0.1_s1     the same, train.seed=1                            30 st, 2 ev   9 min
  [1]   jbond_eta0.02       J-BOND β=0.5, EMA η=0.02 (paper)                  30 st, 2 ev   9 min
  [1]   reinforce_B         REINFORCE+KL, RLOO over 2 samples, each of
                            β_RL=B ∈ {0.001, 0.01, 0.1, 1}                    30 st, 2 ev   7 min
  [1]   reinforce_0.01_s1   second seed of REINFORCE (headline)               30 st, 2 ev   7 min
  [2]   jbond_swap10        J-BOND, hard anchor swaps every 1/η = 10 steps     30 st, 2 ev   9 min
  [3]   bonbon              α·SFT + (1−α)·IPO, α=0.005, β*_8=0.0275482094     40 st, 1 ev   6 min
  [3]   bonbon_dpo          α·SFT + (1−α)·DPO (the authors' code path,
                            objective 'bonbon_dpo')                           40 st, 1 ev   6 min
  [3]   dpo, ipo            each: β = β*_8, the same best/worst-of-8 pairs    40 st, 1 ev   6 min
  [4]   bond_{bwd,jeffreys}_{lq,ties}  each: backward-KL / Jeffreys BOND vs
                            Best-of-4, k=4, log-quantile vs tie-exact reward  24 st, 1 ev   6 min
  [*]   reinforce_0.1_s1, jeffreys_beta{0,0.5,1}_n8 (vs Best-of-8, k=16; C1-C2),
        iterative_n2 (n=2, swap every 10) and bond_n{4,8,16} (C4-C5),
        jbond_eta{0.01,0.05}, jbond_gamma{0.5,1} (C8-C9)                  30 st, 2 ev  ~1.7 h in all

Time of the must-have grid on an idle machine (`--plan`, from the constants below): experiment 1
62 min, 2 9 min, 3 23 min, 4 25 min, shared inputs 6 min: 2.1 h in all. Evaluations: every 15
steps in experiments 1-2 (a reward/KL curve with two points besides π_ref), at the end in 3-4.

Memory: with LoRA a run peaks near 5 GB RSS (full fine-tuning: 12-14 GB, and 18 GB when the
asynchronous mid-run checkpoint coincided with an evaluation in calls of 64 sequences, so the
checkpoint is written one step after an evaluation and evaluation calls are 32 sequences).

Offline runs train on OUT/pairs.jsonl: best/worst-of-8 π_ref samples for each training prompt,
drawn once (`bond.cli.write_bon`, the code of `python -m bond.main --mode=bon`).

LR and LoRA: full fine-tuning at lr 1e-5 moved a J-BOND policy ~1 nat in 20 steps at η=0.05 but
peaks at 12-14 GB and writes 4.4 GB checkpoints; with LoRA (issue 17) a run peaks near 5 GB and
2e-4 moved J-BOND (η = 0.1) 0.52 nats in 15 steps and 0.78 in 30, with held-out reward 0.14 ->
0.19 and win rate 0.544 ± 0.018 (the pilot, now the run jbond_eta0.1). The sampled Best-of-16 of
π_ref is 1.8 nats from π_ref. `--set model.lora.rank=0 --set optim.lr=1e-5` gives full
fine-tuning.

Outputs in OUT: results.csv (every evaluation of every run: run, experiments, seed, step, all
eval/* metrics with their _se), bon_points.csv (the sampled Best-of-N points), results.md (final
tables per experiment, timings), claims.md (every claim of issue 18 with our numbers ± se and a
verdict, rule in VERDICT_RULE), and exp1_reward_vs_kl.png, exp2_over_training.png,
exp3_bonbon.png, exp4_ties.png (and should_*.png). `--write-docs` also writes the tables, claims
and figures into docs/real_results.md (between its `<!-- BEGIN real:... -->` markers) and
docs/figures/real/.

Resuming: a run whose workdir holds DONE.json with the same config is skipped; a killed run
resumes from its last checkpoint (one mid-run checkpoint, the step after its mid-run evaluation
or at mid-run) through `bond.train.train_and_evaluate`. A finished run's checkpoints (on the real model 4.4 GB each
with full fine-tuning, a few MB with LoRA) are deleted unless --keep-checkpoints; its metrics, samples, plots and
reference cache stay.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)   # configs/ is not installed

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from configs import gemma3_270m_jbond  # noqa: E402

TRAIN_PROMPTS = os.path.join(ROOT, "data", "prompts", "real_train.jsonl")
EVAL_PROMPTS = os.path.join(ROOT, "data", "prompts", "real_eval.jsonl")
DOCS = os.path.join(ROOT, "docs", "real_results.md")
BETA_STAR_8 = 0.0275482094          # bond.bon.beta_star(8)
REINFORCE_BETAS = (0.001, 0.01, 0.1, 1)
FAST_ETA = 0.1
Z = 2.0                              # verdict threshold, in standard errors

# ---------------------------------------------------------------------------------------------
# The grid.


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run: `make(config)` edits the shared base config in place."""

  name: str
  experiments: tuple[str, ...]
  make: Callable[[ml_collections.ConfigDict], None]
  steps: int                 # on the real model
  evals: int = 1             # evaluations along the run (evenly spaced, the last at the end)
  seed: int = 0
  pairs: bool = False        # trains on OUT/pairs.jsonl
  label: str = ""

  @property
  def should(self) -> bool:
    return "should" in self.experiments


def _jbond(eta, anchor="ema", swap_every=None, gamma=0.0):
  def make(c):
    c.bond.objective, c.bond.beta, c.bond.eta, c.bond.gamma = "jbond", 0.5, eta, gamma
    c.bond.anchor = anchor
    if swap_every is not None:
      c.bond.swap_every = swap_every
  return make


def _reinforce(beta_rl):
  def make(c):
    c.bond.objective, c.bond.anchor = "reinforce", "fixed"
    c.bond.beta_rl, c.bond.num_policy_samples = beta_rl, 2
  return make


def _offline(objective):
  def make(c):
    c.data.source = "pairs_jsonl"
    c.bond.objective, c.bond.anchor, c.bond.n = objective, "fixed", 8
    c.bond.alpha, c.bond.beta_ipo = 0.005, BETA_STAR_8
  return make


def _bond(objective, n, k, reward="log_quantile", beta=0.5, anchor="fixed", swap_every=None):
  def make(c):
    c.bond.objective, c.bond.n, c.bond.k, c.bond.beta = objective, n, k, beta
    c.bond.bond_reward, c.bond.anchor, c.bond.num_policy_samples = reward, anchor, 2
    if swap_every is not None:
      c.bond.swap_every = swap_every
  return make


def _runs() -> dict[str, Run]:
  runs = [
      Run("jbond_eta0.1", ("1", "2"), _jbond(FAST_ETA), 30, 2, label="J-BOND η=0.1 (EMA)"),
      Run("jbond_eta0.1_s1", ("1",), _jbond(FAST_ETA), 30, 2, seed=1, label="J-BOND η=0.1, seed 1"),
      Run("jbond_eta0.02", ("1",), _jbond(0.02), 30, 2, label="J-BOND η=0.02"),
      *[Run(f"reinforce_{b}", ("1",), _reinforce(b), 30, 2, label=f"REINFORCE β_RL={b}")
        for b in REINFORCE_BETAS],
      Run("reinforce_0.01_s1", ("1",), _reinforce(0.01), 30, 2, seed=1,
          label="REINFORCE β_RL=0.01, seed 1"),
      Run("jbond_swap10", ("2",), _jbond(FAST_ETA, "swap", round(1 / FAST_ETA)), 30, 2,
          label="J-BOND, hard swap every 10"),
      Run("bonbon", ("3",), _offline("bonbon"), 40, 4, pairs=True, label="BoNBoN (IPO term)"),
      Run("bonbon_dpo", ("3",), _offline("bonbon_dpo"), 40, 4, pairs=True,
          label="BoNBoN with a DPO term"),
      Run("dpo", ("3",), _offline("dpo"), 40, 4, pairs=True, label="DPO β*_8"),
      Run("ipo", ("3",), _offline("ipo"), 40, 4, pairs=True, label="IPO β*_8"),
      *[Run(f"bond_{v}_{short}", ("4",), _bond(f"bond_{v}", 4, 4, reward), 24, 1,
            label=f"BOND {v} N=4, {reward}")
        for v in ("bwd", "jeffreys") for short, reward in (("lq", "log_quantile"),
                                                           ("ties", "exact_ties"))],
      # Should-have (off by default).
      Run("reinforce_0.1_s1", ("should",), _reinforce(0.1), 30, 2, seed=1,
          label="REINFORCE β_RL=0.1, seed 1"),
      *[Run(f"jeffreys_beta{b:g}_n8", ("should",), _bond("bond_jeffreys", 8, 16, beta=b), 30, 2,
            label=f"Jeffreys β={b:g} vs BoN-8") for b in (0.0, 0.5, 1.0)],
      Run("iterative_n2", ("should",), _bond("bond_jeffreys", 2, 4, anchor="swap", swap_every=10),
          30, 2, label="iterative BOND n=2"),
      *[Run(f"bond_n{n}", ("should",), _bond("bond_jeffreys", n, max(4, n)), 30, 2,
            label=f"BOND Jeffreys N={n}") for n in (4, 8, 16)],
      *[Run(f"jbond_eta{e}", ("should",), _jbond(e), 30, 2, label=f"J-BOND η={e}")
        for e in (0.01, 0.05)],
      *[Run(f"jbond_gamma{g}", ("should",), _jbond(0.02, gamma=g), 30, 2,
            label=f"J-BOND η=0.02 γ={g}") for g in (0.5, 1)],
  ]
  return {r.name: r for r in runs}


RUNS = _runs()
EXPERIMENTS = ("1", "2", "3", "4", "should")
MUST = [n for n, r in RUNS.items() if not r.should]

# Seconds per training step by objective family (4 prompts, 16 new tokens, LoRA r 8), per run
# besides its steps and evaluations (model and tokenizer load, compiling the first step, plots),
# per held-out evaluation (64 prompts, K = 16, M = 4), and the shared inputs, on an idle machine.
# Measured through this runner: J-BOND 5.1 s/step, evaluations 115-124 s (the run jbond_eta0.1,
# alone on the 2 cores). The other families are scaled from J-BOND by their measured ratios under
# full fine-tuning (REINFORCE 0.71x, backward-KL BOND 1.05x, Jeffreys 1.13x, offline 0.70x);
# overheads and shared inputs are the full fine-tuning measurements (first steps compile in about
# the same time with LoRA: 72 s vs 71 s for J-BOND). On a machine shared with other jobs the
# grid's runs took 1.3-4x longer (docs/real_results.md, Wall time).
STEP_S = {"jbond": 5.1, "reinforce": 3.6, "bond_bwd": 5.4, "bond_jeffreys": 5.8, "offline": 3.6}
RUN_OVERHEAD_S = {"jbond": 125.0, "reinforce": 90.0, "bond_bwd": 118.0, "bond_jeffreys": 120.0,
                  "offline": 85.0}
EVAL_S = 120.0
SHARED_S = {"reference cache (64 x 16 samples)": 130.0, "best/worst-of-8 pairs (203 x 8)": 250.0}

# ---------------------------------------------------------------------------------------------
# Configs.


def tiny_checkpoint(out: str) -> str:
  """OUT/tiny_model: a random tiny Gemma 3 (tiny_gemma3 widths, one local and one global layer,
  the real 262k vocabulary) as an HF directory, so that the real tokenizer and the VADER reward
  run on a model that compiles and steps in seconds (the CI smoke)."""
  path = os.path.join(out, "tiny_model")
  if not os.path.isfile(os.path.join(path, "config.json")):
    import jax
    from bond.models import convert, gemma, presets
    cfg = presets.get("tiny_gemma3", vocab_size=presets.GEMMA3_VOCAB_SMALL, num_layers=2,
                      layer_types=(gemma.LOCAL, gemma.GLOBAL))
    params = gemma.init_params(cfg, jax.random.PRNGKey(0))
    convert.to_hf(cfg, params, path + ".tmp")
    # The GGUF's vocabulary as a SentencePiece .model: the same tokenizer, loaded in 0.1 s
    # instead of the ~10 s of parsing the GGUF in every run.
    from bond import assets, tokenizer
    tok = tokenizer.load(assets.gemma3_270m_gguf_path())
    with open(os.path.join(path + ".tmp", "tokenizer.model"), "wb") as f:
      f.write(tok.sp.serialized_model_proto())
    os.replace(path + ".tmp", path)
  return path


def base_config(model: str, out: str) -> ml_collections.ConfigDict:
  """The settings every run shares."""
  c = gemma3_270m_jbond.get_config()
  c.data.path = TRAIN_PROMPTS
  c.data.max_prompt_len = 24          # the longest prompt is 23 tokens with bos
  c.data.batch_size = 4
  c.sampling.max_new_tokens = 16
  c.sampling.temperature = 1.0
  # LoRA (issue 17): rank 8 on every attention and MLP projection, one frozen base shared by
  # policy, EMA anchor and π_ref: ~5 GB instead of 12-14 GB, 1.9M trained parameters, and runs
  # no longer need a 4.4 GB checkpoint each. `--set model.lora.rank=0 --set optim.lr=1e-5`
  # gives full fine-tuning.
  c.model.lora.rank = 8
  c.model.lora.alpha = 16.0
  c.model.lora.targets = "attn,mlp"
  c.optim.lr = 2e-4
  c.optim.warmup_steps = 5
  c.train.log_every = 1
  c.train.keep_checkpoints = 1
  c.eval.path = EVAL_PROMPTS
  c.eval.num_prompts = 64
  c.eval.ref_samples = 16
  c.eval.policy_samples = 4
  c.eval.chunk_rows = 32              # the config's: 32 sequences a call (64: 18 GB peak, OOM)
  c.eval.num_samples = 2
  if model == "tiny":
    c.model.checkpoint = os.path.join(out, "tiny_model")   # made by tiny_checkpoint(out)
    c.model.preset = ""
    c.model.dtype = "float32"
    c.tokenizer.path = os.path.join(out, "tiny_model", "tokenizer.model")
  return c


def _parse_value(old, text: str):
  if isinstance(old, bool):
    if text.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"expected a boolean, got {text!r}")
    return text.lower() in ("true", "1")
  if isinstance(old, int):
    return int(text)
  if isinstance(old, float):
    return float(text)
  return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> None:
  """`--set key=value`: any existing config key, the value parsed as the key's type."""
  for item in overrides:
    if "=" not in item:
      raise ValueError(f"--set {item!r}: expected key=value")
    key, text = item.split("=", 1)
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      if p not in node:
        raise ValueError(f"--set {key}: unknown config key (see bond/defaults.py)")
      node = node[p]
    if leaf not in node:
      raise ValueError(f"--set {key}: unknown config key (see bond/defaults.py)")
    node[leaf] = _parse_value(node[leaf], text)


def run_config(run: Run, args, out: str) -> ml_collections.ConfigDict:
  c = base_config(args.model, out)
  run.make(c)
  c.train.seed = c.data.shuffle_seed = run.seed   # seed 1: other batches, rollouts, evals
  steps = args.steps or (2 if args.smoke else run.steps)
  evals = 1 if args.smoke else max(1, min(run.evals, steps))
  c.train.num_steps = steps
  c.eval.every = max(1, steps // evals)
  # One mid-run checkpoint (and the final one train_and_evaluate always writes), one step after
  # an evaluation: the asynchronous save's host copy of the state (4.4 GB on the real model) on
  # top of the evaluation's peak was measured at 18 GB RSS, more than this 23 GB machine had free.
  c.train.checkpoint_every = (c.eval.every + 1 if evals > 1 else steps // 2 + 1
                              ) if steps > 2 else steps
  if run.pairs:
    c.data.path = os.path.join(out, "pairs.jsonl")
  if args.smoke:
    c.eval.num_prompts, c.eval.ref_samples, c.eval.policy_samples = 4, 8, 2
    c.train.checkpoint_every = c.train.num_steps
  apply_overrides(c, args.set)
  return c


def schedule_note(run: Run, config) -> str:
  return f"{config.train.num_steps} steps, eval every {config.eval.every}"

# ---------------------------------------------------------------------------------------------
# Workdir state: finished (DONE.json with the same config), resumable, new.

IGNORED_KEYS = ("train.compilation_cache",)


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_diff(saved: dict, config: ml_collections.ConfigDict) -> list[str]:
  """'key: old -> new' for each config value (but IGNORED_KEYS) that differs. A key the saved
  config lacks (added to bond/defaults.py after the run finished) counts only when the new value
  is not its default: e.g. `sampling.cpu_kernels` or `model.logprob_chunk` at their defaults
  leave a finished run finished."""
  from bond import defaults
  old, new = _flat(saved), _flat(json.loads(config.to_json()))
  default = _flat(json.loads(defaults.get_config().to_json()))
  return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
          if k not in IGNORED_KEYS and old.get(k) != new.get(k)
          and not (k not in old and k in default and new.get(k) == default[k])]


def run_status(workdir: str, config) -> tuple[str, list[str]]:
  """('done' | 'stale' | 'resume' | 'new', config differences for 'stale').

  done: DONE.json holds this config; stale: DONE.json holds another config (a finished run of
  different settings: --redo to replace it); resume: a checkpoint is there; new: otherwise."""
  done = os.path.join(workdir, "DONE.json")
  if os.path.isfile(done):
    with open(done) as f:
      diff = config_diff(json.load(f)["config"], config)
    return ("stale", diff) if diff else ("done", [])
  ckpt = os.path.join(workdir, "checkpoints")
  if os.path.isdir(ckpt) and any(name.isdigit() for name in os.listdir(ckpt)):
    return "resume", []
  return "new", []


def mark_done(workdir: str, config, info: dict) -> None:
  tmp = os.path.join(workdir, "DONE.json.tmp")
  with open(tmp, "w") as f:
    json.dump({"config": json.loads(config.to_json()), **info}, f, indent=1)
  os.replace(tmp, os.path.join(workdir, "DONE.json"))


def read_records(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    text = f.read()
  return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines() if line.strip()]


def timing(records: list[dict]) -> dict:
  """First step (with compile), median later step, evaluation seconds from a run's records."""
  out = {"first_step_s": math.nan, "step_s": math.nan, "eval_s": [], "train_loop_s": math.nan}
  if not records:
    return out
  out["first_step_s"] = records[0].get("time/elapsed_s", math.nan)
  out["train_loop_s"] = records[-1].get("time/elapsed_s", math.nan)
  steps = []
  for a, b in zip(records, records[1:]):
    if b["step"] == a["step"] + 1 and "time/eval_s" not in b:
      steps.append(b["time/elapsed_s"] - a["time/elapsed_s"])
  out["step_s"] = float(np.median(steps)) if steps else math.nan
  out["eval_s"] = [r["time/eval_s"] for r in records if "time/eval_s" in r]
  return out

# ---------------------------------------------------------------------------------------------
# Shared inputs: the reference cache and the best/worst-of-8 pairs.


def _shared_reference(out: str, model: str) -> str:
  return os.path.join(out, "reference", model)


def install_reference(out: str, model: str, workdir: str, seed: int) -> bool:
  """Copies the shared reference cache into workdir/eval (its meta's seed set to the run's, so
  `heldout.Evaluator.load_or_draw_cache` accepts it; prompts, K and T it checks itself)."""
  src = os.path.join(_shared_reference(out, model), "reference.npz")
  dst = os.path.join(workdir, "eval", "reference.npz")
  if not os.path.isfile(src) or os.path.isfile(dst):
    return False
  with open(src, "rb") as f:
    saved = dict(np.load(f, allow_pickle=False))
  meta = json.loads(str(saved.pop("meta")))
  meta["seed"] = int(seed)
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  with open(dst + ".tmp", "wb") as f:
    np.savez(f, meta=json.dumps(meta), **saved)
  os.replace(dst + ".tmp", dst)
  return True


def capture_reference(out: str, model: str, workdir: str) -> None:
  """The first finished run's cache and Best-of-N points become the shared ones."""
  shared = _shared_reference(out, model)
  if os.path.isfile(os.path.join(shared, "reference.npz")):
    return
  src = os.path.join(workdir, "eval")
  if not os.path.isfile(os.path.join(src, "reference.npz")):
    return
  os.makedirs(shared, exist_ok=True)
  for name in ("reference_points.json", "reference.npz"):   # the .npz last: it marks completion
    if os.path.isfile(os.path.join(src, name)):
      shutil.copyfile(os.path.join(src, name), os.path.join(shared, name + ".tmp"))
      os.replace(os.path.join(shared, name + ".tmp"), os.path.join(shared, name))


def ensure_pairs(out: str, args) -> str:
  """OUT/pairs.jsonl: best/worst-of-8 π_ref samples of every training prompt (the smoke: of 8),
  drawn once with `bond.cli.write_bon` (what `python -m bond.main --mode=bon` runs)."""
  path = os.path.join(out, "pairs.jsonl")
  if os.path.isfile(path):
    return path
  from bond import cli
  c = base_config(args.model, out)
  c.bond.n = 8
  c.data.batch_size = 8
  apply_overrides(c, [s for s in args.set if not s.startswith("data.batch_size=")])
  if args.smoke:
    c.data.path = os.path.join(out, "smoke_pair_prompts.jsonl")
    with open(TRAIN_PROMPTS) as src, open(c.data.path, "w") as dst:
      dst.writelines(src.readlines()[:8])
  start = time.time()
  cli.write_bon(c, path + ".tmp")
  os.replace(path + ".tmp", path)
  with open(os.path.join(out, "pairs_info.json"), "w") as f:
    json.dump({"n": 8, "prompts": c.data.path, "seed": int(c.train.seed),
               "wall_s": time.time() - start}, f)
  return path

# ---------------------------------------------------------------------------------------------
# Running.


def _objective_available(name: str) -> bool:
  from bond import objectives
  return name in objectives.OBJECTIVES


def train_one(run: Run, config, args, out: str) -> str:
  """Runs (or resumes, or skips) one run; returns its status line."""
  workdir = os.path.join(out, "runs", run.name)
  if not _objective_available(config.bond.objective):
    return (f"[{run.name}] NOT RUN: objective {config.bond.objective!r} is not registered in "
            "bond.objectives.OBJECTIVES")
  status, diff = run_status(workdir, config)
  if status == "stale" and run.name in args.redo:
    shutil.rmtree(workdir)
    status = "new"
  if status == "done":
    return f"[{run.name}] finished earlier: skipped"
  if status == "stale":
    raise SystemExit(f"[{run.name}] {workdir} holds a finished run with another config "
                     f"({'; '.join(diff[:5])}); rerun with --redo {run.name} to replace it, or "
                     "use another --out")
  from bond import train
  if args.model == "tiny":
    tiny_checkpoint(out)
  if run.pairs:
    ensure_pairs(out, args)
  os.makedirs(workdir, exist_ok=True)
  install_reference(out, args.model, workdir, config.train.seed)
  print(f"[{run.name}] {'resuming' if status == 'resume' else 'training'}: "
        f"{schedule_note(run, config)} in {workdir}", flush=True)
  start = time.time()
  train.train_and_evaluate(config, workdir)
  wall = time.time() - start
  records = read_records(workdir)
  if not records or records[-1]["step"] != config.train.num_steps:
    raise SystemExit(f"[{run.name}] stopped before step {config.train.num_steps} (preempted?); "
                     "rerun the same command to resume")
  mark_done(workdir, config, {"wall_s": wall, "resumed": status == "resume",
                              "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                              **timing(records)})
  capture_reference(out, args.model, workdir)
  if not args.keep_checkpoints:
    shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
  last = records[-1]
  get = lambda k: last.get(f"eval/{k}", math.nan)  # noqa: E731
  return (f"[{run.name}] done in {wall:.0f}s: KL {get('kl_to_ref'):.3f} "
          f"reward {get('reward'):.3f} win {get('win_rate'):.3f}")

# ---------------------------------------------------------------------------------------------
# Loading results.


@dataclasses.dataclass
class Results:
  records: dict[str, list[dict]]        # run -> eval records (those with eval/reward), in order
  train: dict[str, list[dict]]          # run -> every record
  done: dict[str, dict]                 # run -> DONE.json without the config
  configs: dict[str, dict]              # run -> its config (from DONE.json)
  points: dict | None                   # sampled Best-of-N points
  not_run: dict[str, str]               # run -> why


def load_results(out: str, names: list[str], model: str) -> Results:
  records, train, done, configs, not_run = {}, {}, {}, {}, {}
  points = None
  shared = os.path.join(_shared_reference(out, model), "reference_points.json")
  candidates = [shared] + [os.path.join(out, "runs", n, "eval", "reference_points.json")
                           for n in names]
  for path in candidates:
    if os.path.isfile(path):
      with open(path) as f:
        points = json.load(f)
      break
  for name in names:
    workdir = os.path.join(out, "runs", name)
    rec = read_records(workdir)
    evals = [r for r in rec if "eval/reward" in r]
    if not os.path.isfile(os.path.join(workdir, "DONE.json")):
      objective = None
      try:
        c = base_config("real", out)
        RUNS[name].make(c)
        objective = c.bond.objective
      except Exception:  # pylint: disable=broad-except
        pass
      if objective is not None and not _objective_available(objective):
        not_run[name] = f"objective {objective!r} not registered in bond.objectives"
      elif evals:
        not_run[name] = f"unfinished (last evaluation at step {evals[-1]['step']})"
      else:
        not_run[name] = "not run"
      if not evals:
        continue
    else:
      with open(os.path.join(workdir, "DONE.json")) as f:
        d = json.load(f)
      configs[name] = d.pop("config")
      done[name] = d
    records[name], train[name] = evals, rec
  return Results(records, train, done, configs, points, not_run)


def origin(points: dict | None) -> dict:
  """π_ref itself as step 0 of every trajectory: KL 0, its reward (N=1 point), win rate ½."""
  out = {"step": 0, "eval/kl_to_ref": 0.0, "eval/kl_to_ref_se": 0.0, "eval/win_rate": 0.5,
         "eval/win_rate_se": 0.0, "eval/bwd_kl_to_bon": 0.0, "eval/bwd_kl_to_bon_se": 0.0,
         "eval/fwd_kl_to_bon": 0.0, "eval/fwd_kl_to_bon_se": 0.0, "eval/effective_n": 1.0,
         "eval/effective_n_se": 0.0}
  if points is not None:
    out["eval/reward"], out["eval/reward_se"] = points["reward"][0], points["reward_se"][0]
    out["eval/length"] = points["mean_length"][0]
    out["eval/length_se"] = points["mean_length_se"][0]
  return out


def trajectory(res: Results, name: str) -> list[dict]:
  return [origin(res.points)] + res.records.get(name, [])

# ---------------------------------------------------------------------------------------------
# Verdicts.

VERDICT_RULE = f"""Verdict rule (automatic; Z = {Z:g}). Each claim is reduced to one difference d
with a standard error se, signed so that the claim says d > 0 (directional claims), or to a
difference that the claim says is small (equivalence / non-inferiority claims, with a stated
margin m):
- directional: **reproduced** if d > Z·se, **not reproduced** if d < −Z·se, else **inconclusive**;
- non-inferiority ("no worse than", margin m): reproduced if d − Z·se > −m, not reproduced if
  d + Z·se < −m, else inconclusive;
- equivalence ("about the same", margin m): reproduced if |d| + Z·se ≤ m, not reproduced if
  |d| − Z·se > m, else inconclusive;
- a claim made of several comparisons (e.g. "at every β_RL") is reproduced if all are, not
  reproduced if any is not, else inconclusive.
Standard errors are over the 64 held-out prompts (the evaluation's `_se`); for a difference of two
runs se = √(se₁² + se₂²), which ignores that runs share the prompts and the reference cache (a
positive correlation, so this se is conservative). Seeds of the same setting are averaged (se of
the mean). Values "at matched KL" are linear interpolations of a run's evaluations, starting
from π_ref at KL 0, at the smaller of the two runs' final KL(π‖π_ref) (their se interpolated
the same way)."""


def verdict(d: float, se: float, kind: str = "greater", margin: float = 0.0) -> str:
  """The rule of VERDICT_RULE for one comparison."""
  if not (math.isfinite(d) and math.isfinite(se)):
    return "inconclusive"
  if kind == "greater":
    return ("reproduced" if d > Z * se else "not reproduced" if d < -Z * se else "inconclusive")
  if kind == "noninferior":
    return ("reproduced" if d - Z * se > -margin else
            "not reproduced" if d + Z * se < -margin else "inconclusive")
  if kind == "equivalent":
    return ("reproduced" if abs(d) + Z * se <= margin else
            "not reproduced" if abs(d) - Z * se > margin else "inconclusive")
  raise ValueError(f"unknown verdict kind {kind!r}")


def combine(verdicts: list[str]) -> str:
  if not verdicts:
    return "not run"
  if any(v == "not reproduced" for v in verdicts):
    return "not reproduced"
  if all(v == "reproduced" for v in verdicts):
    return "reproduced"
  return "inconclusive"


def at_kl(traj: list[dict], kl: float, key: str) -> tuple[float, float]:
  """(value, se) of `key` linearly interpolated where the trajectory first reaches KL = kl."""
  prev = None
  for r in traj:
    if key not in r:
      continue
    x = r["eval/kl_to_ref"]
    if x >= kl:
      if prev is None or x == prev["eval/kl_to_ref"]:
        return r[key], r.get(key + "_se", 0.0)
      w = (kl - prev["eval/kl_to_ref"]) / (x - prev["eval/kl_to_ref"])
      return ((1 - w) * prev[key] + w * r[key],
              (1 - w) * prev.get(key + "_se", 0.0) + w * r.get(key + "_se", 0.0))
    prev = r
  return math.nan, math.nan


def final(res: Results, name: str, key: str) -> tuple[float, float]:
  recs = res.records.get(name)
  if not recs or key not in recs[-1]:
    return math.nan, math.nan
  return recs[-1][key], recs[-1].get(key + "_se", 0.0)


def pooled(values: list[tuple[float, float]]) -> tuple[float, float]:
  """Mean of seeds and the se of that mean."""
  values = [v for v in values if math.isfinite(v[0])]
  if not values:
    return math.nan, math.nan
  m = float(np.mean([v for v, _ in values]))
  return m, math.sqrt(sum(s ** 2 for _, s in values)) / len(values)


def diff(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
  return a[0] - b[0], math.hypot(a[1], b[1])


def _pm(v: tuple[float, float], digits: int = 3) -> str:
  if not math.isfinite(v[0]):
    return "—"
  return f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}"


def seeds_of(res: Results, name: str) -> list[str]:
  return [n for n in (name, f"{name}_s1") if n in res.records]


def matched(res: Results, a: list[str], b: list[str], key: str):
  """Seed-pooled `key` of run groups a and b at the smaller of their (pooled) final KLs."""
  kl_a = pooled([final(res, n, "eval/kl_to_ref") for n in a])[0]
  kl_b = pooled([final(res, n, "eval/kl_to_ref") for n in b])[0]
  kl = min(kl_a, kl_b)
  va = pooled([at_kl(trajectory(res, n), kl, key) for n in a])
  vb = pooled([at_kl(trajectory(res, n), kl, key) for n in b])
  return kl, va, vb


def claims(res: Results) -> list[dict]:
  """One row per claim of issue 18 (C-labels as in the issue; B/T rows are ours, see the doc)."""
  rows = []

  def row(cid, claim, figure, runs, numbers, d=None, kind="greater", margin=0.0, why="",
          verdict_=None):
    missing = [n for n in runs if n not in res.records]
    if missing:
      reasons = {res.not_run.get(n, "not run") for n in missing}
      should = all(RUNS[n].should for n in missing if n in RUNS)
      note = ("should-have, not run: the 2-core time went to the must-have grid "
              "(`--experiment should` runs them)" if should
              else "; ".join(sorted(reasons)))
      rows.append({"id": cid, "claim": claim, "figure": figure, "runs": ", ".join(runs),
                   "numbers": "—", "d": "—", "verdict": "not run", "why": f"missing runs "
                   f"{', '.join(missing)}: {note}"})
      return None
    v = verdict_ if verdict_ is not None else verdict(d[0], d[1], kind, margin)
    rows.append({"id": cid, "claim": claim, "figure": figure, "runs": ", ".join(runs),
                 "numbers": numbers, "d": _pm(d) if d is not None else "—", "verdict": v,
                 "why": why})
    return v

  fast, slow = "jbond_eta0.1", "jbond_eta0.02"
  jb = [n for n in (fast, f"{fast}_s1") if n in res.records] or [fast]
  # C10: reward rises, KL grows roughly linearly.
  ref_r = (res.points["reward"][0], res.points["reward_se"][0]) if res.points else (math.nan,) * 2
  for name in (fast, slow):
    r = final(res, name, "eval/reward")
    row(f"C10a ({name})", "J-BOND's held-out reward rises over training", "BOND Fig. 7",
        [name], f"reward {_pm(r)} vs π_ref {_pm(ref_r)}", diff(r, ref_r),
        why="d = final reward − π_ref's reward (the N=1 point)")
    recs = res.records.get(name, [])
    if len(recs) >= 2:
      mid, end = recs[-2], recs[-1]
      frac = mid["step"] / end["step"]
      d = (end["eval/kl_to_ref"] * frac - mid["eval/kl_to_ref"],
           math.hypot(frac * end["eval/kl_to_ref_se"], mid["eval/kl_to_ref_se"]))
      margin = 0.25 * frac * abs(end["eval/kl_to_ref"])
      row(f"C10b ({name})", "J-BOND's KL(π‖π_ref) grows roughly linearly with steps",
          "BOND Fig. 7", [name],
          f"KL at step {mid['step']}: {_pm((mid['eval/kl_to_ref'], mid['eval/kl_to_ref_se']))}, "
          f"at {end['step']}: {_pm((end['eval/kl_to_ref'], end['eval/kl_to_ref_se']))}", d,
          kind="equivalent", margin=margin,
          why=f"d = {frac:.2f}·KL(end) − KL(mid) (0 if linear from KL 0); margin 25% of "
              f"{frac:.2f}·KL(end) = {margin:.3f}")
    else:
      row(f"C10b ({name})", "J-BOND's KL(π‖π_ref) grows roughly linearly with steps",
          "BOND Fig. 7", [name], "—", (math.nan, math.nan), kind="equivalent",
          why="needs two evaluations")
  # C11 / C12: J-BOND (fast η, seeds pooled) vs REINFORCE at every β_RL, at matched KL.
  c11, c12 = [], []
  for b in REINFORCE_BETAS:
    rf = seeds_of(res, f"reinforce_{b}") or [f"reinforce_{b}"]
    kl, a, bb = matched(res, jb, rf, "eval/reward")
    v = row(f"C11 (β_RL={b})", "J-BOND's reward/KL curve lies above REINFORCE's",
            "BOND Fig. 7", jb + rf, f"at KL {kl:.3f}: J-BOND {_pm(a)}, REINFORCE {_pm(bb)}",
            diff(a, bb), why="d = J-BOND − REINFORCE reward at matched KL (seeds pooled)")
    c11.append(v)
    kl, a, bb = matched(res, jb, rf, "eval/bwd_kl_to_bon")
    v = row(f"C12 (β_RL={b})", "J-BOND stays closer to the Best-of-N family than REINFORCE",
            "BOND §5 / algorithms.md §8", jb + rf,
            f"KL(π‖π_BoN(N̂*)) at KL {kl:.3f}: J-BOND {_pm(a)}, REINFORCE {_pm(bb)}",
            diff(bb, a), why="d = REINFORCE − J-BOND backward KL to π_BoN(N̂*) at matched KL")
    c12.append(v)
  for cid, vs, claim in (("C11", c11, "J-BOND dominates REINFORCE at every β_RL"),
                         ("C12", c12, "J-BOND closer to π_BoN(N̂*) than REINFORCE at every β_RL")):
    got = [v for v in vs if v is not None]
    rows.append({"id": cid, "claim": claim, "figure": "BOND Fig. 7", "runs": "all of the above",
                 "numbers": f"{len(got)} of 4 β_RL compared", "d": "—",
                 "verdict": combine(got) if len(got) == 4 else (
                     "not run" if not got else f"{combine(got)} (partial)"),
                 "why": "all four comparisons must hold"})
  # C7: EMA vs hard swaps.
  ema, swap = fast, "jbond_swap10"
  kl_e, kl_s = final(res, ema, "eval/kl_to_ref"), final(res, swap, "eval/kl_to_ref")
  r_e, r_s = final(res, ema, "eval/reward"), final(res, swap, "eval/reward")
  row("C7a", "an EMA anchor ends at lower KL than hard swaps every 1/η steps", "BOND Fig. 5",
      [ema, swap], f"KL: EMA {_pm(kl_e)}, swap {_pm(kl_s)}", diff(kl_s, kl_e),
      why="d = KL(swap) − KL(EMA), final evaluations")
  row("C7b", "... at the same reward", "BOND Fig. 5", [ema, swap],
      f"reward: EMA {_pm(r_e)}, swap {_pm(r_s)}", diff(r_e, r_s), kind="noninferior",
      margin=0.05, why="d = reward(EMA) − reward(swap); non-inferiority margin 0.05 (VADER units)")
  # C8 / C9: η and γ.
  kl_f, kl_0 = final(res, fast, "eval/kl_to_ref"), final(res, slow, "eval/kl_to_ref")
  row("C8 (must runs)", "larger η moves faster (η=0.1 vs 0.02)", "BOND Fig. 6", [fast, slow],
      f"KL: η=0.1 {_pm(kl_f)}, η=0.02 {_pm(kl_0)}; reward "
      f"{_pm(final(res, fast, 'eval/reward'))} vs {_pm(final(res, slow, 'eval/reward'))}",
      diff(kl_f, kl_0), why="d = KL(η=0.1) − KL(η=0.02) after the same steps")
  sweep = ["jbond_eta0.01", "jbond_eta0.05", fast]
  kls = [final(res, n, "eval/kl_to_ref") for n in sweep]
  vs = [verdict(*diff(kls[i + 1], kls[i])) for i in range(2)]
  row("C8 (sweep)", "KL after the same steps increases with η ∈ {0.01, 0.05, 0.1}",
      "BOND Fig. 6", sweep, "KL: " + ", ".join(_pm(k) for k in kls), None,
      verdict_=combine(vs), why="each step of the sweep: directional on the KL difference")
  gam = [slow, "jbond_gamma0.5", "jbond_gamma1"]
  kls = [final(res, n, "eval/kl_to_ref") for n in gam]
  rws = [final(res, n, "eval/reward") for n in gam]
  vs = [verdict(*diff(kls[i], kls[i + 1])) for i in range(2)]
  row("C9", "larger γ (KL to the anchor) trades reward for lower KL", "BOND Fig. 6", gam,
      "KL: " + ", ".join(_pm(k) for k in kls) + "; reward: " + ", ".join(_pm(r) for r in rws),
      None, verdict_=combine(vs), why="KL decreases with each step of γ ∈ {0, 0.5, 1}")
  # C1 / C2: Jeffreys β = 0.5 close to the best of forward-only and backward-only.
  jef = ["jeffreys_beta0_n8", "jeffreys_beta0.5_n8", "jeffreys_beta1_n8"]
  for cid, key, what in (("C1", "eval/fwd_kl_to_bon_n", "forward KL(π_BoN(8)‖π)"),
                         ("C2", "eval/bwd_kl_to_bon_n", "backward KL(π‖π_BoN(8))")):
    vals = [final(res, n, key) for n in jef]
    best = min((vals[0], vals[2]), key=lambda v: v[0] if math.isfinite(v[0]) else math.inf)
    row(cid, f"Jeffreys β=0.5 is within 10% of the best of β=0 and β=1 on the {what}",
        "BOND Fig. 2", jef, "β=0, 0.5, 1: " + ", ".join(_pm(v) for v in vals),
        diff(best, vals[1]), kind="noninferior", margin=0.1 * abs(best[0]),
        why="d = best single − Jeffreys; non-inferiority margin 10% of the best")
  # C4 / C5: iterative BOND vs fixed N.
  fixed = ["bond_n4", "bond_n8", "bond_n16"]
  it = "iterative_n2"

  def gain(name):
    recs = res.records.get(name, [])
    if len(recs) < 2:
      return math.nan, math.nan
    return diff((recs[-1]["eval/reward"], recs[-1]["eval/reward_se"]),
                (recs[-2]["eval/reward"], recs[-2]["eval/reward_se"]))
  vs = [verdict(*diff(gain(it), gain(n))) for n in fixed]
  row("C4", "iterative BOND keeps improving where fixed-N BOND saturates", "BOND Fig. 4",
      [it] + fixed, "reward gain over the second half: " + ", ".join(
          f"{n} {_pm(gain(n))}" for n in [it] + fixed), None, verdict_=combine(vs),
      why="d = gain(iterative) − gain(fixed N), for each N")
  vs = []
  for n in fixed:
    if it in res.records and n in res.records:
      _, a, b = matched(res, [it], [n], "eval/reward")
      vs.append(verdict(*diff(a, b), kind="equivalent", margin=0.05))
  row("C5", "... on the same reward/KL trade-off", "BOND Fig. 4", [it] + fixed,
      "reward at matched KL vs each fixed N", None, verdict_=combine(vs),
      why="equivalence of reward at matched KL, margin 0.05, against each fixed N")
  # BoNBoN (issue 18 experiment 3; B-labels are ours).
  w_bb = final(res, "bonbon", "eval/win_rate")
  row("B1", "BoNBoN reaches a high win rate against π_ref", "BoNBoN Fig. 1", ["bonbon"],
      f"win rate {_pm(w_bb)}; Best-of-8 "
      f"{_pm(_bon_point(res, 8, 'win_rate'))}", diff(w_bb, (0.5, 0.0)),
      why="d = win rate − ½ (Best-of-8 shown for scale)")
  len_ref = _bon_point(res, 1, "mean_length")
  drift = {}
  for n in ("bonbon", "dpo", "ipo", "bonbon_dpo"):
    ln = final(res, n, "eval/length")
    drift[n] = (abs(ln[0] - len_ref[0]), math.hypot(ln[1], len_ref[1]))
  for other in ("dpo", "ipo"):
    row(f"B2 (vs {other.upper()})", f"BoNBoN drifts less in length than {other.upper()}",
        "BoNBoN Fig. 1", ["bonbon", other],
        f"|Δlength| BoNBoN {_pm(drift['bonbon'])}, {other.upper()} {_pm(drift[other])} "
        f"(π_ref {len_ref[0]:.2f} tokens)", diff(drift[other], drift["bonbon"]),
        why="d = |Δlen(other)| − |Δlen(BoNBoN)|; completions are capped at 16 tokens, so "
            "length can only drift down (eos)")
    kl, a, b = matched(res, ["bonbon"], [other], "eval/win_rate")
    row(f"B3 (vs {other.upper()})", f"BoNBoN's win rate at matched KL ≥ {other.upper()}'s",
        "BoNBoN Fig. 1", ["bonbon", other], f"at KL {kl:.3f}: BoNBoN {_pm(a)}, "
        f"{other.upper()} {_pm(b)}", diff(a, b), kind="noninferior", margin=0.02,
        why="d = win(BoNBoN) − win(other) at matched KL; non-inferiority margin 0.02")
  w_d = final(res, "bonbon_dpo", "eval/win_rate")
  row("B4", "BoNBoN with a DPO term (the authors' runnable code) vs the paper's IPO term",
      "BoNBoN code (trainers.py)", ["bonbon", "bonbon_dpo"],
      f"win: IPO {_pm(w_bb)}, DPO {_pm(w_d)}; KL: {_pm(final(res, 'bonbon', 'eval/kl_to_ref'))}"
      f" vs {_pm(final(res, 'bonbon_dpo', 'eval/kl_to_ref'))}; |Δlen| {_pm(drift['bonbon'])} vs "
      f"{_pm(drift['bonbon_dpo'])}", diff(w_bb, w_d), verdict_="reported",
      why="no claim: both reported (d = win(IPO) − win(DPO))")
  # T1: the tie-exact BOND reward on a tied reward (bond's own claim, algorithms.md §1).
  for v in ("bwd", "jeffreys"):
    lq, ties = f"bond_{v}_lq", f"bond_{v}_ties"
    a, b = final(res, lq, "eval/bwd_kl_to_bon_n"), final(res, ties, "eval/bwd_kl_to_bon_n")
    row(f"T1 ({v})", "with tied rewards (VADER 0), the tie-exact reward gets closer to "
        "π_BoN(4) than the log-quantile reward", "algorithms.md §1 (BOND Eq. 8)", [lq, ties],
        f"KL(π‖π_BoN(4)): log-quantile {_pm(a)}, tie-exact {_pm(b)}; reward "
        f"{_pm(final(res, lq, 'eval/reward'))} vs {_pm(final(res, ties, 'eval/reward'))}",
        diff(a, b), why="d = KL(π‖π_BoN(4)) log-quantile − tie-exact (final evaluation)")
  return rows


def _bon_point(res: Results, n: int, key: str) -> tuple[float, float]:
  p = res.points
  if p is None or float(n) not in [float(x) for x in p["n"]]:
    return math.nan, math.nan
  i = [float(x) for x in p["n"]].index(float(n))
  return p[key][i], p.get(key + "_se", [0.0] * len(p["n"]))[i]

# ---------------------------------------------------------------------------------------------
# Tables.

METRICS = ("eval/kl_to_ref", "eval/reward", "eval/win_rate", "eval/length", "eval/effective_n",
           "eval/bwd_kl_to_bon", "eval/fwd_kl_to_bon", "eval/log_quantile")
METRICS_N = ("eval/bwd_kl_to_bon_n", "eval/fwd_kl_to_bon_n")
SHORT = {"eval/kl_to_ref": "KL(π‖π_ref)", "eval/reward": "reward", "eval/win_rate": "win vs π_ref",
         "eval/length": "length", "eval/effective_n": "N̂*",
         "eval/bwd_kl_to_bon": "KL(π‖BoN(N̂*))", "eval/fwd_kl_to_bon": "KL(BoN(N̂*)‖π)",
         "eval/log_quantile": "log p̂≤", "eval/bwd_kl_to_bon_n": "KL(π‖BoN(n))",
         "eval/fwd_kl_to_bon_n": "KL(BoN(n)‖π)"}
TITLES = {"1": "Experiment 1: J-BOND vs REINFORCE (BOND Fig. 7)",
          "2": "Experiment 2: EMA anchor vs hard swaps (BOND Fig. 5)",
          "3": "Experiment 3: BoNBoN vs DPO vs IPO on best/worst-of-8 pairs (BoNBoN Fig. 1)",
          "4": "Experiment 4: backward-KL and Jeffreys BOND vs Best-of-4, log-quantile vs "
               "tie-exact reward",
          "should": "Should-have runs"}


def _md_table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
  return "\n".join(lines)


def _eval_prompts(res: Results) -> str:
  counts = sorted({c["eval"]["num_prompts"] for c in res.configs.values()})
  return "/".join(str(n) for n in counts) or "?"


def results_tables(res: Results, names: list[str]) -> str:
  parts = []
  for exp in EXPERIMENTS:
    runs = [n for n in names if exp in RUNS[n].experiments]
    if not runs:
      continue
    keys = METRICS + (METRICS_N if exp in ("3", "4", "should") else ())
    header = ["run", "step"] + [SHORT[k] for k in keys]
    rows = []
    for n in runs:
      if n not in res.records or not res.records[n]:
        rows.append([n, res.not_run.get(n, "not run")] + ["—"] * len(keys))
        continue
      last = res.records[n][-1]
      rows.append([n, last["step"]] + [_pm((last.get(k, math.nan), last.get(k + "_se", 0.0)))
                                         for k in keys])
    parts += [f"### {TITLES[exp]}\n",
              f"Final held-out evaluation ({_eval_prompts(res)} prompts; mean ± se).\n",
              _md_table(header, rows), ""]
  if res.points is not None:
    p = res.points
    header = ["N", "KL(π_BoN‖π_ref)", "bound log N − (N−1)/N", "reward", "win vs π_ref",
              "length"]
    rows = [[f"{n:g}", _pm((p["kl"][i], p["kl_se"][i])), f"{p['kl_bound'][i]:.3f}",
             _pm((p["reward"][i], p["reward_se"][i])),
             _pm((p["win_rate"][i], p["win_rate_se"][i])),
             _pm((p["mean_length"][i], p["mean_length_se"][i]), 2)]
            for i, n in enumerate(p["n"])]
    parts += ["### Sampled Best-of-N points of π_ref (the shared reference cache)\n",
              _md_table(header, rows), ""]
  return "\n".join(parts)


def timing_table(res: Results, names: list[str]) -> str:
  header = ["run", "steps", "wall (s)", "first step incl. compile (s)", "s/step",
            "evaluations (s each)", "resumed"]
  rows = []
  total = 0.0
  for n in names:
    d = res.done.get(n)
    if d is None:
      continue
    total += d["wall_s"]
    evals = ", ".join(f"{e:.0f}" for e in d.get("eval_s", []))
    rows.append([n, res.configs[n]["train"]["num_steps"], f"{d['wall_s']:.0f}",
                 f"{d.get('first_step_s', math.nan):.0f}", f"{d.get('step_s', math.nan):.1f}",
                 evals, "yes" if d.get("resumed") else "no"])
  if not rows:
    return "No finished runs.\n"
  rows.append(["**total**", "", f"**{total:.0f}** ({total / 3600:.2f} h)", "", "", "", ""])
  per_exp: dict[str, float] = {}
  for n in names:
    if n in res.done and n in RUNS:
      first = RUNS[n].experiments[0]
      per_exp[first] = per_exp.get(first, 0.0) + res.done[n]["wall_s"]
  by_exp = ("Measured wall time per experiment (a run counted in its first experiment; the shared "
            "reference cache and pairs not included): " + ", ".join(
                f"{k}: {v / 60:.0f} min" for k, v in per_exp.items()) + ".")
  return _md_table(header, rows) + "\n\n" + by_exp + "\n"


def claims_table(rows: list[dict]) -> str:
  header = ["id", "claim", "paper", "our numbers (± se)", "d ± se", "verdict", "why / rule"]
  body = [[r["id"], r["claim"], r["figure"], r["numbers"], r["d"], f"**{r['verdict']}**",
           r["why"]] for r in rows]
  return _md_table(header, body) + "\n"


def write_csv(out: str, res: Results, names: list[str]) -> None:
  keys = sorted({k for n in names for r in res.records.get(n, []) for k in r
                 if k.startswith("eval/")})
  cols = ["run", "experiments", "seed", "step"] + keys + ["time/eval_s", "time/elapsed_s"]
  with open(os.path.join(out, "results.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for n in names:
      for r in res.records.get(n, []):
        w.writerow({"run": n, "experiments": "+".join(RUNS[n].experiments),
                    "seed": RUNS[n].seed, **r})
  if res.points is not None:
    p = res.points
    pk = [k for k in p if k != "n"]
    with open(os.path.join(out, "bon_points.csv"), "w", newline="") as f:
      w = csv.writer(f)
      w.writerow(["n"] + pk)
      for i, n in enumerate(p["n"]):
        w.writerow([n] + [p[k][i] for k in pk])

# ---------------------------------------------------------------------------------------------
# Figures.


def _bon(ax, res: Results, x: str, y: str, highlight: int | None = None):
  p = res.points
  if p is None:
    return
  xs, ys = np.asarray(p[x], float), np.asarray(p[y], float)
  xe = np.asarray(p.get(x + "_se", np.zeros_like(xs)), float)
  ye = np.asarray(p.get(y + "_se", np.zeros_like(ys)), float)
  ok = np.isfinite(xs) & np.isfinite(ys)
  ax.errorbar(xs[ok], ys[ok], xerr=xe[ok], yerr=ye[ok], fmt="k--o", ms=3, lw=1, capsize=2,
              label="Best-of-N of π_ref (sampled)")
  for n, a, b in zip(np.asarray(p["n"])[ok], xs[ok], ys[ok]):
    ax.annotate(f"N={n:g}", (a, b), fontsize=7, xytext=(3, -9), textcoords="offset points",
                weight="bold" if highlight == n else None)


def _traj(ax, res: Results, name: str, x: str, y: str, style="-o", label=None):
  t = [r for r in trajectory(res, name) if x in r and y in r]
  if len(t) < 2:
    return
  xs, ys = [r[x] for r in t], [r[y] for r in t]
  ax.errorbar(xs, ys, xerr=[r.get(x + "_se", 0.0) for r in t],
              yerr=[r.get(y + "_se", 0.0) for r in t], fmt=style, ms=3, lw=1.2, capsize=2,
              label=label or RUNS[name].label or name)


def plot(out: str, res: Results, names: list[str]) -> list[str]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  paths = []

  def save(fig, name):
    fig.tight_layout()
    paths.append(os.path.join(out, name))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

  exp1 = [n for n in names if "1" in RUNS[n].experiments and n in res.records]
  if exp1:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, y, label in ((axes[0], "reward", "held-out reward (VADER)"),
                         (axes[1], "win_rate", "held-out win rate vs π_ref")):
      _bon(ax, res, "kl", y)
      for n in exp1:
        _traj(ax, res, n, "eval/kl_to_ref", f"eval/{y}",
              style="--s" if n.startswith("reinforce") else "-o")
      ax.set_xlabel("KL(π ‖ π_ref), sampled (nats)")
      ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"J-BOND vs REINFORCE ({_eval_prompts(res)} held-out prompts; ± se)",
                 fontsize=10)
    save(fig, "exp1_reward_vs_kl.png")

  exp2 = [n for n in names if "2" in RUNS[n].experiments and n in res.records]
  if exp2:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, train_key, key, label in (
        (axes[0], "reward/mean", "eval/reward", "reward"),
        (axes[1], "kl/policy_ref", "eval/kl_to_ref", "KL(π ‖ π_ref) (nats)")):
      for n in exp2:
        tr = res.train.get(n, [])
        xs = np.array([r["step"] for r in tr if train_key in r])
        ys = np.array([r[train_key] for r in tr if train_key in r])
        if len(ys) >= 5:
          ys = np.convolve(ys, np.ones(5) / 5, mode="valid")
          xs = xs[2:len(ys) + 2]
        line, = ax.plot(xs, ys, lw=0.8, alpha=0.5)
        t = trajectory(res, n)
        ax.errorbar([r["step"] for r in t if key in r], [r[key] for r in t if key in r],
                    yerr=[r.get(key + "_se", 0.0) for r in t if key in r], fmt="-o", ms=4,
                    capsize=2, color=line.get_color(), label=RUNS[n].label or n)
        cfg = res.configs.get(n, {}).get("bond", {})
        if cfg.get("anchor") == "swap":
          for s in range(cfg["swap_every"], int(xs.max()) + 1 if len(xs) else 0,
                         cfg["swap_every"]):
            ax.axvline(s, color=line.get_color(), ls=":", lw=0.6)
      ax.set_xlabel("step")
      ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    fig.suptitle("EMA anchor vs hard swaps (dots: held-out evaluations ± se; lines: training "
                 "rollouts, 5-step mean; dotted: swaps)", fontsize=9)
    save(fig, "exp2_over_training.png")

  exp3 = [n for n in names if "3" in RUNS[n].experiments and n in res.records]
  if exp3:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (x, bx, label) in zip(axes, (("eval/length", "mean_length", "mean completion length "
                                          "(tokens, eos excluded; cap 16)"),
                                         ("eval/kl_to_ref", "kl", "KL(π ‖ π_ref) (nats)"))):
      _bon(ax, res, bx, "win_rate", highlight=8)
      for n in exp3:
        _traj(ax, res, n, x, "eval/win_rate")
      ax.set_xlabel(label)
      ax.set_ylabel("held-out win rate vs π_ref")
    axes[0].legend(fontsize=7)
    fig.suptitle("BoNBoN vs DPO vs IPO on the same best/worst-of-8 pairs (Best-of-8 in bold)",
                 fontsize=10)
    save(fig, "exp3_bonbon.png")

  exp4 = [n for n in names if "4" in RUNS[n].experiments and n in res.records]
  if exp4:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.38
    for j, (key, label) in enumerate((("eval/bwd_kl_to_bon_n", "KL(π ‖ π_BoN(4))"),
                                      ("eval/fwd_kl_to_bon_n", "KL(π_BoN(4) ‖ π)"))):
      vals = [final(res, n, key) for n in exp4]
      axes[0].bar(np.arange(len(exp4)) + (j - 0.5) * width, [v[0] for v in vals], width,
                  yerr=[v[1] for v in vals], capsize=2, label=label)
    axes[0].set_xticks(np.arange(len(exp4)))
    axes[0].set_xticklabels(exp4, rotation=20, fontsize=7)
    axes[0].set_ylabel("nats (final evaluation)")
    axes[0].legend(fontsize=7)
    _bon(axes[1], res, "kl", "reward", highlight=4)
    for n in exp4:
      _traj(axes[1], res, n, "eval/kl_to_ref", "eval/reward")
    axes[1].set_xlabel("KL(π ‖ π_ref) (nats)")
    axes[1].set_ylabel("held-out reward")
    axes[1].legend(fontsize=7)
    fig.suptitle("BOND against Best-of-4: log-quantile vs tie-exact reward", fontsize=10)
    save(fig, "exp4_ties.png")

  should = [n for n in names if RUNS[n].should and n in res.records]
  if should:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _bon(ax, res, "kl", "reward")
    for n in should:
      _traj(ax, res, n, "eval/kl_to_ref", "eval/reward")
    ax.set_xlabel("KL(π ‖ π_ref) (nats)")
    ax.set_ylabel("held-out reward")
    ax.legend(fontsize=7)
    save(fig, "should_reward_vs_kl.png")
  return paths

# ---------------------------------------------------------------------------------------------
# Reports.


def report(out: str, names: list[str], model: str, docs: str | None = None) -> dict:
  res = load_results(out, names, model)
  write_csv(out, res, names)
  tables = results_tables(res, names)
  timings = timing_table(res, names)
  not_run = "".join(f"- `{n}`: {why}\n" for n, why in res.not_run.items())
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(f"# Gemma 3 270M results ({model} model)\n\n{tables}\n## Timings\n\n{timings}\n")
    if not_run:
      f.write(f"\n## Not run\n\n{not_run}")
  rows = claims(res)
  ctable = claims_table(rows)
  with open(os.path.join(out, "claims.md"), "w") as f:
    f.write(f"# Claims table\n\n{ctable}\n{VERDICT_RULE}\n")
  paths = plot(out, res, names)
  if docs:
    write_docs(docs, paths, tables, timings, ctable, not_run)
  return {"results": res, "claims": rows, "figures": paths}


def replace_between(text: str, name: str, body: str) -> str:
  begin, end = f"<!-- BEGIN real:{name} -->", f"<!-- END real:{name} -->"
  i, j = text.find(begin), text.find(end)
  if i < 0 or j < i:
    raise ValueError(f"no '{begin}' ... '{end}' markers in the docs file")
  return text[:i + len(begin)] + "\n" + body.rstrip() + "\n" + text[j:]


def write_docs(docs: str, figures: list[str], tables: str, timings: str, ctable: str,
               not_run: str) -> None:
  """Writes the tables, timings, claims and figures into `docs` between its markers; figures
  are copied to DOCS_DIR/figures/real/."""
  fig_dir = os.path.join(os.path.dirname(os.path.abspath(docs)), "figures", "real")
  os.makedirs(fig_dir, exist_ok=True)
  links = []
  for p in figures:
    shutil.copyfile(p, os.path.join(fig_dir, os.path.basename(p)))
    links.append(f"![{os.path.basename(p)}](figures/real/{os.path.basename(p)})")
  with open(docs) as f:
    text = f.read()
  text = replace_between(text, "figures", "\n\n".join(links) or "_no figures yet_")
  text = replace_between(text, "tables", tables + ("\n**Not run**\n\n" + not_run if not_run
                                                   else ""))
  text = replace_between(text, "timings", timings)
  text = replace_between(text, "claims", ctable + "\n" + VERDICT_RULE)
  with open(docs, "w") as f:
    f.write(text)

# ---------------------------------------------------------------------------------------------
# The plan (time estimate).


def _family(config) -> str:
  o = config.bond.objective
  return o if o in STEP_S else "offline"


def plan(names: list[str], args) -> str:
  out = args.out or "/tmp/bond_real"
  rows, total = [], sum(SHARED_S.values())
  per_exp: dict[str, float] = {}
  for n in names:
    c = run_config(RUNS[n], args, out)
    evals = math.ceil(c.train.num_steps / c.eval.every)
    s = RUN_OVERHEAD_S[_family(c)] + c.train.num_steps * STEP_S[_family(c)] + evals * EVAL_S
    total += s
    first = RUNS[n].experiments[0]
    per_exp[first] = per_exp.get(first, 0.0) + s
    rows.append([n, "+".join(RUNS[n].experiments), c.bond.objective, c.train.num_steps, evals,
                 f"{s / 60:.1f}"])
  table = _md_table(["run", "exp", "objective", "steps", "evals", "est. min"], rows)
  lines = [table, "", "shared: " + ", ".join(f"{k} {v:.0f} s" for k, v in SHARED_S.items()),
           "per experiment (a run counted in its first experiment): " + ", ".join(
               f"{k}: {v / 60:.0f} min" for k, v in per_exp.items() if v),
           f"total: {total / 60:.0f} min ({total / 3600:.2f} h)"]
  return "\n".join(lines)

# ---------------------------------------------------------------------------------------------


def select(args, parser) -> list[str]:
  names = [n for n in args.only.split(",") if n]
  unknown = sorted(set(names) - set(RUNS))
  if unknown:
    parser.error(f"--only: unknown runs {unknown}; known: {list(RUNS)}")
  exps = [e for e in args.experiment.split(",") if e]
  bad = sorted(set(exps) - set(EXPERIMENTS))
  if bad:
    parser.error(f"--experiment: unknown {bad}; known: {list(EXPERIMENTS)}")
  for e in exps:
    names += [n for n, r in RUNS.items() if e in r.experiments and n not in names]
  if names:
    return names
  if args.reuse:   # the report: the must-have grid and every should-have run that finished
    return list(MUST) + [n for n in RUNS if n not in MUST and os.path.isfile(
        os.path.join(args.out or "", "runs", n, "DONE.json"))]
  return list(MUST)


def main(argv: list[str] | None = None) -> dict | None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="/tmp/bond_real", help="output directory")
  parser.add_argument("--only", default="", help="comma-separated run names")
  parser.add_argument("--experiment", default="",
                      help="comma-separated experiments: 1, 2, 3, 4, should")
  parser.add_argument("--steps", type=int, default=None, help="train steps for every run")
  parser.add_argument("--reuse", action="store_true",
                      help="do not train: tables, figures and claims from OUT/runs/*")
  parser.add_argument("--smoke", action="store_true",
                      help="2 steps a run, evaluation on 4 prompts (K=8, M=2), pairs of 8 prompts")
  parser.add_argument("--model", choices=("real", "tiny"), default="real",
                      help="real: Gemma 3 270M; tiny: a random tiny Gemma 3 with the real "
                           "tokenizer (tests)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config key in every run, e.g. --set optim.lr=3e-6")
  parser.add_argument("--redo", default="", help="comma-separated runs whose finished workdir "
                      "(with another config) may be replaced")
  parser.add_argument("--keep-checkpoints", action="store_true",
                      help="keep finished runs' checkpoints (4.4 GB each on the real model)")
  parser.add_argument("--write-docs", nargs="?", const=DOCS, default=None, metavar="PATH",
                      help=f"write tables/claims/figures into PATH (default {DOCS})")
  parser.add_argument("--plan", action="store_true", help="print the grid and its time estimate")
  args = parser.parse_args(argv)
  args.redo = [n for n in args.redo.split(",") if n]
  names = select(args, parser)
  if args.plan:
    print(plan(names, args))
    return None
  os.makedirs(args.out, exist_ok=True)
  start = time.time()
  if not args.reuse:
    base = base_config(args.model, args.out)
    apply_overrides(base, args.set)
    if argv is None:   # run as a script: glibc's huge pages, as `python -m bond.main` re-executes
      from bond import hugepages
      hugepages.reexec_for(base)
    from bond import aot   # as `python -m bond.main` does
    aot.enable_compilation_cache(base.train.compilation_cache)
    for name in names:
      config = run_config(RUNS[name], args, args.out)
      print(train_one(RUNS[name], config, args, args.out), flush=True)
  out = report(args.out, names, args.model, args.write_docs)
  print(f"done in {time.time() - start:.0f}s")
  for p in ["results.csv", "results.md", "claims.md"] + [os.path.basename(p) for p in
                                                          out["figures"]]:
    print(os.path.join(args.out, p))
  return out


if __name__ == "__main__":
  main()
