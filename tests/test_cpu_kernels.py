"""The AVX512-BF16 / AMX decode kernels against float64 numpy, and the sampler that uses them."""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bond import sampling
from bond.models import backends, cpu_kernels, gemma
from conftest import padded_batch
from test_sampling import teacher_forced_logprobs, tiny_model

# Compiles much and runs little: XLA's quicker codegen (tests/conftest.py, `quick_compiles`).
pytestmark = pytest.mark.quick_compiles

# CI and dev machines have avx512_bf16: there the kernel must build and run (a failed compile is
# a test failure, not a silent fallback). Elsewhere only the fallback is checked.
HAS_KERNEL = cpu_kernels.cpu_has_avx512_bf16()


def _cpu_flags() -> set[str]:
  with open("/proc/cpuinfo") as f:
    return next((set(line.split()) for line in f if line.startswith("flags")), set())


# Intel CPUs with AMX-BF16 (Linux >= 5.16 grants the tiles on request): the matmul kernels run
# on the tile unit there, and every matmul test runs on both units.
HAS_AMX = HAS_KERNEL and {"amx_bf16", "amx_tile"} <= _cpu_flags()


@pytest.fixture(params=["avx512", "amx"])
def unit(request):
  """The matmul kernels' unit for one test: AVX512-BF16, or AMX tiles (skipped without AMX)."""
  if request.param == "amx" and not HAS_AMX:
    pytest.skip("needs a CPU with AMX-BF16")
  assert cpu_kernels.set_amx(request.param == "amx") == (request.param == "amx")
  yield request.param
  cpu_kernels.set_amx(True)


def test_amx_is_on_exactly_where_the_cpu_has_it():
  assert cpu_kernels.amx() == HAS_AMX


def _bf16(rng, shape, scale=1.0):
  return jnp.asarray(scale * rng.normal(size=shape), jnp.bfloat16)


def test_kernel_is_available_exactly_when_the_cpu_has_avx512_bf16():
  assert cpu_kernels.available() == HAS_KERNEL


@pytest.mark.parametrize("kernel", ["1", "0"], ids=["ffi_pack", "xla_pack"])
def test_pack_layout(kernel, monkeypatch):
  # Block b, pair j, column c, half p holds w[2j + p, 32b + c]; packed by the FFI op where the
  # kernel is available, else by an XLA transpose.
  monkeypatch.setenv("BOND_CPU_KERNELS", kernel)
  k, n = 4, 64
  w = jnp.arange(k * n, dtype=jnp.float32).reshape(k, n)      # integers < 256: exact in bf16
  packed = np.asarray(cpu_kernels.pack(w), np.float32)
  assert packed.shape == (n // 32, k // 2, 32, 2)
  for b, j, c, p in [(0, 0, 0, 0), (0, 0, 0, 1), (1, 1, 31, 1), (1, 1, 5, 0), (0, 1, 7, 0)]:
    assert packed[b, j, c, p] == w[2 * j + p, 32 * b + c]
  # Leading contracted dims are flattened first: [2, 2, 64] with contract=2 is [4, 64].
  np.testing.assert_array_equal(cpu_kernels.pack(w.reshape(2, 2, n), contract=2), packed)


def _f32_with_edge_cases(rng, shape):
  """Normal f32 weights with ties to even (both ways), subnormals, +-inf, NaNs, the f32 max."""
  w = rng.normal(size=shape).astype(np.float32)
  flat, bits = w.reshape(-1), w.reshape(-1).view(np.uint32)
  bits[:40] = (bits[:40] & 0xFFFE0000) | 0x8000      # halfway, even upper half: rounds down
  bits[40:80] = (bits[40:80] & 0xFFFE0000) | 0x18000  # halfway, odd upper half: rounds up
  flat[80:100] = 1e-40 * rng.normal(size=20)          # f32 subnormals (some stay bf16 subnormals)
  flat[100:104] = [np.inf, -np.inf, np.nan, -np.nan]
  flat[104] = np.finfo(np.float32).max                # rounds to inf
  return w


@pytest.mark.skipif(not HAS_KERNEL, reason="needs a CPU with avx512_bf16")
@pytest.mark.parametrize("k,n", [(64, 96), (40, 64), (640, 256)])   # K = 40: a partial vector
def test_pack_from_f32_rounds_as_xla_converts(k, n):
  """The f32 packing (cast and permutation in one pass, as the sampler packs training params)
  is bit for bit `w.astype(bf16)` permuted; `pack_transposed(e)` is that of e.T. A hardware
  `vcvtneps2bf16` flushes the subnormals and fails this."""
  w = jnp.asarray(_f32_with_edge_cases(np.random.default_rng(k + n), (k, n)))
  bits = np.asarray(jax.lax.bitcast_convert_type(w.astype(jnp.bfloat16), jnp.uint16))
  want = bits.reshape(k // 2, 2, n // 32, 32).transpose(2, 0, 3, 1)   # the layout, in numpy
  as_bits = lambda a: np.asarray(jax.lax.bitcast_convert_type(a, jnp.uint16))  # noqa: E731
  np.testing.assert_array_equal(as_bits(jax.jit(cpu_kernels.pack)(w)), want)
  np.testing.assert_array_equal(as_bits(jax.jit(cpu_kernels.pack_transposed)(w.T)), want)
  # From bf16 (a frozen LoRA base): the FFI's transposed packing, the same bits as the numpy
  # layout of the bf16 weights (NaNs and infs included), and XLA's transpose not in the program.
  w16 = w.astype(jnp.bfloat16)
  np.testing.assert_array_equal(as_bits(jax.jit(cpu_kernels.pack_transposed)(w16.T)), want)
  hlo = jax.jit(cpu_kernels.pack_transposed).lower(w16.T).as_text()
  assert cpu_kernels.PACK_TARGET in hlo and "stablehlo.transpose" not in hlo
  with pytest.raises(ValueError, match="cannot pack"):
    cpu_kernels.pack_transposed(jnp.zeros((48, 6)))


@pytest.mark.skipif(not HAS_KERNEL, reason="needs a CPU with avx512_bf16")
@pytest.mark.parametrize("name", ["tiny_gemma3", "tiny_gemma2"])
def test_sampling_f32_params_equals_sampling_them_cast_to_bf16(name):
  """The sampler packs f32 params itself and looks up the f32 embedding (no cast of the whole
  table): its samples and log-probs are exactly those of the same params cast to bf16 first."""
  config, params = tiny_model(name, dtype=jnp.bfloat16, param_dtype=jnp.float32)
  assert "input_embedding" in backends.pack_weights(params)     # the table's path is covered
  cast = jax.tree.map(lambda w: w.astype(jnp.bfloat16) if w.ndim >= 2 else w, params)
  tokens, mask = padded_batch()
  draw = lambda p: sampling.sample(config, p, tokens, mask, jax.random.key(3), max_new_tokens=6,  # noqa: E731
                                   num_samples=2, eos_id=None, cpu_kernels=True)
  got, want = draw(params), draw(cast)
  for field in ("tokens", "mask", "logprobs"):
    np.testing.assert_array_equal(np.asarray(getattr(got, field)),
                                  np.asarray(getattr(want, field)), err_msg=field)


@pytest.mark.parametrize("bad", [(6, 48), (5, 64), (1, 32)])
def test_pack_rejects_unsupported_shapes(bad):
  assert not cpu_kernels.supports(*bad)
  with pytest.raises(ValueError, match="cannot pack"):
    cpu_kernels.pack(jnp.zeros(bad))
  with pytest.raises(ValueError, match="cannot pack"):
    cpu_kernels.pack_geglu(jnp.zeros((bad[0], 2, bad[1] // 2)))


@pytest.mark.skipif(not HAS_KERNEL, reason="needs a CPU with avx512_bf16")
@pytest.mark.parametrize("m,k,n", [(1, 2, 32), (3, 64, 96), (8, 512, 1024), (13, 128, 256),
                                   (40, 2048, 64), (33, 96, 64), (64, 640, 96)])
def test_matmul_matches_float64(m, k, n, unit):
  rng = np.random.default_rng(m * k + n)
  x, w = _bf16(rng, (m, k)), _bf16(rng, (k, n))
  want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)    # exact products of bf16 inputs
  got = jax.jit(cpu_kernels.matmul)(x, cpu_kernels.pack(w))
  assert got.dtype == jnp.float32 and got.shape == (m, n)
  # f32 accumulation of K products of size ~1: error ~ K * 2^-24 * |terms|, far below 1e-3.
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5 * k)
  # Leading batch dims are kept.
  got3 = cpu_kernels.matmul(x.reshape(1, m, k), cpu_kernels.pack(w))
  np.testing.assert_array_equal(np.asarray(got3)[0], np.asarray(got))


@pytest.mark.skipif(not HAS_KERNEL, reason="needs a CPU with avx512_bf16")
def test_matmul_writes_bf16_rounded_as_xla_converts(unit):
  # The bf16 output is the kernel's own f32 result rounded as XLA's convert rounds it, to nearest
  # even: random rows, and a row of exact ties (1.0078125 * 1.5 = 1.51171875, halfway between
  # two bf16 values; truncation or rounding half up would miss them).
  rng = np.random.default_rng(0)
  x = np.asarray(_bf16(rng, (6, 64)), np.float32)
  x[2] = 0.0
  x[2, 0] = 1.0 + 2.0 ** -7
  w = np.asarray(_bf16(rng, (64, 96)), np.float32)
  w[0, :32] = 1.5
  x, w = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
  packed = cpu_kernels.pack(w)
  f32 = jax.jit(cpu_kernels.matmul)(x, packed)
  got = jax.jit(functools.partial(cpu_kernels.matmul, dtype=jnp.bfloat16))(x, packed)
  want = f32.astype(jnp.bfloat16)
  assert got.dtype == jnp.bfloat16 and got.shape == (6, 96)
  assert np.all(np.asarray(f32)[2, :32] == 1.51171875)
  np.testing.assert_array_equal(np.asarray(got).view(np.uint16), np.asarray(want).view(np.uint16))
  with pytest.raises(ValueError, match="float32 or bfloat16"):
    cpu_kernels.matmul(x, packed, jnp.float16)


def _gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


@pytest.mark.skipif(not HAS_KERNEL, reason="needs a CPU with avx512_bf16")
@pytest.mark.parametrize("m,k,f", [(1, 64, 16), (8, 512, 2048), (13, 96, 48), (37, 64, 80)])
def test_geglu_matches_float64(m, k, f, unit):
  rng = np.random.default_rng(m + k + f)
  x, w = _bf16(rng, (m, k)), _bf16(rng, (k, 2, f), 2.0 / np.sqrt(k))   # gate/up values ~ +-2
  gu = np.einsum("mk,kcf->mcf", np.asarray(x, np.float64), np.asarray(w, np.float64))
  gate, up = _bf16_round(gu[:, 0]), _bf16_round(gu[:, 1])
  want = _bf16_round(_gelu_tanh(gate) * up)
  got = np.asarray(cpu_kernels.geglu(x, cpu_kernels.pack_geglu(w)), np.float64)
  assert got.shape == (m, f)
  # Every rounding above is to bf16; the kernel's f32 sums and gelu (error ~1e-6) can only land
  # on the other side of a bf16 rounding boundary by chance: nearly all entries are identical,
  # and none is more than 2 bf16 ulps away. (The gelu with 0.05 for 0.044715 fails both.)
  assert np.mean(got == want) > 0.98
  ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(want), 2.0 ** -126))) - 7)   # bf16's, at want
  assert np.all(np.abs(got - want) <= np.maximum(2 * ulp, 1e-6))


@pytest.mark.skipif(not HAS_KERNEL, reason="needs a CPU with avx512_bf16")
def test_matmul_rejects_wrong_feature_count():
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match="expects 64"):
    cpu_kernels.matmul(_bf16(rng, (2, 32)), cpu_kernels.pack(_bf16(rng, (64, 32))))


def _bf16_round(x):
  return np.asarray(jnp.asarray(x, jnp.float32).astype(jnp.bfloat16), np.float64)


def _attention_reference(q, k, v, mask, softcap):
  """float64 decode attention: q [R, K, G, Hd], k [R, S, K, Hd], v [R, K, Hd, S], mask [R, S]."""
  logits = np.einsum("rkgh,rskh->rkgs", q, k)
  if softcap:
    logits = np.tanh(logits / softcap) * softcap
  logits = np.where(mask[:, None, None], logits, -np.inf)
  logits = np.where(mask.any(-1)[:, None, None, None], logits, 0.0)   # fully masked: uniform
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p = _bf16_round(p / p.sum(-1, keepdims=True))          # the model rounds probs to bf16
  return np.einsum("rkgs,rkhs->rkgh", p, v)


@pytest.mark.skipif(not HAS_KERNEL, reason="needs a CPU with avx512_bf16")
@pytest.mark.parametrize("r,kh,g,hd,s,softcap", [   # query heads per key tile: 1, 4, 8, 1, 2
    (5, 2, 3, 24, 37, 0.0), (4, 1, 4, 128, 143, 0.0), (3, 2, 8, 16, 16, 2.5), (2, 1, 9, 32, 5, 0.0),
    (3, 2, 2, 20, 45, 0.0)])
def test_decode_attention_matches_float64(r, kh, g, hd, s, softcap):
  rng = np.random.default_rng(r * s + g)
  q = _bf16(rng, (r, kh, g, hd), 0.3)
  k, v = _bf16(rng, (r, s, kh, hd)), _bf16(rng, (r, kh, hd, s))
  mask = rng.random((r, s)) < 0.7
  mask[0] = False                                         # a fully masked row: uniform weights
  mask[1, :] = False
  mask[1, s // 2] = True                                  # a single visible key
  bits = lambda a: jax.lax.bitcast_convert_type(a, jnp.uint16)  # noqa: E731
  got = cpu_kernels.decode_attention(q, bits(k), bits(v), jnp.asarray(mask), softcap)
  want = _attention_reference(*(np.asarray(a, np.float64) for a in (q, k, v)), mask, softcap)
  assert got.shape == (r, kh, g, hd) and got.dtype == jnp.float32
  # Logits and softmax agree to f32 rounding (errors here are <= 5e-7). Where a probability p
  # sits on a bf16 rounding boundary the two may round apart, moving an output by p * 2^-8 * |v|;
  # 1e-3 leaves room for that on small p. An exp off by 0.5% (a wrong Taylor term) gives 5e-3.
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-3)
  np.testing.assert_allclose(np.asarray(got)[1], np.asarray(v, np.float64)[1, :, :, s // 2][
      :, None, :].repeat(g, 1), rtol=0, atol=1e-6)        # one key: exactly its value


@pytest.mark.skipif(not HAS_KERNEL, reason="needs a CPU with avx512_bf16")
def test_decode_attention_rejects_bad_shapes():
  z = jnp.zeros
  with pytest.raises(ValueError, match="do not fit"):
    cpu_kernels.decode_attention(z((2, 1, 4, 16)), z((2, 8, 1, 8), jnp.uint16),
                                 z((2, 1, 16, 8), jnp.uint16), z((2, 8), bool))
  with pytest.raises(ValueError, match="uint16 bits"):
    cpu_kernels.decode_attention(z((2, 1, 4, 16)), z((2, 8, 1, 16)), z((2, 1, 16, 8)),
                                 z((2, 8), bool))


@pytest.mark.skipif(not HAS_KERNEL, reason="needs a CPU with avx512_bf16")
@pytest.mark.parametrize("r,kh,g,hd,s,index,softcap", [
    (5, 2, 3, 24, 37, 10, 0.0), (3, 2, 8, 16, 16, 15, 2.5), (2, 1, 4, 128, 20, 25, 0.0),
    (3, 1, 1, 8, 9, 0, 0.0)])   # index 25 >= S: clamped to the last slot, as XLA's write does
def test_decode_attention_update_is_the_xla_backends_attention_step(r, kh, g, hd, s, index,
                                                                     softcap):
  # One decode step of `gemma.Backend.attention` on a bf16 cache: the kernel's cache after the
  # write must be the XLA backend's bit for bit (the key rotated as XLA:CPU rounds it), and its
  # output the float64 attention of XLA's rotated, scaled query over that cache.
  rng = np.random.default_rng(r * s + g + index)
  q, key, value = _bf16(rng, (r, 1, kh * g, hd)), _bf16(rng, (r, 1, kh, hd)), _bf16(rng, (r, 1, kh, hd))
  pos = jnp.asarray(rng.integers(0, 3000, (r, 1)), jnp.int32)
  rope = gemma.rope_table(pos, gemma.rope_inv_freq(hd, 10_000.0, 1.0), jnp.bfloat16)
  cache = {"k": jax.lax.bitcast_convert_type(_bf16(rng, (r, s, kh, hd)), jnp.uint16),
           "v": jax.lax.bitcast_convert_type(_bf16(rng, (r, kh, hd, s)), jnp.uint16)}
  mask = rng.random((r, 1, s)) < 0.7
  mask[0] = False                                         # a fully masked row: uniform weights
  scale = hd ** -0.5
  k_pos, k_valid = jnp.zeros((r, s), jnp.int32), jnp.ones((r, s), bool)

  def xla(q, key, value, rope, cache):
    ctx = gemma.KVContext(k_pos, k_valid, cache, jnp.int32(index))
    out, new = gemma.XLA.attention(q, key, value, rope, scale, ctx, jnp.asarray(mask), softcap,
                                   jnp.bfloat16)
    return out, new, gemma.rotate(q, *rope) * jnp.asarray(scale, jnp.bfloat16)

  _, want_cache, q_rot = jax.jit(xla)(q, key, value, rope, cache)
  got, k_bits, v_bits = jax.jit(cpu_kernels.decode_attention_update, static_argnums=(5, 10))(
      q.reshape(r, kh, g, hd), key[:, 0], value[:, 0], rope[0][:, 0], rope[1][:, 0], scale,
      cache["k"], cache["v"], jnp.int32(index), jnp.asarray(mask[:, 0]), softcap)
  np.testing.assert_array_equal(np.asarray(k_bits), np.asarray(want_cache["k"]))
  np.testing.assert_array_equal(np.asarray(v_bits), np.asarray(want_cache["v"]))
  assert got.dtype == jnp.bfloat16 and got.shape == (r, kh, g, hd)
  unbits = lambda a: np.asarray(jax.lax.bitcast_convert_type(a, jnp.bfloat16), np.float64)  # noqa: E731
  want = _attention_reference(np.asarray(q_rot, np.float64).reshape(r, kh, g, hd),
                              unbits(want_cache["k"]), unbits(want_cache["v"]), mask[:, 0], softcap)
  # As in test_decode_attention_matches_float64, plus the output's rounding to bf16.
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2.0 ** -8, atol=1e-3)


@pytest.mark.skipif(not HAS_KERNEL, reason="needs a CPU with avx512_bf16")
def test_decode_attention_update_rejects_bad_shapes():
  z = jnp.zeros
  args = dict(q=z((2, 1, 4, 16)), key=z((2, 1, 16)), value=z((2, 1, 16)), cos=z((2, 8)),
              sin=z((2, 8)), query_scale=0.25, k_bits=z((2, 8, 1, 16), jnp.uint16),
              v_bits=z((2, 1, 16, 8), jnp.uint16), index=0, mask=z((2, 8), bool))
  cpu_kernels.decode_attention_update(**args)                       # the shapes that fit
  with pytest.raises(ValueError, match="do not fit"):
    cpu_kernels.decode_attention_update(**{**args, "cos": z((2, 16))})
  with pytest.raises(ValueError, match="do not fit"):
    cpu_kernels.decode_attention_update(**{**args, "index": z((2,), jnp.int32)})
  with pytest.raises(ValueError, match="uint16 bits"):
    cpu_kernels.decode_attention_update(**{**args, "k_bits": z((2, 8, 1, 16))})


def test_packed_model_matches_the_einsum_model():
  # Every matmul of the tiny model is packable; with packed weights the bf16 logits must equal
  # the einsum path's up to bf16 rounding of the intermediate activations.
  config, params = tiny_model(dtype=jnp.bfloat16)
  params = jax.tree.map(lambda w: w.astype(jnp.bfloat16), params)
  packed = backends.pack_weights(params)
  assert set(packed) == {f"layer_{i}" for i in range(config.num_layers)} | {"input_embedding"}
  assert set(packed["layer_0"]["attn"]) == {"q_einsum", "kv_einsum", "attn_vec_einsum"}
  assert set(packed["layer_0"]["mlp"]) == {"gating_geglu", "linear"}
  tokens, mask = padded_batch()
  plain = gemma.Gemma(config).apply({"params": params}, tokens, attention_mask=mask)
  if not HAS_KERNEL:
    pytest.skip("the packed path needs the AVX512-BF16 kernel (not built on this CPU)")
  model = gemma.Gemma(config, backend=backends.CpuKernels())
  fast = jax.jit(lambda v: model.apply(v, tokens, attention_mask=mask))(
      {"params": params, backends.PACKED: packed})
  scale = float(jnp.max(jnp.abs(plain)))
  np.testing.assert_allclose(np.asarray(fast), np.asarray(plain), atol=0.02 * scale)


@pytest.mark.skipif(not HAS_KERNEL, reason="needs a CPU with avx512_bf16")
def test_prefill_reads_the_packed_weights_exactly_where_the_kernels_run_on_amx():
  """The sampler's prompt pass runs its matmuls through the kernels on AMX tiles (fused GeGLUs in
  the prefill as well as in the decode step), through XLA's dots on AVX512-BF16 alone (the decode
  step's GeGLUs only); either way the samples' log-probs stay the teacher-forced pass's."""
  config, params = tiny_model("tiny_gemma3", dtype=jnp.bfloat16)
  tokens, mask = padded_batch()
  kw = dict(max_new_tokens=4, num_samples=2, eos_id=None, cpu_kernels=True)

  def geglu_calls(amx):
    previous = cpu_kernels.amx()
    cpu_kernels.set_amx(amx)
    try:
      assert backends.packed_prefill(backends.CpuKernels()) == (amx and HAS_AMX)
      text = jax.jit(functools.partial(sampling.sample_fn, config, **kw)).lower(
          params, tokens, mask, jax.random.key(0)).as_text()
      out = sampling.sample(config, params, tokens, mask, jax.random.key(1), **kw)
    finally:
      cpu_kernels.set_amx(previous)
    want = teacher_forced_logprobs(config, params, tokens, mask, out)
    np.testing.assert_allclose(np.asarray(out.logprobs), want, atol=0.1)   # bf16 rounding
    return text.count(cpu_kernels.GEGLU_TARGET)

  decode_only = geglu_calls(False)
  assert decode_only >= 1
  with_prefill = geglu_calls(True)
  assert with_prefill > decode_only if HAS_AMX else with_prefill == decode_only


@pytest.mark.parametrize("name", ["tiny_gemma3", "tiny_gemma2"])   # gemma2: attention softcap
def test_sampler_uses_the_kernels_in_bf16_and_matches_a_teacher_forced_pass(name):
  config, params = tiny_model(name, dtype=jnp.bfloat16)
  tokens, mask = padded_batch()
  kw = dict(max_new_tokens=6, num_samples=2, eos_id=None)
  lower = lambda **o: jax.jit(functools.partial(sampling.sample_fn, config, **kw, **o)).lower(  # noqa: E731
      params, tokens, mask, jax.random.key(0)).as_text()
  for target in (cpu_kernels.TARGET, cpu_kernels.ATTENTION_TARGET):
    assert (target in lower()) == HAS_KERNEL                    # auto: on where it can run
    assert target not in lower(cpu_kernels=False)
  f32_config, _ = tiny_model(name)
  assert cpu_kernels.TARGET not in jax.jit(functools.partial(sampling.sample_fn, f32_config, **kw)
                                          ).lower(params, tokens, mask, jax.random.key(0)).as_text()
  if not HAS_KERNEL:
    pytest.skip("kernels unavailable here: only the XLA-path checks above ran")
  out = sampling.sample(config, params, tokens, mask, jax.random.key(0), **kw, cpu_kernels=True)
  want = teacher_forced_logprobs(config, params, tokens, mask, out)   # einsum path, no cache
  np.testing.assert_allclose(np.asarray(out.logprobs), want, atol=0.1)   # bf16 rounding


@pytest.mark.skipif(not HAS_KERNEL, reason="needs a CPU with avx512_bf16")
def test_token_lookup_copies_the_rows_of_a_bf16_table_without_converting_it(monkeypatch):
  """`take_rows` is `jnp.take` bit for bit (repeated, first and last ids); the sampler of a bf16
  model looks tokens up through it, in the prefill and in every decode step, so its compiled
  program holds no converted copy of the whole embedding (XLA's own bf16 lookup makes one)."""
  table = jax.random.normal(jax.random.key(0), (1000, 64)).astype(jnp.bfloat16)
  ids = jnp.asarray([[0, 999, 5], [7, 7, 123]], jnp.int32)
  bits = lambda a: np.asarray(jax.lax.bitcast_convert_type(a, jnp.uint16))  # noqa: E731
  np.testing.assert_array_equal(bits(jax.jit(cpu_kernels.take_rows)(table, ids)),
                                bits(jnp.take(table, ids, axis=0)))
  with pytest.raises(ValueError, match="bf16 table"):
    cpu_kernels.take_rows(table.astype(jnp.float32), ids)
  config, params = tiny_model("tiny_gemma3", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  params = jax.tree.map(lambda w: w.astype(jnp.bfloat16), params)
  tokens, mask = padded_batch()
  kw = dict(max_new_tokens=4, num_samples=2, eos_id=None)
  whole = f"[{config.vocab_size},{config.embed_dim}]"

  def program(**o):   # compiled once, run as compiled
    return jax.jit(functools.partial(sampling.sample_fn, config, **kw, **o)).lower(
        params, tokens, mask, jax.random.key(0)).compile()

  converted = lambda hlo: [line for line in hlo.splitlines()  # noqa: E731
                           if f"u16{whole}" in line and "parameter(" not in line]
  fast_program = program()
  fast = fast_program.as_text()
  assert fast.count(cpu_kernels.TAKE_ROWS_TARGET) >= 2 and not converted(fast)   # prefill, decode
  assert converted(program(cpu_kernels=False).as_text())              # the control: XLA's lookup
  # The lookup is exact: the same kernels with XLA's lookup draw the same samples bit for bit.
  ours = fast_program(params, tokens, mask, jax.random.key(1))
  monkeypatch.setattr(backends.CpuKernels, "embed", gemma.Backend.embed)
  xla_lookup = program()
  assert not fast.count(cpu_kernels.TAKE_ROWS_TARGET) or converted(xla_lookup.as_text())
  theirs = xla_lookup(params, tokens, mask, jax.random.key(1))
  for x, y in ((ours.tokens, theirs.tokens), (ours.logprobs, theirs.logprobs)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _greedy_logits():
  """Rows of f32 logits with the cases a greedy choice must get right, in several lengths."""
  rng = np.random.default_rng(0)
  rows = {}
  for v in (1, 17, 64, 100, 16_387):
    x = (3 * rng.normal(size=(9, v))).astype(np.float32)
    if v > 1:
      x[1, [v // 3, v - 1]] = x[1].max() + 1               # a tie: the first index wins
      x[2] = 0.0                                           # all tied: index 0
      x[3, :] = -np.inf
      x[3, v - 1] = 2.0                                    # one finite entry, in the tail
      x[4] = -np.inf                                       # nothing finite: token 0, NaN
      x[5, v // 2] = np.inf                                # an infinite max: NaN, as XLA
      x[6, 0] = x[6].max() + 1                             # the first entry
    rows[v] = x
  return rows


@pytest.mark.skipif(not HAS_KERNEL, reason="needs a CPU with avx512_bf16")
def test_greedy_kernel_picks_the_first_argmax_and_its_float64_log_softmax():
  for v, x in _greedy_logits().items():
    tokens, logprobs = jax.jit(cpu_kernels.greedy)(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(tokens), np.argmax(x, -1), err_msg=f"V={v}")
    x64 = x.astype(np.float64)
    with np.errstate(invalid="ignore"):
      top = x64.max(-1, keepdims=True)
      want = -np.log(np.exp(x64 - top).sum(-1))             # log softmax at the maximum
    want[~np.isfinite(top[:, 0])] = np.nan
    np.testing.assert_allclose(np.asarray(logprobs), want, rtol=2e-6, atol=2e-6, err_msg=f"V={v}")
    # The XLA backend's choice (the sampler without the kernels) agrees, NaNs included.
    xla_tokens, xla_logprobs = jax.jit(gemma.XLA.greedy)(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(xla_tokens))
    np.testing.assert_allclose(np.asarray(logprobs), np.asarray(xla_logprobs), rtol=2e-6,
                               atol=2e-6)
  x = np.zeros((3, 40), np.float32)
  x[1, 5] = np.nan                                         # a NaN propagates to the log-prob
  assert np.isnan(np.asarray(cpu_kernels.greedy(jnp.asarray(x))[1])).tolist() == [False, True,
                                                                                    False]
  with pytest.raises(ValueError, match="f32 logits"):
    cpu_kernels.greedy(jnp.zeros((2, 3), jnp.bfloat16))


@pytest.mark.skipif(not HAS_KERNEL, reason="needs a CPU with avx512_bf16")
def test_greedy_sampling_with_the_kernels_takes_the_argmax_and_the_models_logprob():
  """The kernels' sampler chooses greedily in one kernel call per step (`bond_greedy`), and picks
  the tokens the XLA sampler picks, with the log-probs of the model's teacher-forced pass."""
  config, params = _seam_model("tiny_gemma2", jnp.float32)   # final soft-cap applied first
  tokens, mask = padded_batch()
  kw = dict(max_new_tokens=6, num_samples=1, temperature=0.0, eos_id=None)
  program = lambda kernels: jax.jit(functools.partial(  # noqa: E731
      sampling.sample_fn, config, cpu_kernels=kernels, **kw)).lower(
          params, tokens, mask, jax.random.key(0)).compile().as_text()
  assert cpu_kernels.GREEDY_TARGET in program(True)
  assert cpu_kernels.GREEDY_TARGET not in program(False)
  fast, plain = (sampling.sample(config, params, tokens, mask, jax.random.key(0), cpu_kernels=k,
                                 **kw) for k in (True, False))
  np.testing.assert_array_equal(np.asarray(fast.tokens), np.asarray(plain.tokens))
  np.testing.assert_array_equal(np.asarray(fast.sample_logprobs), 0.0)
  trained = teacher_forced_logprobs(config, params, tokens, mask, fast)
  np.testing.assert_allclose(np.asarray(fast.logprobs), trained, atol=0.08)
  np.testing.assert_allclose(np.asarray(fast.logprobs), np.asarray(plain.logprobs), atol=0.08)


def test_cpu_kernel_true_fails_clearly_where_it_cannot_run():
  config, params = tiny_model()                                  # f32: the kernel is bf16 only
  tokens, mask = padded_batch()
  with pytest.raises(ValueError, match="cpu_kernels=True needs config.dtype=bfloat16"):
    sampling.sample(config, params, tokens, mask, jax.random.key(0), max_new_tokens=2,
                    cpu_kernels=True)


def test_env_switch_turns_the_kernel_off(monkeypatch):
  monkeypatch.setenv("BOND_CPU_KERNELS", "0")
  assert not cpu_kernels.available()
  config, params = tiny_model(dtype=jnp.bfloat16)
  tokens, mask = padded_batch()
  hlo = jax.jit(functools.partial(sampling.sample_fn, config, max_new_tokens=2)).lower(
      params, tokens, mask, jax.random.key(0)).as_text()
  assert cpu_kernels.TARGET not in hlo


# ------------------------------------------------------------------ the backend seam


def decode_logprobs(config, params, backend, prompt, mask, tokens):
  """log pi(tokens [R, T]) after prompt [R, P] through the KV-cache decode path of `backend`:
  one prefill, then one token per step, as the sampler runs them."""
  r, t = tokens.shape
  params = sampling._compute_params(config, params)
  positions = gemma.default_positions(jnp.asarray(mask))
  cache = gemma.init_cache(config, r, prompt.shape[1] - 1 + t)
  cache = sampling._prefill(config, params, jnp.asarray(prompt[:, :-1]),
                            jnp.asarray(mask[:, :-1]), positions[:, :-1], cache)
  variables = {"params": params, **backend.prepare(params)}
  step = jax.jit(functools.partial(sampling._decode_step, config, backend=backend))
  feed = np.concatenate([prompt[:, -1:], tokens[:, :-1]], 1)
  out = []
  for i in range(t):
    logits, cache = step(variables, cache, jnp.asarray(feed[:, i]), positions[:, -1] + i)
    out.append(np.asarray(jax.nn.log_softmax(logits))[np.arange(r), tokens[:, i]])
  return np.stack(out, 1)


def _seam_model(name, param_dtype):
  """A bf16 tiny model; Gemma 2 with attention and final soft-caps that bite."""
  if name == "tiny_gemma3":
    config, params = tiny_model(name, dtype=jnp.bfloat16, param_dtype=param_dtype)
  else:   # attention logits ~ +-5 (q, k weights x10) against a cap of 1; final logits ~ 4 vs 2
    config, params = tiny_model(name, embed_std=0.5, dtype=jnp.bfloat16, param_dtype=param_dtype,
                                attn_logit_softcap=1.0, final_logit_softcap=2.0)
    for layer in (p for key, p in params.items() if key.startswith("layer_")):
      for w in ("q_einsum", "kv_einsum"):
        layer["attn"][w] = 10 * layer["attn"][w]
  return config, jax.tree.map(lambda w: w.astype(param_dtype), params)


@pytest.mark.skipif(not HAS_KERNEL, reason="needs a CPU with avx512_bf16")
@pytest.mark.parametrize("param_dtype", [   # training: f32 params, bf16 compute
    pytest.param(jnp.float32, id="training_dtype"),
    pytest.param(jnp.bfloat16, id="bf16_params", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", ["tiny_gemma2", "tiny_gemma3"])
def test_both_backends_give_the_same_samples_the_same_logprobs(name, param_dtype):
  config, params = _seam_model(name, param_dtype)
  tokens, mask = padded_batch()
  n, t = 2, 6
  out = sampling.sample(config, params, tokens, mask, jax.random.key(0), max_new_tokens=t,
                        num_samples=n, eos_id=None, cpu_kernels=True)
  samples = np.asarray(out.tokens).reshape(-1, t)
  prompt, prompt_mask = np.repeat(tokens, n, 0), np.repeat(mask, n, 0)
  xla, kernels = (decode_logprobs(config, params, backend, prompt, prompt_mask, samples)
                  for backend in (gemma.XLA, backends.CpuKernels()))
  # The model being trained: one teacher-forced pass in the same config (bf16 compute).
  trained = teacher_forced_logprobs(config, params, tokens, mask, out).reshape(-1, t)
  # bf16 rounding of the activations: XLA's own decode and teacher-forced compilations differ
  # by ~0.03 at most here (excess precision in different fusions); the kernels as little.
  for got, want in [(kernels, xla), (kernels, trained), (xla, trained),
                    (np.asarray(out.logprobs).reshape(-1, t), kernels)]:
    np.testing.assert_allclose(got, want, atol=0.08)
    assert np.mean(np.abs(got - want)) < 0.015
  if name == "tiny_gemma2":   # both caps change these log-probs far beyond the tolerance
    for cap in ("attn_logit_softcap", "final_logit_softcap"):
      uncapped = teacher_forced_logprobs(config.replace(**{cap: None}), params, tokens, mask, out)
      assert np.max(np.abs(uncapped.reshape(-1, t) - trained)) > 0.5, cap


def test_sampler_keeps_the_training_models_f32_numerics():
  # A model trained in f32 compute (the default `model.dtype`) is sampled in f32: the bf16
  # kernels stay off, so its samples' log-probs are the training pass's to f32 rounding.
  config, params = tiny_model()
  assert backends.select(config) == gemma.XLA
  tokens, mask = padded_batch()
  out = sampling.sample(config, params, tokens, mask, jax.random.key(0), max_new_tokens=6,
                        num_samples=2, eos_id=None)
  want = teacher_forced_logprobs(config, params, tokens, mask, out)
  np.testing.assert_allclose(np.asarray(out.logprobs), want, atol=1e-4)


def test_select_falls_back_to_xla_with_one_log_line_saying_why(monkeypatch, caplog):
  caplog.set_level(logging.INFO)
  bf16, _ = tiny_model(dtype=jnp.bfloat16)
  assert isinstance(backends.select(bf16), backends.CpuKernels) == HAS_KERNEL
  monkeypatch.setenv("BOND_CPU_KERNELS", "0")
  backends._log_once.cache_clear()
  f32, _ = tiny_model()
  for config in (bf16, bf16, f32, f32):
    assert backends.select(config) == gemma.XLA
    assert backends.select(config, cpu_kernels=False) == gemma.XLA
  lines = [r.getMessage() for r in caplog.records if "bond.models.backends" in r.getMessage()]
  assert len(lines) == 2, lines
  assert "BOND_CPU_KERNELS=0" in lines[0] and "float32" in lines[1]


def test_the_model_file_holds_no_kernel_code():
  source = open(gemma.__file__).read()
  for word in ("cpu_kernels", "packed", "PACKED", "ffi"):
    assert word not in source, word


@pytest.mark.skipif(not HAS_KERNEL, reason="needs a CPU with avx512_bf16")
@pytest.mark.parametrize("name", ["tiny_gemma2", "tiny_gemma3"])
def test_forced_rows_score_a_sample_as_its_own_sampler_did(name):
  """`bond.anchor_logp='decode'` takes log π_θ/π_anchor from two samplers' log-probs (the
  policy's, and the anchor's forced rows). On the kernels, at the training dtype, a forced row
  scores a sample as the sampler that drew it did (same params, same per-row kernels): the ratio
  is 0 where the models agree. A teacher-forced pass differs from both by bf16 rounding, so a
  ratio of one pass and one sampler would not be."""
  config, params = _seam_model(name, jnp.float32)
  tokens, mask = padded_batch()
  kw = dict(max_new_tokens=6, eos_id=None, cpu_kernels=True)
  policy = sampling.sample(config, params, tokens, mask, jax.random.key(0), num_samples=1, **kw)
  anchor = sampling.sample(config, params, tokens, mask, jax.random.key(1), num_samples=2, **kw,
                           forced_tokens=policy.tokens, forced_mask=policy.mask)
  np.testing.assert_allclose(anchor.forced_logprobs, policy.logprobs, rtol=0, atol=1e-5)
  trained = teacher_forced_logprobs(config, params, tokens, mask, policy)
  print("max |forced - sampler|", np.abs(np.asarray(anchor.forced_logprobs - policy.logprobs)).max(),
        "max |pass - sampler|", np.abs(trained - np.asarray(policy.logprobs)).max())
  assert np.abs(trained - np.asarray(policy.logprobs)).max() > 1e-3
