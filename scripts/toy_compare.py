"""The papers' toy experiments on the exact harness: BOND-family vs REINFORCE, BoNBoN vs DPO/IPO.

    python scripts/toy_compare.py --out /tmp/toy_compare [--steps 180] [--only jbond,dpo] [--reuse]

Two groups of runs, each trained with `bond.train.train_and_evaluate` from the project's config
files (one workdir per run under OUT/runs/), every metric exact (enumerated) on the toy task:

  frontier   (default task)  J-BOND (configs/toy_jbond.py), BOND Jeffreys N=4 (toy_bond.py),
             iterative BOND n=2 with hard anchor swaps (toy_iterative.py), REINFORCE with
             β_RL ∈ {0.001, 0.01, 0.1, 1} (toy_baselines.py); BOND §5 / Fig. 4.
  length     (toy_bonbon.py's task: reward bonus per token, eos so lengths vary) BoNBoN, DPO, IPO
             on the same best/worst-of-8 pairs of π_ref, β = β*_8; BoNBoN Fig. 1.
  ties       (default task: rewards on 5 integer levels, so they tie) backward-KL and Jeffreys
             BOND against Best-of-4 of π_ref with the log-quantile reward vs the tie-exact BOND
             reward (`bond.bond_reward`), p̂ from k = 4 or 16 anchor samples, same seeds and
             1080 steps; distance to π_BoN(4) itself.

Writes OUT/results.csv (every evaluation of every run), OUT/results.md (tables), OUT/bon_curve.md
(the exact Best-of-N points of each task) and the PNGs reward_vs_kl.png, distance_to_bon.png,
bonbon_length.png. CPU only; about 4 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/

import jax
import numpy as np

from bond import evaluate, toy, train  # noqa: E402
from configs import toy_baselines, toy_bond, toy_bonbon, toy_iterative, toy_jbond  # noqa: E402

BON_NS = (1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
MATCHED_KL = {"frontier": (0.1, 0.2, 0.35, 0.75), "length": (0.1, 0.3, 0.6),
              "ties": (0.1, 0.2, 0.3)}
COLUMNS = ("run", "group", "step", "exact/kl_to_ref", "exact/reward", "exact/win_rate",
           "exact/effective_n", "exact/fwd_kl_to_bon", "exact/bwd_kl_to_bon",
           "exact/reward_gap_to_bon", "exact/mean_length", "exact/log_quantile",
           "exact/fwd_kl_to_bon_n", "exact/bwd_kl_to_bon_n")
SHORT = {"exact/kl_to_ref": "KL(π‖π_ref)", "exact/reward": "E[r]", "exact/win_rate": "win vs π_ref",
         "exact/effective_n": "N*", "exact/fwd_kl_to_bon": "KL(BoN(N*)‖π)",
         "exact/bwd_kl_to_bon": "KL(π‖BoN(N*))", "exact/reward_gap_to_bon": "E[r]−E_BoN(N*)[r]",
         "exact/mean_length": "mean len", "exact/fwd_kl_to_bon_n": "KL(BoN(n)‖π)",
         "exact/bwd_kl_to_bon_n": "KL(π‖BoN(n))"}


def _length_task(config):
  """Put `config` on toy_bonbon.py's task (length bonus, eos) with best/worst-of-8 pairs."""
  config.task = toy_bonbon.get_config().task
  return config


def _tie_run(variant: str, reward: str, k: int):
  """toy_bond.py:VARIANT with bond.bond_reward = reward and k anchor samples for p̂, trained 6x
  longer than the frontier runs (1080 steps), to get near the target π_BoN(4)."""
  config = toy_bond.get_config(variant)
  config.bond.bond_reward = reward
  config.bond.k = k
  config.train.num_steps = 1080
  return config


# name -> (group, config factory). Offline runs all read the same pairs: same task, n, seed.
RUNS = {
    "jbond": ("frontier", toy_jbond.get_config),
    "bond_jeffreys_n4": ("frontier", lambda: toy_bond.get_config("jeffreys")),
    "iterative_bond_n2": ("frontier", toy_iterative.get_config),
    **{f"reinforce_{b}": ("frontier", lambda b=b: toy_baselines.get_config(f"reinforce_{b}"))
       for b in toy_baselines.REINFORCE_BETAS},
    **{f"bond_{v}_n4_k{k}_{reward}": ("ties", lambda v=v, reward=reward, k=k: _tie_run(v, reward, k))
       for k in (4, 16) for v in ("bwd", "jeffreys") for reward in ("log_quantile", "exact_ties")},
    "bonbon": ("length", toy_bonbon.get_config),
    "dpo": ("length", lambda: _length_task(toy_baselines.get_config("dpo"))),
    "ipo": ("length", lambda: _length_task(toy_baselines.get_config("ipo"))),
}


def run_config(name: str, steps: int | None):
  config = RUNS[name][1]()
  if steps is not None:
    config.train.num_steps = steps
  config.train.checkpoint_every = config.train.num_steps   # one checkpoint, at the end
  config.train.log_every = config.eval.every = 10
  return config


def train_run(name: str, config, out: str, reuse: bool = False) -> list[dict]:
  """Trains `name` from scratch in OUT/runs/NAME (or, with `reuse`, reads its metrics.jsonl);
  returns its records with exact metrics."""
  workdir = os.path.join(out, "runs", name)
  start = time.time()
  if not reuse:
    shutil.rmtree(workdir, ignore_errors=True)   # never resume a previous comparison
    train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f if line.strip()]
  records = [r for r in records if "exact/reward" in r]
  last = records[-1]
  print(f"[{name}] {time.time() - start:.0f}s: step {last['step']} "
        f"KL {last['exact/kl_to_ref']:.3f} "
        f"reward {last['exact/reward']:.3f} win {last['exact/win_rate']:.3f} "
        f"N* {last['exact/effective_n']:.2f} fwd/bwd to BoN {last['exact/fwd_kl_to_bon']:.3f}/"
        f"{last['exact/bwd_kl_to_bon']:.3f}", flush=True)
  return records


def task_curve(config) -> dict:
  """Exact Best-of-N points (KL, reward, win rate, mean length) of the config's task and π_ref."""
  exp = train.build(config)
  ref_lp = toy.policy_log_probs(exp.model_config, exp.params, exp.task)
  return evaluate.bon_curve(ref_lp, exp.task.rewards, BON_NS, lengths=exp.task.lengths)


def at_kl(records: list[dict], kl: float) -> dict | None:
  """Metrics linearly interpolated where the run first reaches exact KL(π‖π_ref) = kl."""
  prev = None
  for r in records:
    if r["exact/kl_to_ref"] >= kl:
      if prev is None:
        return dict(r)
      lo, hi = prev["exact/kl_to_ref"], r["exact/kl_to_ref"]
      w = (kl - lo) / max(hi - lo, 1e-12)
      return {k: (1 - w) * prev[k] + w * v for k, v in r.items()
              if k.startswith("exact/") and k in prev} | {"step": r["step"]}
    prev = r
  return None


def matched_rows(results: dict[str, list[dict]], names, curve: dict, kls) -> list[dict]:
  """One row per (KL, run) reached, plus the exact Best-of-N point at that KL."""
  rows = []
  for kl in kls:
    bon_row = {"run": "Best-of-N", "at KL": kl, "step": "",
               "exact/reward": float(np.interp(kl, curve["kl"], curve["reward"])),
               "exact/win_rate": float(np.interp(kl, curve["kl"], curve["win_rate"])),
               "exact/mean_length": float(np.interp(kl, curve["kl"], curve["mean_length"])),
               "exact/effective_n": float(np.interp(kl, curve["kl"], curve["n"])),
               "exact/fwd_kl_to_bon": 0.0, "exact/bwd_kl_to_bon": 0.0}
    rows.append(bon_row)
    for name in names:
      row = at_kl(results[name], kl)
      if row is not None:
        rows.append({"run": name, "at KL": kl, **row})
  return rows


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{v:.3f}"
  return str(v)


def markdown_table(rows: list[dict], keys: tuple[str, ...]) -> str:
  head = "| " + " | ".join(SHORT.get(k, k) for k in keys) + " |"
  sep = "|" + "|".join("---" for _ in keys) + "|"
  body = ["| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
  return "\n".join([head, sep] + body)


def write_tables(out: str, results: dict[str, list[dict]], curves: dict[str, dict]) -> None:
  rows = [{"run": name, "group": RUNS[name][0], **r} for name, records in results.items()
          for r in records]
  with open(os.path.join(out, "results.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)

  frontier_keys = ("run", "step", "exact/kl_to_ref", "exact/reward", "exact/win_rate",
                   "exact/effective_n", "exact/fwd_kl_to_bon", "exact/bwd_kl_to_bon",
                   "exact/reward_gap_to_bon")
  length_keys = ("run", "step", "exact/kl_to_ref", "exact/reward", "exact/win_rate",
                 "exact/mean_length", "exact/effective_n", "exact/fwd_kl_to_bon",
                 "exact/bwd_kl_to_bon", "exact/fwd_kl_to_bon_n", "exact/bwd_kl_to_bon_n")
  ties_keys = ("run", "step", "exact/kl_to_ref", "exact/reward", "exact/win_rate",
               "exact/fwd_kl_to_bon_n", "exact/bwd_kl_to_bon_n", "exact/effective_n")
  parts = []
  for group, keys in (("frontier", frontier_keys), ("length", length_keys), ("ties", ties_keys)):
    names = [n for n in results if RUNS[n][0] == group]
    if not names:
      continue
    finals = [{"run": n, **results[n][-1]} for n in names]
    evaluated = sorted({r["step"] for n in names for r in results[n]})
    marks = {min(evaluated, key=lambda s: abs(s - f * evaluated[-1])) for f in (1 / 3, 2 / 3, 1)}
    along = [{"run": n, **r} for n in names for r in results[n] if r["step"] in marks]
    kls = MATCHED_KL[group]
    matched_keys = ("at KL", "run", "step") + tuple(
        k for k in keys if k not in ("run", "step", "exact/kl_to_ref", "exact/reward_gap_to_bon",
                                     "exact/fwd_kl_to_bon_n", "exact/bwd_kl_to_bon_n"))
    parts += [f"## {group}: final evaluation\n", markdown_table(finals, keys), "",
              f"## {group}: along training (steps {sorted(marks)})\n",
              markdown_table(along, keys), "",
              f"## {group}: at equal KL(π‖π_ref) (first crossing, linear interpolation between "
              "evaluations; `step` is the evaluation after the crossing)\n",
              markdown_table(matched_rows(results, names, curves[group], kls), matched_keys), ""]
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write("\n".join(parts))

  lines = []
  for group, curve in curves.items():
    keys = [k for k in ("n", "kl", "reward", "win_rate", "mean_length") if k in curve]
    lines += [f"## exact Best-of-N, {group} task\n", "| " + " | ".join(keys) + " |",
              "|" + "|".join("---" for _ in keys) + "|"]
    lines += ["| " + " | ".join(_fmt(curve[k][i]) for k in keys) + " |"
              for i in range(len(curve["n"]))]
    lines.append("")
  with open(os.path.join(out, "bon_curve.md"), "w") as f:
    f.write("\n".join(lines))


def _series(records, x, y):
  return [r[x] for r in records], [r[y] for r in records]


def _draw_curve(ax, curve, x, y, label="Best-of-N (exact)"):
  ax.plot(curve[x], curve[y], "k--", lw=1, label=label)
  for n, a, b in zip(curve["n"], curve[x], curve[y]):
    if n in (1, 2, 4, 8, 16, 64):
      ax.annotate(f"N={n:g}", (a, b), fontsize=7, xytext=(3, -8), textcoords="offset points")


def plot(out: str, results: dict[str, list[dict]], curves: dict[str, dict]) -> list[str]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  paths = []
  frontier = {n: r for n, r in results.items() if RUNS[n][0] == "frontier"}
  if frontier:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    _draw_curve(ax, curves["frontier"], "kl", "reward")
    for name, records in frontier.items():
      style = "--" if name.startswith("reinforce") else "-"
      line, = ax.plot(*_series(records, "exact/kl_to_ref", "exact/reward"), style, lw=1.2,
                      label=name)
      ax.plot(records[-1]["exact/kl_to_ref"], records[-1]["exact/reward"], "o",
              color=line.get_color(), ms=4)
    ax.set_xlabel("KL(π ‖ π_ref), exact (nats)")
    ax.set_ylabel("expected reward, exact")
    ax.set_title("reward vs KL along training (dot: final step)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out, "reward_vs_kl.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, title in ((axes[0], "exact/fwd_kl_to_bon", "KL(π_BoN(N*) ‖ π)"),
                           (axes[1], "exact/bwd_kl_to_bon", "KL(π ‖ π_BoN(N*))")):
      for name, records in frontier.items():
        style = "--" if name.startswith("reinforce") else "-"
        ax.plot(*_series(records, "exact/kl_to_ref", key), style, lw=1.2, label=name)
      # Beyond KL(π_BoN(64) ‖ π_ref) no BoN policy is as far from π_ref: N* hits its cap, and
      # with tied rewards π_BoN(N*) has almost no mass off the top level, so KL(π‖π_BoN) explodes.
      ax.axvline(curves["frontier"]["kl"][-1], color="k", ls=":", lw=1, label="KL of BoN(64)")
      ax.set_yscale("log")
      ax.set_ylim(bottom=1e-2)
      ax.set_xlabel("KL(π ‖ π_ref), exact (nats)")
      ax.set_title(f"distance to the BoN family: {title}", fontsize=9)
    axes[0].set_ylabel("nats")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out, "distance_to_bon.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

  length = {n: r for n, r in results.items() if RUNS[n][0] == "length"}
  if length:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, x, ckey, label in ((axes[0], "exact/kl_to_ref", "kl", "KL(π ‖ π_ref), exact (nats)"),
                               (axes[1], "exact/mean_length", "mean_length",
                                "mean length (content tokens), exact")):
      _draw_curve(ax, curves["length"], ckey, "win_rate")
      for name, records in length.items():
        line, = ax.plot(*_series(records, x, "exact/win_rate"), "-", lw=1.2, label=name)
        ax.plot(records[-1][x], records[-1]["exact/win_rate"], "o", color=line.get_color(), ms=4)
      ax.set_xlabel(label)
    axes[0].set_ylabel("win rate vs π_ref (ties ½), exact")
    axes[0].legend(fontsize=7)
    fig.suptitle("best/worst-of-8 pairs, reward with a length bonus", fontsize=9)
    fig.tight_layout()
    paths.append(os.path.join(out, "bonbon_length.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
  return paths


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="/tmp/toy_compare", help="output directory")
  parser.add_argument("--steps", type=int, default=None,
                      help="train steps per run (default: each config's own, 180-200)")
  parser.add_argument("--only", default="", help=f"comma-separated subset of {list(RUNS)}")
  parser.add_argument("--reuse", action="store_true",
                      help="do not train: redraw tables and plots from OUT/runs/*/metrics.jsonl")
  args = parser.parse_args()
  names = [n for n in args.only.split(",") if n] or list(RUNS)
  unknown = sorted(set(names) - set(RUNS))
  if unknown:
    parser.error(f"--only: unknown runs {unknown}; known: {list(RUNS)}")
  os.makedirs(args.out, exist_ok=True)
  print(f"devices: {jax.devices()}")

  start = time.time()
  results, curves = {}, {}
  for name in names:
    config = run_config(name, args.steps)
    group = RUNS[name][0]
    if group not in curves:
      curves[group] = task_curve(config)
    results[name] = train_run(name, config, args.out, reuse=args.reuse)
  write_tables(args.out, results, curves)
  paths = plot(args.out, results, curves)
  print(f"done in {time.time() - start:.0f}s")
  for p in ["results.csv", "results.md", "bon_curve.md"]:
    print(os.path.join(args.out, p))
  print("\n".join(paths))


if __name__ == "__main__":
  main()
