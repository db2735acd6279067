"""Decode attention over a bf16 KV cache: XLA:CPU ops (gemma.Attention's path) vs bond's kernel.

One query token per row, the cache held as uint16 bits in the layouts of `gemma.init_cache`
(keys [R, S, K, Hd], values [R, K, Hd, S]). Both sides run as a chain of 7 calls in one jit (the
layers of gemma3_35m), and the script prints ms per call, their ratio, and the rate at which
the cache is read (GB/s).

  python benchmarks/attention.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bond.models import cpu_kernels, gemma
import sampler   # benchmarks/sampler.py (this script's directory is on sys.path)

LAYERS = 7


def xla_attention(q, k_bits, v_bits, mask):
  """What gemma.Attention computes for one decode token without the kernel."""
  key = jax.lax.bitcast_convert_type(k_bits, jnp.bfloat16)
  value = jax.lax.bitcast_convert_type(v_bits, jnp.bfloat16)
  logits = jnp.einsum("RKGH,RSKH->RKGS", q, key, preferred_element_type=jnp.float32)
  logits = jnp.where(mask[:, None, None], logits, gemma.K_MASK)
  probs = jax.nn.softmax(logits, axis=-1).astype(jnp.bfloat16)
  return jnp.einsum("RKGS,RKHS->RKGH", probs, value, preferred_element_type=jnp.float32)


def chain_time(fn, q, k_bits, v_bits, mask) -> float:
  @jax.jit
  def chain(q, k_bits, v_bits, mask):
    acc = jnp.zeros(q.shape, jnp.float32)
    for _ in range(LAYERS):                      # serial dependency through q
      acc = acc + fn((q.astype(jnp.float32) + 1e-6 * acc).astype(jnp.bfloat16), k_bits,
                     v_bits, mask)
    return acc

  chain(q, k_bits, v_bits, mask).block_until_ready()
  return sampler.best_time(lambda: chain(q, k_bits, v_bits, mask).block_until_ready(), 30) / LAYERS


def main():
  if not cpu_kernels.available():
    raise SystemExit("bond.models.cpu_kernels is not available here (needs avx512_bf16)")
  rng = np.random.default_rng(0)
  bits = lambda a: jax.lax.bitcast_convert_type(jnp.asarray(a, jnp.bfloat16), jnp.uint16)  # noqa: E731
  print(f"{'R':>4} {'K':>2} {'G':>2} {'Hd':>4} {'S':>5} | {'XLA ms':>7} {'kernel ms':>9} | ratio | "
        "kernel cache GB/s")
  for r, kh, g, hd, s in [(8, 1, 4, 128, 143), (32, 1, 4, 128, 143), (32, 1, 4, 128, 527),
                          (8, 1, 4, 256, 1024), (64, 2, 4, 128, 143)]:
    q = jnp.asarray(0.1 * rng.normal(size=(r, kh, g, hd)), jnp.bfloat16)
    k_bits, v_bits = bits(rng.normal(size=(r, s, kh, hd))), bits(rng.normal(size=(r, kh, hd, s)))
    mask = jnp.asarray(rng.random((r, s)) < 0.9)
    t_xla = chain_time(xla_attention, q, k_bits, v_bits, mask)
    t_ker = chain_time(cpu_kernels.decode_attention, q, k_bits, v_bits, mask)
    cache_bytes = k_bits.nbytes + v_bits.nbytes
    print(f"{r:>4} {kh:>2} {g:>2} {hd:>4} {s:>5} | {t_xla * 1e3:>7.3f} {t_ker * 1e3:>9.3f} | "
          f"{t_xla / t_ker:>5.2f} | {cache_bytes / t_ker / 1e9:>8.1f}", flush=True)


if __name__ == "__main__":
  main()
