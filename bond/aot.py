"""Compiled programs kept across runs: a rerun of a config loads its training programs instead of
tracing, lowering and compiling them.

JAX's persistent compilation cache skips only the XLA compilation: a rerun still traces the model
in Python and lowers it to find the cache entry (seconds for an unrolled 18-layer model, holding
the GIL). `ProgramCache` stores each compiled program itself (`jax.experimental.
serialize_executable`, as MaxText's `compiled_trainstep_file` does) under a key of everything the
program is a function of, and loads it (C++, without the GIL) on a rerun:

* the program's name and a fingerprint of the run (`fingerprint`): the config, the source of the
  `bond` package, the installed versions of jax, jaxlib, flax, optax and numpy, Python's, JAX's
  settings, the BOND_* and XLA_* environment variables (BOND_CPU_KERNELS, XLA_FLAGS), the
  devices and the host CPU's features, the size and mtime of every file the config names, and
  optionally the tree structure, shapes, dtypes and shardings of given arguments. A program's
  constants come from these (JAX embeds closed-over values in the executable), so any change
  to them gives a new key and the program is traced again. `train.seed` is left out: it reaches
  the programs only as the state's PRNG key, an argument, so a seed sweep compiles once (a test
  checks that another seed's loaded programs log what its fresh ones do). Code outside the
  `bond` package is not in the key: a run whose programs close over such code (a reward
  function patched in from a notebook, say) should set `train.program_cache=False`.
* A program with host callbacks, effects or kept-alive objects is never stored (as JAX's own
  cache does), and nothing is stored with several processes.
* A program is stored only from a fresh compilation (`_fresh`, `_lost_code`): XLA:CPU
  serializes an executable that it had deserialized without its compiled code.
* A stored program that fails to load or rejects its arguments is traced and compiled as usual
  (by `jax.jit`), with one log line saying why.

Entries are written atomically (a temporary file renamed into place), so concurrent runs never
read a partial one; the directory keeps the `MAX_ENTRIES` most recently used.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import importlib.metadata
import itertools
import json
import os
import pathlib
import pickle
import re
import sys
import tempfile
import threading
import time
import zlib
from typing import Any, Callable

import jax
from absl import logging
from jax import monitoring
from jax.experimental import serialize_executable

MAX_ENTRIES = 32
LOAD_EVENT = "/bond/program_cache/load_sec"   # a jax.monitoring duration per program loaded
_PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "ml_collections")
_SOURCE_SUFFIXES = (".py", ".cc", ".h")
# JAX settings that change how programs are logged, cached or debugged, not what they compute.
_UNKEYED_JAX = re.compile("log|cache|debug|traceback|profil|explain|dump")


def _source_digest() -> str:
  """sha256 over the bond package's source files (names and contents)."""
  root = pathlib.Path(__file__).resolve().parent
  h = hashlib.sha256()
  for path in sorted(p for p in root.rglob("*") if p.suffix in _SOURCE_SUFFIXES):
    h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
  return h.hexdigest()


def _cpu_features() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next((line for line in f if line.startswith("flags")), "")
  except OSError:
    return ""


# Config keys that name where programs are kept, not what they compute.
_UNKEYED = ("compilation_cache", "program_cache")
# Config values that reach the loop's programs only as arguments: `train.seed` becomes the
# state's PRNG key (steps.init_state), never a constant of a program. Runs that differ in them
# alone (a seed sweep) share their stored programs.
_ARGUMENTS_ONLY = (("train", "seed"),)


def _keyed(config) -> dict:
  """The config as a dict without `_UNKEYED` keys (at any depth) and `_ARGUMENTS_ONLY` values."""
  tree = config.to_dict() if hasattr(config, "to_dict") else dict(config)

  def strip(node):
    if isinstance(node, dict):
      return {k: strip(v) for k, v in node.items() if k not in _UNKEYED}
    return node

  tree = strip(tree)
  for section, key in _ARGUMENTS_ONLY:
    if isinstance(tree.get(section), dict):
      tree[section].pop(key, None)
  return tree


def _named_files(config: dict | list) -> list:
  """(path, size, mtime) of every existing file a config string names (for a directory, of the
  files under it)."""
  out = []

  def visit(node):
    if isinstance(node, dict):
      for _, v in sorted(node.items()):
        visit(v)
    elif isinstance(node, list):
      for v in node:
        visit(v)
    elif isinstance(node, str) and node and os.path.exists(os.path.expanduser(node)):
      root = pathlib.Path(os.path.expanduser(node))
      # A directory (an HF checkpoint, say): its first 1000 entries, however large it is.
      files = [root] if root.is_file() else sorted(itertools.islice(root.rglob("*"), 1000))
      for p in (f for f in files if f.is_file()):
        st = p.stat()
        out.append((str(p.resolve()), st.st_size, st.st_mtime_ns))

  visit(config)
  return out


def abstract(tree) -> str:
  """The tree structure, shapes, dtypes, weak types and shardings of `tree`'s arrays, as text."""
  leaves, treedef = jax.tree.flatten(tree)
  shown = [(tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False)),
            str(getattr(x, "sharding", None))) if hasattr(x, "shape") else repr(x)
           for x in leaves]
  return f"{treedef}|{shown}"


def fingerprint(config, *trees, files=()) -> str:
  """A key of everything a run's compiled programs depend on besides their names (above); `files`
  adds the identity of files the config names indirectly (e.g. a checkpoint given as an asset
  name)."""
  keyed = _keyed(config)
  parts = {
      "config": json.dumps(keyed, sort_keys=True, default=repr),
      "trees": [abstract(t) for t in trees],
      "source": _source_digest(),
      "versions": {p: _version(p) for p in _PACKAGES},
      "jax_config": sorted((k, repr(v)) for k, v in jax.config.values.items()
                           if not _UNKEYED_JAX.search(k)),
      "environment": sorted((k, v) for k, v in os.environ.items()   # BOND_CPU_KERNELS, XLA_FLAGS
                            if k.startswith(("BOND_", "XLA_")) and k != "BOND_KERNEL_CACHE"),
      "python": sys.version,
      "devices": [(d.platform, d.device_kind, d.id, d.process_index) for d in jax.devices()],
      "cpu": _cpu_features(),
      "files": _named_files(keyed) + _named_files([os.fspath(f) for f in files]),
  }
  return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:32]


def _version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return ""


def storable(compiled) -> str | None:
  """Why `compiled` cannot be stored and reloaded faithfully, or None."""
  # pylint: disable=protected-access
  try:
    unloaded = getattr(compiled._executable, "_unloaded_executable", None)
    if unloaded is None:
      return "its executable does not support serialization"
    if unloaded.host_callbacks:
      return "it has host callbacks"
    if unloaded.ordered_effects or unloaded.unordered_effects:
      return "it has side effects"
    if unloaded.keepalive:
      return "it keeps Python objects alive"
    if compiled._params.const_args:
      return "it has constant arguments"
  except AttributeError as e:
    return f"this JAX version's compiled programs differ from those bond.aot knows ({e})"
  return None


def enable_compilation_cache(path: str) -> None:
  """JAX's persistent compilation cache in `path` (`train.compilation_cache`; '' leaves it off),
  holding every program, however quickly it compiled, as JAX's own quick start sets it.

  JAX's default keeps only programs that took >= 1 s to compile; a run also compiles a few
  hundred small ones (eager ops: the random init, the toy task's exact metrics, ...), which a
  rerun then loads instead (the toy job's rerun 2.06x faster: `python benchmarks/first_step.py
  --threshold-baseline`, benchmarks/RESULTS.md session 29). A remote directory (gs://...) keeps
  the 1 s threshold: there each entry read is a round trip (not measured).
  """
  if path:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      1.0 if "://" in path else 0.0)


def _devices(compiled) -> list:
  return list(compiled._executable._unloaded_executable.device_list)   # pylint: disable=protected-access


def _lost_code(compiled, serialized: bytes) -> bool:
  """True if `serialized` is an XLA:CPU executable without object code.

  XLA:CPU serializes an executable it deserialized (e.g. one JAX's persistent cache supplied, now
  or earlier in the process) without its compiled functions: reloaded, it fails with "Function
  ... not found". A fresh compilation carries its functions as ELF objects. (A program that
  compiled no function at all, only library calls, is then not stored either: it loses nothing.)
  """
  platforms = {d.platform for d in _devices(compiled)}
  return platforms == {"cpu"} and b"\x7fELF" not in serialized


def _fresh(key: str) -> dict:
  """Compiler options under which JAX's persistent cache holds no executable of a program that
  the ProgramCache lacks under `key`, so that the program compiles afresh and can be stored
  (`_lost_code`): on CPU, a GPU-only option set to a value naming `key`, which changes JAX's
  cache key and nothing XLA:CPU compiles. On other platforms, none."""
  if jax.default_backend() != "cpu":
    return {}
  return {"xla_gpu_per_fusion_autotune_cache_dir": f"bond-program-{key}"}


def _register(targets) -> None:
  """Registers the FFI targets a stored program calls that register on first use (bond's CPU
  kernels, registered when a traced model selects them)."""
  if any(t.startswith("bond_") for t in targets):
    from bond.models import cpu_kernels   # pylint: disable=import-outside-toplevel
    cpu_kernels.build()


class ProgramCache:
  """Compiled programs in `directory`, one file per (name, key)."""

  def __init__(self, directory: str | os.PathLike):
    self.directory = pathlib.Path(os.path.expanduser(os.fspath(directory)))
    self._prefetched: dict[tuple[str, str], concurrent.futures.Future] = {}

  def _path(self, name: str, key: str) -> pathlib.Path:
    return self.directory / f"{name}-{key}.pkl"

  def prefetch(self, key: str, names) -> None:
    """Starts loading the stored programs `names` (those present) of `key` on a thread, in
    order: a run calls it first thing, so that loading overlaps the model's loading."""
    present = [n for n in names if self._path(n, key).exists()]
    if not present:
      return
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bond-program-load")
    for name in present:
      self._prefetched[(name, key)] = pool.submit(self._load, name, key)
    pool.shutdown(wait=False)

  def load(self, name: str, key: str):
    """The stored program as a `jax.stages.Compiled`, or None (absent or unloadable)."""
    future = self._prefetched.pop((name, key), None)
    return future.result() if future is not None else self._load(name, key)

  def _load(self, name: str, key: str):
    path = self._path(name, key)
    try:
      blob = path.read_bytes()
    except OSError:
      return None
    try:
      start = time.perf_counter()
      serialized, in_tree, out_tree, targets, ids = pickle.loads(zlib.decompress(blob))
      _register(targets)
      by_id = {d.id: d for d in jax.devices()}
      compiled = serialize_executable.deserialize_and_load(
          serialized, in_tree, out_tree, execution_devices=[by_id[i] for i in ids])
      monitoring.record_event_duration_secs(LOAD_EVENT, time.perf_counter() - start)
    except Exception as e:   # pylint: disable=broad-except
      logging.warning("stored program %s could not be loaded (tracing it again): %s", path, e)
      return None
    try:
      os.utime(path)   # most recently used
    except OSError:
      pass
    logging.info("program %s loaded from %s", name, path)
    return compiled

  def save(self, name: str, key: str, compiled) -> bool:
    """Stores `compiled` (if `storable`); True if written."""
    reason = storable(compiled)
    if reason is not None:
      logging.info("program %s is not stored: %s", name, reason)
      return False
    try:
      serialized, in_tree, out_tree = serialize_executable.serialize(compiled)
      if _lost_code(compiled, serialized):
        logging.info("program %s is not stored: its executable was loaded from JAX's persistent "
                     "cache, and XLA:CPU serializes a loaded executable without its code", name)
        return False
      targets = sorted(set(re.findall(r'custom_call_target="([^"]+)"', compiled.as_text())))
      blob = zlib.compress(pickle.dumps(
          (serialized, in_tree, out_tree, targets, [d.id for d in _devices(compiled)])), 1)
      self.directory.mkdir(parents=True, exist_ok=True)
      fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{name}-", suffix=".tmp")
      with os.fdopen(fd, "wb") as f:
        f.write(blob)
      os.chmod(tmp, 0o644)
      os.replace(tmp, self._path(name, key))
    except Exception as e:   # pylint: disable=broad-except
      logging.warning("program %s could not be stored: %s", name, e)
      return False
    self._evict()
    return True

  def _evict(self) -> None:
    entries = sorted(self.directory.glob("*.pkl"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[MAX_ENTRIES:]:
      old.unlink(missing_ok=True)


class Program:
  """A jitted function compiled once per run, loaded from a `ProgramCache` when it holds it.

  `make_jitted()` builds the `jax.jit` function (only when the program must be traced: building
  it may need abstract evaluations of its own); `args()` gives the arguments (or their
  `jax.ShapeDtypeStruct`s with shardings) it is compiled for. `compile()` is thread-safe and
  runs once; calls then go straight to the executable. With `cache=None` it is the plain jit.
  """

  def __init__(self, name: str, make_jitted: Callable[[], Any], cache: ProgramCache | None,
               key: str):
    self.name, self._make_jitted, self._cache, self._key = name, make_jitted, cache, key
    self._lock = threading.Lock()
    self._jitted = self._compiled = None
    self.loaded = False   # True when the executable came from the cache

  def jitted(self):
    if self._jitted is None:
      self._jitted = self._make_jitted()
    return self._jitted

  def compile(self, args: Callable[[], tuple]):
    with self._lock:
      if self._compiled is None:
        if self._cache is not None:
          self._compiled = self._cache.load(self.name, self._key)
          self.loaded = self._compiled is not None
        if self._compiled is None:
          lowered = self.jitted().lower(*args())
          if self._cache is None:
            self._compiled = lowered.compile()
          else:
            self._compiled = lowered.compile(compiler_options=_fresh(self._key))
            self._cache.save(self.name, self._key, self._compiled)
      return self._compiled

  def __call__(self, *args):
    compiled = self.compile(lambda: args)
    try:
      return compiled(*args)
    except (TypeError, ValueError) as e:   # arguments unlike those it was compiled for
      if self.loaded:
        logging.warning("stored program %s rejected its arguments (tracing it again): %s",
                        self.name, e)
      return self.jitted()(*args)          # jax.jit's own handling: retrace, or the error
