"""Named Gemma configs: every published text size, plus tiny sizes for tests and toy tasks.

`get(name, **overrides)` returns a `GemmaConfig`; overrides replace fields (e.g. dtype).
"""

from __future__ import annotations

from bond.models.gemma import GLOBAL, LOCAL, GemmaConfig

GEMMA1_VOCAB = 256_000
GEMMA3_VOCAB_SMALL = 262_144     # 270M and 1B
GEMMA3_VOCAB = 262_208           # 4B, 12B, 27B (multimodal tokenizer)


def gemma2_layer_types(num_layers: int) -> tuple[str, ...]:
  """Gemma 2: alternating, starting with a local (sliding-window) layer."""
  return tuple(LOCAL if i % 2 == 0 else GLOBAL for i in range(num_layers))


def gemma3_layer_types(num_layers: int, pattern: int = 6) -> tuple[str, ...]:
  """Gemma 3: `pattern - 1` local layers then one global, repeated."""
  return tuple(GLOBAL if (i + 1) % pattern == 0 else LOCAL for i in range(num_layers))


def _gemma1(**kw) -> GemmaConfig:
  return GemmaConfig(version=1, vocab_size=kw.pop("vocab_size", GEMMA1_VOCAB), **kw)


def _gemma2(num_layers: int, **kw) -> GemmaConfig:
  kw.setdefault("sliding_window", 4096)
  return GemmaConfig(
      version=2, vocab_size=kw.pop("vocab_size", GEMMA1_VOCAB), num_layers=num_layers,
      layer_types=gemma2_layer_types(num_layers), attn_logit_softcap=50.0,
      final_logit_softcap=30.0, use_post_norms=True, **kw)


def _gemma3(num_layers: int, **kw) -> GemmaConfig:
  kw.setdefault("sliding_window", 1024)
  kw.setdefault("query_pre_attn_scalar", 256)
  return GemmaConfig(
      version=3, vocab_size=kw.pop("vocab_size", GEMMA3_VOCAB), num_layers=num_layers,
      layer_types=gemma3_layer_types(num_layers), rope_base_global=1_000_000.0,
      rope_base_local=10_000.0, use_qk_norm=True, use_post_norms=True, **kw)


_PRESETS = {
    "gemma_2b": lambda: _gemma1(num_layers=18, embed_dim=2048, hidden_dim=16384, num_heads=8,
                                num_kv_heads=1, head_dim=256),
    "gemma_7b": lambda: _gemma1(num_layers=28, embed_dim=3072, hidden_dim=24576, num_heads=16,
                                num_kv_heads=16, head_dim=256),
    "gemma2_2b": lambda: _gemma2(26, embed_dim=2304, hidden_dim=9216, num_heads=8,
                                 num_kv_heads=4, head_dim=256, query_pre_attn_scalar=256),
    "gemma2_9b": lambda: _gemma2(42, embed_dim=3584, hidden_dim=14336, num_heads=16,
                                 num_kv_heads=8, head_dim=256, query_pre_attn_scalar=256),
    "gemma2_27b": lambda: _gemma2(46, embed_dim=4608, hidden_dim=36864, num_heads=32,
                                  num_kv_heads=16, head_dim=128, query_pre_attn_scalar=144),
    "gemma3_270m": lambda: _gemma3(18, vocab_size=GEMMA3_VOCAB_SMALL, embed_dim=640,
                                   hidden_dim=2048, num_heads=4, num_kv_heads=1, head_dim=256,
                                   sliding_window=512),
    "gemma3_1b": lambda: _gemma3(26, vocab_size=GEMMA3_VOCAB_SMALL, embed_dim=1152,
                                 hidden_dim=6912, num_heads=4, num_kv_heads=1, head_dim=256,
                                 sliding_window=512),
    "gemma3_4b": lambda: _gemma3(34, embed_dim=2560, hidden_dim=10240, num_heads=8,
                                 num_kv_heads=4, head_dim=256, rope_scale_global=8.0),
    "gemma3_12b": lambda: _gemma3(48, embed_dim=3840, hidden_dim=15360, num_heads=16,
                                  num_kv_heads=8, head_dim=256, rope_scale_global=8.0),
    "gemma3_27b": lambda: _gemma3(62, embed_dim=5376, hidden_dim=21504, num_heads=32,
                                  num_kv_heads=16, head_dim=128, query_pre_attn_scalar=168,
                                  rope_scale_global=8.0),
    # Tiny sizes for tests, toy tasks and benchmarks (random init).
    "tiny_gemma1": lambda: _gemma1(vocab_size=256, num_layers=4, embed_dim=64, hidden_dim=128,
                                   num_heads=4, num_kv_heads=2, head_dim=16),
    "tiny_gemma2": lambda: _gemma2(4, vocab_size=256, embed_dim=64, hidden_dim=128, num_heads=4,
                                   num_kv_heads=2, head_dim=16, query_pre_attn_scalar=24,
                                   sliding_window=4),
    "tiny_gemma3": lambda: _gemma3(6, vocab_size=256, embed_dim=64, hidden_dim=128, num_heads=4,
                                   num_kv_heads=2, head_dim=16, query_pre_attn_scalar=16,
                                   sliding_window=4, rope_scale_global=8.0),
    # ~35M params: the sampler benchmark size (Gemma 3 layout, vocab cut to 16k).
    "gemma3_35m": lambda: _gemma3(7, vocab_size=16_384, embed_dim=512, hidden_dim=2048,
                                  num_heads=4, num_kv_heads=1, head_dim=128,
                                  query_pre_attn_scalar=128, sliding_window=512),
}


def names() -> list[str]:
  return sorted(_PRESETS)


def get(name: str, **overrides) -> GemmaConfig:
  """The named preset, with optional field overrides (e.g. `dtype=jnp.bfloat16`)."""
  if name not in _PRESETS:
    raise ValueError(f"unknown Gemma preset {name!r}; known presets: {', '.join(names())}")
  config = _PRESETS[name]()
  return config.replace(**overrides) if overrides else config
