"""Preparing f32 training weights for the decode kernels: `cpu_kernels.pack_transposed` (rounding
and packing the tied embedding as the logits' weight in one pass) against the same result from
XLA ops (cast to bf16, transpose, reshape and permute: `pack`'s fallback), in one run.

The sampler does this twice per J-BOND step on the real Gemma 3 270M (anchor and policy, whose
weights change every step), for its [262144, 640] f32 embedding. Also printed: the row-order
`pack` of the same bytes (as a [D, V] weight) as the kernel's own streaming reference, and the
memory bandwidth measured in the same run. Both results are checked equal, bit for bit.

  python benchmarks/pack.py                       # the 270M embedding
  python benchmarks/pack.py --dtype bf16          # a bf16 table (frozen LoRA base, bf16 inference)
                                                  # against the previous path: XLA's transpose,
                                                  # then the FFI pack
  python benchmarks/pack.py --vocab 16384 --dim 512
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import sampler   # benchmarks/sampler.py (this script's directory is on sys.path)
from bond import hugepages
from bond.models import cpu_kernels


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--vocab", type=int, default=262_144)
  parser.add_argument("--dim", type=int, default=640)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--dtype", choices=("f32", "bf16"), default="f32")
  parser.add_argument("--malloc-hugepages", choices=("on", "off"), default="on",
                      help="glibc's huge pages for large buffers, as `python -m bond.main` runs "
                           "real models (bond/hugepages.py)")
  args = parser.parse_args()
  hugepages.maybe_reexec(args.malloc_hugepages == "on")
  if not cpu_kernels.available():
    raise SystemExit("the CPU kernels cannot run here (needs avx512_bf16 and g++)")
  v, d = args.vocab, args.dim
  w = jnp.asarray(np.random.default_rng(0).standard_normal((v, d), np.float32))
  kernel = jax.jit(cpu_kernels.pack_transposed)
  cols = cpu_kernels.COLS
  xla = jax.jit(lambda w: w.T.astype(jnp.bfloat16).reshape(d // 2, 2, v // cols, cols)
                .transpose(2, 0, 3, 1))
  if args.dtype == "bf16":
    w = w.astype(jnp.bfloat16)
    xla = jax.jit(lambda w: cpu_kernels.pack(w.T))   # XLA's transpose, then the FFI pack
  rows = jax.jit(lambda w: cpu_kernels.pack(w.reshape(d, v)))
  block = lambda f: (lambda: f(w).block_until_ready())  # noqa: E731
  bits = lambda a: np.asarray(jax.lax.bitcast_convert_type(a, jnp.uint16))  # noqa: E731
  np.testing.assert_array_equal(bits(kernel(w)), bits(xla(w)))
  bandwidth = sampler.memory_bandwidth()
  times = {}
  baseline = "XLA cast + transpose" if args.dtype == "f32" else "XLA transpose, FFI pack"
  for name, fn in (("kernel pack_transposed", kernel), (baseline, xla),
                   ("kernel row-order pack", rows)):
    fn(w).block_until_ready()
    times[name] = sampler.best_time(block(fn), args.repeats)
  moved = w.size * w.dtype.itemsize + w.size * 2   # read w, write bf16
  print(f"[{v}, {d}] {args.dtype} -> packed bf16; memory bandwidth {bandwidth / 1e9:.1f} GB/s; "
        f"{hugepages.status()}")
  for name, t in times.items():
    print(f"  {name:<24} {t * 1e3:8.1f} ms  {moved / t / 1e9:6.1f} GB/s")
  print(f"{baseline} / kernel: {times[baseline] / times['kernel pack_transposed']:.2f}x")


if __name__ == "__main__":
  main()
