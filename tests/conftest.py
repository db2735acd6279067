"""Shared fixtures: tiny random HF PyTorch Gemma 1/2/3 models (the reference) and padded batches."""

import collections
import os

import numpy as np
import pytest

VOCAB = 128
# GQA (4 heads, 2 kv heads), head_dim 24 != hidden/heads = 16, 6 layers so Gemma 3 has a global one.
TINY_HF = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
               num_attention_heads=4, num_key_value_heads=2, head_dim=24,
               initializer_range=0.1)
TINY_HF_BY_VERSION = {
    1: dict(),
    # Window 4 < sequence length; caps small enough to bite on these logits.
    2: dict(sliding_window=4, query_pre_attn_scalar=20, attn_logit_softcapping=3.0,
            final_logit_softcapping=4.0),
    3: dict(sliding_window=4, query_pre_attn_scalar=20, rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
}


@pytest.fixture(scope="session")
def torch():
  import torch
  torch.set_num_threads(2)
  return torch


def hf_config(version: int, **overrides):
  import transformers
  cls = {1: transformers.GemmaConfig, 2: transformers.Gemma2Config,
         3: transformers.Gemma3TextConfig}[version]
  return cls(**{**TINY_HF, **TINY_HF_BY_VERSION[version], **overrides},
             attn_implementation="eager")


def build_hf_model(version: int, seed: int = 0, **overrides):
  """Random tiny HF causal LM with random non-zero norm weights (exercises the `1 + w`)."""
  import torch
  import transformers
  torch.manual_seed(seed)
  cls = {1: transformers.GemmaForCausalLM, 2: transformers.Gemma2ForCausalLM,
         3: transformers.Gemma3ForCausalLM}[version]
  model = cls(hf_config(version, **overrides)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.normal_(0.0, 0.5)
  return model


@pytest.fixture(scope="module", params=[1, 2, 3], ids=["gemma1", "gemma2", "gemma3"])
def hf_model_dir(request, tmp_path_factory, torch):
  """(version, HF model, directory it was saved to)."""
  model = build_hf_model(request.param)
  path = tmp_path_factory.mktemp(f"gemma{request.param}")
  model.save_pretrained(path)
  return request.param, model, str(path)


def padded_batch(lengths=(12, 7, 10), width=12, seed=0):
  """LEFT-padded random tokens [B, P] (ids >= 3, pad 0) and mask [B, P]."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, VOCAB, (len(lengths), width)).astype(np.int32)
  mask = np.arange(width)[None, :] >= width - np.asarray(lengths)[:, None]
  return np.where(mask, tokens, 0).astype(np.int32), mask


def hf_logits(model, tokens, mask):
  """Reference logits [B, T, V] with explicit positions cumsum(mask) - 1 clipped at 0."""
  import torch
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long),
                position_ids=torch.tensor(positions, dtype=torch.long))
  return out.logits.float().numpy()


# Modules that run whole on one worker under `-n N`: their tests share a costly module-scoped
# fixture (a trained run, a loaded 270M model), built once rather than once per worker, or compile
# the same programs (toy J-BOND's step in several tests), which the compile sharing below then
# compiles once: 91 of the 653 s that eight in-process files spent compiling went to programs
# the other worker also compiled, 68 s of it within test_steps, test_lora, test_logprobs and
# test_heldout alone (benchmarks/RESULTS.md, session 26). (xdist's own `--dist loadgroup` marks
# stopped grouping under pytest 9: it renames node ids through an attribute pytest 9 no longer
# reads.) Every other test is scheduled on its own.
SHARED_FIXTURE_MODULES = ("test_gguf.py", "test_multihost.py", "test_notebooks.py",
                          "test_train.py", "test_steps.py", "test_lora.py", "test_logprobs.py",
                          "test_heldout.py")


@pytest.hookimpl(optionalhook=True)    # only called under pytest-xdist
def pytest_xdist_make_scheduler(config, log):
  from xdist.scheduler import LoadScopeScheduling

  class Scheduler(LoadScopeScheduling):
    """xdist's scope scheduler (largest work units first) with one unit per test, except one
    per module for SHARED_FIXTURE_MODULES."""

    def _split_scope(self, nodeid: str) -> str:
      module = nodeid.split("::", 1)[0]
      return module if os.path.basename(module) in SHARED_FIXTURE_MODULES else nodeid

  return Scheduler(config, log)


# ---------------------------------------------------------------------------------------------
# One compile per distinct program in a test process.
#
# Tests build their steps afresh (new closures, new configs), so JAX's own caches, which key on
# the function, miss, and a worker compiled the same program many times (a compile map of eight
# in-process test files found 218 of the 668 s spent on programs over 0.3 s in exact repeats,
# e.g. toy J-BOND's train_step in four tests; benchmarks/RESULTS.md, session 25). This keeps each executable XLA compiles here under JAX's
# persistent-cache key of its module (the program text, compile options, devices, backend and
# XLA flags) and hands it back when the same key compiles again. Nothing is serialized, so no
# test ever runs a reloaded executable (aot.py's `_lost_code`); programs with host callbacks,
# which the key does not cover, always compile. A test that counts XLA compiles is marked
# `fresh_compiles`; BOND_TEST_SHARED_COMPILES=0 turns the sharing off for a whole run.
#
# Test files marked `quick_compiles` (their tests compile much and run little) compile with
# XLA's backend (LLVM) optimization level 0 and its expensive LLVM passes off, as JAX's
# `jax_disable_most_optimizations` does: the same HLO passes, quicker codegen, slower code (and
# rounding that may differ in the last bits, e.g. without fused multiply-adds). Measured per
# file (benchmarks/RESULTS.md, session 27): compile-bound files took 10-40% less time; files
# that run hundreds of toy steps or a real model took 20-70% more, so they are not marked.

# The XLA debug options of a `quick_compiles` compile, and the same as XLA_FLAGS for a test's
# subprocess where its runs compile much and run little.
_QUICK_DEBUG_OPTIONS = {"xla_backend_optimization_level": 0,
                        "xla_llvm_disable_expensive_passes": True}
QUICK_COMPILE_XLA_FLAGS = " ".join(f"--{name}={str(value).lower()}"
                                   for name, value in _QUICK_DEBUG_OPTIONS.items())

_EXECUTABLES: collections.OrderedDict = collections.OrderedDict()
_MAX_EXECUTABLES = 1024
_SHARING = {"on": os.environ.get("BOND_TEST_SHARED_COMPILES", "1") != "0"}
_QUICK_COMPILES = {"on": False, "last": False}


def _share_compiled_executables() -> None:
  from jax._src import cache_key
  from jax._src import compiler

  compile_ = compiler.compile_or_get_cached

  def compile_or_reuse(backend, computation, devices, compile_options, host_callbacks, *args,
                       **kwargs):
    if _QUICK_COMPILES["on"]:    # before the key, which covers the compile options
      debug_options = compile_options.executable_build_options.debug_options
      for name, value in _QUICK_DEBUG_OPTIONS.items():
        setattr(debug_options, name, value)
    if not _SHARING["on"] or host_callbacks or kwargs.get("pgle_profiler") is not None:
      return compile_(backend, computation, devices, compile_options, host_callbacks, *args,
                      **kwargs)
    try:
      key = cache_key.get(computation, devices, compile_options, backend)
    except Exception:  # pylint: disable=broad-except  (JAX's own cache then compiles too)
      return compile_(backend, computation, devices, compile_options, host_callbacks, *args,
                      **kwargs)
    if key in _EXECUTABLES:
      _EXECUTABLES.move_to_end(key)
      return _EXECUTABLES[key]
    executable = compile_(backend, computation, devices, compile_options, host_callbacks, *args,
                          **kwargs)
    _EXECUTABLES[key] = executable
    if len(_EXECUTABLES) > _MAX_EXECUTABLES:
      _EXECUTABLES.popitem(last=False)
    return executable

  compiler.compile_or_get_cached = compile_or_reuse


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "fresh_compiles: the test counts XLA compiles, so nothing compiled before it "
      "is reused while it runs")
  config.addinivalue_line(
      "markers", "quick_compiles: compile at XLA's backend optimization level 0 (the test "
      "compiles much and runs little)")
  _share_compiled_executables()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):    # pylint: disable=unused-argument
  """Sets `quick_compiles` for the test's setup (its module fixtures too), call and teardown.

  Where it changes, JAX's own caches (jit and op-by-op dispatch, keyed without the compile
  options) are cleared, so no test runs an executable compiled at the other level: the two
  may round differently, and a test that compares two computations bit for bit must see both
  at its own level. Compiles after the clear still reuse this process's shared executables (their
  key covers the level), so only tracing and lowering run again.
  """
  quick = item.get_closest_marker("quick_compiles") is not None
  if quick != _QUICK_COMPILES["last"]:
    import jax
    jax.clear_caches()
    _QUICK_COMPILES["last"] = quick
  _QUICK_COMPILES["on"] = quick
  try:
    yield
  finally:
    _QUICK_COMPILES["on"] = False


@pytest.fixture(autouse=True)
def _fresh_compiles(request):
  if request.node.get_closest_marker("fresh_compiles") is None:
    yield
    return
  before, _SHARING["on"] = _SHARING["on"], False
  try:
    yield
  finally:
    _SHARING["on"] = before
