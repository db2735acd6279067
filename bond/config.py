"""Start-up validation of experiment configs: every error names the key and the allowed range."""

from __future__ import annotations

import ml_collections

from bond import steps

from configs import default

CHOICES = {
    "model.dtype": ("float32", "bfloat16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "data.source": ("toy", "jsonl", "tfds", "pairs_jsonl"),
    "data.prompt_truncation": ("keep_end", "keep_start"),
    "reward.kind": ("toy", "vader", "length", "model"),
    "bond.objective": steps.ONLINE + steps.OFFLINE,
    "bond.anchor": ("fixed", "ema", "swap"),
    "bond.quantile_smoothing": ("clip", "add_one"),
    "task.reward_transform": ("identity", "exp3"),
}

# key -> (low, high, inclusive-low); None = unbounded.
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
    "train.checkpoint_every": (1, None), "train.keep_checkpoints": (1, None),
    "eval.every": (1, None),
}


def _flat(cfg: ml_collections.ConfigDict, prefix: str = "") -> dict:
  out = {}
  for key, value in cfg.items():
    name = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_flat(value, name + "."))
    else:
      out[name] = value
  return out


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first offending key."""
  known = _flat(default.get_config())
  given = _flat(config)
  unknown = sorted(set(given) - set(known))
  if unknown:
    raise ValueError(f"unknown config key(s) {unknown}; every key must be declared in "
                     "configs/default.py")
  missing = sorted(set(known) - set(given))
  if missing:
    raise ValueError(f"config is missing key(s) {missing}; start from configs.default.get_config()")
  for key, choices in CHOICES.items():
    if given[key] not in choices:
      raise ValueError(f"{key} must be one of {list(choices)}, got {given[key]!r}")
  for key, (low, high) in RANGES.items():
    value = given[key]
    if (low is not None and value < low) or (high is not None and value > high):
      bounds = f"[{low}, {'inf' if high is None else high}]"
      raise ValueError(f"{key} must be in {bounds}, got {value}")
  b = config.bond
  if b.objective in ("bond_bwd", "bond_jeffreys", "reinforce") and b.num_policy_samples < 2:
    raise ValueError("bond.num_policy_samples must be >= 2 for the leave-one-out baseline of "
                     f"{b.objective}, got {b.num_policy_samples}")
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
