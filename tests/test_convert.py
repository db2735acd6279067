"""HF import/export round trips, checkpoint variants, and clear errors on bad inputs."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from bond.models import convert, gemma, presets
from conftest import build_hf_model, hf_config, hf_logits, padded_batch

# Compiles much and runs little: XLA's quicker codegen (tests/conftest.py, `quick_compiles`).
pytestmark = pytest.mark.quick_compiles


def ours(config, params, tokens, mask):
  return np.asarray(gemma.Gemma(config).apply({"params": params}, jnp.asarray(tokens),
                                              attention_mask=jnp.asarray(mask)))


def random_params(config, seed=0):
  """init_params with random norm scales (init_params zeros them, hiding the `1 + w`)."""
  params = gemma.init_params(config, jax.random.key(seed))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree_util.tree_unflatten(treedef, [
      0.5 * jax.random.normal(k, x.shape) if "scale" in jax.tree_util.keystr(path) else x
      for (path, x), k in zip(leaves, keys)])


@pytest.mark.parametrize("name", ["tiny_gemma1", "tiny_gemma2", "tiny_gemma3"])
def test_to_hf_reloads_in_transformers_with_identical_logits(name, tmp_path, torch):
  import transformers
  config = presets.get(name)
  params = random_params(config)
  convert.to_hf(config, params, str(tmp_path))
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), attn_implementation="eager", dtype=torch.float32).eval()
  expected_class = {1: "GemmaForCausalLM", 2: "Gemma2ForCausalLM", 3: "Gemma3ForCausalLM"}
  assert type(model).__name__ == expected_class[config.version]
  tokens, mask = padded_batch()
  err = np.abs(ours(config, params, tokens, mask) - hf_logits(model, tokens, mask))[mask].max()
  print(f"{name} to_hf -> transformers max abs err: {err:.2e}")
  assert err <= 1e-5


def test_from_hf_to_hf_round_trip_is_exact(hf_model_dir, tmp_path):
  _, _, path = hf_model_dir
  config, params = convert.from_hf(path)
  convert.to_hf(config, params, str(tmp_path))
  config2, params2 = convert.from_hf(str(tmp_path))
  assert config2 == config
  jax.tree.map(np.testing.assert_array_equal, params2, params)
  original = load_file(os.path.join(path, "model.safetensors"))
  exported = load_file(str(tmp_path / "model.safetensors"))
  assert exported.keys() == original.keys()
  for name in original:
    np.testing.assert_array_equal(exported[name], original[name], err_msg=name)


@pytest.mark.parametrize("version", [1, 2, 3])
def test_config_matches_transformers_parsing_of_legacy_keys(version):
  """transformers 4.x keys (rope_theta, rope_scaling, rope_local_base_freq, no layer_types)."""
  legacy = {**hf_config(version).to_dict(), "rope_theta": 5e5}
  legacy.pop("rope_parameters")
  legacy.pop("layer_types", None)
  if version == 3:
    legacy.update(rope_local_base_freq=2e4, rope_scaling={"rope_type": "linear", "factor": 4.0},
                  sliding_window_pattern=3)
  parsed_by_hf = type(hf_config(version))(**legacy).to_dict()    # transformers' own reading
  assert convert.config_from_hf(legacy) == convert.config_from_hf(parsed_by_hf)
  config = convert.config_from_hf(legacy)
  assert config.rope_base_global == 5e5
  if version == 3:
    assert (config.rope_base_local, config.rope_scale_global) == (2e4, 4.0)
    assert config.layer_types[:3] == ("local", "local", "global")


def test_sharded_bf16_checkpoint(tmp_path, torch):
  model = build_hf_model(3).to(torch.bfloat16)
  model.save_pretrained(tmp_path, max_shard_size="20KB")
  assert os.path.exists(tmp_path / "model.safetensors.index.json")
  _, params = convert.from_hf(str(tmp_path))
  state = model.state_dict()
  np.testing.assert_array_equal(
      np.asarray(params["layer_2"]["attn"]["kv_einsum"][:, 1]).reshape(64, 48).T,
      state["model.layers.2.self_attn.v_proj.weight"].float().numpy())
  np.testing.assert_array_equal(params["input_embedding"],
                                state["model.embed_tokens.weight"].float().numpy())


def test_multimodal_gemma3_loads_the_language_model(tmp_path, torch):
  import transformers
  torch.manual_seed(0)
  text = {**hf_config(3).to_dict(), "vocab_size": 300}
  mm = transformers.Gemma3Config(
      text_config=text, mm_tokens_per_image=4, image_token_index=299, boi_token_index=297,
      eoi_token_index=298, vision_config=dict(hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=1, num_attention_heads=2,
                                              image_size=28, patch_size=14))
  model = transformers.Gemma3ForConditionalGeneration(mm).eval()
  model.save_pretrained(tmp_path)
  config, params = convert.from_hf(str(tmp_path))
  assert config.vocab_size == 300
  tokens, mask = padded_batch()
  err = np.abs(ours(config, params, tokens, mask) - hf_logits(model, tokens, mask))[mask].max()
  assert err <= 1e-4


def test_vocab_padding_rows_are_dropped(tmp_path, torch):
  build_hf_model(1).save_pretrained(tmp_path)
  tensors = load_file(str(tmp_path / "model.safetensors"))
  embed = tensors["model.embed_tokens.weight"]
  tensors["model.embed_tokens.weight"] = np.concatenate([embed, np.ones((8, embed.shape[1]),
                                                                        embed.dtype)])
  save_file(tensors, str(tmp_path / "model.safetensors"))
  config, params = convert.from_hf(str(tmp_path))
  assert config.vocab_size == embed.shape[0]
  np.testing.assert_array_equal(params["input_embedding"], embed)


# ------------------------------------------------------------------------------ bad inputs


@pytest.fixture
def saved_dir(tmp_path, torch):
  build_hf_model(2).save_pretrained(tmp_path)
  return tmp_path


def edit_config(path, **changes):
  with open(path / "config.json") as f:
    cfg = json.load(f)
  cfg.update(changes)
  with open(path / "config.json", "w") as f:
    json.dump(cfg, f)


def test_unknown_model_type_names_it_and_the_supported_ones(saved_dir):
  edit_config(saved_dir, model_type="llama")
  with pytest.raises(ValueError, match=r"'llama'.*gemma, gemma2, gemma3_text, gemma3"):
    convert.from_hf(str(saved_dir))


def test_missing_config_json(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    convert.from_hf(str(tmp_path))


def test_missing_safetensors(saved_dir):
  os.remove(saved_dir / "model.safetensors")
  with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
    convert.from_hf(str(saved_dir))


def test_wrong_tensor_shape_names_the_tensor(saved_dir):
  edit_config(saved_dir, head_dim=16)
  with pytest.raises(ValueError, match=r"'layers\.0\.self_attn\.q_proj\.weight' has shape "
                                       r"\(96, 64\), expected \(64, 64\)"):
    convert.from_hf(str(saved_dir))


def test_missing_tensors_are_named(saved_dir):
  tensors = load_file(str(saved_dir / "model.safetensors"))
  del tensors["model.layers.3.mlp.up_proj.weight"], tensors["model.norm.weight"]
  save_file(tensors, str(saved_dir / "model.safetensors"))
  with pytest.raises(KeyError, match=r"2 tensor\(s\): norm\.weight, layers\.3\.mlp\.up_proj"):
    convert.from_hf(str(saved_dir))


def test_untied_lm_head_is_rejected(saved_dir):
  tensors = load_file(str(saved_dir / "model.safetensors"))
  tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1.0
  save_file(tensors, str(saved_dir / "model.safetensors"))
  with pytest.raises(ValueError, match="lm_head.weight differs"):
    convert.from_hf(str(saved_dir))


@pytest.mark.parametrize("name,change,field", [
    ("tiny_gemma1", dict(attn_logit_softcap=10.0), "attn_logit_softcap"),
    ("tiny_gemma2", dict(rope_base_local=1e3), "rope_base_local"),
    ("tiny_gemma3", dict(use_qk_norm=False), "use_qk_norm"),
])
def test_to_hf_rejects_configs_hf_cannot_express(name, change, field, tmp_path):
  config = presets.get(name, **change)
  with pytest.raises(ValueError, match=f"cannot express this config.*'{field}'"):
    convert.to_hf(config, gemma.init_params(config, jax.random.key(0)), str(tmp_path))


def test_unsupported_rope_type(saved_dir):
  edit_config(saved_dir, rope_parameters={"rope_type": "yarn", "factor": 2.0})
  with pytest.raises(ValueError, match="unsupported rope_type 'yarn'"):
    convert.from_hf(str(saved_dir))


def test_multimodal_checkpoint_without_language_model(tmp_path):
  with open(tmp_path / "config.json", "w") as f:
    json.dump({"model_type": "gemma3", "text_config": hf_config(3).to_dict()}, f)
  save_file({"vision_tower.w": np.zeros(2, np.float32)}, str(tmp_path / "model.safetensors"))
  with pytest.raises(KeyError, match="no embed_tokens.weight"):
    convert.from_hf(str(tmp_path))
