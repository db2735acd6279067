"""Peak memory and step time of the Gemma 3 270M J-BOND config: full fine-tuning vs LoRA vs QLoRA.

Each variant is `python -m bond.main --config=configs/gemma3_270m_jbond_lora.py ...` in its own
process (the held-out evaluation off, so the step alone is measured); the peak resident memory
is that process's own `ru_maxrss` (os.wait4), which includes loading the GGUF, compiling and
training; the teacher-forced passes use the chunked log-probs (the default,
`model.logprob_chunk`; `--full-logprobs` for the full logits). Step time = the median of the per-step wall times after the first `--warmup` steps
(time/elapsed_s in metrics.jsonl); compile+first step is reported apart.

  python benchmarks/lora_memory.py                       # every variant below
  python benchmarks/lora_memory.py --only lora,qlora --steps 6
  python benchmarks/lora_memory.py --only lora,qlora --mmap-threshold 1048576
  python benchmarks/lora_memory.py --only lora,lora_recompute,full,full_recompute  # kept logits
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/gemma3_270m_jbond_lora.py"
VARIANTS = {
    "full": ["--config.model.lora.rank=0", "--config.model.param_dtype=float32",
             "--config.optim.lr=1e-5"],                         # = configs/gemma3_270m_jbond.py
    "lora": [],                                                   # rank 8, bf16 base
    "qlora": ["--config.model.lora.base_dtype=int8"],       # int8 layers, bf16 tied embedding
    # int8 embedding too: every pass dequantizes all of it (a bf16 copy in flight).
    "qlora_embed": ["--config.model.lora.base_dtype=int8",
                    "--config.model.lora.quantize_embedding=True"],
    # The XLA decode path instead of the AVX512-BF16 kernels, which pack a copy of the weights
    # in every sampler call (~0.4 GB of temporaries on this model).
    "lora_xla": ["--config.sampling.cpu_kernels=off"],
    "qlora_xla": ["--config.model.lora.base_dtype=int8", "--config.sampling.cpu_kernels=off"],
    # Full passes as one lax.scan over the layers (model.scan_layers).
    "full_scan": ["--config.model.lora.rank=0", "--config.model.param_dtype=float32",
                  "--config.optim.lr=1e-5", "--config.model.scan_layers=True"],
    "lora_scan": ["--config.model.scan_layers=True"],
    # The backward recomputes the vocabulary logits instead of reading the forward's (before
    # session 30): less memory in flight, one vocabulary matmul more.
    "full_recompute": ["--config.model.lora.rank=0", "--config.model.param_dtype=float32",
                       "--config.optim.lr=1e-5", "--config.model.logprob_keep_mb=0"],
    "lora_recompute": ["--config.model.logprob_keep_mb=0"],
}


def run(name: str, steps: int, workdir: str, full_logprobs: bool = False,
        mmap_threshold: int = 0) -> dict:
  cmd = [sys.executable, "-m", "bond.main", f"--config={CONFIG}", f"--workdir={workdir}",
         f"--config.train.num_steps={steps}", "--config.train.log_every=1",
         "--config.eval.sampled=False", f"--config.train.checkpoint_every={10 * steps}",
         "--config.train.compilation_cache=", *VARIANTS[name]]
  if full_logprobs:
    cmd.append("--config.model.logprob_chunk=0")
  t0 = time.time()
  env = dict(os.environ)
  if mmap_threshold:
    # glibc serves allocations of at least this size with mmap and unmaps them when freed;
    # by default it raises the threshold as large blocks are freed and keeps freed heap
    # memory, so ru_maxrss also counts temporaries already released.
    env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
  with open(workdir + ".log", "w") as log:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
  if status != 0:
    raise RuntimeError(f"{name} failed ({status}); see {workdir}.log")
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  elapsed = [r["time/elapsed_s"] for r in records]
  return {"wall_s": time.time() - t0, "peak_rss_gb": usage.ru_maxrss / 2**20,
          "first_step_s": elapsed[0], "step_s": elapsed}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--only", default=",".join(VARIANTS))
  parser.add_argument("--steps", type=int, default=6)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--full-logprobs", action="store_true",
                      help="score through the full logits (model.logprob_chunk=0; default: chunked)")
  parser.add_argument("--mmap-threshold", type=int, default=0,
                      help="run each variant with MALLOC_MMAP_THRESHOLD_=BYTES (e.g. 1048576), "
                           "so freed temporaries go back to the OS (0: glibc's default)")
  args = parser.parse_args()
  names = args.only.split(",")
  unknown = sorted(set(names) - set(VARIANTS))
  if unknown:
    parser.error(f"--only: unknown variant(s) {unknown}; known: {list(VARIANTS)}")
  rows = {}
  with tempfile.TemporaryDirectory() as tmp:
    for name in names:
      r = run(name, args.steps, os.path.join(tmp, name), args.full_logprobs,
              args.mmap_threshold)
      per_step = np.diff(r["step_s"])[args.warmup - 1:]
      rows[name] = dict(peak_rss_gb=r["peak_rss_gb"], step_s=float(np.median(per_step)),
                        first_step_s=r["first_step_s"], wall_s=r["wall_s"])
      print(f"{name:6s} peak RSS {r['peak_rss_gb']:6.2f} GB   step {rows[name]['step_s']:6.2f} s "
            f"(median of {len(per_step)})   compile + first step {r['first_step_s']:6.1f} s   "
            f"process wall {r['wall_s']:6.1f} s", flush=True)
  if "full" in rows:
    for name in rows:
      if name != "full":
        print(f"{name} vs full: memory {rows[name]['peak_rss_gb'] / rows['full']['peak_rss_gb']:.2f}x, "
              f"step time {rows[name]['step_s'] / rows['full']['step_s']:.2f}x")


if __name__ == "__main__":
  main()
