"""bond/aot.py: compiled programs stored and loaded instead of traced, and the keys that decide
when a stored program may be reused."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax import monitoring

from bond import aot
from bond import train

# Compiles much and runs little: XLA's quicker codegen (tests/conftest.py, `quick_compiles`).
pytestmark = pytest.mark.quick_compiles

DATA = "data.jsonl"


def _counting(fn, **jit_kwargs):
  """(make_jitted, calls): make_jitted() builds jax.jit(fn) and counts how often it is built."""
  calls = []

  def make():
    calls.append(1)
    return jax.jit(fn, **jit_kwargs)

  return make, calls


def _step(state, x):
  return state * 2.0 + jnp.sum(x), jnp.mean(x) * state


def test_stored_program_is_loaded_without_tracing_and_computes_the_same(tmp_path):
  cache = aot.ProgramCache(tmp_path)
  state, x = jnp.arange(6.0).reshape(2, 3), jnp.linspace(0.0, 1.0, 5)
  make, calls = _counting(_step, donate_argnums=0)
  first = aot.Program("step", make, cache, "k1")
  want = jax.device_get(first(jnp.array(state), x))
  assert calls == [1] and not first.loaded
  assert [p.name for p in tmp_path.iterdir()] == ["step-k1.pkl"]

  make2, calls2 = _counting(_step, donate_argnums=0)
  second = aot.Program("step", make2, cache, "k1")
  got = second(jnp.array(state), x)
  assert second.loaded and calls2 == []          # loaded: never traced
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), want)
  again = second(jnp.array(state) + 1.0, x)       # later calls reuse it
  np.testing.assert_allclose(again[0], (state + 1.0) * 2.0 + jnp.sum(x))
  assert calls2 == []
  # Another key is another program: traced again.
  make3, calls3 = _counting(_step, donate_argnums=0)
  aot.Program("step", make3, cache, "k2")(jnp.array(state), x)
  assert calls3 == [1]


def test_load_events_are_recorded(tmp_path):
  cache = aot.ProgramCache(tmp_path)
  aot.Program("f", _counting(jnp.sin)[0], cache, "k")(jnp.ones(3))
  seen = []
  listen = lambda name, seconds, **_: seen.append(name)  # noqa: E731
  monitoring.register_event_duration_secs_listener(listen)
  try:
    aot.Program("f", _counting(jnp.sin)[0], cache, "k")(jnp.ones(3))
  finally:
    monitoring.unregister_event_duration_listener(listen)
  assert seen.count(aot.LOAD_EVENT) == 1


def test_program_with_a_host_callback_is_not_stored(tmp_path):
  def with_callback(x):
    return jax.pure_callback(lambda v: np.asarray(v) + 1.0,
                             jax.ShapeDtypeStruct(x.shape, x.dtype), x)

  cache = aot.ProgramCache(tmp_path)
  program = aot.Program("cb", _counting(with_callback)[0], cache, "k")
  np.testing.assert_array_equal(program(jnp.zeros(3)), np.ones(3))
  assert "host callbacks" in aot.storable(program.compile(lambda: (jnp.zeros(3),)))
  assert not list(tmp_path.glob("*.pkl"))
  assert aot.storable(jax.jit(jnp.sin).lower(jnp.ones(3)).compile()) is None


def test_unreadable_entry_is_traced_again(tmp_path):
  cache = aot.ProgramCache(tmp_path)
  (tmp_path / "f-k.pkl").write_bytes(b"not a program")
  make, calls = _counting(jnp.cos)
  program = aot.Program("f", make, cache, "k")
  np.testing.assert_allclose(program(jnp.zeros(2)), np.ones(2))
  assert calls == [1] and not program.loaded
  # ... and the rewritten entry loads next time.
  other = aot.Program("f", _counting(jnp.cos)[0], cache, "k")
  np.testing.assert_allclose(other(jnp.zeros(2)), np.ones(2))
  assert other.loaded


def test_loaded_program_given_other_shapes_is_traced_again(tmp_path):
  cache = aot.ProgramCache(tmp_path)
  aot.Program("step", _counting(_step)[0], cache, "k")(jnp.ones((2, 3)), jnp.ones(5))
  make, calls = _counting(_step)
  program = aot.Program("step", make, cache, "k")    # same key, other shapes: a stale entry
  out = program(jnp.ones((4, 4)), jnp.ones(7))
  np.testing.assert_allclose(out[0], np.full((4, 4), 9.0))
  assert calls == [1]                                  # traced by jax.jit for these shapes
  out = program(jnp.ones((2, 3)), jnp.ones(5))         # the stored shapes: still loaded
  np.testing.assert_allclose(out[0], np.full((2, 3), 7.0))
  with pytest.raises(TypeError):                       # a genuine error is jax.jit's error
    program(jnp.ones((2, 3)))


def test_cache_keeps_the_most_recently_used_entries(tmp_path, monkeypatch):
  monkeypatch.setattr(aot, "MAX_ENTRIES", 2)
  cache = aot.ProgramCache(tmp_path)
  for key in ("a", "b", "c"):
    aot.Program("f", _counting(jnp.sin)[0], cache, key)(jnp.ones(3))
  assert len(list(tmp_path.glob("*.pkl"))) == 2


def _config(tmp_path):
  (tmp_path / DATA).write_text('{"prompt": "x"}\n')
  return ml_collections.ConfigDict({
      "model": {"dtype": "bfloat16"},
      "data": {"path": str(tmp_path / DATA)},
      "train": {"compilation_cache": str(tmp_path / "cache"), "program_cache": True}})


def test_fingerprint_changes_with_what_programs_depend_on(tmp_path, monkeypatch):
  config = _config(tmp_path)
  args = ({"w": jnp.ones((2, 3))}, jax.ShapeDtypeStruct((4,), jnp.int32))
  base = aot.fingerprint(config, *args)
  assert aot.fingerprint(config, *args) == base                     # deterministic

  changed = []
  other = ml_collections.ConfigDict(config.to_dict())
  other.model.dtype = "float32"
  changed.append(aot.fingerprint(other, *args))                     # a config value
  changed.append(aot.fingerprint(config, {"w": jnp.ones((2, 4))}, args[1]))       # a shape
  changed.append(aot.fingerprint(config, {"w": jnp.ones((2, 3), jnp.bfloat16)}, args[1]))
  changed.append(aot.fingerprint(config, {"v": jnp.ones((2, 3))}, args[1]))       # the tree
  changed.append(aot.fingerprint(config, args[0], jax.ShapeDtypeStruct(
      (4,), jnp.int32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))))
  with monkeypatch.context() as m:
    m.setenv("BOND_CPU_KERNELS", "0")                             # the kernels switched off
    changed.append(aot.fingerprint(config, *args))
  other_file = tmp_path / "weights.bin"
  other_file.write_bytes(b"w")
  changed.append(aot.fingerprint(config, *args, files=[other_file]))  # a file named indirectly
  (tmp_path / DATA).write_text('{"prompt": "a longer prompt"}\n')  # a file the config names
  changed.append(aot.fingerprint(config, *args))
  assert len(set(changed + [base])) == len(changed) + 1

  # Where programs are kept, and how JAX logs, do not change what they compute.
  key = aot.fingerprint(config, *args)
  moved = ml_collections.ConfigDict(config.to_dict())
  moved.train.compilation_cache = str(tmp_path / "elsewhere")
  moved.train.seed = 7                  # the seed reaches programs as an argument only
  assert aot.fingerprint(moved, *args) == key
  with jax.log_compiles(True):
    assert aot.fingerprint(config, *args) == key


def test_fingerprint_covers_the_package_source(monkeypatch):
  base = aot.fingerprint({"a": 1})
  monkeypatch.setattr(aot, "_source_digest", lambda: "edited")
  assert aot.fingerprint({"a": 1}) != base


# ---------------------------------------------------------------------------------------------
# The training loop: a rerun loads its programs.


def _host_reward(reward_fn):
  def reward(*args):
    return reward_fn(*args)
  reward.host = lambda *args: np.asarray(reward_fn(*args))
  return reward


@pytest.mark.parametrize("staged", [False, True], ids=["one_jit_rollout", "host_reward"])
def test_rerun_of_a_config_loads_its_programs_and_logs_the_same(tmp_path, monkeypatch, staged):
  """A second run of the same config in a fresh ProgramCache instance traces none of the loop's
  programs (rollout or sample + finish, and update) and logs the same metrics; with
  train.program_cache=False nothing is loaded; a run under another seed loads the same programs
  and logs what that seed's freshly compiled programs log."""
  from configs import toy_jbond
  config = toy_jbond.get_config()
  config.train.update(num_steps=3, log_every=1, checkpoint_every=3)
  config.eval.sampled = False
  monkeypatch.setattr(train, "_program_dir", lambda c: c.train.program_cache and str(
      tmp_path / "programs"))
  if staged:
    real_build = train.build
    monkeypatch.setattr(train, "build", lambda *a, **k: (lambda e: dataclasses.replace(
        e, reward_fn=_host_reward(e.reward_fn)))(real_build(*a, **k)))
  names = ["sample", "finish", "update"] if staged else ["rollout", "update"]

  def run(workdir):
    events = []
    listen = lambda name, seconds, **kw: events.append((name, kw.get("fun_name")))  # noqa: E731
    monitoring.register_event_duration_secs_listener(listen)
    try:
      train.train_and_evaluate(config, str(tmp_path / workdir))
    finally:
      monitoring.unregister_event_duration_listener(listen)
    lines = (tmp_path / workdir / "metrics.jsonl").read_text().splitlines()
    return events, [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")}
                    for line in lines]

  first_events, first = run("first")
  stored = sorted(p.name.split("-")[0] for p in (tmp_path / "programs").glob("*.pkl"))
  assert stored == sorted(names)
  assert first_events.count((aot.LOAD_EVENT, None)) == 0
  second_events, second = run("second")
  assert second_events.count((aot.LOAD_EVENT, None)) == len(names)
  traced = [fun for name, fun in second_events if name == "/jax/core/compile/jaxpr_trace_duration"]
  assert not {"step", "sample", "rollout_fn", "logged_rollout"} & set(traced), traced
  assert second == first and len(first) == 3

  # Another seed, compiled afresh without the store; then with it: it loads the first seed's
  # programs (the seed is the state's PRNG key, an argument) and logs what the fresh ones do.
  config.train.update(seed=1, program_cache=False)
  third_events, third = run("third")
  assert third_events.count((aot.LOAD_EVENT, None)) == 0 and len(third) == 3
  assert third != first
  config.train.program_cache = True
  fourth_events, fourth = run("fourth")
  assert fourth_events.count((aot.LOAD_EVENT, None)) == len(names)
  assert fourth == third


def test_programs_are_kept_in_jax_cache_directory_when_the_config_asks():
  from configs import toy_jbond
  config = toy_jbond.get_config()
  before = jax.config.jax_compilation_cache_dir
  try:
    jax.config.update("jax_compilation_cache_dir", "~/some/cache")   # nothing compiles here
    assert train._program_dir(config).endswith("/some/cache/bond_programs")
    assert not train._program_dir(config).startswith("~")
    config.train.program_cache = False
    assert train._program_dir(config) is None
    config.train.program_cache = True
    jax.config.update("jax_compilation_cache_dir", None)
    assert train._program_dir(config) is None        # JAX's cache is off: so are programs
  finally:
    jax.config.update("jax_compilation_cache_dir", before)


JAX_CACHE_SCRIPT = """
import pathlib, sys, jax, jax.numpy as jnp, numpy as np
from bond import aot
root = pathlib.Path(sys.argv[1])
jax.config.update("jax_compilation_cache_dir", str(root / "jax"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
f = lambda x: -(x ** 3) + jnp.sum(x) * 2
x = jnp.linspace(0.0, 1.0, 1000)
want = np.asarray(jax.jit(f)(x))             # compiled, and stored by JAX
jax.clear_caches()
cache = aot.ProgramCache(root / "programs")
loaded = []
for _ in range(3):
  program = aot.Program("f", lambda: jax.jit(f), cache, "k")
  np.testing.assert_array_equal(program(x), want)
  loaded.append(program.loaded)
print(loaded, sorted(p.name for p in (root / "programs").glob("*.pkl")))
"""


def test_program_in_jax_cache_is_compiled_afresh_and_stored(tmp_path):
  """XLA:CPU serializes an executable it loaded without its functions (stored and reloaded, it
  fails with "Function ... not found"): a program that JAX's persistent cache holds is compiled
  afresh for the ProgramCache, stored, then loads and runs. In a fresh process, as the CLI runs
  with JAX's cache on."""
  import os
  import subprocess
  import sys
  out = subprocess.run([sys.executable, "-c", JAX_CACHE_SCRIPT, str(tmp_path)],
                       capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip() == "[False, True, True] ['f-k.pkl']", out.stdout + out.stderr[-3000:]


QUICK_PROGRAM_SCRIPT = """
import pathlib, sys, time, jax, jax.numpy as jnp
from bond import aot
root = pathlib.Path(sys.argv[1])
if sys.argv[2] == "bond":
  aot.enable_compilation_cache(str(root))
else:   # the control: JAX's own threshold
  jax.config.update("jax_compilation_cache_dir", str(root))
start = time.perf_counter()
jax.jit(lambda x: x * 3 + 1).lower(jnp.ones(7)).compile()
print(time.perf_counter() - start, len(list(root.glob("*-cache"))))
"""


@pytest.mark.parametrize("setting", ["bond", "jax_default"])
def test_compilation_cache_keeps_programs_that_compile_quickly(tmp_path, setting):
  """`aot.enable_compilation_cache` (the CLI's `train.compilation_cache`) stores a program that
  compiled in milliseconds; with JAX's default threshold (1 s) nothing is stored."""
  import subprocess
  import sys
  out = subprocess.run([sys.executable, "-c", QUICK_PROGRAM_SCRIPT, str(tmp_path), setting],
                       capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-3000:]
  seconds, stored = out.stdout.split()
  assert float(seconds) < 1.0
  assert (int(stored) > 0) == (setting == "bond"), out.stdout    # entries stored


def test_compilation_cache_on_a_remote_directory_keeps_jax_threshold(monkeypatch):
  """A gs:// cache keeps JAX's 1 s threshold; '' sets nothing (no JAX setting is changed here)."""
  calls = []
  monkeypatch.setattr(jax.config, "update", lambda name, value: calls.append((name, value)))
  aot.enable_compilation_cache("gs://bucket/cache")
  aot.enable_compilation_cache("")
  aot.enable_compilation_cache("~/c")
  assert calls == [("jax_compilation_cache_dir", "gs://bucket/cache"),
                   ("jax_persistent_cache_min_compile_time_secs", 1.0),
                   ("jax_compilation_cache_dir", os.path.expanduser("~/c")),
                   ("jax_persistent_cache_min_compile_time_secs", 0.0)]


def test_executable_without_code_is_not_stored(tmp_path, monkeypatch):
  """The guard behind it: an XLA:CPU executable without object code is not stored."""
  cache = aot.ProgramCache(tmp_path)
  compiled = jax.jit(lambda x: x ** 3 - x).lower(jnp.ones(100)).compile()
  assert cache.save("f", "k", compiled)
  monkeypatch.setattr(aot.serialize_executable, "serialize", lambda c: (b"no code", None, None))
  assert not cache.save("g", "k", compiled)
  assert [p.name for p in tmp_path.glob("*.pkl")] == ["f-k.pkl"]
