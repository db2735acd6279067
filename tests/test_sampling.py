"""The KV-cache sampler against independent references: HF `generate`, teacher-forced forward
passes, and exact sequence probabilities by enumeration."""

import functools
import itertools
import os
import subprocess
import sys
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from bond import sampling
from bond.models import convert, gemma, presets
from conftest import QUICK_COMPILE_XLA_FLAGS, padded_batch

# Compiles much and runs little: XLA's quicker codegen (tests/conftest.py, `quick_compiles`).
pytestmark = pytest.mark.quick_compiles

NEW = 10          # > sliding window 4 of the tiny models, so decode runs past the window


def tiny_model(name="tiny_gemma3", embed_std=0.1, seed=0, **overrides):
  """A tiny random model whose next-token distributions are neither flat nor one-hot."""
  config = presets.get(name, **overrides)
  params = gemma.init_params(config, jax.random.key(seed))
  params["input_embedding"] = embed_std * jax.random.normal(
      jax.random.key(seed + 1), params["input_embedding"].shape)
  return config, params


def teacher_forced_logprobs(config, params, prompt, prompt_mask, out):
  """log pi(y_t | x, y_<t) [B, N, T] from one full forward pass over prompt + completion."""
  b, n, t = out.tokens.shape
  p = prompt.shape[1]
  tokens = np.concatenate([np.repeat(prompt, n, 0), np.asarray(out.tokens).reshape(b * n, t)], 1)
  mask = np.concatenate([np.repeat(prompt_mask, n, 0), np.asarray(out.mask).reshape(b * n, t)], 1)
  logits = gemma.Gemma(config).apply({"params": params}, jnp.asarray(tokens),
                                     attention_mask=jnp.asarray(mask))
  logp = np.asarray(jax.nn.log_softmax(logits[:, p - 1:-1]), np.float64)
  return np.take_along_axis(logp, tokens[:, p:, None], -1)[..., 0].reshape(b, n, t)


def reference_probs(logits, temperature, top_k, top_p):
  """NumPy float64 HF-style warpers: temperature, top-k, then top-p (ascending-cumsum rule)."""
  z = np.asarray(logits, np.float64) / temperature
  if top_k:
    z = np.where(z < np.sort(z)[-top_k], -np.inf, z)
  probs = np.exp(z - z.max())
  probs /= probs.sum()
  if top_p < 1.0:
    order = np.argsort(probs)
    remove = np.cumsum(probs[order]) <= 1.0 - top_p
    remove[-1] = False
    probs[order[remove]] = 0.0
    probs /= probs.sum()
  return probs


# ----------------------------------------------------------------------------- HF parity


def hf_generate(model, tokens, mask, new_tokens, eos_id, pad_id):
  import torch
  with torch.no_grad():
    out = model.generate(torch.tensor(tokens, dtype=torch.long),
                         attention_mask=torch.tensor(mask, dtype=torch.long),
                         max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id,
                         eos_token_id=eos_id)
  out = out.numpy()[:, tokens.shape[1]:]
  assert eos_id is not None or out.shape[1] == new_tokens
  return out


def test_greedy_matches_hf_generate(hf_model_dir):
  """Left-padded prompts of different lengths, decoding past the sliding window, with and
  without an eos that stops one row early (HF pads finished rows with pad_token_id)."""
  version, model, path = hf_model_dir
  config, params = convert.from_hf(path)
  tokens, mask = padded_batch(lengths=(12, 5, 9), width=12)
  out = sampling.sample(config, params, tokens, mask, jax.random.key(0), max_new_tokens=NEW,
                        temperature=0.0, eos_id=None)
  got = np.asarray(out.tokens[:, 0])
  np.testing.assert_array_equal(got, hf_generate(model, tokens, mask, NEW, None, config.pad_id))
  assert np.asarray(out.mask).all()

  eos = int(got[0, 3])                  # row 0 stops at step 3 or before
  out = sampling.sample(config, params, tokens, mask, jax.random.key(0), max_new_tokens=NEW,
                        temperature=0.0, eos_id=eos)
  ref = hf_generate(model, tokens, mask, NEW, eos, config.pad_id)
  got = np.asarray(out.tokens[:, 0])
  np.testing.assert_array_equal(got[:, :ref.shape[1]], ref)
  assert (got[:, ref.shape[1]:] == config.pad_id).all()
  assert not np.asarray(out.mask[0, 0, 4:]).any()


# ------------------------------------------------------------------- log-probs and eos


@pytest.mark.parametrize("name,options", [
    ("tiny_gemma3", dict()),
    ("tiny_gemma2", dict(temperature=0.7, top_k=4, top_p=0.9)),
])
def test_logprobs_equal_teacher_forcing_with_eos_stops(name, options):
  config, params = tiny_model(name, vocab_size=8)
  tokens, mask = padded_batch(lengths=(12, 3, 8), width=12)
  tokens = tokens % 8
  out = sampling.sample(config, params, tokens, mask, jax.random.key(1), max_new_tokens=NEW,
                        num_samples=4, eos_id=1, **options)
  got_tokens, got_mask = np.asarray(out.tokens), np.asarray(out.mask)
  # eos semantics: masked up to and including the first eos, pad and mask 0 after it.
  for row_tokens, row_mask in zip(got_tokens.reshape(-1, NEW), got_mask.reshape(-1, NEW)):
    hits = np.flatnonzero(row_tokens == 1)
    length = hits[0] + 1 if hits.size else NEW
    assert row_mask[:length].all() and not row_mask[length:].any()
    assert (row_tokens[length:] == config.pad_id).all()
  assert 0 < (got_mask.sum(-1) < NEW).mean() < 1, "want some rows stopped by eos, some not"

  ref = teacher_forced_logprobs(config, params, tokens, mask, out)
  np.testing.assert_allclose(np.asarray(out.logprobs)[got_mask], ref[got_mask], atol=1e-4)
  assert (np.asarray(out.logprobs)[~got_mask] == 0).all()
  assert (np.asarray(out.sample_logprobs)[~got_mask] == 0).all()

  # Processed-distribution log-probs against the NumPy warpers on teacher-forced logits.
  b, n, t = got_tokens.shape
  full = np.concatenate([np.repeat(tokens, n, 0), got_tokens.reshape(b * n, t)], 1)
  full_mask = np.concatenate([np.repeat(mask, n, 0), got_mask.reshape(b * n, t)], 1)
  logits = np.asarray(gemma.Gemma(config).apply(
      {"params": params}, jnp.asarray(full), attention_mask=jnp.asarray(full_mask)))
  flat_mask = got_mask.reshape(b * n, t)
  sample_lp = np.asarray(out.sample_logprobs).reshape(b * n, t)
  for r, s in zip(*np.nonzero(flat_mask)):
    probs = reference_probs(logits[r, tokens.shape[1] - 1 + s], options.get("temperature", 1.0),
                            options.get("top_k", 0), options.get("top_p", 1.0))
    np.testing.assert_allclose(sample_lp[r, s], np.log(probs[full[r, tokens.shape[1] + s]]),
                               atol=1e-4)


def test_no_eos_runs_to_max_new_tokens_and_greedy_is_deterministic():
  config, params = tiny_model()
  tokens, mask = padded_batch()
  run = functools.partial(sampling.sample, config, params, tokens, mask, max_new_tokens=NEW,
                          num_samples=3, temperature=0.0, eos_id=None)
  a, b = run(jax.random.key(0)), run(jax.random.key(7))
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.tokens[:, 0], a.tokens[:, 2])
  assert a.tokens.shape == a.mask.shape == a.logprobs.shape == (3, 3, NEW)
  assert np.asarray(a.mask).all() and (np.asarray(a.sample_logprobs) == 0).all()
  # Every row emits its first greedy token as eos: all stop at once, the rest is padding.
  first = int(a.tokens[0, 0, 0])
  out = run(jax.random.key(0), eos_id=(first, *np.asarray(a.tokens[1:, 0, 0]).tolist()))
  assert (np.asarray(out.mask).sum(-1) == 1).all()
  assert (np.asarray(out.tokens[..., 1:]) == config.pad_id).all()



def test_greedy_is_numpy_argmax_first_maximum_on_ties():
  vocab = 1000
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(10, vocab)).astype(np.float32)
  logits[1, [7, 500, vocab - 1]] = 9.0                 # a three-way tie: the first wins
  logits[2, [0, 1]] = 9.0
  logits[3] = 0.0                                      # all tied
  logits[4, vocab - 1] = np.inf
  logits[5, 3] = -np.inf
  logits[6, [127, 128]] = 9.0                          # adjacent ties
  logits[7, [300, 260, 900]] = 9.0                     # the first index, not the first set
  logits[8] = -np.inf                                  # nothing finite: the first id
  logits[9, [200, 950]] = np.inf
  np.testing.assert_array_equal(sampling.greedy(jnp.asarray(logits)), np.argmax(logits, -1))
  np.testing.assert_array_equal(sampling.greedy(jnp.asarray(logits).reshape(2, 5, vocab)),
                                np.argmax(logits, -1).reshape(2, 5))

# ------------------------------------------------------------------ exact distribution


@pytest.mark.parametrize("options", [
    dict(temperature=1.0), dict(temperature=0.6), dict(top_k=2), dict(top_p=0.7),
    dict(temperature=1.5, top_k=4, top_p=0.8),
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_sampling_is_exact_by_enumeration(options):
  """Empirical sequence frequencies (V=5, T=3) against exact probabilities: products of the
  NumPy-warped teacher-forced next-token distributions over all V^T sequences; chi-square."""
  v, t, n = 5, 3, 6000
  config, params = tiny_model(vocab_size=v, sliding_window=2)
  prompts = np.array([[0, 0, 2, 3], [2, 4, 1, 3]], np.int32)
  prompt_mask = np.array([[0, 0, 1, 1], [1, 1, 1, 1]], bool)
  out = sampling.sample(config, params, prompts, prompt_mask, jax.random.key(3),
                        max_new_tokens=t, num_samples=n, eos_id=None, **options)
  seqs = np.array(list(itertools.product(range(v), repeat=t)), np.int32)          # [V^T, T]
  k = len(seqs)
  full = np.concatenate([np.repeat(prompts, k, 0), np.tile(seqs, (2, 1))], 1)
  full_mask = np.concatenate([np.repeat(prompt_mask, k, 0), np.ones((2 * k, t), bool)], 1)
  logits = np.asarray(gemma.Gemma(config).apply(
      {"params": params}, jnp.asarray(full), attention_mask=jnp.asarray(full_mask)))
  step_logits = logits[:, prompts.shape[1] - 1:-1]                                 # [2K, T, V]
  warped = dict(temperature=options.get("temperature", 1.0), top_k=options.get("top_k", 0),
                top_p=options.get("top_p", 1.0))
  exact = np.array([[reference_probs(step_logits[i, s], **warped)[full[i, prompts.shape[1] + s]]
                     for s in range(t)] for i in range(2 * k)]).prod(-1).reshape(2, k)
  np.testing.assert_allclose(exact.sum(-1), 1.0, atol=1e-9)

  codes = np.asarray(out.tokens) @ (v ** np.arange(t - 1, -1, -1))                # [2, N]
  for b in range(2):
    observed = np.bincount(codes[b], minlength=k)
    assert observed[exact[b] == 0].sum() == 0, "sampled a sequence the warpers exclude"
    expected = exact[b] * n
    big = expected >= 5
    obs = np.append(observed[big], observed[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    p_value = scipy.stats.chisquare(obs[keep], exp[keep]).pvalue
    tv = 0.5 * np.abs(observed / n - exact[b]).sum()
    print(f"{options} prompt {b}: chi2 p={p_value:.3g}, TV={tv:.4f}")
    assert p_value > 1e-3


# --------------------------------------------------------------- structure and keys


def test_prompts_are_prefilled_once_for_all_samples(monkeypatch):
  config, params = tiny_model()
  tokens, mask = padded_batch()
  seen = {"prefill": [], "decode": []}

  prefill, decode = sampling._prefill, sampling._decode_step
  monkeypatch.setattr(sampling, "_prefill", lambda c, p, toks, *a: (
      seen["prefill"].append(toks.shape), prefill(c, p, toks, *a))[1])
  monkeypatch.setattr(sampling, "_decode_step", lambda c, p, cache, toks, *a: (
      seen["decode"].append(toks.shape), decode(c, p, cache, toks, *a))[1])
  fn = jax.jit(lambda p, t, m, k: sampling.sample_fn(config, p, t, m, k, max_new_tokens=4,
                                                      num_samples=5))
  jax.block_until_ready(fn(params, tokens, mask, jax.random.key(0)))
  assert seen["prefill"] == [(3, 11)]                  # B prompts, P - 1 tokens, once
  assert seen["decode"] == [(15,)]                     # B * N rows, traced once in the loop


def test_bf16_kv_cache_is_updated_in_place_and_decodes_like_a_full_pass():
  # XLA:CPU runs a bf16 dynamic-update-slice in f32: the whole cache converted to f32 and back at
  # every step. The cache is stored as uint16 bits so that never happens: no f32 buffer of the
  # cache's shape may appear in the compiled sampler.
  config, params = tiny_model(dtype=jnp.bfloat16)
  tokens, mask = padded_batch()
  b, p = tokens.shape
  n, t = 2, 6
  kw = dict(max_new_tokens=t, num_samples=n, eos_id=None)
  hlo = jax.jit(functools.partial(sampling.sample_fn, config, **kw)).lower(
      params, tokens, mask, jax.random.key(0)).compile().as_text()
  r, s, k, hd = b * n, p - 1 + t, config.num_kv_heads, config.head_dim
  assert "while" in hlo
  for shape in [(r, s, k, hd), (r, k, hd, s)]:
    assert f"f32[{','.join(map(str, shape))}]" not in hlo, shape
  out = sampling.sample(config, params, tokens, mask, jax.random.key(0), **kw)
  want = teacher_forced_logprobs(config, params, tokens, mask, out)
  assert out.tokens.shape == (b, n, t) and bool(np.all(out.mask))
  np.testing.assert_allclose(np.asarray(out.logprobs), want, atol=0.1)   # bf16 rounding


def test_per_prompt_keys_make_samples_independent_of_the_batch():
  config, params = tiny_model()
  tokens, mask = padded_batch(lengths=(12, 7, 10), width=12)
  keys = jax.random.split(jax.random.key(5), 3)
  batch = sampling.sample(config, params, tokens, mask, keys, max_new_tokens=NEW, num_samples=4)
  alone = sampling.sample(config, params, tokens[1:2, -7:], mask[1:2, -7:], keys[1:2],
                          max_new_tokens=NEW, num_samples=4)
  np.testing.assert_array_equal(batch.tokens[1], alone.tokens[0])
  np.testing.assert_allclose(batch.logprobs[1], alone.logprobs[0], atol=1e-5)
  # The samples of one prompt differ from each other, and the same key reproduces them.
  assert len({tuple(row) for row in np.asarray(batch.tokens[1])}) > 1
  again = sampling.sample(config, params, tokens, mask, keys, max_new_tokens=NEW, num_samples=4)
  np.testing.assert_array_equal(batch.tokens, again.tokens)


def test_single_key_rows_do_not_depend_on_other_prompts():
  config, params = tiny_model()
  tokens, mask = padded_batch()
  other = tokens.copy()
  other[0] = np.where(mask[0], (tokens[0] + 1) % config.vocab_size, 0)
  run = functools.partial(sampling.sample, config, params, rng=jax.random.key(2),
                          max_new_tokens=NEW, num_samples=2, eos_id=None)
  a, b = run(prompt_tokens=tokens, prompt_mask=mask), run(prompt_tokens=other, prompt_mask=mask)
  np.testing.assert_array_equal(a.tokens[1:], b.tokens[1:])
  assert (np.asarray(a.tokens[0]) != np.asarray(b.tokens[0])).any()


def test_traceable_inside_an_outer_jit():
  config, params = tiny_model()
  tokens, mask = padded_batch()
  kw = dict(max_new_tokens=NEW, num_samples=2, top_k=5, eos_id=1)
  outer = jax.jit(lambda p, t, m, k: sampling.sample_fn(config, p, t, m, k, **kw).tokens)
  np.testing.assert_array_equal(
      outer(params, tokens, mask, jax.random.key(4)),
      sampling.sample(config, params, tokens, mask, jax.random.key(4), **kw).tokens)


SHARDED = """
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from bond import sampling
from test_sampling import tiny_model
from conftest import padded_batch
config, params = tiny_model()
tokens, mask = padded_batch(lengths=(12, 7, 10, 3), width=12)
kw = dict(max_new_tokens=6, num_samples=2)
mesh = Mesh(np.array(jax.devices()), ("data",))
data = NamedSharding(mesh, P("data"))
params_s = jax.device_put(params, NamedSharding(mesh, P()))
fn = jax.jit(lambda p, t, m, k: sampling.sample_fn(config, p, t, m, k, **kw).tokens)
got = fn(params_s, jax.device_put(tokens, data), jax.device_put(mask, data), jax.random.key(0))
ref = sampling.sample(config, params, tokens, mask, jax.random.key(0), **kw).tokens
np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
print("ok", len(jax.devices()))
"""


def test_batch_sharded_on_a_data_mesh_gives_the_same_samples():
  env = {**os.environ,
         "XLA_FLAGS": f"--xla_force_host_platform_device_count=4 {QUICK_COMPILE_XLA_FLAGS}",
         "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
  run = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "ok 4" in run.stdout


def test_generate_text_decodes_the_samples():
  from bond.tokenizer import ByteTokenizer
  tok = ByteTokenizer()
  config, params = tiny_model(vocab_size=tok.vocab_size)
  prompts = ["hello", "a"]
  texts = sampling.generate_text(config, params, tok, prompts, jax.random.key(0),
                                 max_new_tokens=6, num_samples=2, temperature=0.0, eos_id=None)
  tokens, mask = tok.batch_encode(prompts)
  out = sampling.sample(config, params, tokens, mask, jax.random.key(0), max_new_tokens=6,
                        num_samples=2, temperature=0.0, eos_id=None)
  assert texts == [[tok.decode(row) for row in rows] for rows in np.asarray(out.tokens)]


def test_bad_arguments_raise_clear_errors():
  config, params = tiny_model()
  tokens, mask = padded_batch()
  with pytest.raises(ValueError, match="top_p"):
    sampling.sample(config, params, tokens, mask, jax.random.key(0), max_new_tokens=2, top_p=0.0)
  with pytest.raises(ValueError, match="one key per prompt"):
    sampling.sample(config, params, tokens, mask, jax.random.split(jax.random.key(0), 2),
                    max_new_tokens=2)


# ---------------------------------------------------------------- forced (scored) rows


def test_forced_rows_score_given_completions_like_a_teacher_forced_pass():
  """Forced rows (completions given, not sampled) decoded beside the sampled ones: their
  log-probs are those of a teacher-forced pass, the loop runs until the longest of them is
  scored even when every sampled row stopped at its first token, and the sampled rows are those
  of a call without forced rows."""
  config, params = tiny_model(vocab_size=8)
  tokens, mask = padded_batch(lengths=(12, 3, 8), width=12)
  tokens = tokens % 8
  b, f = tokens.shape[0], 3
  rng = np.random.default_rng(0)
  forced = rng.integers(0, 8, (b, f, NEW)).astype(np.int32)
  lengths = np.array([[NEW, 0, 4], [1, NEW, 7], [NEW - 1, 2, NEW]])     # prefix masks, one empty
  forced_mask = np.arange(NEW) < lengths[..., None]
  kw = dict(max_new_tokens=NEW, num_samples=2, eos_id=1)
  plain = sampling.sample(config, params, tokens, mask, jax.random.key(1), **kw)
  out = sampling.sample(config, params, tokens, mask, jax.random.key(1), **kw,
                        forced_tokens=forced, forced_mask=forced_mask)
  assert out.forced_logprobs.shape == (b, f, NEW)
  want = teacher_forced_logprobs(config, params, tokens, mask, SimpleNamespace(
      tokens=forced, mask=forced_mask))
  got = np.asarray(out.forced_logprobs)
  np.testing.assert_allclose(got[forced_mask], want[forced_mask], atol=1e-4)
  assert (got[~forced_mask] == 0).all()
  for name in ("tokens", "mask", "logprobs", "sample_logprobs"):
    np.testing.assert_allclose(getattr(out, name), getattr(plain, name), atol=1e-6, err_msg=name)
  assert plain.forced_logprobs is None

  # Every sampled row stops at its first (greedy) token; the full-length forced rows still get
  # all NEW of their tokens scored.
  greedy = dict(max_new_tokens=NEW, num_samples=2, temperature=0.0)
  first = np.asarray(sampling.sample(config, params, tokens, mask, jax.random.key(0),
                                     eos_id=None, **greedy).tokens[:, :, 0])
  out = sampling.sample(config, params, tokens, mask, jax.random.key(0), **greedy,
                        eos_id=tuple(sorted(set(first.ravel().tolist()))),
                        forced_tokens=forced, forced_mask=forced_mask)
  assert (np.asarray(out.mask).sum(-1) == 1).all()
  got = np.asarray(out.forced_logprobs)
  np.testing.assert_allclose(got[forced_mask], want[forced_mask], atol=1e-4)


def test_forced_rows_bad_arguments_raise_clear_errors():
  config, params = tiny_model()
  tokens, mask = padded_batch()
  b = tokens.shape[0]
  run = functools.partial(sampling.sample, config, params, tokens, mask, jax.random.key(0),
                          max_new_tokens=4)
  good = np.zeros((b, 2, 4), np.int32)
  with pytest.raises(ValueError, match="go together"):
    run(forced_tokens=good)
  with pytest.raises(ValueError, match=r"forced_tokens must be \[B=3, F, max_new_tokens=4\]"):
    run(forced_tokens=good[:, :, :3], forced_mask=good[:, :, :3] > 0)
  with pytest.raises(ValueError, match="forced_mask must have the shape"):
    run(forced_tokens=good, forced_mask=good[:, :1] > 0)
