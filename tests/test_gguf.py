"""The real Gemma 3 270M Q4_K_M GGUF: `from_gguf` against transformers' own GGUF loading."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bond import assets, sampling
from bond.models import convert, gemma
from bond.tokenizer import Tokenizer
from conftest import hf_logits

# Compiles much and runs little: XLA's quicker codegen (tests/conftest.py, `quick_compiles`).
pytestmark = [pytest.mark.slow, pytest.mark.quick_compiles]

PROMPTS = ["The capital of France is", "Once upon a time, there was a little",
           "def fibonacci(n):\n  "]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def path():
  return assets.gemma3_270m_gguf_path()


@pytest.fixture(scope="module")
def ours(path):
  return convert.from_gguf(path)


@pytest.fixture(scope="module")
def hf_model(path, torch):
  import transformers
  return transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32,
      attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def tokenizer(path):
  return Tokenizer.from_gguf(path)


@pytest.fixture(scope="module")
def batch(tokenizer):
  return tokenizer.batch_encode(PROMPTS)


def test_config_matches_transformers(ours, hf_model):
  config, _ = ours
  assert config == convert.config_from_hf(hf_model.config.to_dict())
  assert (config.num_layers, config.embed_dim, config.num_heads, config.num_kv_heads,
          config.head_dim, config.sliding_window, config.vocab_size) == (
              18, 640, 4, 1, 256, 512, 262_144)


def test_logits_match_transformers(ours, hf_model, batch):
  config, params = ours
  tokens, mask = batch
  got = np.asarray(gemma.Gemma(config).apply({"params": params}, jnp.asarray(tokens),
                                              attention_mask=jnp.asarray(mask)))
  ref = hf_logits(hf_model, tokens, mask)
  err = np.abs(got - ref)[mask].max()
  print(f"Gemma 3 270M GGUF max abs logit err vs transformers: {err:.2e} "
        f"(max |logit| {np.abs(ref[mask]).max():.1f})")
  assert err <= 1e-3


def greedy(config, params, tokens, mask, steps):
  """Greedy decode through the KV cache: one prefill, then one token per step. -> [B, steps]."""
  apply = jax.jit(lambda p, t, pos, m, c: gemma.Gemma(config).apply(
      {"params": p}, t, positions=pos, attention_mask=m, cache=c))
  b, width = tokens.shape
  cache = gemma.init_cache(config, b, width + steps)
  positions = gemma.default_positions(jnp.asarray(mask))
  logits, cache = apply(params, tokens, positions, mask, cache)
  position = positions[:, -1:]
  out = []
  for _ in range(steps):
    token = jnp.argmax(logits[:, -1:], axis=-1).astype(jnp.int32)
    out.append(token)
    position = position + 1
    logits, cache = apply(params, token, position, jnp.ones((b, 1), bool), cache)
  return np.asarray(jnp.concatenate(out, axis=1))


def test_greedy_continuation_matches_transformers(ours, hf_model, batch, tokenizer, torch):
  """The model's KV-cache decode and the sampler (`sampling.sample`, greedy, default decode
  backend) both continue the prompts exactly as HF `generate` does."""
  config, params = ours
  tokens, mask = batch
  got = greedy(config, params, tokens, mask, NEW_TOKENS)
  with torch.no_grad():
    ref = hf_model.generate(torch.tensor(tokens, dtype=torch.long),
                            attention_mask=torch.tensor(mask, dtype=torch.long),
                            max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                            do_sample=False).numpy()[:, tokens.shape[1]:]
  np.testing.assert_array_equal(got, ref)
  sampled = sampling.sample(config, params, jnp.asarray(tokens), jnp.asarray(mask),
                            jax.random.key(0), max_new_tokens=NEW_TOKENS, temperature=0.0,
                            eos_id=None)
  np.testing.assert_array_equal(np.asarray(sampled.tokens[:, 0]), ref)
  for prompt, row in zip(PROMPTS, got):
    print(f"{prompt!r} -> {tokenizer.decode(row)!r}")
