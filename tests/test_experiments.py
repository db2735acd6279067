"""experiments/real.py, the Gemma 3 270M experiment runner (issue 18).

Fast tests: the prompts, the verdict rule, the resume/skip logic and the reports on fake
workdirs. The slow test: a 2-step smoke of every experiment type through the runner on a random
tiny Gemma 3 with the real tokenizer and the VADER reward, then `--reuse` and a rerun that skips.
"""

import json
import math
import os
import shutil

import numpy as np
import pytest

from experiments import real

# Compiles much and runs little: XLA's quicker codegen (tests/conftest.py, `quick_compiles`).
pytestmark = pytest.mark.quick_compiles

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args(*argv):
  """The runner's parsed arguments (as main() sees them) without running anything."""
  import argparse
  ns = argparse.Namespace(model="real", smoke=False, steps=None, set=[], redo=[],
                          keep_checkpoints=False)
  for k, v in zip(argv[::2], argv[1::2]):
    setattr(ns, k, v)
  return ns


# ---------------------------------------------------------------------------------------------
# Prompts.


def _prompts(name):
  with open(os.path.join(ROOT, "data", "prompts", name)) as f:
    return [json.loads(line)["prompt"] for line in f if line.strip()]


def test_prompts_are_enough_distinct_and_disjoint():
  train, held = _prompts("real_train.jsonl"), _prompts("real_eval.jsonl")
  assert len(train) >= 200 and len(held) == 64
  assert len(set(train)) == len(train) and len(set(held)) == len(held)
  assert not set(train) & set(held)
  assert not (set(train) | set(held)) & set(_prompts("reviews.jsonl"))


# ---------------------------------------------------------------------------------------------
# The verdict rule.


def test_verdict_rule():
  v = real.verdict
  assert v(0.5, 0.2) == "reproduced"                       # d > 2 se
  assert v(0.3, 0.2) == "inconclusive"
  assert v(-0.5, 0.2) == "not reproduced"                  # d < −2 se
  assert v(0.4, 0.2) == "inconclusive"                     # exactly 2 se: not beyond
  assert v(math.nan, 0.1) == v(0.1, math.nan) == "inconclusive"
  # Non-inferiority with margin 0.05: d − 2se > −m reproduced, d + 2se < −m not reproduced.
  assert v(0.0, 0.01, "noninferior", 0.05) == "reproduced"
  assert v(-0.2, 0.01, "noninferior", 0.05) == "not reproduced"
  assert v(-0.04, 0.01, "noninferior", 0.05) == "inconclusive"
  # Equivalence with margin 0.1: |d| + 2se ≤ m reproduced, |d| − 2se > m not reproduced.
  assert v(0.02, 0.01, "equivalent", 0.1) == "reproduced"
  assert v(-0.5, 0.1, "equivalent", 0.1) == "not reproduced"
  assert v(0.09, 0.01, "equivalent", 0.1) == "inconclusive"
  with pytest.raises(ValueError):
    v(0.0, 1.0, "sideways")
  assert real.combine(["reproduced", "reproduced"]) == "reproduced"
  assert real.combine(["reproduced", "inconclusive"]) == "inconclusive"
  assert real.combine(["reproduced", "not reproduced", "inconclusive"]) == "not reproduced"
  assert real.combine([]) == "not run"


def test_at_kl_interpolates_from_pi_ref():
  traj = [{"eval/kl_to_ref": 0.0, "eval/reward": 0.1, "eval/reward_se": 0.0},
          {"eval/kl_to_ref": 1.0, "eval/reward": 0.3, "eval/reward_se": 0.02},
          {"eval/kl_to_ref": 2.0, "eval/reward": 0.4, "eval/reward_se": 0.04}]
  assert real.at_kl(traj, 0.5, "eval/reward") == pytest.approx((0.2, 0.01))
  assert real.at_kl(traj, 1.5, "eval/reward") == pytest.approx((0.35, 0.03))
  assert all(math.isnan(x) for x in real.at_kl(traj, 3.0, "eval/reward"))
  d, se = real.diff((0.5, 0.03), (0.2, 0.04))
  assert (d, se) == pytest.approx((0.3, 0.05))
  assert real.pooled([(0.2, 0.02), (0.4, 0.02)]) == pytest.approx((0.3, math.sqrt(8e-4) / 2))


# ---------------------------------------------------------------------------------------------
# Configs, resume and skip logic, reports, on fake workdirs.


def test_every_run_config_is_valid_and_shares_the_settings(tmp_path):
  from bond import config as config_lib
  args = _args()
  seen = set()
  for name, run in real.RUNS.items():
    c = real.run_config(run, args, str(tmp_path))
    config_lib.validate(c, check_files=False)
    # What every run shares.
    seen.add((c.data.batch_size, c.sampling.max_new_tokens, c.sampling.temperature, c.optim.lr,
              c.eval.path, c.eval.num_prompts, c.eval.ref_samples, c.eval.policy_samples,
              c.model.checkpoint, c.model.lora.rank, c.model.lora.targets))
    assert c.train.seed == c.data.shuffle_seed == run.seed
    assert c.eval.every * run.evals <= c.train.num_steps
    if run.pairs:
      assert c.data.source == "pairs_jsonl" and c.bond.n == 8
      assert c.bond.beta_ipo == pytest.approx(real.BETA_STAR_8)
  assert seen == {(4, 16, 1.0, 2e-4, real.EVAL_PROMPTS, 64, 16, 4, "gemma3_270m", 8, "attn,mlp")}
  c = real.run_config(real.RUNS["jbond_swap10"], args, str(tmp_path))
  assert (c.bond.anchor, c.bond.swap_every, c.bond.eta) == ("swap", 10, real.FAST_ETA)
  # --set reaches every run; unknown keys fail naming the key.
  c = real.run_config(real.RUNS["dpo"], _args("set", ["optim.lr=3e-6", "eval.num_prompts=8"]),
                      str(tmp_path))
  assert (c.optim.lr, c.eval.num_prompts) == (3e-6, 8)
  with pytest.raises(ValueError, match="model.nonexistent"):
    real.apply_overrides(c, ["model.nonexistent=4"])


def _fake_run(out, name, config, kls=(0.5, 1.0), rewards=(0.3, 0.5)):
  """A finished run: metrics.jsonl with evaluations and DONE.json."""
  workdir = os.path.join(out, "runs", name)
  os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
  steps = config.train.num_steps
  records = []
  for i, (kl, r) in enumerate(zip(kls, rewards)):
    step = (i + 1) * steps // len(kls)
    for before in (step - 2, step - 1):
      records.append({"step": before, "loss": 1.0, "reward/mean": r, "kl/policy_ref": kl,
                      "time/elapsed_s": 10.0 * before})
    rec = {"step": step, "loss": 1.0, "reward/mean": r, "kl/policy_ref": kl,
           "time/elapsed_s": 10.0 * step + 5, "time/eval_s": 3.0}
    for key, v in (("kl_to_ref", kl), ("reward", r), ("win_rate", 0.5 + r / 2), ("length", 16.0),
                   ("effective_n", 1 + kl), ("bwd_kl_to_bon", 0.1), ("fwd_kl_to_bon", 0.2),
                   ("log_quantile", -0.5)):
      rec[f"eval/{key}"], rec[f"eval/{key}_se"] = v, 0.01
    records.append(rec)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  points = {"n": [1.0, 2.0, 4.0], "kl_bound": [0.0, 0.19, 0.64], "kl": [0.0, 0.16, 0.57],
            "kl_se": [0.0, 0.01, 0.01], "reward": [0.14, 0.31, 0.46],
            "reward_se": [0.02, 0.02, 0.02], "win_rate": [0.5, 0.65, 0.78],
            "win_rate_se": [0.0, 0.01, 0.01], "mean_length": [16.0] * 3,
            "mean_length_se": [0.0] * 3, "log_quantile": [-0.7, -0.4, -0.2],
            "log_quantile_se": [0.01] * 3}
  with open(os.path.join(workdir, "eval", "reference_points.json"), "w") as f:
    json.dump(points, f)
  real.mark_done(workdir, config, {"wall_s": 100.0, **real.timing(records)})
  return workdir


def test_run_status_resume_and_stale(tmp_path):
  out = str(tmp_path)
  config = real.run_config(real.RUNS["jbond_eta0.1"], _args(), out)
  workdir = os.path.join(out, "runs", "jbond_eta0.1")
  assert real.run_status(workdir, config) == ("new", [])
  os.makedirs(os.path.join(workdir, "checkpoints", "20"))
  assert real.run_status(workdir, config) == ("resume", [])
  _fake_run(out, "jbond_eta0.1", config)
  assert real.run_status(workdir, config) == ("done", [])
  # The compilation cache path does not count; any other key does.
  config.train.compilation_cache = "/elsewhere"
  assert real.run_status(workdir, config) == ("done", [])
  config.bond.eta = 0.3
  status, diff = real.run_status(workdir, config)
  assert status == "stale" and diff == ["bond.eta: 0.1 -> 0.3"]
  # A key added to bond after the run finished counts only away from its default.
  config.bond.eta = 0.1
  done = os.path.join(workdir, "DONE.json")
  saved = json.load(open(done))
  del saved["config"]["sampling"]["cpu_kernels"]
  json.dump(saved, open(done, "w"))
  assert real.run_status(workdir, config) == ("done", [])
  config.sampling.cpu_kernels = "off"
  assert real.run_status(workdir, config) == ("stale", ["sampling.cpu_kernels: None -> 'off'"])
  t = real.timing(real.read_records(workdir))
  assert t["step_s"] == pytest.approx(10.0) and t["eval_s"] == [3.0, 3.0]


def test_rerun_skips_finished_runs_and_reports(tmp_path, monkeypatch):
  """Finished workdirs are not trained again; a stale one stops the runner unless --redo."""
  from bond import train
  out = str(tmp_path)

  def fail(*a, **k):
    raise AssertionError("a finished run was trained again")
  monkeypatch.setattr(train, "train_and_evaluate", fail)
  names = ["jbond_eta0.1", "jbond_eta0.02", "reinforce_0.01", "jbond_swap10"]
  for name, kls, rewards in zip(names, ((0.5, 1.0), (0.2, 0.4), (0.6, 1.2), (0.7, 1.4)),
                                ((0.3, 0.5), (0.2, 0.3), (0.2, 0.3), (0.3, 0.5))):
    _fake_run(out, name, real.run_config(real.RUNS[name], _args(), out), kls, rewards)
  common = ["--out", out, "--set", "train.compilation_cache="]
  result = real.main(common + ["--only", ",".join(names)])
  rows = {r["id"]: r for r in result["claims"]}
  assert rows["C10a (jbond_eta0.1)"]["verdict"] == "reproduced"     # 0.5 vs 0.14 ± 0.02
  assert rows["C8 (must runs)"]["verdict"] == "reproduced"           # KL 1.0 vs 0.4
  assert rows["C7a"]["verdict"] == "reproduced"                      # KL 1.4 vs 1.0
  assert rows["C11 (β_RL=0.01)"]["verdict"] == "reproduced"          # at KL 1.0: 0.5 vs ~0.28
  assert rows["C11 (β_RL=0.001)"]["verdict"] == "not run"
  assert rows["C1"]["verdict"] == "not run" and "should-have" in rows["C1"]["why"]
  for name in ("results.csv", "results.md", "claims.md", "bon_points.csv",
               "exp1_reward_vs_kl.png", "exp2_over_training.png"):
    assert os.path.isfile(os.path.join(out, name)), name
  with open(os.path.join(out, "results.csv")) as f:
    lines = f.read().splitlines()
  assert len(lines) == 1 + 2 * len(names) and "eval/reward_se" in lines[0]   # evaluations only
  # A finished run with other settings is not silently replaced.
  with pytest.raises(SystemExit, match="--redo jbond_eta0.1"):
    real.main(common + ["--only", "jbond_eta0.1", "--set", "bond.gamma=0.5"])


def test_report_includes_finished_should_have_runs_only(tmp_path):
  """--reuse with no selection reports the must-have grid plus every should-have run that
  finished (DONE.json); a run only started is not added, and training still defaults to MUST."""
  import argparse
  parser = argparse.ArgumentParser()
  should = [n for n, r in real.RUNS.items() if r.should]
  os.makedirs(tmp_path / "runs" / should[0])
  (tmp_path / "runs" / should[0] / "DONE.json").write_text("{}")
  os.makedirs(tmp_path / "runs" / should[1])           # started, not finished
  args = lambda reuse: argparse.Namespace(only="", experiment="", reuse=reuse,  # noqa: E731
                                          out=str(tmp_path))
  assert real.select(args(True), parser) == list(real.MUST) + [should[0]]
  assert real.select(args(False), parser) == list(real.MUST)


def test_shared_reference_cache_is_installed_with_the_runs_seed(tmp_path):
  out, model = str(tmp_path), "real"
  first = os.path.join(out, "runs", "a")
  os.makedirs(os.path.join(first, "eval"))
  meta = {"seed": 0, "num_prompts": 64, "k": 16, "max_new_tokens": 16, "prompts_sum": 123}
  np.savez(os.path.join(first, "eval", "reference.npz"), meta=json.dumps(meta),
           rewards=np.arange(6.0).reshape(2, 3))
  with open(os.path.join(first, "eval", "reference_points.json"), "w") as f:
    json.dump({"n": [1.0]}, f)
  real.capture_reference(out, model, first)
  second = os.path.join(out, "runs", "b")
  assert real.install_reference(out, model, second, seed=1)
  assert not real.install_reference(out, model, second, seed=1)   # never overwrites
  saved = dict(np.load(os.path.join(second, "eval", "reference.npz")))
  assert json.loads(str(saved.pop("meta"))) == {**meta, "seed": 1}
  np.testing.assert_array_equal(saved["rewards"], np.arange(6.0).reshape(2, 3))


def test_docs_markers_are_filled(tmp_path):
  docs = tmp_path / "real_results.md"
  shutil.copyfile(real.DOCS, docs)
  png = tmp_path / "fig.png"
  png.write_bytes(b"\x89PNG")
  real.write_docs(str(docs), [str(png)], "TABLES", "TIMINGS", "CLAIMS", "")
  text = docs.read_text()
  for body in ("TABLES", "TIMINGS", "CLAIMS", "figures/real/fig.png"):
    assert body in text
  assert (tmp_path / "figures" / "real" / "fig.png").is_file()
  real.write_docs(str(docs), [str(png)], "TABLES2", "TIMINGS", "CLAIMS", "")   # idempotent
  text = docs.read_text()
  assert "TABLES2" in text and "TABLES\n" not in text


# ---------------------------------------------------------------------------------------------
# The smoke of every experiment type (slow).

# DPO and IPO share BoNBoN's offline code path (test_every_run_config_is_valid... checks their
# configs); leaving them out keeps this test near 3 minutes of CPU.
SMOKE_RUNS = ["jbond_eta0.1", "reinforce_0.01", "jbond_swap10", "bonbon", "bonbon_dpo",
              "bond_bwd_ties"]


@pytest.mark.slow
def test_smoke_every_experiment_type_then_reuse_then_skip(tmp_path, monkeypatch):
  """2 steps of online J-BOND (EMA and swap anchors), REINFORCE, BoNBoN (IPO and DPO terms) on shared
  best/worst-of-8 pairs and backward-KL BOND with the tie-exact reward, on a random tiny Gemma 3
  with the real tokenizer and VADER; then --reuse redraws everything, and a rerun trains nothing.
  """
  from bond import train
  out = str(tmp_path / "out")
  common = ["--out", out, "--smoke", "--model", "tiny", "--set", "train.compilation_cache="]
  result = real.main(common + ["--only", ",".join(SMOKE_RUNS)])
  res = result["results"]
  trained = SMOKE_RUNS
  assert sorted(res.done) == sorted(trained)
  for name in trained:
    last = res.records[name][-1]
    assert last["step"] == 2
    for key in ("reward", "win_rate", "kl_to_ref", "effective_n", "bwd_kl_to_bon",
                "fwd_kl_to_bon"):
      assert math.isfinite(last[f"eval/{key}"]) and math.isfinite(last[f"eval/{key}_se"]), key
    assert not os.path.exists(os.path.join(out, "runs", name, "checkpoints"))   # cleaned up
  # Shared inputs: one reference cache (every run's Best-of-N points identical), one pairs file.
  points = {json.dumps(json.load(open(os.path.join(out, "runs", n, "eval",
                                                    "reference_points.json"))))
            for n in trained}
  assert len(points) == 1
  with open(os.path.join(out, "pairs.jsonl")) as f:
    pairs = [json.loads(line) for line in f]
  assert len(pairs) == 8 and all({"prompt", "best", "worst"} <= set(p) for p in pairs)
  assert res.configs["bonbon"]["data"]["path"] == os.path.join(out, "pairs.jsonl")
  rows = {r["id"]: r for r in result["claims"]}
  assert rows["C7a"]["verdict"] != "not run" and rows["T1 (bwd)"]["verdict"] == "not run"

  # --reuse regenerates tables, figures and claims from the workdirs alone.
  figures = ["exp1_reward_vs_kl.png", "exp2_over_training.png", "exp3_bonbon.png",
             "exp4_ties.png"]
  outputs = ["results.csv", "results.md", "claims.md"] + figures
  for name in outputs:
    os.remove(os.path.join(out, name))
  monkeypatch.setattr(train, "train_and_evaluate",
                      lambda *a, **k: pytest.fail("--reuse or a rerun trained a run"))
  docs = tmp_path / "docs" / "real_results.md"
  docs.parent.mkdir()
  shutil.copyfile(real.DOCS, docs)
  real.main(common + ["--only", ",".join(SMOKE_RUNS), "--reuse", "--write-docs", str(docs)])
  for name in outputs:
    assert os.path.isfile(os.path.join(out, name)), name
  text = docs.read_text()
  assert "figures/real/exp1_reward_vs_kl.png" in text and "| C7a |" in text
  # A rerun of the same command skips every finished run.
  real.main(common + ["--only", ",".join(SMOKE_RUNS)])
