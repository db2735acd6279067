"""LoRA / QLoRA (bond/lora.py): one frozen base shared by policy, anchor and reference.

Independent checks: the merged weights against ΔW written in transformers' layout (PEFT's
B·A on q/k/v/o/gate/up/down_proj), exact equality of the first forward with the base's, the
base's bytes before and after training, NumPy arithmetic for the EMA of the factors, the
transformers reload of a merged export, and the exact toy harness for J-BOND with LoRA.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from bond import config as config_lib
from bond import data as data_lib
from bond import lora, steps, toy, train
from bond import rollout as rollout_lib
from bond.models import convert, gemma, presets
from configs import toy_jbond, toy_jbond_lora

# Compiles much and runs little: XLA's quicker codegen (tests/conftest.py, `quick_compiles`).
pytestmark = pytest.mark.quick_compiles

ALL = "embed,attn,mlp"


def _spec(model_config, rank=4, alpha=8.0, targets=ALL, base_dtype=""):
  return lora.Spec(rank=rank, alpha=alpha, targets=lora.resolve_targets(
      targets, model_config.num_layers), dtype=model_config.dtype, base_dtype=base_dtype)


def _random_adapters(spec, base, seed=0):
  """Adapters with non-zero B (init_adapters starts B at 0)."""
  adapters = lora.init_adapters(spec, base, jax.random.key(seed))
  leaves, treedef = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.key(seed + 7), len(leaves))
  return jax.tree.unflatten(treedef, [0.1 * jax.random.normal(k, x.shape)
                                      for x, k in zip(leaves, keys)])


def test_targets_resolve_names_aliases_and_regexes():
  assert lora.resolve_targets("q,v", 2) == ((0, "q"), (0, "v"), (1, "q"), (1, "v"))
  assert len(lora.resolve_targets("attn,mlp", 3)) == 21
  assert lora.resolve_targets("layer_(0|2)/down", 3) == ((0, "down"), (2, "down"))
  assert lora.resolve_targets("embed", 3) == ((lora.EMBED, "embed"),)


@pytest.mark.parametrize("change,message", [
    ({"rank": -1}, "model.lora.rank must be an integer >= 0"),
    ({"rank": 4, "alpha": 0.0}, "model.lora.alpha must be > 0"),
    ({"rank": 4, "targets": "layer_9/q"}, "'layer_9/q' matches no projection"),
    ({"rank": 4, "targets": "qproj"}, "'qproj' matches no projection"),
    ({"rank": 4, "targets": "layer_[0/q"}, "nor a valid regex"),
    ({"rank": 4, "targets": " , "}, "must name at least one projection"),
    ({"rank": 4, "base_dtype": "nf4"}, "model.lora.base_dtype must be one of"),
    ({"base_dtype": "int8"}, "needs model.lora.rank > 0"),
    ({"rank": 4, "base_dtype": "bfloat16", "quantize_embedding": True},
     "quantize_embedding=True needs model.lora.base_dtype='int8'"),
])
def test_bad_lora_config_is_one_line_error_at_validation(change, message):
  c = toy_jbond.get_config()
  c.model.lora.update(**change)
  with pytest.raises(ValueError, match=message) as e:
    config_lib.validate(c, check_files=False)
  assert "\n" not in str(e.value)


def test_merge_matches_delta_in_transformers_layout():
  """merge() against W_hf + (alpha/r)·B_peft·A_peft written on the HF weights (slicing of the
  stacked k/v and gate/up weights, reshapes of q and o)."""
  config = presets.get("tiny_gemma3")
  base = gemma.init_params(config, jax.random.key(0))
  spec = _spec(config)
  adapters = _random_adapters(spec, base)
  merged = convert.params_to_torch_layout(config, lora.merge(spec, base, adapters))
  expected = convert.params_to_torch_layout(config, base)
  for name, t in lora.peft_tensors(spec, adapters).items():
    module = name.removeprefix("base_model.model.").rsplit(".", 2 if ".weight" in name else 1)[0]
    if name.endswith("lora_A.weight"):
      b = lora.peft_tensors(spec, adapters)[name.replace("lora_A", "lora_B")]
      expected[module + ".weight"] = expected[module + ".weight"] + spec.scale * (b @ t)
    elif name.endswith("lora_embedding_A"):
      b = lora.peft_tensors(spec, adapters)[name.replace("_A", "_B")]
      expected[module + ".weight"] = expected[module + ".weight"] + spec.scale * (b @ t).T
  assert merged.keys() == expected.keys()
  changed = 0
  for k in merged:
    np.testing.assert_allclose(merged[k], expected[k], rtol=1e-5, atol=1e-6, err_msg=k)
    changed += not np.array_equal(merged[k], convert.params_to_torch_layout(config, base)[k])
  assert changed == 1 + 7 * config.num_layers       # the embedding and every projection


@pytest.mark.parametrize("preset,dtype", [("tiny_gemma3", jnp.float32),
                                          ("tiny_gemma2", jnp.bfloat16)])
def test_first_forward_equals_the_base_exactly(preset, dtype):
  config = presets.get(preset, dtype=dtype)
  params = gemma.init_params(config, jax.random.key(1))
  state = steps.init_state(params, steps.make_optimizer(toy_jbond.get_config().optim), 0,
                           lora=_spec(config))
  tokens = jax.random.randint(jax.random.key(2), (2, 7), 0, config.vocab_size)
  apply = lambda p: gemma.Gemma(config).apply({"params": p}, tokens)  # noqa: E731
  base = apply(params)
  for view in (state.policy(), state.anchor(), state.reference()):
    np.testing.assert_array_equal(np.asarray(apply(view)), np.asarray(base))


def test_int8_base_is_per_channel_and_shared_by_every_view():
  config = presets.get("tiny_gemma3")
  params = gemma.init_params(config, jax.random.key(3))
  base = lora.quantize(params, embedding=True)
  emb = base["input_embedding"]
  assert emb.q.dtype == jnp.int8 and emb.scale.shape == (config.vocab_size, 1)
  q = base["layer_0"]["attn"]["q_einsum"]
  assert q.scale.shape == (1,) + params["layer_0"]["attn"]["q_einsum"].shape[1:]
  # Round to nearest: every weight within half a step of its channel's scale.
  for w, qt in ((params["input_embedding"], emb), (params["layer_0"]["attn"]["q_einsum"], q)):
    err = np.abs(np.asarray(w) - np.asarray(qt.q, np.float32) * np.asarray(qt.scale))
    assert np.all(err <= np.asarray(qt.scale) / 2 + 1e-7)
  state = steps.init_state(params, steps.make_optimizer(toy_jbond.get_config().optim), 0,
                           lora=_spec(config, base_dtype="int8"))
  ref = state.reference()
  assert state.ref_params["layer_0"]["mlp"]["linear"].q.dtype == jnp.int8
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(state.policy())):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_int8_base_keeps_the_embedding_unless_asked_and_stores_less():
  """QLoRA's default base: int8 layer weights, the tied embedding as it was (each pass would
  otherwise dequantize all of it); quantize_embedding=True quantizes it too. Stored bytes:
  int8 < int8 + bf16 embedding < bf16."""
  config = presets.get("tiny_gemma3")
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), gemma.init_params(config, jax.random.key(3)))
  nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
  spec = _spec(config, targets="attn,mlp", base_dtype="int8")
  base = lora.make_base(spec, params)
  assert base["input_embedding"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(base["input_embedding"], np.float32),
                                np.asarray(params["input_embedding"], np.float32))
  assert base["layer_0"]["mlp"]["linear"].q.dtype == jnp.int8
  full = lora.make_base(dataclasses.replace(spec, quantize_embedding=True), params)
  assert full["input_embedding"].q.dtype == jnp.int8
  assert nbytes(full) < nbytes(base) < nbytes(params)
  # The reference view dequantizes only the layers; its embedding is the base's own.
  assert lora.reference(spec, base)["input_embedding"] is base["input_embedding"]
  c = toy_jbond.get_config()
  c.model.lora.update(rank=4, base_dtype="int8", quantize_embedding=True)
  assert lora.spec_from_config(c, config).quantize_embedding


def _toy_runner(config):
  exp = train.build(config)
  optimizer = steps.make_optimizer(config.optim)
  spec = lora.spec_from_config(config, exp.model_config)
  state = steps.init_state(exp.params, optimizer, config.train.seed, lora=spec)
  step = jax.jit(steps.make_train_step(config, exp.model_config, exp.reward_fn, optimizer))
  batch = lambda i: data_lib.get_batch(exp.table, i, config.data.batch_size,  # noqa: E731
                                       config.data.shuffle_seed)
  return exp, state, step, batch


@pytest.mark.parametrize("objective", ["jbond", "dpo"])
def test_only_adapters_train_and_the_base_stays_bit_identical(objective):
  config = toy_jbond_lora.get_config()
  config.bond.objective = objective
  config.optim.warmup_steps = 0
  if objective == "dpo":
    config.bond.anchor = "fixed"
  exp, state, step, batch = _toy_runner(config)
  base_before = jax.device_get(state.ref_params)
  adapters_before = jax.device_get(state.params)
  n_adapter = lora.count(state.params)
  # Adam tracks the adapters only: two moments of each adapter entry, nothing of the base.
  opt_entries = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
  assert opt_entries == 2 * n_adapter
  assert n_adapter < gemma.count_params(exp.model_config)
  for i in range(3):
    state, metrics = step(state, batch(i))
  assert np.isfinite(float(metrics["loss"]))
  for a, b in zip(jax.tree.leaves(base_before), jax.tree.leaves(state.ref_params)):
    np.testing.assert_array_equal(a, np.asarray(b))
  moved = max(float(np.max(np.abs(np.asarray(a) - b))) for a, b in
              zip(jax.tree.leaves(state.params), jax.tree.leaves(adapters_before)))
  assert moved > 1e-4


def test_ema_anchor_is_an_ema_of_the_factors():
  config = toy_jbond_lora.get_config()
  config.optim.warmup_steps = 0
  _, state, step, batch = _toy_runner(config)
  anchor0 = jax.device_get(state.anchor_params)
  state, _ = step(state, batch(0))
  eta = config.bond.eta
  for a0, p1, a1 in zip(jax.tree.leaves(anchor0), jax.tree.leaves(state.params),
                        jax.tree.leaves(state.anchor_params)):
    np.testing.assert_allclose(np.asarray(a1), (1 - eta) * a0 + eta * np.asarray(p1),
                               rtol=1e-6, atol=1e-7)


def _run(config, workdir, steps_):
  config.train.num_steps = steps_
  return train.train_and_evaluate(config, str(workdir))


@pytest.mark.slow
def test_lora_resume_is_exact_checkpoint_holds_no_base_and_base_is_checked(tmp_path):
  config = toy_jbond_lora.get_config()
  config.train.update(checkpoint_every=2, log_every=1)
  config.eval.update(every=2, sampled=False)
  config.data.batch_size = 16
  _run(config, tmp_path / "straight", 4)
  _run(config, tmp_path / "resumed", 2)
  _run(config, tmp_path / "resumed", 4)
  read = lambda w: [{k: v for k, v in json.loads(l).items() if not k.startswith("time/")}  # noqa: E731
                    for l in (w / "metrics.jsonl").read_text().splitlines()]
  assert read(tmp_path / "straight") == read(tmp_path / "resumed")
  import orbax.checkpoint as ocp
  saved = ocp.StandardCheckpointer().restore(tmp_path / "straight" / "checkpoints" / "4" / "state")
  assert set(saved) == {"step", "params", "opt_state", "anchor_params", "rng"}   # no base
  config.model.init_seed = 5                        # another base model
  with pytest.raises(ValueError, match="was trained on base 'preset=toy init_seed=0'"):
    _run(config, tmp_path / "resumed", 6)


@pytest.mark.slow
def test_jbond_with_lora_moves_toward_best_of_n_on_the_exact_harness(tmp_path):
  """configs/toy_jbond_lora.py (EMA of the factors) for its 180 steps, exact metrics, seeds 0-2.

  Single J-BOND trajectories of this job are chaotic: a last-bit change in the update sends a
  seed elsewhere (optax's gradient clipping against a select-free rewrite of the same arithmetic,
  equal op by op, fused differently by XLA). Over seeds 0-7 under those two roundings
  (docs/toy_results.md), a seed's final N* ranged 2.5-8.1 (mean 4.6, sd 1.7), its win rate
  0.53-0.69 (mean 0.62, sd 0.05), its reward gain over its start 0.08-0.96 (mean 0.56, sd 0.25).
  Each claim below on the three-seed mean sits 2.5 or more standard errors of that mean under
  its expected value. The control that fails them: adapters without the embedding target leave
  π at π_ref (seeds 0-2 at rank 5: reward gains -0.002, 0.001, 0.004; docs/toy_results.md at
  rank 32: N* 1.03, win rate 0.50)."""
  finals, gains = [], []
  for seed in range(3):
    config = toy_jbond_lora.get_config()
    config.train.seed = seed
    config.eval.sampled = False
    _run(config, tmp_path / str(seed), config.train.num_steps)
    records = [json.loads(l) for l in (tmp_path / str(seed) / "metrics.jsonl").read_text().splitlines()]
    exact = [r for r in records if "exact/reward" in r]
    early = np.mean([r["exact/reward"] for r in exact[:3]])
    late = np.mean([r["exact/reward"] for r in exact[-3:]])
    print(seed, {k: round(v, 3) for k, v in exact[-1].items() if k.startswith("exact/")})
    gains.append(late - early)
    finals.append(exact[-1])
  mean = lambda key: float(np.mean([f[key] for f in finals]))  # noqa: E731
  assert np.mean(gains) > 0.2, gains
  assert mean("exact/effective_n") >= 2.0, [f["exact/effective_n"] for f in finals]
  assert mean("exact/win_rate") > 0.55, [f["exact/win_rate"] for f in finals]
  assert mean("exact/reward_gap_to_bon") < 0.0


def test_merged_export_reloads_in_transformers_and_adapters_save_alone(tmp_path, torch):
  import transformers
  config = presets.get("tiny_gemma3")
  base = gemma.init_params(config, jax.random.key(4))
  spec = _spec(config)
  adapters = _random_adapters(spec, base, seed=2)
  merged = lora.merge(spec, base, adapters)
  convert.to_hf(config, merged, str(tmp_path / "hf"))
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path / "hf"), attn_implementation="eager", dtype=torch.float32).eval()
  tokens = np.asarray(jax.random.randint(jax.random.key(5), (2, 9), 1, config.vocab_size))
  ours = np.asarray(gemma.Gemma(config).apply({"params": merged}, jnp.asarray(tokens)))
  with torch.no_grad():
    theirs = model(torch.as_tensor(tokens)).logits.numpy()
  assert np.abs(ours - theirs).max() <= 1e-4
  lora.save_adapters(spec, adapters, str(tmp_path / "adapters"), {"model": "m", "fingerprint": "f"})
  saved = load_file(str(tmp_path / "adapters" / "adapter_model.safetensors"))
  meta = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
  assert meta["r"] == 4 and meta["lora_alpha"] == 8.0 and meta["peft_type"] == "LORA"
  assert len(saved) == 2 * len(spec.targets)
  key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
  assert saved[key].shape == (4, config.embed_dim)


def _sample_stage_bytes(base_dtype: str, quantize_embedding: bool = False) -> int:
  """XLA's own accounting (arguments + temporaries) of the J-BOND sample stage's jit, on a
  model with a large vocabulary like Gemma's (abstract shapes: nothing runs)."""
  mc = presets.get("tiny_gemma3", vocab_size=65536, embed_dim=256, hidden_dim=1024,
                   dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  c = toy_jbond_lora.get_config()
  c.model.lora.update(rank=4, targets="attn,mlp", base_dtype=base_dtype,
                      quantize_embedding=quantize_embedding)
  c.sampling.cpu_kernels = "auto"
  spec = lora.spec_from_config(c, mc)
  state = jax.eval_shape(lambda: steps.init_state(
      gemma.init_params(mc, jax.random.key(0)), steps.make_optimizer(c.optim), 0, lora=spec))
  batch = {"prompt_tokens": jax.ShapeDtypeStruct((2, 4), jnp.int32),
           "prompt_mask": jax.ShapeDtypeStruct((2, 4), jnp.bool_)}
  stages = rollout_lib.make_rollout_stages(c, mc, None)
  m = jax.jit(stages.sample).lower(state, batch).compile().memory_analysis()
  return m.argument_size_in_bytes + m.temp_size_in_bytes


def test_int8_base_lowers_the_sample_stage_memory():
  """QLoRA's point: the int8 base must hold less than the bf16 base, in flight too. The sample
  stage merges the anchor's and then the policy's weights: the rollout sequences the two views
  (without that, XLA keeps the int8 base's dequantized layers live across both samplers and the
  int8 stage needs more than the bf16 one); and the tied embedding stays in bf16 by default
  (quantized, the logits need all of it dequantized in flight, which costs more than it saves)."""
  bf16, int8 = _sample_stage_bytes(""), _sample_stage_bytes("int8")
  int8_embedding = _sample_stage_bytes("int8", quantize_embedding=True)
  assert int8 < bf16, (int8, bf16)
  assert int8 < int8_embedding, (int8, int8_embedding)


def test_scanned_layer_stack_trains_like_the_unrolled_one(tmp_path):
  """model.scan_layers through the whole loop (LoRA merges, chunked log-probs, the J-BOND
  update): the same losses, gradient norms and rewards as the unrolled stack, step by step."""
  def run(scan):
    c = toy_jbond_lora.get_config()
    c.model.scan_layers = scan
    c.train.num_steps, c.train.log_every, c.eval.every = 3, 1, 100
    c.eval.sampled = False
    config_lib.validate(c)
    workdir = tmp_path / f"scan{int(scan)}"
    train.train_and_evaluate(c, str(workdir))
    return [json.loads(line) for line in open(workdir / "metrics.jsonl")]

  scanned, unrolled = run(True), run(False)
  assert [r["step"] for r in scanned] == [r["step"] for r in unrolled] == [1, 2, 3]
  for s, u in zip(scanned, unrolled):
    for key in ("loss", "grads/global_norm", "reward/mean", "kl_to_anchor"):
      np.testing.assert_allclose(s[key], u[key], rtol=1e-5, atol=1e-7, err_msg=key)
  assert unrolled[-1]["grads/global_norm"] > 0
