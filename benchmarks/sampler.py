"""Decode speed of `bond.sampling.sample` against HF `generate` (PyTorch, KV cache), same weights.

For each model and batch size B (one sample per prompt, 16-token prompts, T new tokens, no eos,
temperature 1 sampling on both sides, or greedy with --temperature 0) it prints our tokens/s
(prefill and decode), HF's tokens/s (best of --repeats runs each, ours and HF's alternated so
that a busy spell of a shared host slows both), the ratio of the bests and the median of the
per-run-pair ratios ("pairs"), and our fraction of a roofline measured in
this run: the prompt pass's FLOPs (the vocabulary projection at the last position only) at the
matmul peak, then per decode step max(bytes / memory bandwidth, FLOPs / matmul peak), bytes =
weights + KV cache read, FLOPs = 2 * params * B + attention. "x@floor" is the ratio ours would
reach at that floor (HF's best run over it): where it is below a target, the target is beyond
this host's reach.
Compile time is reported separately. A last block times N samples of B prompts (one prefill per
prompt) against B * N copied prompts (one prefill per row).

  python benchmarks/sampler.py                      # all models (~5 min on 2 cores)
  python benchmarks/sampler.py --models gemma3_35m:bf16 --batches 8
  python benchmarks/sampler.py --models gemma3_35m:bf16 --batches 64 --new_tokens 64 --temperature 0
  python benchmarks/sampler.py --malloc-hugepages=off   # glibc's defaults (before session 12)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from bond import sampling
from bond.models import convert, gemma, presets

PROMPT_LEN = 16
DTYPES = {"bf16": jnp.bfloat16, "f32": jnp.float32}


def best_time(fn, repeats: int) -> float:
  """Best wall time of `repeats` calls of fn (which blocks until done)."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def memory_bandwidth() -> float:
  """Bytes/s of a jitted reduction over a 512 MiB random array (read once)."""
  x = jax.random.normal(jax.random.key(0), (128 * 2**20,), jnp.float32)
  total = jax.jit(jnp.sum)
  total(x).block_until_ready()
  return x.nbytes / best_time(lambda: total(x).block_until_ready(), 5)


def matmul_peak(dtype) -> float:
  """The highest FLOP/s of large jitted matmuls in `dtype` (f32 accumulation), best of 20 calls
  on each of three shapes: on a shared 2-core host one shape at 5 calls read 257-368 GFLOP/s bf16
  in one morning and the other shapes up to 396, and a floor from a low reading is no floor."""
  mm = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  rates = []
  for m, k, n in ((512, 2048, 2048), (1024, 1024, 4096), (2048, 2048, 2048)):
    a, b = jnp.ones((m, k), dtype), jnp.ones((k, n), dtype)
    mm(a, b).block_until_ready()
    rates.append(2 * m * k * n / best_time(lambda: mm(a, b).block_until_ready(), 20))
  return max(rates)


def roofline_step(config, params, rows: int, cache_len: int, bandwidth: float,
                  peak: float) -> float:
  """Lower bound (s) on one decode step of `rows` rows."""
  itemsize = jnp.dtype(config.dtype).itemsize
  n_params = sum(x.size for x in jax.tree.leaves(params))
  kv = 2 * config.num_layers * rows * cache_len * config.num_kv_heads * config.head_dim
  bytes_ = n_params * itemsize + kv * itemsize
  flops = 2 * n_params * rows + 2 * kv * config.num_heads // config.num_kv_heads
  return max(bytes_ / bandwidth, flops / peak)


def embedding_size(params) -> int:
  """Parameters of the embedding table (the tied vocabulary projection)."""
  return sum(x.size for k, x in jax.tree.leaves_with_path(params)
             if "input_embedding" in jax.tree_util.keystr(k))


def roofline_prefill(params, rows: int, prompt_len: int, peak: float) -> float:
  """Lower bound (s) on the prompt pass: every prompt token through the layers, the vocabulary
  projection at the last position only."""
  n_params = sum(x.size for x in jax.tree.leaves(params))
  embed = embedding_size(params)
  return 2 * ((n_params - embed) * rows * prompt_len + embed * rows) / peak


def load(model: str, dtype):
  """(config, params, HF torch model) with the same weights in `dtype`."""
  import torch
  import transformers
  torch_dtype = {jnp.bfloat16: torch.bfloat16, jnp.float32: torch.float32}[dtype]
  if model == "gemma3_270m_gguf":
    from bond import assets
    path = assets.gemma3_270m_gguf_path()
    config, params = convert.from_gguf(path, dtype=dtype, param_dtype=dtype)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch_dtype)
  else:
    config = presets.get(model, dtype=dtype, param_dtype=dtype)
    params = gemma.init_params(config.replace(dtype=jnp.float32, param_dtype=jnp.float32),
                               jax.random.key(0))
    with tempfile.TemporaryDirectory() as tmp:
      convert.to_hf(config, params, tmp)
      hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch_dtype)
    params = jax.tree.map(lambda x: x.astype(dtype), params)
  return config, params, hf.eval()


def prompts(config, batch: int, length: int = PROMPT_LEN):
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, min(config.vocab_size, 30_000), (batch, length)).astype(np.int32)
  return tokens, np.ones_like(tokens, bool)


def _run_fn(config, params, tokens, mask, new_tokens: int, num_samples: int = 1,
            temperature: float = 1.0):
  return lambda: sampling.sample(config, params, tokens, mask, jax.random.key(0),  # noqa: E731
                                 max_new_tokens=new_tokens, num_samples=num_samples,
                                 temperature=temperature, eos_id=None).tokens.block_until_ready()


def ours(config, params, tokens, mask, new_tokens: int, repeats: int, num_samples: int = 1,
         temperature: float = 1.0):
  """(compile s, best run s) of `sample`, prefill and decode."""
  run = _run_fn(config, params, tokens, mask, new_tokens, num_samples, temperature)
  first = best_time(run, 1)
  best = best_time(run, repeats)
  return first - best, best


def _hf_fn(hf, tokens, mask, temperature: float = 1.0):
  """gen(n): HF `generate` of exactly n new tokens per row, without gradients."""
  import torch
  ids, attn = torch.tensor(tokens, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
  if temperature == 0:
    how = dict(do_sample=False)
  else:
    how = dict(do_sample=True, top_k=0, top_p=1.0, temperature=temperature)

  def gen(n):
    with torch.no_grad():
      hf.generate(ids, attention_mask=attn, max_new_tokens=n, min_new_tokens=n, pad_token_id=0,
                  **how)
  return gen


def alternated(config, params, hf, tokens, mask, new_tokens: int, repeats: int,
               temperature: float = 1.0):
  """(compile s, our runs s, HF runs s): after a first call of each, `repeats` runs of ours and
  of HF `generate` in turn (ours, HF, ours, HF, ...), so that a busy spell of a shared host
  slows both sides, not one."""
  run = _run_fn(config, params, tokens, mask, new_tokens, temperature=temperature)
  gen = _hf_fn(hf, tokens, mask, temperature)
  first = best_time(run, 1)
  gen(2)
  ours_s, hf_s = [], []
  for _ in range(repeats):
    ours_s.append(best_time(run, 1))
    hf_s.append(best_time(lambda: gen(new_tokens), 1))
  return first - min(ours_s), ours_s, hf_s


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default="gemma3_35m:bf16,gemma3_35m:f32,gemma3_270m_gguf:bf16")
  parser.add_argument("--batches", default="1,8,32")
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=3,
                      help="timed runs of each side, alternated")
  parser.add_argument("--temperature", type=float, default=1.0,
                      help="both sides; 0 = greedy decoding")
  parser.add_argument("--malloc-hugepages", choices=("on", "off"), default="on",
                      help="glibc's huge pages for large buffers, as `python -m bond.main` runs "
                           "real models (bond/hugepages.py; both sides share the process)")
  args = parser.parse_args()
  from bond import hugepages
  hugepages.maybe_reexec(args.malloc_hugepages == "on")
  if args.temperature < 0:
    parser.error(f"--temperature must be >= 0, got {args.temperature}")

  import torch
  torch.set_num_threads(2)
  bandwidth = memory_bandwidth()
  peaks = {name: matmul_peak(dt) for name, dt in DTYPES.items()}
  print(f"devices: {jax.devices()}  torch threads: {torch.get_num_threads()}  load: "
        f"{os.getloadavg()[0]:.1f}  temperature: {args.temperature:g}"
        + (" (greedy)" if args.temperature == 0 else "") + f"  {hugepages.status()}")
  print(f"measured: memory {bandwidth / 1e9:.1f} GB/s, matmul peak "
        + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items()))
  t = args.new_tokens
  print(f"{'model':>24} {'B':>3} {'ours tok/s':>10} {'HF tok/s':>9} {'ratio':>6} {'pairs':>6} "
        f"{'ms/step':>8} {'roofline':>9} {'x@floor':>8} {'compile s':>9}")
  for spec in args.models.split(","):
    model, dtype_name = spec.split(":")
    config, params, hf = load(model, DTYPES[dtype_name])
    for b in [int(x) for x in args.batches.split(",")]:
      tokens, mask = prompts(config, b)
      compile_s, runs, hf_runs = alternated(config, params, hf, tokens, mask, t, args.repeats,
                                            temperature=args.temperature)
      run_s, hf_s = min(runs), min(hf_runs)
      pair = float(np.median([h / o for o, h in zip(runs, hf_runs)]))
      floor = (t * roofline_step(config, params, b, PROMPT_LEN + t, bandwidth, peaks[dtype_name])
               + roofline_prefill(params, b, PROMPT_LEN, peaks[dtype_name]))
      print(f"{model + ':' + dtype_name:>24} {b:>3} {b * t / run_s:>10.0f} {b * t / hf_s:>9.0f} "
            f"{hf_s / run_s:>6.2f} {pair:>6.2f} {run_s / t * 1e3:>8.2f} {floor / run_s:>8.0%} "
            f"{hf_s / floor:>8.2f} {compile_s:>9.1f}", flush=True)
    del hf

  # One prefill per prompt: N samples of B prompts vs B * N copies of the prompts.
  config, params, _ = load("gemma3_35m", jnp.bfloat16)
  b, n, long_prompt, few = 4, 8, 512, 8
  tokens, mask = prompts(config, b, long_prompt)
  shared = ours(config, params, tokens, mask, few, args.repeats, num_samples=n)[1]
  copied = ours(config, params, np.repeat(tokens, n, 0), np.repeat(mask, n, 0), few,
                args.repeats)[1]
  print(f"prefill sharing (gemma3_35m bf16, B={b} prompts of {long_prompt} tokens, N={n}, "
        f"{few} new tokens): num_samples=N {shared * 1e3:.0f} ms vs B*N copied prompts "
        f"{copied * 1e3:.0f} ms, speed-up {copied / shared:.2f}x")


if __name__ == "__main__":
  main()
