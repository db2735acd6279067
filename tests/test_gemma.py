"""Flax Gemma 1/2/3 against the HF PyTorch reference (eager attention, f32), via `from_hf`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bond.models import convert, gemma
from conftest import hf_logits, padded_batch

# Compiles much and runs little: XLA's quicker codegen (tests/conftest.py, `quick_compiles`).
pytestmark = pytest.mark.quick_compiles


@pytest.fixture(scope="module")
def loaded(hf_model_dir):
  version, model, path = hf_model_dir
  config, params = convert.from_hf(path)
  return version, model, config, params


def ours(config, params, tokens, mask):
  return np.asarray(gemma.Gemma(config).apply({"params": params}, jnp.asarray(tokens),
                                              attention_mask=jnp.asarray(mask)))


def test_logits_match_hf_on_left_padded_batch(loaded):
  _, model, config, params = loaded
  tokens, mask = padded_batch()
  ref = hf_logits(model, tokens, mask)
  got = ours(config, params, tokens, mask)
  assert np.abs(ref[mask]).max() > 1.0    # far from zero; the mutation test checks the caps bite
  err = np.abs(got - ref)[mask].max()
  print(f"gemma{config.version} padded-batch max abs err vs HF: {err:.2e}")
  assert err <= 1e-4


def test_padding_does_not_change_real_token_logits(loaded):
  _, _, config, params = loaded
  tokens, mask = padded_batch()
  padded = ours(config, params, tokens, mask)
  for b in range(tokens.shape[0]):
    row = tokens[b:b + 1, mask[b]]
    alone = ours(config, params, row, np.ones_like(row, bool))
    np.testing.assert_allclose(padded[b, mask[b]], alone[0], atol=1e-5, rtol=0)


def test_kv_cache_decode_matches_hf_full_forward(loaded):
  """Prefill a padded prompt into the cache, then decode one token at a time."""
  _, model, config, params = loaded
  tokens, mask = padded_batch(lengths=(8, 5, 3), width=8)
  extra = np.random.default_rng(1).integers(3, 128, (3, 4)).astype(np.int32)
  full_tokens = np.concatenate([tokens, extra], axis=1)
  full_mask = np.concatenate([mask, np.ones_like(extra, bool)], axis=1)
  ref = hf_logits(model, full_tokens, full_mask)

  apply = jax.jit(lambda p, t, pos, m, c: gemma.Gemma(config).apply(
      {"params": p}, t, positions=pos, attention_mask=m, cache=c))
  positions = gemma.default_positions(jnp.asarray(full_mask))
  cache = gemma.init_cache(config, 3, full_tokens.shape[1])
  logits, cache = apply(params, tokens, positions[:, :8], mask, cache)
  steps = [logits]
  for t in range(8, full_tokens.shape[1]):
    logits, cache = apply(params, full_tokens[:, t:t + 1], positions[:, t:t + 1],
                          full_mask[:, t:t + 1], cache)
    steps.append(logits)
  got = np.concatenate([np.asarray(s) for s in steps], axis=1)
  err = np.abs(got - ref)[full_mask].max()
  print(f"gemma{config.version} KV-cache decode max abs err vs HF: {err:.2e}")
  assert err <= 1e-4


# Each mutation breaks one feature the reference exercises; the parity check must notice.
MUTATIONS = {
    1: [dict(rope_base_global=1e3, rope_base_local=1e3), dict(rms_norm_eps=1e-1)],
    2: [dict(attn_logit_softcap=None), dict(final_logit_softcap=None), dict(sliding_window=100),
        dict(query_pre_attn_scalar=None)],
    3: [dict(rope_scale_global=1.0), dict(rope_base_local=1e6), dict(sliding_window=100),
        dict(use_qk_norm=False)],
}


def test_parity_check_detects_wrong_features(loaded):
  _, model, config, params = loaded
  tokens, mask = padded_batch()
  ref = hf_logits(model, tokens, mask)
  for mutation in MUTATIONS[config.version]:
    # Params a mutated config does not use (e.g. QK-norm scales) are ignored by `apply`.
    err = np.abs(ours(config.replace(**mutation), params, tokens, mask) - ref)[mask].max()
    assert err > 1e-2, f"mutation {mutation} went unnoticed (err {err:.2e})"


@pytest.mark.parametrize("name", ["tiny_gemma2", "tiny_gemma3"])
def test_init_params_are_those_of_a_full_init_bit_for_bit(name):
  """init_params skips the forward pass (lazy_init); the values must be what Gemma.init gives."""
  from bond.models import presets
  config = presets.get(name)
  rng = jax.random.key(7)
  want = gemma.Gemma(config).init(rng, jnp.zeros((1, 4), jnp.int32))["params"]
  got = gemma.init_params(config, rng)
  want = jax.tree.map(np.asarray, gemma.nn.meta.unbox(want))
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for path, x in jax.tree_util.tree_leaves_with_path(got):
    y = want
    for k in path:
      y = y[k.key]
    assert x.dtype == y.dtype and x.shape == y.shape, path
    np.testing.assert_array_equal(np.asarray(x), y, err_msg=str(path))


def test_bf16_embedding_lookup_is_exact_and_differentiable():
  # The bf16 table is gathered as uint16 bits (gemma._take_rows); values and gradients must be
  # those of a plain f32 gather of the same numbers.
  table = jax.random.normal(jax.random.key(0), (50, 8)).astype(jnp.bfloat16)
  ids = jnp.array([[3, 0, 49], [7, 7, 1]])
  np.testing.assert_array_equal(np.asarray(gemma._take_rows(table, ids), np.float32),
                                np.asarray(table, np.float32)[np.asarray(ids)])
  weights = jnp.arange(48.0).reshape(2, 3, 8)
  grad = jax.grad(lambda t: jnp.sum(gemma._take_rows(t, ids).astype(jnp.float32) * weights))(
      table)
  want = np.zeros((50, 8), np.float32)
  np.add.at(want, np.asarray(ids), np.asarray(weights))
  np.testing.assert_array_equal(np.asarray(grad, np.float32), want)


def test_scanned_and_unrolled_layer_stacks_agree(loaded):
  """`scan_layers` (one lax.scan over the stacked layer params) is the unrolled stack's
  computation: same logits, and gradients reaching the per-layer params."""
  _, _, unrolled, params = loaded
  tokens, mask = padded_batch()
  assert not unrolled.scan_layers
  config = unrolled.replace(scan_layers=True)
  np.testing.assert_array_equal(ours(config, params, tokens, mask),
                                ours(unrolled, params, tokens, mask))

  def loss(p, c):
    logits = gemma.Gemma(c).apply({"params": p}, jnp.asarray(tokens), attention_mask=mask)
    return jnp.sum(jnp.where(mask[..., None], jax.nn.log_softmax(logits), 0.0)[..., 5])

  got, want = jax.grad(loss)(params, config), jax.grad(loss)(params, unrolled)
  assert jax.tree.structure(got) == jax.tree.structure(params)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * float(np.abs(w).max()))
  assert float(np.abs(got["layer_0"]["mlp"]["linear"]).max()) > 0


def test_model_trace_holds_one_layer_of_each_type():
  """Tracing cost does not grow with depth: with scan_layers a full pass is one scanned layer;
  unrolled (a KV-cache decode step, or the default full pass) it calls one traced function per
  layer type (XLA inlines them)."""
  from bond.models import presets

  def full_pass(num_layers):
    c = presets.get("tiny_gemma3", num_layers=num_layers, scan_layers=True,
                    layer_types=presets.gemma3_layer_types(num_layers))
    p = gemma.param_shapes(c)
    tokens = jnp.zeros((2, 8), jnp.int32)
    return jax.make_jaxpr(lambda p: gemma.Gemma(c).apply({"params": p}, tokens))(p).jaxpr

  shallow, deep = full_pass(2), full_pass(12)
  text = str(deep)                                  # the scan sits inside scan_stack's custom VJP
  assert text.count("scan[") == 1 and "length=12" in text
  # Only the stacking of the params grows with depth (one concatenate input per layer).
  assert len(deep.eqns) - len(shallow.eqns) <= 40, (len(shallow.eqns), len(deep.eqns))

  c = presets.get("tiny_gemma3", num_layers=12, layer_types=presets.gemma3_layer_types(12))
  p = gemma.param_shapes(c)
  cache = jax.eval_shape(lambda: gemma.init_cache(c, 2, 16))
  step = jax.make_jaxpr(lambda p, cache: gemma.Gemma(c).apply(
      {"params": p}, jnp.zeros((2, 1), jnp.int32), cache=cache))(p, cache).jaxpr
  calls = [e for e in step.eqns if e.primitive.name in ("pjit", "jit")
           and e.params["name"] == "apply"]
  assert len(calls) == 12
  assert len({id(e.params["jaxpr"].jaxpr) for e in calls}) == 2     # local and global


@pytest.mark.parametrize("name", ["tiny_gemma2", "tiny_gemma3"])
def test_scanned_bf16_gradients_match_unrolled_and_store_residuals_as_bits(name):
  """The scanned stack's custom VJP (`gemma.scan_stack`) on a bf16 model: the gradients are the
  unrolled stack's, and no residual is stacked in bf16 (XLA:CPU would convert the whole stack
  to f32 and back at every layer's write); with remat it still agrees."""
  from bond.models import presets
  config = presets.get(name, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  params = gemma.init_params(config, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 24), 3, config.vocab_size)

  def loss(p, c):
    logits = gemma.Gemma(c).apply({"params": p}, tokens)
    return jnp.sum(jax.nn.log_softmax(logits.astype(jnp.float32))[:, -4:, 5])

  def grads(**kw):
    return jax.jit(jax.grad(lambda p: loss(p, config.replace(**kw))))(params)

  want = grads(scan_layers=False)
  for remat in (False, True):
    got = grads(scan_layers=True, remat=remat)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert g.dtype == w.dtype == jnp.bfloat16
      np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                 rtol=1e-2, atol=1e-3 * float(np.abs(np.asarray(w, np.float32)).max()))

  jaxpr = jax.make_jaxpr(jax.grad(lambda p: loss(p, config.replace(scan_layers=True))))(params)
  scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
  assert len(scans) == 2                                         # forward, then backward
  stacked = [v.aval for e in scans for v in e.outvars if v.aval.ndim and
             v.aval.shape[0] == config.num_layers]
  assert any(a.dtype == jnp.uint16 for a in stacked)
  assert not [a for a in stacked if a.dtype == jnp.bfloat16], stacked


@pytest.mark.parametrize("equation,x_shape,w_shape", [
    ("BTD,DNH->BTNH", (2, 5, 16), (16, 4, 8)),          # q projection
    ("BTD,DCF->BTCF", (2, 5, 16), (16, 2, 24)),         # fused gate/up
    ("BTNH,NHD->BTD", (2, 5, 4, 8), (4, 8, 16)),        # attention output
])
@pytest.mark.parametrize("x_dtype", [jnp.float32, jnp.bfloat16])
def test_bf16_einsum_gradient_is_the_exact_products_accumulated_in_f32(equation, x_shape, w_shape,
                                                                       x_dtype):
  """`gemma._einsum` in bf16 (f32 weights, as in training): its gradients are the f64 products of
  the bf16-rounded operands and cotangent, rounded once to each input's dtype; autodiff of the
  plain form rounds the weight gradient to bf16 on the way (checked as a control)."""
  kx, kw, kc = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, x_shape).astype(x_dtype)
  w = jax.random.normal(kw, w_shape)
  out_shape = jax.eval_shape(lambda: gemma._einsum(equation, x, w, jnp.bfloat16)).shape
  ct = jax.random.normal(kc, out_shape).astype(jnp.bfloat16)

  def loss(einsum):
    return lambda x, w: jnp.sum(einsum(x, w).astype(jnp.float32) * ct.astype(jnp.float32))

  ours = jax.grad(loss(lambda x, w: gemma._einsum(equation, x, w, jnp.bfloat16)), (0, 1))(x, w)
  f64 = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64)
  (xs, ws), out = equation.split("->")[0].split(","), equation.split("->")[1]
  want_dx = np.einsum(f"{out},{ws}->{xs}", f64(ct), f64(w))
  want_dw = np.einsum(f"{xs},{out}->{ws}", f64(x), f64(ct))
  assert ours[0].dtype == x_dtype and ours[1].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(ours[0], np.float64), want_dx,
                             rtol=1e-5 if x_dtype == jnp.float32 else 8e-3, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ours[1], np.float64), want_dw, rtol=1e-5, atol=1e-5)

  plain = lambda x, w: jnp.einsum(equation, x.astype(jnp.bfloat16), w.astype(jnp.bfloat16),
                                  preferred_element_type=jnp.float32).astype(jnp.bfloat16)
  control = jax.grad(loss(plain), 1)(x, w)
  assert np.abs(np.asarray(control, np.float64) - want_dw).max() > 1e-4


def test_bf16_einsum_gradient_runs_bf16_dots():
  """Every dot in the gradient of a bf16 `_einsum` takes bf16 operands (autodiff of the plain
  form ran both gradient dots in f32 x f32, about half as fast on CPU)."""
  x = jnp.ones((2, 5, 16), jnp.bfloat16)
  w = jnp.ones((16, 4, 8), jnp.float32)
  grad = jax.jit(jax.value_and_grad(
      lambda x, w: jnp.sum(gemma._einsum("BTD,DNH->BTNH", x, w, jnp.bfloat16)
                           .astype(jnp.float32)), (0, 1)))
  dots = [line for line in grad.lower(x, w).as_text().splitlines() if "dot_general" in line]
  assert len(dots) == 3                                          # forward, dx, dw
  for line in dots:
    operands = line.rsplit(":", 1)[1].split("->")[0]
    assert operands.count("bf16") == 2 and "f32" not in operands, line


def _gelu_mul_f64(gu):
  g, u = gu[..., 0, :], gu[..., 1, :]
  return 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3))) * u


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gelu_mul_matches_plain_formula_and_finite_differences(dtype):
  """`gemma.gelu_mul` (custom VJP): forward identical to the plain formula; gradient within f32
  error of central finite differences of the formula in f64, rounded once to the input dtype."""
  gu = (2 * jax.random.normal(jax.random.key(0), (3, 2, 2, 40))).astype(dtype)
  ct = jax.random.normal(jax.random.key(1), (3, 2, 40))
  plain = jax.nn.gelu(gu[..., 0, :], approximate=True) * gu[..., 1, :]
  np.testing.assert_array_equal(np.asarray(gemma.gelu_mul(gu), np.float32),
                                np.asarray(plain, np.float32))
  grad = jax.grad(lambda a: jnp.sum(gemma.gelu_mul(a).astype(jnp.float32) * ct))(gu)
  assert grad.dtype == dtype
  x, c, eps = np.asarray(gu, np.float64), np.asarray(ct, np.float64), 1e-6
  want = np.zeros_like(x)
  for idx in np.ndindex(x.shape[:-1]):
    for j in range(x.shape[-1]):
      d = np.zeros_like(x)
      d[idx + (j,)] = eps
      want[idx + (j,)] = np.sum((_gelu_mul_f64(x + d) - _gelu_mul_f64(x - d)) * c) / (2 * eps)
  rtol = 1e-5 if dtype == jnp.float32 else 8e-3
  np.testing.assert_allclose(np.asarray(grad, np.float64), want, rtol=rtol, atol=rtol)
