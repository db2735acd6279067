"""Reward functions: one interface, a Gemma reward model trained by Bradley–Terry, toy rewards.

The interface (what `bon.best_of_n`, the train steps and the evaluators call):

    reward_fn(prompt_tokens [B, P], prompt_mask [B, P], completion_tokens [B, T],
              completion_mask [B, T]) -> [B] f32

Prompts are left-padded, completions right-padded (mask 1 on real tokens incl. eos), as the
sampler returns them. Token ids must be in the vocabulary of the reward: `reward_for_policy`
re-tokenizes through text when policy and RM tokenizers differ, and refuses mismatched
vocabularies without tokenizers instead of silently scoring foreign ids.
"""

from __future__ import annotations

import glob
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bond import objectives
from bond import tokenizer as tokenizer_lib
from bond.models import convert, gemma

Array = jax.Array
RewardFn = Callable[[Array, Array, Array, Array], Array]


class RewardModel(nn.Module):
  """Gemma backbone + scalar head on the final-normed hidden state of the last real token.

  `apply({'params': p}, tokens [B, T], mask [B, T]) -> r [B]` f32. Params are
  {'backbone': Gemma params, 'head': Dense(D -> 1)}, so a pretrained Gemma can be the backbone.
  """

  config: gemma.GemmaConfig

  @nn.compact
  def __call__(self, tokens: Array, mask: Array) -> Array:
    mask = mask.astype(jnp.bool_)
    hidden = gemma.Gemma(self.config, name="backbone")(tokens, attention_mask=mask,
                                                        return_hidden=True)   # [B, T, D]
    t = tokens.shape[1]
    last = t - 1 - jnp.argmax(mask[:, ::-1], axis=-1)                          # [B]
    h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]         # [B, D]
    head = nn.Dense(1, dtype=jnp.float32, param_dtype=self.config.param_dtype, name="head")
    return head(h.astype(jnp.float32))[:, 0]


def init_reward_model(config: gemma.GemmaConfig, rng: Array, backbone: Any = None):
  """RM params; `backbone` (Gemma params, e.g. the policy's) replaces the random backbone."""
  tokens = jnp.zeros((1, 4), jnp.int32)
  params = nn.meta.unbox(RewardModel(config).init(rng, tokens, jnp.ones((1, 4), bool))["params"])
  return params if backbone is None else {**params, "backbone": backbone}


def score(config: gemma.GemmaConfig, params, prompt_tokens, prompt_mask, completion_tokens,
          completion_mask) -> Array:
  """r(x, y) [B]: the RM on the concatenation [prompt (left-padded) ‖ completion (right-padded)]."""
  tokens = jnp.concatenate([prompt_tokens, completion_tokens], axis=1).astype(jnp.int32)
  mask = jnp.concatenate([prompt_mask, completion_mask], axis=1).astype(jnp.bool_)
  return RewardModel(config).apply({"params": params}, tokens, mask)


def model_reward_fn(config: gemma.GemmaConfig, params) -> RewardFn:
  """The reward interface for a trained RM (jittable)."""
  return lambda *batch: score(config, params, *batch)


def pairwise_accuracy(r_chosen: Array, r_rejected: Array) -> Array:
  """P[r_w > r_l] + ½ P[r_w = r_l] over pairs."""
  diff = jnp.asarray(r_chosen, jnp.float32) - jnp.asarray(r_rejected, jnp.float32)
  return jnp.mean((diff > 0) + 0.5 * (diff == 0))


PAIR_KEYS = ("prompt_tokens", "prompt_mask", "chosen_tokens", "chosen_mask", "rejected_tokens",
             "rejected_mask")


def pair_rewards(config: gemma.GemmaConfig, params, pairs: dict[str, Array]):
  """(r_chosen [B], r_rejected [B]) for preference pairs with the `PAIR_KEYS` arrays."""
  x = (pairs["prompt_tokens"], pairs["prompt_mask"])
  return (score(config, params, *x, pairs["chosen_tokens"], pairs["chosen_mask"]),
          score(config, params, *x, pairs["rejected_tokens"], pairs["rejected_mask"]))


def train_reward_model(config: gemma.GemmaConfig, params, pairs: dict[str, np.ndarray], rng: Array,
                       *, steps: int = 300, batch_size: int = 64, learning_rate: float = 3e-3):
  """Adam on the Bradley–Terry loss over random minibatches of pairs; returns (params, losses)."""
  missing = [k for k in PAIR_KEYS if k not in pairs]
  if missing:
    raise ValueError(f"train_reward_model: pairs lack {missing}; need {PAIR_KEYS}")
  num = len(pairs["prompt_tokens"])
  if steps < 1 or not 1 <= batch_size <= num:
    raise ValueError(f"train_reward_model: need steps >= 1 and 1 <= batch_size <= {num} pairs, "
                     f"got steps={steps}, batch_size={batch_size}")
  opt = optax.adam(learning_rate)
  data = {k: jnp.asarray(pairs[k]) for k in PAIR_KEYS}

  @jax.jit
  def step(carry, key):
    params, opt_state = carry
    idx = jax.random.choice(key, num, (batch_size,), replace=False)
    batch = {k: v[idx] for k, v in data.items()}
    loss, grads = jax.value_and_grad(
        lambda p: objectives.reward_model_loss(*pair_rewards(config, p, batch))[0])(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  (params, _), losses = jax.lax.scan(step, (params, opt.init(params)),
                                     jax.random.split(rng, steps))
  return params, losses


def bag_of_tokens_reward(weights) -> RewardFn:
  """Hidden linear score r(y) = Σ_t mask_t · w[y_t] (w [V]): a programmatic reward for toy tasks."""
  weights = jnp.asarray(weights, jnp.float32)

  def reward(prompt_tokens, prompt_mask, completion_tokens, completion_mask):
    del prompt_tokens, prompt_mask
    return jnp.sum(jnp.where(completion_mask, weights[completion_tokens], 0.0), axis=-1)

  return reward


def length_reward(eos_id: int | None = None) -> RewardFn:
  """r(y) = number of completion tokens (eos excluded when `eos_id` is given)."""
  def reward(prompt_tokens, prompt_mask, completion_tokens, completion_mask):
    del prompt_tokens, prompt_mask
    real = completion_mask.astype(jnp.bool_)
    if eos_id is not None:
      real &= completion_tokens != eos_id
    return jnp.sum(real, axis=-1).astype(jnp.float32)

  return reward


def _decoded(tokenizer, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
  """Texts [B] of right-padded completions [B, T] (mask True on real tokens), eos dropped."""
  return [tokenizer.decode(t[m], stop_at_eos=True) for t, m in zip(tokens, np.asarray(mask, bool))]


def text_reward(score_texts: Callable[[list[str]], np.ndarray], tokenizer) -> RewardFn:
  """r(y) = score_texts(decode(y)): a host-side text scorer as a jittable reward.

  The completions are decoded on the host through `jax.pure_callback`, so the reward can sit
  inside the jitted train step; `score_texts(texts [B]) -> [B]` sees plain strings.
  """
  def host(completion_tokens, completion_mask):
    texts = _decoded(tokenizer, np.asarray(completion_tokens), completion_mask)
    return np.asarray(score_texts(texts), np.float32).reshape(len(texts))

  def reward(prompt_tokens, prompt_mask, completion_tokens, completion_mask):
    del prompt_tokens, prompt_mask
    out = jax.ShapeDtypeStruct(completion_tokens.shape[:1], jnp.float32)
    return jax.pure_callback(host, out, completion_tokens, completion_mask)

  # The same scores on numpy arrays, for a training loop that rewards outside any jit
  # (`rollout.Stages`): the persistent compilation cache stores no program with a callback.
  reward.host = lambda prompt_tokens, prompt_mask, tokens, mask: host(tokens, mask)
  return reward


def vader_reward(tokenizer) -> RewardFn:
  """r(y) = VADER compound sentiment of the decoded completion, in [−1, 1] (Hutto & Gilbert 2014).

  The prompt is not scored: the task is "continue the text positively".
  """
  from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
  analyzer = SentimentIntensityAnalyzer()
  return text_reward(lambda texts: [analyzer.polarity_scores(t)["compound"] for t in texts],
                     tokenizer)


def retokenized_reward_fn(rm_reward_fn: RewardFn, policy_tokenizer, rm_tokenizer, *,
                          max_prompt_len: int, max_completion_len: int) -> RewardFn:
  """Scores policy ids with an RM of another tokenizer: ids -> text -> RM ids -> RM.

  Prompts are re-encoded left-padded with the RM's bos (truncated at the left if too long),
  completions right-padded (truncated at the right); a completion that ended in the policy's eos
  ends in the RM's eos. The text round trip runs on the host through `jax.pure_callback`, so the
  reward is jittable when `rm_reward_fn` is.
  """
  def host(prompt_tokens, prompt_mask, completion_tokens, completion_mask):
    prompt_tokens, prompt_mask = np.asarray(prompt_tokens), np.asarray(prompt_mask, bool)
    completion_tokens = np.asarray(completion_tokens)
    completion_mask = np.asarray(completion_mask, bool)
    prompts = [policy_tokenizer.decode(t[m]) for t, m in zip(prompt_tokens, prompt_mask)]
    x_tokens, x_mask = rm_tokenizer.batch_encode(prompts, max_len=max_prompt_len, truncate=True)
    y_tokens = np.full((len(prompts), max_completion_len), rm_tokenizer.pad_id, np.int32)
    y_mask = np.zeros(y_tokens.shape, bool)
    texts = _decoded(policy_tokenizer, completion_tokens, completion_mask)
    for b, (t, m, text) in enumerate(zip(completion_tokens, completion_mask, texts)):
      ids = t[m]
      ended = len(ids) > 0 and ids[-1] == policy_tokenizer.eos_id
      seq = rm_tokenizer.encode(text, add_bos=False)
      seq = (seq + [rm_tokenizer.eos_id] if ended else seq)[:max_completion_len]
      y_tokens[b, :len(seq)], y_mask[b, :len(seq)] = seq, True
    return x_tokens, x_mask, y_tokens, y_mask

  def reward(prompt_tokens, prompt_mask, completion_tokens, completion_mask):
    b = prompt_tokens.shape[0]
    shapes = (jax.ShapeDtypeStruct((b, max_prompt_len), jnp.int32),
              jax.ShapeDtypeStruct((b, max_prompt_len), jnp.bool_),
              jax.ShapeDtypeStruct((b, max_completion_len), jnp.int32),
              jax.ShapeDtypeStruct((b, max_completion_len), jnp.bool_))
    return rm_reward_fn(*jax.pure_callback(host, shapes, prompt_tokens, prompt_mask,
                                           completion_tokens, completion_mask))

  return reward


def reward_for_policy(rm_config: gemma.GemmaConfig, rm_params, policy_vocab_size: int,
                      policy_tokenizer=None, rm_tokenizer=None, *, max_prompt_len: int = 0,
                      max_completion_len: int = 0) -> RewardFn:
  """The RM as a reward for a policy's ids: direct when both tokenizers are the same (or none is
  given and the vocabularies agree), re-tokenized through text when two tokenizers are given."""
  direct = model_reward_fn(rm_config, rm_params)
  if policy_tokenizer is None and rm_tokenizer is None:
    if policy_vocab_size != rm_config.vocab_size:
      raise ValueError(
          f"policy vocab size {policy_vocab_size} != reward model vocab size "
          f"{rm_config.vocab_size}: pass policy_tokenizer and rm_tokenizer to re-tokenize through "
          "text; token ids cannot be fed across vocabularies")
    return direct
  if policy_tokenizer is None or rm_tokenizer is None:
    raise ValueError("reward_for_policy: pass both policy_tokenizer and rm_tokenizer, or neither")
  if policy_tokenizer is rm_tokenizer:
    return direct
  if max_prompt_len < 1 or max_completion_len < 1:
    raise ValueError(f"re-tokenizing needs max_prompt_len and max_completion_len >= 1, got "
                     f"{max_prompt_len} and {max_completion_len}")
  return retokenized_reward_fn(direct, policy_tokenizer, rm_tokenizer,
                               max_prompt_len=max_prompt_len,
                               max_completion_len=max_completion_len)


# An RM directory: an HF Gemma directory (the backbone) plus the scalar head as HF's
# `*ForSequenceClassification` names it (`score.weight` [1, D], optional `score.bias` [1]).
HEAD_FILE = "reward_head.safetensors"
KINDS = ("toy", "vader", "length", "model")


def save_reward_model(config: gemma.GemmaConfig, params, path: str) -> None:
  """Writes RM params as `path/{config.json, model.safetensors}` (backbone) + `HEAD_FILE`."""
  from safetensors.numpy import save_file
  convert.to_hf(config, jax.device_get(params["backbone"]), path)
  head = jax.device_get(params["head"])
  save_file({"score.weight": np.asarray(head["kernel"], np.float32).T.copy(),
             "score.bias": np.asarray(head["bias"], np.float32)}, os.path.join(path, HEAD_FILE))


def load_reward_model(path: str, dtype: Any = jnp.float32):
  """(config, params, tokenizer or None) of an RM directory (`save_reward_model`, or an HF
  Gemma `*ForSequenceClassification` directory: its `score` head has no bias).

  The tokenizer is the directory's own (`tokenizer.json` / `tokenizer.model`) when it has one.
  """
  from safetensors import safe_open
  config, backbone = convert.from_hf(path, dtype=dtype, param_dtype=dtype)
  head = {}
  for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
    with safe_open(file, framework="np") as f:
      head.update({k: f.get_tensor(k) for k in f.keys() if k in ("score.weight", "score.bias")})
  if "score.weight" not in head:
    raise ValueError(f"{path!r} has no reward head: expected `score.weight` [1, D] in {HEAD_FILE} "
                     "or in the model's safetensors (HF *ForSequenceClassification)")
  kernel = np.asarray(head["score.weight"], np.float32)
  if kernel.shape != (1, config.embed_dim):
    raise ValueError(f"reward head score.weight has shape {kernel.shape}, expected "
                     f"(1, {config.embed_dim}): a scalar head on the backbone's hidden size")
  bias = np.asarray(head.get("score.bias", np.zeros(1)), np.float32)
  params = {"backbone": backbone, "head": {"kernel": jnp.asarray(kernel.T, dtype),
                                           "bias": jnp.asarray(bias, dtype)}}
  tokenizer = None
  for name in ("tokenizer.json", "tokenizer.model"):
    if os.path.isfile(os.path.join(path, name)):
      tokenizer = tokenizer_lib.load(os.path.join(path, name))
      break
  return config, params, tokenizer


def from_config(reward_config, tokenizer, policy_config: gemma.GemmaConfig, *,
                max_prompt_len: int = 0, max_completion_len: int = 0) -> RewardFn:
  """The reward named by `config.reward` for a policy with `tokenizer` and `policy_config`.

  kinds: 'vader' (`vader_reward`), 'length' (`length_reward`, eos excluded), 'model' (the RM
  directory `reward.checkpoint`, see `load_reward_model`; an RM with its own tokenizer is fed
  re-tokenized text, truncated to `max_prompt_len` / `max_completion_len`, otherwise the
  policy's ids directly). Every returned function is jittable. 'toy' is the toy task's reward
  table (`bond.toy.reward_fn`) and is built with the task, not here.
  """
  kind = reward_config.kind
  if kind == "length":
    return length_reward(eos_id=policy_config.eos_id)
  if kind == "vader":
    if tokenizer is None:
      raise ValueError("reward.kind='vader' scores decoded text and needs the policy's tokenizer "
                       "(tokenizer.path, or a checkpoint that has one)")
    return vader_reward(tokenizer)
  if kind == "model":
    if not reward_config.checkpoint:
      raise ValueError("reward.kind='model' needs reward.checkpoint: an RM directory written by "
                       "`--mode=train_rm` (HF backbone + reward_head.safetensors)")
    rm_config, rm_params, rm_tokenizer = load_reward_model(reward_config.checkpoint)
    if rm_tokenizer is None:      # the RM shares the policy's vocabulary (checked by size)
      return reward_for_policy(rm_config, rm_params, policy_config.vocab_size)
    return reward_for_policy(rm_config, rm_params, policy_config.vocab_size, tokenizer,
                             rm_tokenizer, max_prompt_len=max_prompt_len,
                             max_completion_len=max_completion_len)
  if kind == "toy":
    raise ValueError("reward.kind='toy' is the toy task's reward table: it needs data.source='toy'")
  raise ValueError(f"reward.kind must be one of {list(KINDS)}, got {kind!r}")
