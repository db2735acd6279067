"""bond/hugepages.py: when the CLI re-executes itself with glibc's huge-page tunable, and that the
tunable really gives malloc'd memory transparent huge pages (read back from /proc/self/smaps)."""

import os
import subprocess
import sys

import pytest

from bond import hugepages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC, MODE = hugepages.glibc_version(), hugepages.thp_mode()
FULL = ("glibc.malloc.hugetlb=1:glibc.malloc.mmap_max=0:glibc.malloc.arena_max=1:"
        "glibc.malloc.trim_threshold=68719476736")
CAN = sys.platform.startswith("linux") and GLIBC is not None and GLIBC >= (2, 35) and MODE in (
    "madvise", "always")


def test_environment_adds_the_tunable_and_keeps_the_users_others():
  env = hugepages.environment({"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
                              (2, 36), "madvise")
  # The user's arena_max stays and ours is not added; the other keep-memory tunables are.
  assert env["GLIBC_TUNABLES"] == ("glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1:"
                                   "glibc.malloc.mmap_max=0:"
                                   "glibc.malloc.trim_threshold=68719476736")
  assert env["PATH"] == "/bin"
  assert hugepages.environment({}, (2, 35), "always")["GLIBC_TUNABLES"] == FULL
  assert hugepages.environment({}, (2, 35), "always", keep=False)["GLIBC_TUNABLES"] == (
      "glibc.malloc.hugetlb=1")


def test_freed_memory_is_kept_for_full_fine_tuning_only():
  from bond import defaults
  config = defaults.get_config()
  assert hugepages.keep_for(config)
  config.model.lora.rank = 8
  assert not hugepages.keep_for(config)


@pytest.mark.parametrize("environ, glibc, mode", [
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, (2, 36), "madvise"),   # the user's choice
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, (2, 36), "madvise"),   # already re-executed
    ({}, (2, 34), "madvise"),                                       # no such tunable before 2.35
    ({}, None, "madvise"),                                          # not glibc (musl, macOS)
    ({}, (2, 36), "never"),                                         # THP off in the kernel
    ({}, (2, 36), None),                                            # no THP at all
])
def test_environment_leaves_the_process_alone(environ, glibc, mode):
  assert hugepages.environment(environ, glibc, mode) is None


@pytest.mark.parametrize("setting, preset, checkpoint, on", [
    ("auto", "gemma3_270m", "", True), ("auto", "gemma3_35m", "", True),
    ("auto", "toy", "", False), ("auto", "tiny_gemma3", "", False),
    ("auto", "", "/models/gemma.gguf", True), ("on", "toy", "", True),
    ("off", "gemma3_270m", "gemma3_270m", False),
])
def test_enabled_by_setting_and_model(setting, preset, checkpoint, on):
  assert hugepages.enabled(setting, preset, checkpoint) is on


def test_a_bad_setting_is_one_clear_error():
  with pytest.raises(ValueError, match="must be one of auto, on, off, got 'maybe'"):
    hugepages.enabled("maybe", "toy")
  out = subprocess.run([sys.executable, "-m", "bond.main", "--mode=sample",
                        "--config.train.malloc_hugepages=maybe"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1] == (
      "FATAL train.malloc_hugepages must be one of auto, on, off, got 'maybe'")


def test_thp_mode_parses_the_kernel_file(tmp_path):
  path = tmp_path / "enabled"
  path.write_text("always [madvise] never\n")
  assert hugepages.thp_mode(str(path)) == "madvise"
  assert hugepages.thp_mode(str(tmp_path / "missing")) is None


# A child that re-executes itself as the CLI does (argv[1] 'on' or 'off'), then mallocs 64 MiB
# through libc and writes it, frees it, mallocs and writes 64 MiB again (as a training step's
# buffers come and go), and reports the tunables it runs under, how much of its anonymous memory
# is in huge pages, and the page faults of the second buffer.
_CHILD = r"""
import ctypes, os, resource, sys
sys.path.insert(0, %r)
from bond import hugepages
hugepages.maybe_reexec(sys.argv[1] == "on")
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
size = 64 << 20
p = libc.malloc(ctypes.c_size_t(size))
ctypes.memset(p, 1, size)
huge = [l for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages:")]
libc.free(ctypes.c_void_p(p))
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
q = libc.malloc(ctypes.c_size_t(size))
ctypes.memset(q, 2, size)
refaults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
print(os.environ.get("GLIBC_TUNABLES", "-"), int(huge[0].split()[1]) if huge else 0, refaults)
""" % ROOT


def _child(setting: str) -> tuple[str, int, int]:
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  out = subprocess.run([sys.executable, "-c", _CHILD, setting], env=env, capture_output=True,
                       text=True, timeout=60, check=True).stdout.split()
  return out[0], int(out[1]), int(out[2])


@pytest.mark.skipif(not CAN, reason=f"needs Linux, glibc >= 2.35 and THP (glibc {GLIBC}, "
                                    f"THP {MODE})")
def test_reexec_gives_malloced_memory_huge_pages_and_keeps_it():
  tunables, huge_kb, refaults = _child("on")
  assert tunables == FULL
  assert huge_kb >= 32 << 10            # at least half of the 64 MiB in 2 MiB pages
  assert refaults < 64                  # the freed 64 MiB was reused: no fresh pages
  # Control: glibc's defaults map the buffer apart and unmap it when freed, so the second one
  # faults in fresh pages (16,384 of 4 KiB, or 32 huge ones under THP 'always').
  tunables, huge_kb, refaults = _child("off")
  assert tunables == "-" and refaults >= 32
  if MODE == "madvise":                 # without the tunable glibc never asks for huge pages
    assert huge_kb < 8 << 10 and refaults >= 8192


@pytest.mark.skipif(not CAN, reason=f"needs Linux, glibc >= 2.35 and THP (glibc {GLIBC}, "
                                    f"THP {MODE})")
@pytest.mark.parametrize("setting, on", [("on", True), ("auto", False)])   # auto: off for the toy
def test_the_cli_runs_under_the_setting(tmp_path, setting, on):
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  out = subprocess.run([sys.executable, "-m", "bond.main", "--mode=sample", "--verbosity=0",
                        f"--config.train.malloc_hugepages={setting}", "--config.eval.num_samples=1",
                        f"--workdir={tmp_path}"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = [line for line in out.stderr.splitlines() if "glibc malloc huge pages" in line]
  assert len(lines) == 1 and ("huge pages: on" in lines[0]) is on, lines
