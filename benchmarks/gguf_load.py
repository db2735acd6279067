"""Reading the real Gemma 3 270M GGUF: `bond.models.gguf_file.read` vs `gguf.GGUFReader`.

Both parse the same file's header and build the same tensor views (tests/test_gguf_file.py);
calls alternate so a busy spell of the host slows both. Prints the median per side and the
ratio, then the whole load as bond does it (`convert.from_gguf` weights, `tokenizer.load`).

  python benchmarks/gguf_load.py
"""

from __future__ import annotations

import argparse
import statistics
import time


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--calls", type=int, default=3, help="timed reads per side")
  args = parser.parse_args()
  from gguf import GGUFReader

  from bond import assets, tokenizer
  from bond.models import convert, gguf_file

  path = assets.gemma3_270m_gguf_path()
  ours, theirs = [], []
  for _ in range(args.calls):
    ours.append(_timed(lambda: gguf_file.read(path)))
    theirs.append(_timed(lambda: GGUFReader(path)))
  a, b = statistics.median(ours), statistics.median(theirs)
  print(f"header + tensor views: gguf_file.read {a:.3f} s, gguf.GGUFReader {b:.3f} s "
        f"(median of {args.calls}); ratio {b / a:.1f}x")
  weights = _timed(lambda: convert.from_gguf(path))
  print(f"convert.from_gguf (weights, dequantized to f32): {weights:.2f} s")
  print(f"tokenizer.load: {_timed(lambda: tokenizer.load(path)):.2f} s")


if __name__ == "__main__":
  main()
