"""Decode-shaped matmuls: XLA:CPU dots, bond's CPU kernel and PyTorch (oneDNN), same shapes.

A decode step of a small model is a chain of [M, K] x [K, N] matmuls with M = rows being
sampled (8..32) and weights too large to stay in cache. This script times exactly that: C
different weight matrices of one shape, applied in sequence inside one jitted function (so each
is read from memory, not cache), in bf16 with f32 accumulation, against `torch.nn.functional.linear`
on the same shapes, and reports weight streaming rate (GB/s) and GFLOP/s next to the machine's
memory bandwidth measured in the same run. The middle column is `bond.models.cpu_kernels` (the
kernel the sampler's decode loop uses where it can: on AMX tiles where the CPU has AMX-BF16,
else AVX512-BF16), on the same chain; with AMX, a last column gives the same kernel on AVX512.

  python benchmarks/matmul.py
  python benchmarks/matmul.py --rows 48,64      # the J-BOND anchor's loop, the sampler at 64 rows
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from bond.models import cpu_kernels
import sampler   # benchmarks/sampler.py (this script's directory is on sys.path)

COPIES = 16
SHAPES = [(512, 4096), (2048, 512), (512, 768), (512, 16384)]   # gemma3_35m: gate/up, down, qkv, logits


def best_time(fn, repeats: int = 20) -> float:
  """Best of `repeats` timed calls, after one untimed warm-up call."""
  fn()
  return sampler.best_time(fn, repeats)


def xla_chain(m: int, k: int, n: int, kernel: bool = False) -> float:
  """Seconds per matmul of a jitted chain over COPIES distinct bf16 weights."""
  weights = [jnp.full((k, n), 0.01 * (i + 1), jnp.bfloat16) for i in range(COPIES)]
  if kernel:
    weights = [cpu_kernels.pack(w) for w in weights]

  @jax.jit
  def chain(x, weights):
    for w in weights:
      y = (cpu_kernels.matmul(x, w) if kernel else
           jnp.dot(x, w, preferred_element_type=jnp.float32))
      x = x + y[:, :1].astype(x.dtype)                      # serial dependency
    return x

  x = jnp.ones((m, k), jnp.bfloat16)
  return best_time(lambda: chain(x, weights).block_until_ready()) / COPIES


def torch_chain(m: int, k: int, n: int) -> float:
  import torch
  weights = [torch.full((n, k), 0.01 * (i + 1), dtype=torch.bfloat16) for i in range(COPIES)]
  x0 = torch.ones((m, k), dtype=torch.bfloat16)

  def chain():
    x = x0
    with torch.no_grad():
      for w in weights:
        y = torch.nn.functional.linear(x, w)
        x = x + y[:, :1]
    return x

  return best_time(chain) / COPIES


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rows", default="8,32", help="comma-separated M (rows being sampled)")
  args = parser.parse_args()
  import torch
  torch.set_num_threads(2)
  x = jnp.ones((256 * 2**20,), jnp.bfloat16)
  total = jax.jit(lambda x: jnp.sum(x.astype(jnp.float32)))
  bandwidth = x.nbytes / best_time(lambda: total(x).block_until_ready(), 5)
  del x
  print(f"memory bandwidth (jitted read of 512 MiB): {bandwidth / 1e9:.1f} GB/s")
  kernel = cpu_kernels.available()
  if not kernel:
    print("bond.models.cpu_kernels is not available here (needs avx512_bf16): column left empty")
  amx = kernel and cpu_kernels.amx()
  print(f"kernel unit: {'AMX tiles' if amx else 'AVX512-BF16'}"
        + (" (last column: the same kernel on AVX512-BF16)" if amx else ""))
  print(f"{'M':>3} {'K':>5} {'N':>6} | {'XLA GB/s':>8} {'GFLOP/s':>7} | {'kernel GB/s':>11} "
        f"{'GFLOP/s':>7} | {'torch GB/s':>10} {'GFLOP/s':>7} | XLA/kernel torch/kernel")
  rate = lambda t, m, k, n: f"{2 * k * n / t / 1e9:.1f} {2 * m * k * n / t / 1e9:>7.0f}"  # noqa: E731
  for m in [int(r) for r in args.rows.split(",")]:
    for k, n in SHAPES:
      t_xla, t_torch = xla_chain(m, k, n), torch_chain(m, k, n)
      t_ker = xla_chain(m, k, n, kernel=True) if kernel else float("nan")
      extra = ""
      if amx:
        cpu_kernels.set_amx(False)
        extra = f" | avx512 {rate(xla_chain(m, k, n, kernel=True), m, k, n)}"
        cpu_kernels.set_amx(True)
      print(f"{m:>3} {k:>5} {n:>6} | {rate(t_xla, m, k, n):>16} | {rate(t_ker, m, k, n):>19} | "
            f"{rate(t_torch, m, k, n):>18} | {t_xla / t_ker:>10.2f} {t_torch / t_ker:>12.2f}"
            + extra, flush=True)


if __name__ == "__main__":
  main()
