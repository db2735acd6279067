"""The sample / bon / train_rm modes (bond/cli.py) and the reward factory (rewards.from_config)."""

import json
import os
import string
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from bond import cli
from bond import config as config_lib
from bond import rewards
from bond import tokenizer as tokenizer_lib
from bond.models import presets
from configs import default

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REVIEWS = os.path.join(ROOT, "data", "prompts", "reviews.jsonl")


def char_tokenizer(path: str) -> str:
  """An HF tokenizer directory with one token per printable ASCII character.

  pad 0, eos 1, bos 2 (the GemmaConfig defaults), unk 3, V = 101 <= 256 (the tiny presets).
  """
  import transformers
  from tokenizers import Tokenizer, decoders, models
  chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
  vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>"] + chars)}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
  tok.decoder = decoders.Fuse()
  transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
      unk_token="<unk>").save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  return char_tokenizer(str(tmp_path_factory.mktemp("char_tok")))


def tiny_text_config(tok_dir: str) -> ml_collections.ConfigDict:
  """A random tiny Gemma 3 on the review prompts with the character tokenizer."""
  c = default.get_config()
  c.model.preset = "tiny_gemma3"
  c.tokenizer.path = tok_dir
  c.data.source = "jsonl"
  c.data.path = REVIEWS
  c.data.max_prompt_len = 96
  c.data.batch_size = 20
  c.reward.kind = "length"
  c.sampling.max_new_tokens = 6
  c.bond.n = 4
  config_lib.validate(c)
  return c


def _run(*args, timeout=300):
  return subprocess.run([sys.executable, "-m", "bond.main", *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout)


def test_bon_mode_on_the_toy_writes_best_and_worst_of_n(tmp_path):
  """Through the CLI; checked against the toy reward table and the token vocabulary."""
  out = tmp_path / "bon.jsonl"
  proc = _run("--config=configs/toy_jbond.py", f"--workdir={tmp_path}", "--mode=bon",
              f"--out={out}", "--config.bond.n=6")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert str(out) in proc.stdout
  records = [json.loads(line) for line in out.read_text().splitlines()]
  from bond import train, toy
  task = train.make_task(default.get_config())
  assert len(records) == task.num_prompts
  for i, r in enumerate(records):
    assert set(r) == {"prompt", "best", "worst", "rewards"} and len(r["rewards"]) == 6
    p = toy.prompt_index(task, np.asarray([r["prompt"]]))[0]
    score = {}
    for name in ("best", "worst"):
      ids = r[name]
      assert 1 <= len(ids) <= task.completions.shape[1]
      row = np.zeros((1, task.completions.shape[1]), np.int32)
      row[0, :len(ids)] = ids
      m = np.arange(row.shape[1])[None] < len(ids)
      score[name] = float(task.rewards[p, toy.completion_index(task, row, m)[0]])
    assert score["best"] == max(r["rewards"]) and score["worst"] == min(r["rewards"])


@pytest.mark.slow
def test_sample_mode_prints_text_from_a_tiny_preset(tok_dir, capsys):
  c = tiny_text_config(tok_dir)
  c.eval.num_samples = 3
  out = cli.sample(c, ["The soup was", "Our trip"])
  assert [len(o) for o in out] == [3, 3]
  printed = capsys.readouterr().out
  assert "=== 'The soup was'" in printed and "=== 'Our trip'" in printed
  assert all(isinstance(t, str) and repr(t) in printed for row in out for t in row)
  assert sum(len(t) for row in out for t in row) > 0
  # No --prompt: the first eval.num_samples prompts of the dataset, decoded.
  out = cli.sample(c, [])
  first = json.loads(open(REVIEWS).readline())["prompt"]
  assert len(out) == 3 and f"=== {first!r}" in capsys.readouterr().out


@pytest.mark.slow
def test_bon_then_train_rm_then_model_reward(tok_dir, tmp_path):
  """Text BoN data under the length reward, an RM trained on it, loaded as reward.kind='model'."""
  c = tiny_text_config(tok_dir)
  path = str(tmp_path / "bon.jsonl")
  assert cli.write_bon(c, path) == 40
  records = [json.loads(line) for line in open(path)]
  prompts = [json.loads(line)["prompt"] for line in open(REVIEWS)]
  tok = tokenizer_lib.load(tok_dir)
  for r, prompt in zip(records, prompts):
    assert r["prompt"] == prompt
    # length reward = completion tokens without eos; each character is one token here.
    assert max(r["rewards"]) >= len(tok.encode(r["best"], add_bos=False))
    assert all(float(x).is_integer() and 0 <= x <= c.sampling.max_new_tokens for x in r["rewards"])

  c.data.source = "pairs_jsonl"
  c.data.path = path
  c.train.num_steps = 60
  c.train.log_every = 20
  c.optim.lr = 3e-3
  rm_dir = cli.train_rm(c, str(tmp_path / "work"))
  logged = [json.loads(line) for line in open(tmp_path / "work" / "rm_metrics.jsonl")]
  assert [r["step"] for r in logged[:-1]] == [20, 40, 60]
  c.reward.kind = "model"
  c.reward.checkpoint = rm_dir
  from bond import train
  exp = train.build(c)
  cols = exp.table.columns
  fn = jax.jit(exp.reward_fn)
  r_w = fn(cols["prompt_tokens"], cols["prompt_mask"], cols["chosen_tokens"], cols["chosen_mask"])
  r_l = fn(cols["prompt_tokens"], cols["prompt_mask"], cols["rejected_tokens"],
           cols["rejected_mask"])
  diff = np.asarray(r_w) - np.asarray(r_l)
  accuracy = np.mean((diff > 0) + 0.5 * (diff == 0))
  assert accuracy == pytest.approx(logged[-1]["rm/train_accuracy"], abs=1e-6)


def test_vader_reward_scores_the_decoded_completion_inside_jit(tok_dir):
  from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
  tok = tokenizer_lib.load(tok_dir)
  texts = ["What a wonderful, lovely day!", "The food was awful.", "It is a table.", ""]
  width = max(len(t) for t in texts) + 1
  y = np.full((len(texts), width), tok.pad_id, np.int32)
  m = np.zeros(y.shape, bool)
  for b, t in enumerate(texts):
    ids = tok.encode(t, add_bos=False) + [tok.eos_id]
    y[b, :len(ids)], m[b, :len(ids)] = ids, True
  y[2, -1] = 7                      # a stray id after the mask is never decoded
  x, xm = tok.batch_encode(["Prompt"] * len(texts))
  fn = rewards.from_config(ml_collections.ConfigDict({"kind": "vader", "checkpoint": ""}), tok,
                           presets.get("tiny_gemma3"))
  got = np.asarray(jax.jit(fn)(x, xm, y, m))
  analyzer = SentimentIntensityAnalyzer()
  expected = [analyzer.polarity_scores(t)["compound"] for t in texts]
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, expected, atol=1e-6)
  assert got[0] > 0.5 and got[1] < -0.3 and got[2] == 0.0


def test_from_config_length_and_errors(tok_dir):
  cfg = lambda kind, ckpt="": ml_collections.ConfigDict({"kind": kind, "checkpoint": ckpt})  # noqa
  policy = presets.get("tiny_gemma3")
  y = np.array([[5, 6, policy.eos_id, 0], [7, 0, 0, 0]], np.int32)
  m = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], bool)
  length = jax.jit(rewards.from_config(cfg("length"), None, policy))
  np.testing.assert_array_equal(length(y[:, :1], m[:, :1], y, m), [2.0, 1.0])
  with pytest.raises(ValueError, match="reward.kind='vader'.*tokenizer"):
    rewards.from_config(cfg("vader"), None, policy)
  with pytest.raises(ValueError, match="reward.kind='model' needs reward.checkpoint"):
    rewards.from_config(cfg("model"), None, policy)
  with pytest.raises(ValueError, match="data.source='toy'"):
    rewards.from_config(cfg("toy"), None, policy)
  with pytest.raises(ValueError, match=r"reward.kind must be one of .* got 'bleu'"):
    rewards.from_config(cfg("bleu"), None, policy)
  with pytest.raises(FileNotFoundError, match="no config.json"):
    rewards.from_config(cfg("model", "/nonexistent/rm"), None, policy)


def test_hf_sequence_classification_reward_model_matches_transformers(tmp_path, torch):
  """An HF Gemma 2 *ForSequenceClassification directory as reward.kind='model' vs PyTorch."""
  import transformers
  from conftest import hf_config
  torch.manual_seed(0)
  model = transformers.Gemma2ForSequenceClassification(
      hf_config(2, num_labels=1, pad_token_id=0)).eval()
  model.save_pretrained(tmp_path)
  config, params, tok = rewards.load_reward_model(str(tmp_path))
  assert tok is None
  rng = np.random.default_rng(0)
  x = rng.integers(3, config.vocab_size, (3, 5)).astype(np.int32)
  y = rng.integers(3, config.vocab_size, (3, 4)).astype(np.int32)
  rm_config = ml_collections.ConfigDict({"kind": "model", "checkpoint": str(tmp_path)})
  fn = rewards.from_config(rm_config, None, config)
  got = np.asarray(fn(x, np.ones_like(x, bool), y, np.ones_like(y, bool)))
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(np.concatenate([x, y], 1), dtype=torch.long)).logits
  np.testing.assert_allclose(got, ref[:, 0].numpy(), atol=1e-4)
  other = config.replace(vocab_size=config.vocab_size + 1)
  with pytest.raises(ValueError, match="policy vocab size"):
    rewards.from_config(rm_config, None, other)


@pytest.mark.parametrize("args", [["--config.bond.betaa=0.5"],
                                  ["--config=configs/toy_bond.py", "--config.bond.nn=3"]])
def test_unknown_config_key_on_the_command_line_is_a_clean_flag_error(args, tmp_path):
  proc = _run(*args, f"--workdir={tmp_path}", timeout=120)
  assert proc.returncode == 1
  assert "FATAL Flags parsing error: unknown config key" in proc.stderr
  assert args[-1].split("=")[0] in proc.stderr and "bond/defaults.py" in proc.stderr
  assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("truncation", ["keep_start", "keep_end"])
def test_prompt_truncation_cuts_the_text_and_keeps_bos_and_the_template(tok_dir, truncation):
  from bond import data, tokenizer
  tok = tokenizer.load(tok_dir)
  template, text = "Summarize: {} TL;DR:", "".join(chr(ord("a") + i % 26) for i in range(50))
  budget = 30 - 1 - len("Summarize: ") - len(" TL;DR:")         # one token per character
  table = data.prompt_table([text, "short"], tok, 30, template, truncation)
  tokens, mask = table.columns["prompt_tokens"], table.columns["prompt_mask"]
  assert table.counters["prompt_truncated"] == 1 and mask[0].all()
  kept = text[:budget] if truncation == "keep_start" else text[-budget:]
  assert tokens[0, 0] == tok.bos_id
  assert tok.decode(tokens[0]) == f"Summarize: {kept} TL;DR:"
  short = tok.encode("Summarize: short TL;DR:")                 # untouched, left-padded
  assert list(tokens[1, mask[1]]) == short and not mask[1, :30 - len(short)].any()
  with pytest.raises(ValueError, match="no room for the text"):
    data.prompt_table([text], tok, 12, template, truncation)
  with pytest.raises(ValueError, match="exactly one"):
    data.prompt_table([text], tok, 30, "no slot", truncation)


def test_cli_fills_the_persistent_compilation_cache(tmp_path):
  """`train.compilation_cache`: the CLI stores compiled programs there (reruns load them). That
  it keeps the small ones too: tests/test_aot.py."""
  cache = tmp_path / "jax_cache"
  proc = _run("--config=configs/toy_jbond.py", f"--workdir={tmp_path / 'w'}", "--mode=bon",
              f"--out={tmp_path / 'bon.jsonl'}", f"--config.train.compilation_cache={cache}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert cache.is_dir() and len(list(cache.glob("*-cache"))) > 0
