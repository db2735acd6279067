"""Reward interface, Bradley–Terry RM training, programmatic rewards and tokenizer mismatch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from bond import rewards
from bond.models import gemma
from bond.tokenizer import ByteTokenizer, Tokenizer

V, T, P = 16, 6, 2
CONFIG = gemma.GemmaConfig(vocab_size=V, num_layers=2, embed_dim=32, hidden_dim=64, num_heads=2,
                           num_kv_heads=1, head_dim=16)


def _completions(rng, n, lengths=None):
  lengths = rng.integers(1, T + 1, n) if lengths is None else lengths
  mask = np.arange(T)[None] < np.broadcast_to(lengths, (n,))[:, None]
  return np.where(mask, rng.integers(1, V, (n, T)), 0).astype(np.int32), mask


def _prompts(rng, n):
  return rng.integers(1, V, (n, P)).astype(np.int32), np.ones((n, P), bool)


def _bt_pairs(rng, hidden, n, scale=3.0):
  """Pairs labelled by Bradley–Terry from the hidden reward: P[a ≻ b] = σ(scale·(r_a − r_b))."""
  x, xm = _prompts(rng, n)
  (a, am), (b, bm) = _completions(rng, n, T), _completions(rng, n, T)
  ra, rb = np.asarray(hidden(x, xm, a, am)), np.asarray(hidden(x, xm, b, bm))
  a_wins = (rng.random(n) < 1 / (1 + np.exp(-scale * (ra - rb))))[:, None]
  return dict(prompt_tokens=x, prompt_mask=xm,
              chosen_tokens=np.where(a_wins, a, b), chosen_mask=np.where(a_wins, am, bm),
              rejected_tokens=np.where(a_wins, b, a), rejected_mask=np.where(a_wins, bm, am))


def test_trained_rm_recovers_a_hidden_reward():
  """Held out: ≥ 90% pairs ordered as the hidden reward orders them, Spearman ≥ 0.8.

  Measured (seed 0): 94.4% agreement, Spearman 0.91; training takes ~8 s on one CPU core.

  Completions have a fixed length T: the hidden score is a sum over tokens, and attention
  computes averages, so sums over varying lengths would also need the length to be learnt.
  """
  rng = np.random.default_rng(0)
  w = rng.normal(size=V).astype(np.float32)
  hidden = rewards.bag_of_tokens_reward(w)
  train, test = _bt_pairs(rng, hidden, 4000), _bt_pairs(rng, hidden, 500)
  params = rewards.init_reward_model(CONFIG, jax.random.key(0))
  params, losses = rewards.train_reward_model(CONFIG, params, train, jax.random.key(1), steps=500,
                                              batch_size=64, learning_rate=1e-3)
  assert float(losses[-50:].mean()) < 0.5 * float(losses[0])
  x, xm = test["prompt_tokens"], test["prompt_mask"]
  r_w, r_l = rewards.pair_rewards(CONFIG, params, test)
  h_w = hidden(x, xm, test["chosen_tokens"], test["chosen_mask"])
  h_l = hidden(x, xm, test["rejected_tokens"], test["rejected_mask"])
  agree = np.mean(np.sign(np.asarray(r_w - r_l)) == np.sign(np.asarray(h_w - h_l)))
  assert agree >= 0.9
  y, ym = _completions(rng, 500, T)
  x, xm = _prompts(rng, 500)
  rho = scipy.stats.spearmanr(rewards.score(CONFIG, params, x, xm, y, ym), hidden(x, xm, y, ym))[0]
  assert rho >= 0.8
  # Held-out labels are noisy (BT): the RM should be near the hidden reward's own accuracy.
  label_acc = float(rewards.pairwise_accuracy(h_w, h_l))
  assert float(rewards.pairwise_accuracy(r_w, r_l)) > label_acc - 0.05


def test_pairwise_accuracy_counts_ties_half():
  rw, rl = np.array([2.0, 0.0, -1.0, 1.0]), np.array([1.0, 0.0, 3.0, 1.0])
  assert float(rewards.pairwise_accuracy(rw, rl)) == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)


@pytest.fixture(scope="module")
def rm_params():
  return rewards.init_reward_model(CONFIG, jax.random.key(3))


def test_score_reads_the_last_real_token(rm_params):
  """Independent path: Gemma hidden states by hand, head on the last real token."""
  rng = np.random.default_rng(1)
  x, _ = _prompts(rng, 3)
  xm = np.array([[True, True], [False, True], [True, True]])
  x = np.where(xm, x, 0)
  y, ym = _completions(rng, 3, np.array([1, 4, 6]))
  got = np.asarray(rewards.score(CONFIG, rm_params, x, xm, y, ym))
  for b in range(3):
    seq = np.concatenate([x[b][xm[b]], y[b][ym[b]]])[None]           # unpadded
    h = gemma.Gemma(CONFIG).apply({"params": rm_params["backbone"]}, seq, return_hidden=True)
    head = rm_params["head"]
    expected = float(np.asarray(h)[0, -1] @ np.asarray(head["kernel"])[:, 0] + head["bias"][0])
    assert got[b] == pytest.approx(expected, abs=1e-4)
  junk = np.where(ym, y, 7)                                           # pad slots change
  np.testing.assert_allclose(rewards.score(CONFIG, rm_params, x, xm, junk, ym), got, atol=1e-5)
  jitted = jax.jit(rewards.model_reward_fn(CONFIG, rm_params))
  np.testing.assert_allclose(jitted(x, xm, y, ym), got, atol=1e-5)


def test_programmatic_rewards():
  rng = np.random.default_rng(2)
  w = rng.normal(size=V)
  x, xm = _prompts(rng, 5)
  y, ym = _completions(rng, 5)
  y[:, 0] = 3
  bag = rewards.bag_of_tokens_reward(w)(x, xm, y, ym)
  np.testing.assert_allclose(bag, [sum(w[t] for t, m in zip(r, mr) if m) for r, mr in zip(y, ym)],
                             rtol=1e-5)
  np.testing.assert_array_equal(rewards.length_reward()(x, xm, y, ym), ym.sum(1))
  np.testing.assert_array_equal(rewards.length_reward(eos_id=3)(x, xm, y, ym), ym.sum(1) - 1)


class WordTokenizer(Tokenizer):
  """A second vocabulary for the mismatch test: pad 0, eos 1, bos 2, words 3.."""

  WORDS = ["hello", "world", "good", "bad"]

  def __init__(self):
    super().__init__(3 + len(self.WORDS), pad_id=0, bos_id=2, eos_id=1)

  def _encode(self, text):
    return [3 + self.WORDS.index(w) for w in text.split()]

  def _decode(self, ids):
    return " ".join(self.WORDS[i - 3] for i in ids if i >= 3)


def test_retokenizes_through_text_across_vocabularies():
  policy_tok, rm_tok = WordTokenizer(), ByteTokenizer()
  seen = {}

  def rm_fn(x, xm, y, ym):
    seen["prompts"] = [rm_tok.decode(t[m]) for t, m in zip(x, xm)]
    seen["completions"] = [list(t[m]) for t, m in zip(y, ym)]
    return jnp.zeros(len(x))

  x, xm = policy_tok.batch_encode(["hello", "good world"])
  y = np.array([[5, 6, 1, 0], [4, 0, 0, 0]], np.int32)          # "good bad" eos | "world"
  ym = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], bool)
  fn = rewards.retokenized_reward_fn(rm_fn, policy_tok, rm_tok, max_prompt_len=16,
                                     max_completion_len=12)
  fn(x, xm, y, ym)
  assert seen["prompts"] == ["hello", "good world"]
  assert seen["completions"][0] == rm_tok.encode("good bad", add_bos=False) + [rm_tok.eos_id]
  assert seen["completions"][1] == rm_tok.encode("world", add_bos=False)


def test_reward_for_policy_refuses_foreign_ids(rm_params):
  with pytest.raises(ValueError, match="policy vocab size 259 != reward model vocab size 16"):
    rewards.reward_for_policy(CONFIG, rm_params, 259)
  with pytest.raises(ValueError, match="both policy_tokenizer and rm_tokenizer"):
    rewards.reward_for_policy(CONFIG, rm_params, 259, policy_tokenizer=ByteTokenizer())
  with pytest.raises(ValueError, match="max_prompt_len"):
    rewards.reward_for_policy(CONFIG, rm_params, 7, WordTokenizer(), ByteTokenizer())
  direct = rewards.reward_for_policy(CONFIG, rm_params, V)
  x, xm = _prompts(np.random.default_rng(0), 2)
  y, ym = _completions(np.random.default_rng(1), 2)
  np.testing.assert_allclose(direct(x, xm, y, ym), rewards.score(CONFIG, rm_params, x, xm, y, ym))


def test_train_reward_model_errors(rm_params):
  with pytest.raises(ValueError, match="pairs lack"):
    rewards.train_reward_model(CONFIG, rm_params, {"prompt_tokens": np.zeros((4, 2))},
                               jax.random.key(0))
  pairs = _bt_pairs(np.random.default_rng(0), rewards.length_reward(), 8)
  with pytest.raises(ValueError, match="batch_size <= 8"):
    rewards.train_reward_model(CONFIG, rm_params, pairs, jax.random.key(0), batch_size=16)
