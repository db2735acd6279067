"""Preset param counts against the published counts (abstract shapes only, no allocation)."""

import pytest

from bond.models import gemma, presets

# Gemma 3 4B/12B/27B are published with the SigLIP vision tower (416,866,032 params) and the
# multimodal projector (1152 * D weights + 1152 norm) included; we build the text decoder only.
SIGLIP = 416_866_032

PUBLISHED = {
    "gemma_2b": 2_506_172_416,
    "gemma_7b": 8_537_680_896,
    "gemma2_2b": 2_614_341_888,
    "gemma2_9b": 9_241_705_984,
    "gemma2_27b": 27_227_128_320,
    "gemma3_270m": 268_098_176,
    "gemma3_1b": 999_885_952,
    "gemma3_4b": 4_300_079_472 - SIGLIP - (1152 * 2560 + 1152),
    "gemma3_12b": 12_187_325_040 - SIGLIP - (1152 * 3840 + 1152),
    "gemma3_27b": 27_432_406_640 - SIGLIP - (1152 * 5376 + 1152),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_param_count_matches_published(name):
  assert gemma.count_params(presets.get(name)) == PUBLISHED[name]


def test_unknown_preset_names_the_choices():
  with pytest.raises(ValueError, match="unknown Gemma preset 'gemma9'.*gemma3_1b"):
    presets.get("gemma9")


def test_layer_patterns():
  assert presets.get("gemma2_2b").layer_types[:3] == ("local", "global", "local")
  g3 = presets.get("gemma3_1b").layer_types
  assert g3[:6] == ("local",) * 5 + ("global",) and g3.count("global") == 26 // 6


@pytest.mark.parametrize("field,value,msg", [
    ("num_heads", 3, "multiple of num_kv_heads"),
    ("version", 4, "version must be 1, 2 or 3"),
    ("layer_types", ("local",), "layer_types has 1 entries"),
])
def test_bad_config_is_rejected(field, value, msg):
  with pytest.raises(ValueError, match=msg):
    presets.get("tiny_gemma2", **{field: value})
