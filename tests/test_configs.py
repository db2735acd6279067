"""Every experiment config loads and validates; bad values fail naming the key, also via the CLI;
overrides reach the run; the XSum config runs end to end on mock TFDS data."""

import glob
import importlib
import json
import math
import os
import subprocess
import sys
import time

import pytest

from bond import config as config_lib
from configs import default
from test_cli import char_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
               if not p.endswith("__init__.py"))
VARIANTS = {"toy_bond": ["fwd", "bwd", "jeffreys", None],
            "toy_baselines": ["reinforce_0.001", "reinforce_0.01", "reinforce_0.1", "reinforce_1",
                              "dpo", "ipo", "sft"]}
CASES = [(name, arg) for name in NAMES for arg in VARIANTS.get(name, [None])]


def load(name, arg=None):
  module = importlib.import_module(f"configs.{name}")
  return module.get_config() if arg is None else module.get_config(arg)


def test_every_config_file_is_covered():
  expected = {"default", "toy_jbond", "toy_bond", "toy_iterative", "toy_bonbon", "toy_baselines",
              "xsum_bond", "gemma_jbond", "hh_bonbon", "rm_bt", "gemma3_270m_jbond",
              "gemma3_270m_reinforce", "gemma3_270m_bonbon"}
  assert expected <= set(NAMES)


@pytest.mark.parametrize("name,arg", CASES, ids=[f"{n}:{a}" if a else n for n, a in CASES])
def test_config_loads_and_validates(name, arg):
  c = load(name, arg)
  config_lib.validate(c)
  for key in ("num_steps", "log_every", "checkpoint_every", "seed"):
    assert key in c.train
  assert c.to_json()                                   # serialisable (stored in checkpoints)


def test_variants_select_what_they_name():
  assert [load("toy_bond", a).bond.objective for a in ("fwd", "bwd", "jeffreys")] == [
      "bond_fwd", "bond_bwd", "bond_jeffreys"]
  assert load("toy_bond").bond.objective == "bond_jeffreys" and load("toy_bond").bond.n == 4
  assert [load("toy_baselines", f"reinforce_{b}").bond.beta_rl for b in ("0.001", "0.01", "0.1",
                                                                          "1")] == [
      0.001, 0.01, 0.1, 1.0]
  assert {load("toy_baselines", a).bond.objective for a in ("dpo", "ipo", "sft")} == {
      "dpo", "ipo", "sft"}
  with pytest.raises(ValueError, match="toy_baselines.py needs a variant"):
    load("toy_baselines")
  with pytest.raises(ValueError, match="toy_bond.py variant must be one of"):
    load("toy_bond", "kl")


def test_paper_hyperparameters():
  it = load("toy_iterative").bond
  assert (it.n, it.anchor) == (2, "swap")
  bb = load("toy_bonbon")
  # β*_n = 1 / (2 (n−1) H_{n−1}), BoNBoN §4, written out here independently of bond.bon.
  beta_star_8 = 1.0 / (2 * 7 * sum(1.0 / k for k in range(1, 8)))
  assert bb.bond.n == 8 and bb.bond.alpha == 0.005
  assert bb.bond.beta_ipo == pytest.approx(beta_star_8, rel=1e-8)
  assert bb.task.length_bonus > 0 and bb.task.use_eos
  for name in ("hh_bonbon", "gemma3_270m_bonbon"):
    assert load(name).bond.beta_ipo == pytest.approx(beta_star_8, rel=1e-8)
  jb = load("gemma_jbond")
  assert (jb.data.batch_size, jb.optim.lr, jb.optim.warmup_steps, jb.bond.beta, jb.bond.eta,
          jb.bond.objective, jb.bond.anchor) == (128, 3e-6, 100, 0.5, 0.02, "jbond", "ema")
  xs = load("xsum_bond")
  assert (xs.data.tfds_name, xs.data.prompt_key, xs.data.prompt_template, xs.bond.beta) == (
      "xsum", "document", "Summarize:\n{}\n", 0.5)
  g = load("gemma3_270m_jbond")
  assert (g.model.checkpoint, g.reward.kind, g.bond.objective) == ("gemma3_270m", "vader", "jbond")
  assert os.path.isfile(g.data.path)


def _bad(mutate):
  c = load("toy_jbond")
  mutate(c)
  return c


@pytest.mark.parametrize("mutate,message", [
    (lambda c: setattr(c.bond, "beta", 1.5), r"bond.beta must be in \[0.0, 1.0\], got 1.5"),
    (lambda c: setattr(c.bond, "eta", -1.0), r"bond.eta must be in \[0.0, 1.0\], got -1.0"),
    (lambda c: setattr(c.bond, "gamma", -1.0), r"bond.gamma must be in \[0.0, inf\], got -1.0"),
    (lambda c: setattr(c.bond, "n", 0), r"bond.n must be in \[1, inf\], got 0"),
    (lambda c: setattr(c.bond, "objective", "ppo"), r"bond.objective must be one of .*got 'ppo'"),
    (lambda c: setattr(c.bond, "temperature", 1.0),
     r"unknown config key\(s\) \['bond.temperature'\]"),
], ids=["beta", "eta", "gamma", "n", "objective", "unknown_key"])
def test_bad_values_fail_naming_the_key(mutate, message):
  with pytest.raises(ValueError, match=message):
    config_lib.validate(_bad(mutate))


def _main(*args, timeout=300):
  return subprocess.run([sys.executable, "-m", "bond.main", *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout)


@pytest.mark.parametrize("flag,message", [
    ("--config.bond.beta=1.5", "bond.beta must be in [0.0, 1.0], got 1.5"),
    ("--config.bond.eta=-1", "bond.eta must be in [0.0, 1.0], got -1"),
    ("--config.bond.objective=ppo", "bond.objective must be one of"),
    ("--config.bond.nonsense=1", "nonsense"),   # ml_collections rejects it while parsing
])
def test_cli_rejects_bad_values_before_any_compute(tmp_path, flag, message):
  workdir = tmp_path / "run"
  start = time.time()
  proc = _main("--config=configs/toy_jbond.py", f"--workdir={workdir}", flag, timeout=120)
  assert proc.returncode != 0
  assert message in proc.stderr
  assert not workdir.exists()                          # nothing built, nothing written
  assert time.time() - start < 60


@pytest.mark.slow
def test_cli_overrides_reach_the_run(tmp_path):
  proc = _main("--config=configs/toy_jbond.py", f"--workdir={tmp_path}",
               "--config.train.num_steps=2", "--config.train.log_every=1",
               "--config.bond.beta=0.25")
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in records] == [1, 2]
  assert all(math.isfinite(r["loss"]) for r in records)


@pytest.mark.slow
def test_xsum_config_end_to_end_on_mock_tfds(tmp_path):
  """xsum_bond.py with its TFDS source, template, objective; tiny random Gemma, char tokenizer."""
  import tensorflow_datasets as tfds
  import tensorflow_datasets.summarization.xsum  # noqa: F401  registers the builder without TF
  from bond import train
  c = load("xsum_bond")
  c.model.checkpoint = ""
  c.model.preset = "tiny_gemma3"
  c.model.dtype = "float32"
  c.tokenizer.path = char_tokenizer(str(tmp_path / "tok"))
  c.reward.kind = "length"
  c.reward.checkpoint = ""
  c.data.max_prompt_len = 48
  c.data.batch_size = 4
  c.sampling.max_new_tokens = 4
  c.bond.n, c.bond.k = 2, 3
  c.train.num_steps, c.train.log_every, c.train.checkpoint_every = 2, 1, 2
  config_lib.validate(c)
  with tfds.testing.mock_data(num_examples=8):
    exp = train.build(c)
    texts = [exp.tokenizer.decode(t[m]) for t, m in zip(exp.table.columns["prompt_tokens"],
                                                       exp.table.columns["prompt_mask"])]
    assert len(texts) == 8
    assert all(t.startswith("Summarize:\n") and t.endswith("\n") and len(t) > 12 for t in texts)
    train.train_and_evaluate(c, str(tmp_path / "run"))
  records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert [r["step"] for r in records] == [1, 2]
  for r in records:
    assert math.isfinite(r["loss"])
    assert any(k.startswith("fwd/") for k in r) and any(k.startswith("bwd/") for k in r)
    assert 0 <= r["reward/mean"] <= c.sampling.max_new_tokens
