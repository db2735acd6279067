"""The AVX512-BF16 decode matmul kernel against float64 numpy, and the sampler that uses it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bond import sampling
from bond.models import cpu_matmul, gemma
from conftest import padded_batch
from test_sampling import teacher_forced_logprobs, tiny_model

# CI and dev machines have avx512_bf16: there the kernel must build and run (a failed compile is
# a test failure, not a silent fallback). Elsewhere only the fallback is checked.
HAS_KERNEL = cpu_matmul.cpu_has_avx512_bf16()


def _bf16(rng, shape, scale=1.0):
  return jnp.asarray(scale * rng.normal(size=shape), jnp.bfloat16)


def test_kernel_is_available_exactly_when_the_cpu_has_avx512_bf16():
  assert cpu_matmul.available() == HAS_KERNEL


@pytest.mark.parametrize("kernel", ["1", "0"], ids=["ffi_pack", "xla_pack"])
def test_pack_layout(kernel, monkeypatch):
  # Block b, pair j, column c, half p holds w[2j + p, 32b + c]; packed by the FFI op where the
  # kernel is available, else by an XLA transpose.
  monkeypatch.setenv("BOND_CPU_MATMUL", kernel)
  k, n = 4, 64
  w = jnp.arange(k * n, dtype=jnp.float32).reshape(k, n)      # integers < 256: exact in bf16
  packed = np.asarray(cpu_matmul.pack(w), np.float32)
  assert packed.shape == (n // 32, k // 2, 32, 2)
  for b, j, c, p in [(0, 0, 0, 0), (0, 0, 0, 1), (1, 1, 31, 1), (1, 1, 5, 0), (0, 1, 7, 0)]:
    assert packed[b, j, c, p] == w[2 * j + p, 32 * b + c]
  # Leading contracted dims are flattened first: [2, 2, 64] with contract=2 is [4, 64].
  np.testing.assert_array_equal(cpu_matmul.pack(w.reshape(2, 2, n), contract=2), packed)


@pytest.mark.parametrize("bad", [(6, 48), (5, 64), (1, 32)])
def test_pack_rejects_unsupported_shapes(bad):
  assert not cpu_matmul.supports(*bad)
  with pytest.raises(ValueError, match="cannot pack"):
    cpu_matmul.pack(jnp.zeros(bad))


@pytest.mark.skipif(not HAS_KERNEL, reason="needs a CPU with avx512_bf16")
@pytest.mark.parametrize("m,k,n", [(1, 2, 32), (3, 64, 96), (8, 512, 1024), (13, 128, 256),
                                   (40, 2048, 64)])
def test_matmul_matches_float64(m, k, n):
  rng = np.random.default_rng(m * k + n)
  x, w = _bf16(rng, (m, k)), _bf16(rng, (k, n))
  want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)    # exact products of bf16 inputs
  got = jax.jit(cpu_matmul.matmul)(x, cpu_matmul.pack(w))
  assert got.dtype == jnp.float32 and got.shape == (m, n)
  # f32 accumulation of K products of size ~1: error ~ K * 2^-24 * |terms|, far below 1e-3.
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5 * k)
  # Leading batch dims are kept.
  got3 = cpu_matmul.matmul(x.reshape(1, m, k), cpu_matmul.pack(w))
  np.testing.assert_array_equal(np.asarray(got3)[0], np.asarray(got))


@pytest.mark.skipif(not HAS_KERNEL, reason="needs a CPU with avx512_bf16")
def test_matmul_rejects_wrong_feature_count():
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match="expects 64"):
    cpu_matmul.matmul(_bf16(rng, (2, 32)), cpu_matmul.pack(_bf16(rng, (64, 32))))


def test_packed_model_matches_the_einsum_model():
  # Every matmul of the tiny model is packable; with packed weights the bf16 logits must equal
  # the einsum path's up to bf16 rounding of the intermediate activations.
  config, params = tiny_model(dtype=jnp.bfloat16)
  params = jax.tree.map(lambda w: w.astype(jnp.bfloat16), params)
  packed = gemma.pack_weights(params)
  assert set(packed) == {f"layer_{i}" for i in range(config.num_layers)} | {"input_embedding"}
  assert set(packed["layer_0"]["attn"]) == {"q_einsum", "kv_einsum", "attn_vec_einsum"}
  tokens, mask = padded_batch()
  model = gemma.Gemma(config)
  plain = model.apply({"params": params}, tokens, attention_mask=mask)
  if not HAS_KERNEL:
    return
  fast = jax.jit(lambda v: model.apply(v, tokens, attention_mask=mask))(
      {"params": params, gemma.PACKED: packed})
  scale = float(jnp.max(jnp.abs(plain)))
  np.testing.assert_allclose(np.asarray(fast), np.asarray(plain), atol=0.02 * scale)


def test_sampler_uses_the_kernel_in_bf16_and_matches_a_teacher_forced_pass():
  config, params = tiny_model(dtype=jnp.bfloat16)
  tokens, mask = padded_batch()
  kw = dict(max_new_tokens=6, num_samples=2, eos_id=None)
  lower = lambda **o: jax.jit(functools.partial(sampling.sample_fn, config, **kw, **o)).lower(  # noqa: E731
      params, tokens, mask, jax.random.key(0)).as_text()
  assert (cpu_matmul.TARGET in lower()) == HAS_KERNEL           # auto: on where it can run
  assert cpu_matmul.TARGET not in lower(cpu_kernel=False)
  f32_config, _ = tiny_model()
  assert cpu_matmul.TARGET not in jax.jit(functools.partial(sampling.sample_fn, f32_config, **kw)
                                          ).lower(params, tokens, mask, jax.random.key(0)).as_text()
  if not HAS_KERNEL:
    return
  out = sampling.sample(config, params, tokens, mask, jax.random.key(0), **kw, cpu_kernel=True)
  want = teacher_forced_logprobs(config, params, tokens, mask, out)   # einsum path, no cache
  np.testing.assert_allclose(np.asarray(out.logprobs), want, atol=0.1)   # bf16 rounding


def test_cpu_kernel_true_fails_clearly_where_it_cannot_run():
  config, params = tiny_model()                                  # f32: the kernel is bf16 only
  tokens, mask = padded_batch()
  with pytest.raises(ValueError, match="cpu_kernel=True needs config.dtype=bfloat16"):
    sampling.sample(config, params, tokens, mask, jax.random.key(0), max_new_tokens=2,
                    cpu_kernel=True)


def test_env_switch_turns_the_kernel_off(monkeypatch):
  monkeypatch.setenv("BOND_CPU_MATMUL", "0")
  assert not cpu_matmul.available()
  config, params = tiny_model(dtype=jnp.bfloat16)
  tokens, mask = padded_batch()
  hlo = jax.jit(functools.partial(sampling.sample_fn, config, max_new_tokens=2)).lower(
      params, tokens, mask, jax.random.key(0)).as_text()
  assert cpu_matmul.TARGET not in hlo
