"""The chunked vocab path (bond/logprobs.py) against full logits.

References: `objectives.token_log_probs` on explicit [N, V] logits (token level) and
`bond.logprobs.completion_log_probs_full`, the model's full-logits teacher-forced pass (sequence
level): values and gradients in every param, f32 and bf16 compute, a Gemma 2 layout whose final
soft-cap bites (cap 5 on logits far above it) and a Gemma 3 layout; vocabularies that the chunk
does not divide, one chunk, masked positions. And the traced and compiled programs hold no
[rows, V] array, so the memory saving cannot silently regress.
"""

import functools
import re

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from bond import logprobs, objectives
from bond.models import gemma, presets

# Compiles much and runs little: XLA's quicker codegen (tests/conftest.py, `quick_compiles`).
pytestmark = pytest.mark.quick_compiles

B, N, P, T = 2, 3, 5, 12     # rows = B·N·T = 72 > D = 64: a [rows, V] array outgrows E [V, D]
VOCAB = 250                  # no chunk size below (64, 96) divides it
CAP = 5.0


def _config(version: int, dtype=jnp.float32, param_dtype=jnp.float32):
  """One-layer tiny Gemma 2 (final soft-cap CAP) or Gemma 3 (QK norm, no cap): the layers only
  make the hidden states, one keeps the compiles short."""
  name = {2: "tiny_gemma2", 3: "tiny_gemma3"}[version]
  extra = dict(final_logit_softcap=CAP) if version == 2 else {}
  return presets.get(name, num_layers=1, layer_types=("global",), vocab_size=VOCAB,
                     dtype=dtype, param_dtype=param_dtype, **extra)


def _params(config, seed=0):
  """Random params with random norm scales and an embedding large enough for logits of ~±40."""
  params = gemma.init_params(config, jax.random.key(seed))
  leaves, treedef = jax.tree.flatten_with_path(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  out = []
  for (path, x), k in zip(leaves, keys):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      x = 0.5 * jax.random.normal(k, x.shape, jnp.float32)
    elif "input_embedding" in name:
      x = x * 40.0
    out.append(x.astype(config.param_dtype))
  return jax.tree.unflatten(treedef, out)


def _batch(seed=0):
  """Left-padded prompts [B, P]; completions [B, N, T] right-padded, one row fully masked."""
  rng = np.random.default_rng(seed)
  prompt = rng.integers(3, VOCAB, (B, P)).astype(np.int32)
  prompt_mask = np.arange(P)[None, :] >= np.array([[0], [2]])
  tokens = rng.integers(3, VOCAB, (B, N, T)).astype(np.int32)
  lengths = np.array([[T, 7, 1], [4, 0, 10]])
  mask = np.arange(T)[None, None, :] < lengths[:, :, None]
  return (jnp.asarray(prompt), jnp.asarray(prompt_mask), jnp.asarray(tokens),
          jnp.asarray(mask))


def _weights():
  return jnp.asarray(np.random.default_rng(7).normal(size=(B, N)), jnp.float32)


def _full(config, params, *batch):
  return logprobs.completion_log_probs_full(config, params, *batch)


def _chunked(chunk_size):
  return lambda config, params, *batch: logprobs.completion_log_probs(
      config, params, *batch, chunk_size=chunk_size)


# LLVM -O0: the compiles dominate this file's time and take half as long; the HLO passes (the
# fusions, the loops, hence the buffers test_no_rows_by_vocab_array inspects) are the same.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _jitted_step(config, chunk_size):
  """Jitted (log-probs [B, N], Σ w·log-probs, its gradient in params) of params and the batch;
  chunk_size "full" is the full-logits reference."""
  fn = _full if chunk_size == "full" else _chunked(chunk_size)
  w = _weights()

  def loss(params, batch):
    lp = fn(config, params, *batch)
    return jnp.sum(w * lp), lp

  @jax.jit
  def step(params, batch):
    (value, lp), grads = jax.value_and_grad(loss, has_aux=True)(params, batch)
    return lp, value, grads
  return step


@functools.lru_cache(maxsize=None)
def _step(config, chunk_size):
  """`_jitted_step` compiled once per (config, path) for `_params(config)` and `_batch()`."""
  step = _jitted_step(config, chunk_size).lower(_params(config), _batch())
  return step.compile(compiler_options=FAST_COMPILE)


def _max_rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)


# ------------------------------------------------------------------------------- token level

def _token_reference(hidden, embedding, targets, softcap, dtype):
  logits = jnp.einsum("ND,VD->NV", hidden.astype(dtype), embedding.astype(dtype),
                      preferred_element_type=jnp.float32)
  if softcap:
    logits = jnp.tanh(logits / softcap) * softcap
  return objectives.token_log_probs(logits[None], targets[None])[0]


@pytest.mark.parametrize("keep_mb", [0, 1], ids=["recomputed", "kept"])
@pytest.mark.parametrize("softcap,chunk_size,emb_dtype", [
    (None, 7, jnp.float32), (3.0, 7, jnp.float32), (3.0, 25, jnp.float32),
    (None, 100, jnp.float32), (3.0, 4096, jnp.float32), (3.0, 7, jnp.bfloat16)])
def test_token_log_probs_match_full_softmax(softcap, chunk_size, emb_dtype, keep_mb):
  """f32 compute: V = 100 in chunks of 7 (uneven last), 25 (even), 100 and 4096 (one chunk); the
  backward recomputes the logits or reads the ones the forward kept (1 MiB > 20 x 100 x 4 B)."""
  k = jax.random.split(jax.random.key(0), 3)
  hidden = 3.0 * jax.random.normal(k[0], (20, 16))
  embedding = jax.random.normal(k[1], (100, 16)).astype(emb_dtype)
  targets = jax.random.randint(k[2], (20,), 0, 100)
  w = jnp.linspace(0.5, 1.5, 20)

  def run(fn):
    lp, vjp = jax.vjp(fn, hidden, embedding)
    return lp, vjp(w)
  got, got_grads = jax.jit(run, static_argnums=0)(lambda h, e: logprobs.token_log_probs_chunked(
      h, e, targets, softcap=softcap, dtype=jnp.float32, chunk_size=chunk_size,
      keep_logits_mb=keep_mb))
  want, want_grads = jax.jit(run, static_argnums=0)(
      lambda h, e: _token_reference(h, e, targets, softcap, jnp.float32))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert got_grads[0].dtype == hidden.dtype and got_grads[1].dtype == emb_dtype
  # A bf16 embedding's gradient is rounded to bf16 on both sides, in different places.
  tol = 1e-5 if emb_dtype == jnp.float32 else 1e-2
  assert _max_rel_err(got_grads[0], want_grads[0]) <= 1e-5
  assert _max_rel_err(got_grads[1], want_grads[1]) <= tol


@pytest.mark.parametrize("softcap,chunk_size,emb_dtype", [
    (None, 7, jnp.float32), (3.0, 25, jnp.bfloat16), (3.0, 100, jnp.bfloat16)])
def test_kept_logits_give_the_recomputed_gradients_with_one_matmul_fewer(softcap, chunk_size,
                                                                         emb_dtype):
  """Under value_and_grad, a budget that holds the [N, V] f32 logits (here 20 x 100 x 4 B) makes
  the backward read the forward's logits: the same log-probs and gradients bit for bit, one
  vocabulary matmul fewer per chunk body in the traced program and fewer dots in the compiled
  one. One byte less than N x V x 4: recomputed (the control)."""
  k = jax.random.split(jax.random.key(1), 3)
  hidden = (3.0 * jax.random.normal(k[0], (20, 16))).astype(jnp.bfloat16)
  embedding = jax.random.normal(k[1], (100, 16)).astype(emb_dtype)
  targets = jax.random.randint(k[2], (20,), 0, 100)
  w = jnp.linspace(-1.0, 1.5, 20)
  exact_mb = 20 * 100 * 4 / 2**20
  assert logprobs.keeps_logits(20, 100, exact_mb)
  assert not logprobs.keeps_logits(20, 100, exact_mb - 1 / 2**20)

  def program(keep_mb):
    def loss(h, e):
      lp = logprobs.token_log_probs_chunked(h, e, targets, softcap=softcap, dtype=jnp.bfloat16,
                                            chunk_size=chunk_size, keep_logits_mb=keep_mb)
      return jnp.sum(w * lp), lp
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    compiled = fn.lower(hidden, embedding).compile().as_text()
    return fn(hidden, embedding), _dots(jax.make_jaxpr(fn)(hidden, embedding).jaxpr), \
        compiled.count(" dot(")

  (kept, kept_dots, kept_hlo_dots), (recomputed, recomputed_dots, recomputed_hlo_dots) = (
      program(exact_mb), program(exact_mb - 1 / 2**20))
  for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(recomputed)):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  # Per chunk body (scanned chunks, a short last one): the forward's dot, the backward's two
  # (d_hidden, d_embedding) and, recomputing, the forward's again.
  bodies = 1 + (100 % chunk_size > 0) if chunk_size < 100 else 1
  assert recomputed_dots - kept_dots == bodies, (recomputed_dots, kept_dots)
  # Compiled, the scan body's recompute stays; outside a loop XLA may merge a recompute with the
  # forward's dot (common subexpressions).
  if chunk_size < 100:
    assert recomputed_hlo_dots > kept_hlo_dots, (recomputed_hlo_dots, kept_hlo_dots)


def _dots(jaxpr) -> int:
  """dot_general equations in jaxpr and its nested jaxprs."""
  return (sum(eqn.primitive.name == "dot_general" for eqn in jaxpr.eqns)
          + sum(_dots(sub) for sub in _subjaxprs(jaxpr)))


def test_softcap_bites_in_token_test_data():
  k = jax.random.split(jax.random.key(0), 2)
  logits = (3.0 * jax.random.normal(k[0], (20, 16))) @ jax.random.normal(k[1], (100, 16)).T
  assert float(jnp.abs(logits).max()) > 5 * 3.0


# ---------------------------------------------------------------------------- sequence level

CASES = {   # id: (version, compute dtype, param dtype, chunk size, relative tolerance)
    "gemma2-f32-chunk64": (2, jnp.float32, jnp.float32, 64, 1e-5),
    "gemma3-f32-one-chunk": (3, jnp.float32, jnp.float32, None, 1e-5),
    "gemma2-bf16-chunk96": (2, jnp.bfloat16, jnp.float32, 96, 2e-2),
    "gemma3-bf16-bf16-params-chunk96": (3, jnp.bfloat16, jnp.bfloat16, 96, 2e-2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_completion_log_probs_match_full_logits(case):
  """Log-probs [B, N] (a fully masked completion scores 0), Σ w·log-probs and its gradient in
  every param, in the param dtype, against the full-logits pass."""
  version, dtype, param_dtype, chunk_size, tol = CASES[case]
  config = _config(version, dtype, param_dtype)
  params, batch = _params(config), _batch()
  want_lp, want, want_grads = _step(config, "full")(params, batch)
  got_lp, got, got_grads = _step(config, chunk_size)(params, batch)
  assert got_lp.shape == (B, N) and got_lp.dtype == jnp.float32
  assert float(want_lp[1, 1]) == float(got_lp[1, 1]) == 0.0     # the fully masked completion
  assert _max_rel_err(got_lp, want_lp) <= tol / 10, (got_lp, want_lp)
  assert abs(float(got) - float(want)) <= tol / 10 * abs(float(want))
  flat_want = dict(jax.tree_util.tree_flatten_with_path(want_grads)[0])
  for path, g in jax.tree_util.tree_flatten_with_path(got_grads)[0]:
    name = jax.tree_util.keystr(path)
    assert g.dtype == jnp.dtype(param_dtype), name
    assert np.all(np.isfinite(np.asarray(g, np.float32))), name
    assert _max_rel_err(g, flat_want[path]) <= tol, (name, _max_rel_err(g, flat_want[path]))


def test_bf16_error_is_the_full_paths_own():
  """bf16 compute, against the f32 computation of the same params: the chunked path (bf16
  cotangents into its matmuls) is as close to it as the full-logits path (f32 cotangents)."""
  version, dtype, param_dtype, chunk_size, _ = CASES["gemma2-bf16-chunk96"]
  config = _config(version, dtype, param_dtype)
  params, batch = _params(config), _batch()
  truth = _step(_config(version), "full")(params, batch)
  full, chunked = _step(config, "full")(params, batch), _step(config, chunk_size)(params, batch)
  _assert_as_close_to_truth(chunked, full, truth, factor=2.0)


def _assert_as_close_to_truth(ours, theirs, truth, factor):
  """Log-probs and every param's gradient (`_step` outputs) of `ours` within `factor` times the
  relative error of `theirs` against `truth`."""
  assert _max_rel_err(ours[0], truth[0]) <= factor * _max_rel_err(theirs[0], truth[0]) + 1e-6
  want = dict(jax.tree_util.tree_flatten_with_path(truth[2])[0])
  ref = dict(jax.tree_util.tree_flatten_with_path(theirs[2])[0])
  for path, g in jax.tree_util.tree_flatten_with_path(ours[2])[0]:
    got, bound = _max_rel_err(g, want[path]), _max_rel_err(ref[path], want[path])
    assert got <= factor * bound + 1e-3, (jax.tree_util.keystr(path), got, bound)


def test_softcap_bites_at_scored_positions():
  """The Gemma 2 case's raw logits reach far past the cap, where tanh saturates."""
  config = _config(2)
  params, (prompt, prompt_mask, tokens, mask) = _params(config), _batch()
  seq = jnp.concatenate([jnp.repeat(prompt, N, axis=0), tokens.reshape(B * N, T)], axis=1)
  uncapped = gemma.Gemma(config.replace(final_logit_softcap=None))
  logits = jax.jit(lambda p, x: uncapped.apply({"params": p}, x))(params, seq)
  assert float(jnp.abs(logits[:, P - 1:-1]).max()) > 4 * CAP


def test_masked_positions_are_ignored():
  """Tokens under the completion mask change nothing, in value or gradient."""
  config = _config(3)
  params = _params(config)
  prompt, prompt_mask, tokens, mask = _batch()
  other = jnp.where(mask, tokens, (tokens * 7 + 11) % VOCAB)
  step = _step(config, 64)
  _, a, ga = step(params, (prompt, prompt_mask, tokens, mask))
  _, b, gb = step(params, (prompt, prompt_mask, other, mask))
  assert float(a) == float(b)
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_array_equal(x, y)


def test_embedding_gradient_includes_the_output_projection():
  """Rows of the embedding never fed to the model get gradient from the softmax over them."""
  config = _config(3)
  params, batch = _params(config), _batch()
  _, _, grads = _step(config, 64)(params, batch)
  prompt, _, tokens, _ = batch
  fed = np.zeros(VOCAB, bool)
  fed[np.asarray(prompt).ravel()] = fed[np.asarray(tokens).ravel()] = True
  assert not fed.all()
  assert np.all(np.abs(np.asarray(grads["input_embedding"])[~fed]).max(axis=1) > 0)


def test_default_chunk_size_is_one_chunk_for_small_vocab():
  config = _config(3)
  params, batch = _params(config), _batch()
  jaxpr = jax.make_jaxpr(lambda p: logprobs.completion_log_probs(config, p, *batch))(params)
  assert "scan" not in str(jaxpr) and "while" not in str(jaxpr)
  jaxpr = jax.make_jaxpr(lambda p: logprobs.completion_log_probs(config, p, *batch,
                                                                 chunk_size=64))(params)
  assert "scan" in str(jaxpr)


# -------------------------------------------------------------------------- memory regression

def _subjaxprs(jaxpr):
  for eqn in jaxpr.eqns:
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield sub.jaxpr
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield sub


def _shapes_with_vocab(jaxpr, vocab, min_size):
  """Shapes of every value in jaxpr (and nested jaxprs) with a V dim and >= min_size elements."""
  found = []
  for var in list(jaxpr.invars) + list(jaxpr.constvars) + [
      v for eqn in jaxpr.eqns for v in list(eqn.invars) + list(eqn.outvars)]:
    shape = getattr(getattr(var, "aval", None), "shape", ())
    if vocab in shape and np.prod(shape) >= min_size:
      found.append(shape)
  for sub in _subjaxprs(jaxpr):
    found += _shapes_with_vocab(sub, vocab, min_size)
  return found


def _hlo_shapes_with_vocab(text, vocab, min_size):
  found = []
  for dims in re.findall(r"\[([0-9,]+)\]", text):
    shape = tuple(int(d) for d in dims.split(","))
    if vocab in shape and np.prod(shape) >= min_size:
      found.append(shape)
  return found


@pytest.mark.parametrize("case", ["gemma2-bf16-chunk96", "gemma3-bf16-bf16-params-chunk96"])
def test_no_rows_by_vocab_array(case):
  """value_and_grad of the chunked path: no traced or compiled array of >= rows·V elements
  with a V dim (the embedding [V, D] and its gradient are smaller: rows > D). The detector
  finds the full-logits path's arrays, so it can see a regression."""
  version, dtype, param_dtype, chunk_size, _ = CASES[case]
  config = _config(version, dtype, param_dtype)
  params, batch = _params(config), _batch()
  rows = B * N * T
  assert rows > config.embed_dim
  for path, expect_big in ((chunk_size, False), ("full", True)):
    jaxpr = jax.make_jaxpr(_jitted_step(config, path))(params, batch).jaxpr
    big = _shapes_with_vocab(jaxpr, VOCAB, rows * VOCAB)
    big_hlo = _hlo_shapes_with_vocab(_step(config, path).as_text(), VOCAB, rows * VOCAB)
    assert bool(big) == expect_big and bool(big_hlo) == expect_big, (path, big, big_hlo)


def test_config_key_chooses_the_path_everywhere(monkeypatch):
  """`model.logprob_chunk` (default 8192) is the chunk every teacher-forced pass uses: rollout,
  update (make_loss_fn) and held-out evaluation call rollout.completion_log_probs with it; 0 is
  the full-logits path."""
  from bond import rollout
  calls = []
  monkeypatch.setattr(logprobs, "completion_log_probs",
                      lambda *a, chunk_size, share_prompt, keep_logits_mb=0:
                      calls.append(("chunked", chunk_size)))
  monkeypatch.setattr(logprobs, "completion_log_probs_full", lambda *a: calls.append("full"))
  big, small = presets.get("gemma3_270m"), presets.get("tiny_gemma3")
  assert big.vocab_size > logprobs.DEFAULT_CHUNK_SIZE > small.vocab_size
  rollout.completion_log_probs(big, None, None, None, None, None)
  rollout.completion_log_probs(big, None, None, None, None, None, chunk_size=0)
  rollout.completion_log_probs(big, None, None, None, None, None, chunk_size=512)
  rollout.completion_log_probs(small, None, None, None, None, None)     # one chunk: full path
  rollout.completion_log_probs(small, None, None, None, None, None, chunk_size=2)
  assert calls == [("chunked", logprobs.DEFAULT_CHUNK_SIZE), "full", ("chunked", 512), "full",
                   ("chunked", 2)]
  from bond import defaults
  assert defaults.get_config().model.logprob_chunk == logprobs.DEFAULT_CHUNK_SIZE


def test_training_step_and_evaluation_use_the_configured_chunk(monkeypatch):
  """One J-BOND step (rollout and update) and one held-out scoring call on the toy pass
  `model.logprob_chunk` down to every teacher-forced pass, and the step's loss is the same as
  through the full logits (chunk 0)."""
  from bond import data as data_lib
  from bond import heldout, steps, train
  from configs import toy_jbond
  seen, kept = [], set()
  real = logprobs.completion_log_probs
  def spy(*args, chunk_size, share_prompt, keep_logits_mb=0):
    seen.append((chunk_size, share_prompt))
    kept.add(keep_logits_mb)
    return real(*args, chunk_size=chunk_size, share_prompt=share_prompt,
                keep_logits_mb=keep_logits_mb)
  monkeypatch.setattr(logprobs, "completion_log_probs", spy)
  losses = {}
  # The toy vocabulary has 5 tokens: chunks of 2, 2 and 1, each prompt's samples packed in one row
  # or not (model.share_prompt); 0: full logits.
  for chunk, share in ((2, True), (2, False), (0, True)):
    config = toy_jbond.get_config()
    config.model.logprob_chunk, config.model.share_prompt = chunk, share
    config.model.logprob_keep_mb = 3      # reaches the training step's passes
    exp = train.build(config, held_out=True)
    optimizer = steps.make_optimizer(config.optim)
    state = steps.init_state(exp.params, optimizer, seed=0)
    step = jax.jit(steps.make_train_step(config, exp.model_config, exp.reward_fn, optimizer))
    _, metrics = step(state, data_lib.get_batch(exp.table, 0, config.data.batch_size, 0))
    losses[chunk, share] = float(metrics["loss"])
    ev = heldout.Evaluator(config, exp.model_config, exp.reward_fn, exp.eval_prompts)
    ev.load_or_draw_cache(exp.params, None)
  assert seen and set(seen) == {(2, True), (2, False)}, seen   # chunk 0: never the chunked path
  assert 3 in kept, kept
  np.testing.assert_allclose(losses[2, True], losses[0, True], rtol=1e-5)
  np.testing.assert_allclose(losses[2, False], losses[0, True], rtol=1e-5)


def test_a_bf16_table_is_streamed_without_an_f32_copy():
  """The vocab chunks of a bf16 embedding (a LoRA base, a bf16 model) are sliced as their bits:
  XLA:CPU has no bf16 dynamic-slice and converted the whole table to f32 outside the loop (671 MB
  for Gemma 3's). The control: the same scan over the bf16 table itself makes that copy."""
  vocab, dim, chunk = 4096, 64, 512
  k = jax.random.split(jax.random.key(0), 2)
  hidden = jax.random.normal(k[0], (12, dim))
  table = jax.random.normal(k[1], (vocab, dim)).astype(jnp.bfloat16)
  f32_table = f"f32[{vocab},{dim}]"

  def compiled(fn):
    return jax.jit(fn).lower(hidden, table).compile().as_text()

  ours = lambda h, e: logprobs.chunked_logsumexp(h, e, None, jnp.bfloat16, chunk)  # noqa: E731
  assert f32_table not in compiled(ours)

  def plain(h, e):
    def body(s, i):
      emb = jax.lax.dynamic_slice_in_dim(e, i * chunk, chunk)
      return s + jnp.einsum("ND,CD->N", h.astype(jnp.bfloat16), emb,
                            preferred_element_type=jnp.float32), None
    return jax.lax.scan(body, jnp.zeros(h.shape[0]), jnp.arange(vocab // chunk))[0]
  assert f32_table in compiled(plain)
  want = jax.nn.logsumexp(jnp.einsum("ND,VD->NV", hidden.astype(jnp.bfloat16), table,
                                     preferred_element_type=jnp.float32), axis=-1)
  np.testing.assert_allclose(jax.jit(ours)(hidden, table), want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------- a prompt shared by its samples (packed rows)

def _layered(version: int, dtype=jnp.float32):
  """tiny_gemma2 (4 layers, local/global, attention soft-cap, final cap CAP) or tiny_gemma3 (6
  layers, QK norm): windows of 4 keys, so they bite within P + T = 17."""
  name = {2: "tiny_gemma2", 3: "tiny_gemma3"}[version]
  extra = dict(final_logit_softcap=CAP) if version == 2 else {}
  config = presets.get(name, vocab_size=VOCAB, dtype=dtype, param_dtype=jnp.float32, **extra)
  assert config.sliding_window < P + T and gemma.LOCAL in config.layer_types
  return config


@functools.lru_cache(maxsize=None)
def _shared_step(config, share):
  w = _weights()

  def loss(params, batch):
    lp = logprobs.completion_log_probs(config, params, *batch, chunk_size=64, share_prompt=share)
    return jnp.sum(w * lp), lp

  @jax.jit
  def step(params, batch):
    (value, lp), grads = jax.value_and_grad(loss, has_aux=True)(params, batch)
    return lp, value, grads
  return step.lower(_params(config), _batch()).compile(compiler_options=FAST_COMPILE)


@pytest.mark.parametrize("version,scan", [(2, False), (3, False), (3, True)])
def test_packed_rows_give_the_separate_rows_log_probs(version, scan):
  """share_prompt: the B rows [x; y_1; y_2; y_3] give the log-probs of the B·N rows [x; y_n] and
  their gradient in every param (f32): left-padded prompts, sliding windows that bite, a fully
  masked completion, completions of lengths 1 to T; unrolled layers and one scan over them."""
  config = _layered(version).replace(scan_layers=scan)
  params, batch = _params(config), _batch()
  want_lp, want, want_grads = _shared_step(config, False)(params, batch)
  got_lp, got, got_grads = _shared_step(config, True)(params, batch)
  assert float(got_lp[1, 1]) == 0.0
  assert _max_rel_err(got_lp, want_lp) <= 1e-5, (got_lp, want_lp)
  assert abs(float(got) - float(want)) <= 1e-5 * abs(float(want))
  flat_want = dict(jax.tree_util.tree_flatten_with_path(want_grads)[0])
  for path, g in jax.tree_util.tree_flatten_with_path(got_grads)[0]:
    assert _max_rel_err(g, flat_want[path]) <= 1e-5, jax.tree_util.keystr(path)


def test_packed_rows_bf16_error_is_the_separate_rows_own():
  """bf16 compute against the f32 computation: packed rows as close to it as separate rows."""
  config = _layered(2, jnp.bfloat16)
  params, batch = _params(config), _batch()
  truth = _shared_step(_layered(2), False)(params, batch)
  rows, packed = _shared_step(config, False)(params, batch), _shared_step(config, True)(params, batch)
  _assert_as_close_to_truth(packed, rows, truth, factor=1.5)


def test_segments_keep_completions_apart():
  """In a packed row, y_n's hidden states depend on the prompt and y_n only: changing y_2's
  tokens leaves the prompt's and y_1's, y_3's unchanged bit for bit, and y_2's equal those of
  its own row [x; y_2]."""
  config = _layered(3)
  params = _params(config)
  prompt, prompt_mask, tokens, mask = _batch()
  apply = jax.jit(lambda seq, pos, m: gemma.Gemma(config).apply(
      {"params": params}, seq, pos, m, return_hidden=True, segments=(P, N)))
  other = tokens.at[:, 1].set((tokens[:, 1] * 7 + 11) % VOCAB)
  a = apply(*logprobs.packed_rows(prompt, prompt_mask, tokens, mask)[:3])
  b = apply(*logprobs.packed_rows(prompt, prompt_mask, other, mask)[:3])
  y2 = slice(P + T, P + 2 * T)
  np.testing.assert_array_equal(np.delete(np.asarray(a), np.r_[y2], axis=1),
                                np.delete(np.asarray(b), np.r_[y2], axis=1))
  assert float(jnp.abs(a[:, y2] - b[:, y2]).max()) > 0.1
  seq = jnp.concatenate([prompt, tokens[:, 1]], axis=1)
  seq_mask = jnp.concatenate([prompt_mask, mask[:, 1]], axis=1)
  own = jax.jit(lambda s, m: gemma.Gemma(config).apply({"params": params}, s, attention_mask=m,
                                                     return_hidden=True))(seq, seq_mask)
  real = np.asarray(mask[:, 1])
  np.testing.assert_allclose(np.asarray(a[:, y2])[real], np.asarray(own[:, P:])[real],
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("segments,cache", [((0, 2), False), ((2, 0), False), ((2, 3), False),
                                            ((6, 1), False), ((2, 2), True)])
def test_segments_are_checked(segments, cache):
  config = _layered(3)
  params = _params(config)
  tokens = jnp.zeros((2, 6), jnp.int32)
  kw = dict(cache=gemma.init_cache(config, 2, 8)) if cache else {}
  with pytest.raises(ValueError, match=r"segments=\(P, N\) needs no cache"):
    gemma.Gemma(config).apply({"params": params}, tokens, segments=segments, **kw)


def _layer_flops(config, rows, length, segments=None):
  """XLA's own count of a teacher-forced pass to the hidden states and its backward."""
  tokens = jnp.zeros((rows, length), jnp.int32)
  fn = jax.jit(jax.grad(lambda p: jnp.sum(gemma.Gemma(config).apply(
      {"params": p}, tokens, return_hidden=True, segments=segments))))
  return fn.lower(gemma.param_shapes(config)).compile().cost_analysis()["flops"]


@pytest.mark.parametrize("p,n,t", [(32, 2, 16), (4, 2, 64), (2, 8, 32), (12, 16, 32)])
def test_packed_rows_cost_fewer_flops(p, n, t):
  """Packing never costs more than separate rows, long completions and many samples included:
  the completions attend only to their prompt and themselves, never to each other (XLA's cost
  analysis of fwd+bwd; a dense mask over the whole packed row counted 1.15-1.86x more in the last
  three shapes)."""
  config = presets.get("tiny_gemma3", vocab_size=VOCAB)
  packed = _layer_flops(config, 1, p + n * t, (p, n))
  separate = _layer_flops(config, n, p + t)
  assert packed < separate, (packed, separate)
