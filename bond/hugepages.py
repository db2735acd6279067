"""Transparent huge pages for the process's large buffers, and freed memory kept for reuse.

XLA:CPU gives every large buffer of a program run fresh memory (glibc maps it and unmaps it when
freed), so each step first-touches its temporaries and outputs one 4 KiB page at a time: on the
Gemma 3 270M J-BOND step about 600,000 page faults per fwd+bwd, about a third of its time on this
project's machines (1.83-1.95 s per fwd+bwd against 1.25-1.41 s with huge pages;
benchmarks/RESULTS.md, session 12). With the glibc tunable `glibc.malloc.hugetlb=1`, glibc asks
the kernel for transparent huge pages (`madvise(MADV_HUGEPAGE)`) on the memory it maps, and a
2 MiB page faults once.

Huge pages alone still return every freed buffer to the kernel and fault in fresh ones on the
next step. On this project's VMs (whose hypervisor takes back memory the guest frees) that made
the steps bimodal: some steps spent 1-2 s of system time faulting (35M J-BOND step 2.1-2.4 s
against 1.2-1.3 s in the same process; 270M full fine-tuning medians 5.4-5.6 s, best 3.4 s;
benchmarks/RESULTS.md, session 13). So `on` also keeps freed memory in the process for the
next step (full fine-tuning only, below): `glibc.malloc.mmap_max=0` (no
per-buffer mappings), `arena_max=1` (glibc's per-thread arenas map buffers over 64 MiB
regardless) and a 64 GiB `trim_threshold` (freed heap is not returned). Steps then fault almost
never (0.01-0.08 s of system time per step) and the process's RSS stays at its peak. The CLI
keeps memory for full fine-tuning only (`keep_for`): with LoRA, whose point is a small
footprint, it raised the 270M config's peak RSS from 3.9 to 5.4 GB.

glibc reads its tunables when the process starts, so the CLI sets them and re-executes itself
(`maybe_reexec`, which `python -m bond.main` calls once it has read the config, before JAX
allocates anything). It applies only on Linux with glibc >= 2.35 and transparent huge pages in
`madvise` or `always` mode, and elsewhere does nothing. On a TPU host only host-side buffers are
affected (the accelerator's memory does not come from malloc); not measured there.

The config key `train.malloc_hugepages` controls it: 'auto' (default: on, except for the toy and
`tiny_*` models, whose few-MB buffers gain nothing and whose short runs pay the start-up cost
below), 'on' or 'off'. A `GLIBC_TUNABLES` that already names `glibc.malloc.hugetlb` is left as it
is (the user's choice wins).

The cost: on this project's VMs the first touch of a fresh 2 MiB page is slow (the hypervisor
backs it on demand), so start-up gets slower while steps get faster: Gemma 3 270M J-BOND, LoRA
step 3.03 -> 2.47 s, full fine-tuning 3.74 -> 2.60 s, compile + first step 30.9 -> 34.7 s and
31.2 -> 41.7 s; the toy job's whole run 18-20 -> 20-22 s (benchmarks/RESULTS.md, session 12).
"""

from __future__ import annotations

import os
import sys
from typing import Mapping, Sequence

SETTINGS = ("auto", "on", "off")
TUNABLE = "glibc.malloc.hugetlb"
# With huge pages: freed memory stays in the process (one arena, no per-buffer mmap, no trim).
KEEP = ("glibc.malloc.mmap_max=0", "glibc.malloc.arena_max=1",
        "glibc.malloc.trim_threshold=68719476736")
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def glibc_version() -> tuple[int, int] | None:
  """(major, minor) of the running glibc, None when the C library is not glibc."""
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
  except (AttributeError, ValueError, OSError):
    return None
  if name != "glibc":
    return None
  try:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)
  except ValueError:
    return None


def thp_mode(path: str = _THP_MODE) -> str | None:
  """The kernel's transparent-huge-page mode ('always', 'madvise', 'never'), None if unknown."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def enabled(setting: str, preset: str = "", checkpoint: str = "") -> bool:
  """Whether `train.malloc_hugepages` = setting asks for huge pages for this model."""
  if setting not in SETTINGS:
    raise ValueError(f"train.malloc_hugepages must be one of {', '.join(SETTINGS)}, got "
                     f"{setting!r}")
  if setting == "auto":
    return bool(checkpoint) or not (preset == "toy" or preset.startswith("tiny_"))
  return setting == "on"


def enabled_for(config) -> bool:
  """`enabled` for an experiment config (its train.malloc_hugepages, model preset, checkpoint)."""
  return enabled(config.train.malloc_hugepages, config.model.preset, config.model.checkpoint)


def keep_for(config) -> bool:
  """Whether the CLI also keeps freed memory (`KEEP`) for an experiment config: for full
  fine-tuning, not with LoRA, whose point is a small footprint (kept memory raised the 270M LoRA
  config's peak RSS from 3.9 to 5.4 GB; benchmarks/RESULTS.md, session 13)."""
  return not config.model.lora.get("rank", 0)


def reexec_for(config) -> None:
  """`maybe_reexec` as the CLI and experiments/real.py run it for an experiment config."""
  maybe_reexec(enabled_for(config), keep=keep_for(config))


def environment(environ: Mapping[str, str], glibc: tuple[int, int] | None,
                mode: str | None, keep: bool = True) -> dict[str, str] | None:
  """The environment to re-execute with for huge pages (and `KEEP`), or None to run as is: when
  the tunable is already set (by a previous re-execution, or by the user), or when glibc (< 2.35
  has no such tunable) or the kernel (no THP, or 'never') cannot use it. The user's own
  tunables are kept, and a `KEEP` tunable they already set is not added."""
  tunables = environ.get("GLIBC_TUNABLES", "")
  if TUNABLE + "=" in tunables:
    return None
  if glibc is None or glibc < (2, 35) or mode not in ("madvise", "always"):
    return None
  env = dict(environ)
  ours = [t for t in KEEP if keep and t.split("=")[0] + "=" not in tunables]   # the user's win
  env["GLIBC_TUNABLES"] = ":".join(t for t in (tunables, TUNABLE + "=1", *ours) if t)
  return env


def maybe_reexec(enable: bool = True, argv: Sequence[str] | None = None,
                 keep: bool = True) -> None:
  """Re-executes this process with `glibc.malloc.hugetlb=1` (and, with `keep`, the `KEEP`
  tunables) if `enable` and `environment` says so; otherwise returns. Call it before the process
  allocates much (glibc reads its tunables only at start-up). `argv` defaults to the interpreter's
  original command line (`sys.orig_argv`), so `python -m bond.main ...` and `python script.py ...`
  rerun as invoked.
  """
  if not enable or not sys.platform.startswith("linux"):
    return
  env = environment(os.environ, glibc_version(), thp_mode(), keep)
  if env is None:
    return
  argv = list(argv if argv is not None else getattr(sys, "orig_argv", sys.argv))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, argv, env)


def status() -> str:
  """One line for logs: whether this process's glibc maps with huge pages, and why not."""
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if TUNABLE + "=1" in tunables:
    kept = all(t.split("=")[0] + "=" in tunables for t in KEEP)
    return (f"glibc malloc huge pages: on (THP {thp_mode()})"
            + ("; freed memory kept for reuse" if kept else ""))
  return (f"glibc malloc huge pages: off (GLIBC_TUNABLES {tunables!r}, glibc "
          f"{glibc_version()}, THP {thp_mode()})")
