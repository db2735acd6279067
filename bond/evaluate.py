"""Evaluation: exact toy metrics, the exact Best-of-N curve, and the run's plots.

The BoN curve is what the papers draw next to training runs: for N = 1, 2, 4, ... the exact
KL(π_BoN(N)‖π_ref), expected reward and win rate against π_ref (algorithms.md §1, §8).
"""

from __future__ import annotations

import os
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from bond import bon


def bon_curve(ref_log_probs, rewards, ns: Sequence[float] = (1, 2, 4, 8, 16, 32, 64),
              lengths=None) -> dict:
  """Exact BoN points averaged over prompts: {'n', 'kl', 'reward', 'win_rate'} lists, and
  'mean_length' (E_{π_BoN}[len(y)]) when `lengths` [M] of the completions is given."""
  out = {"n": [], "kl": [], "reward": [], "win_rate": []}
  if lengths is not None:
    out["mean_length"] = []
  for n in ns:
    logp = bon.bon_log_probs(ref_log_probs, rewards, n)
    out["n"].append(float(n))
    out["kl"].append(float(jnp.mean(bon.kl(logp, ref_log_probs))))
    out["reward"].append(float(jnp.mean(bon.expected_reward(logp, rewards))))
    out["win_rate"].append(float(jnp.mean(bon.win_rate_vs_ref(logp, ref_log_probs, rewards))))
    if lengths is not None:
      out["mean_length"].append(float(jnp.mean(jnp.exp(logp) @ jnp.asarray(lengths, logp.dtype))))
  return out


def plot_run(records: list[dict], out_dir: str, curve: dict | None = None) -> list[str]:
  """PNG plots of a run's metrics.jsonl records; returns the written paths."""
  # Figure objects with no pyplot: no global backend switch (notebooks keep inline drawing).
  from matplotlib.figure import Figure

  os.makedirs(out_dir, exist_ok=True)
  paths = []

  def series(key):
    return [(r["step"], r[key]) for r in records if key in r]

  exact = series("exact/kl_to_ref")
  fig = Figure(figsize=(5, 4))
  ax = fig.subplots()
  if exact:
    kl = [r["exact/kl_to_ref"] for r in records if "exact/kl_to_ref" in r]
    rew = [r["exact/reward"] for r in records if "exact/kl_to_ref" in r]
    ax.plot(kl, rew, "o-", ms=3, label="run (exact)")
    ax.set_xlabel("KL(π ‖ π_ref), exact")
  else:
    kl = [r.get("kl/policy_ref", np.nan) for r in records]
    rew = [r.get("reward/mean", np.nan) for r in records]
    ax.plot(kl, rew, "o-", ms=3, label="run (sampled)")
    ax.set_xlabel("KL(π ‖ π_ref), estimate")
  if curve is not None:
    ax.plot(curve["kl"], curve["reward"], "k--", label="Best-of-N (exact)")
    for n, x, y in zip(curve["n"], curve["kl"], curve["reward"]):
      ax.annotate(f"N={n:g}", (x, y), fontsize=7)
  ax.set_ylabel("expected reward")
  ax.legend()
  ax.set_title("reward vs KL")
  fig.tight_layout()
  paths.append(os.path.join(out_dir, "reward_vs_kl.png"))
  fig.savefig(paths[-1], dpi=100)

  fig = Figure(figsize=(5, 4))
  ax = fig.subplots()
  drew = False
  for key in ("exact/fwd_kl_to_bon", "exact/bwd_kl_to_bon", "exact/fwd_kl_to_bon_n",
              "exact/bwd_kl_to_bon_n", "loss"):
    pts = series(key)
    if pts and (key != "loss" or not drew):
      ax.plot(*zip(*pts), label=key)
      drew = True
  ax.set_xlabel("step")
  ax.legend()
  ax.set_title("divergences to π_BoN" if drew else "loss")
  fig.tight_layout()
  paths.append(os.path.join(out_dir, "divergences.png"))
  fig.savefig(paths[-1], dpi=100)
  return paths
