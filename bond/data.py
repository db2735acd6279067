"""Prompt and preference-pair datasets: toy task, JSONL, TFDS (`tfds.data_source`, no TensorFlow).

Every dataset is a random-access table of fixed-shape NumPy examples. Iteration is stateless:
the batch of step `s` is a pure function of (seed, s), drawn from a fresh permutation each epoch,
so the iterator position that a checkpoint stores is the step itself and resume is exact. Each
process takes its contiguous slice of the global batch (`process_index`, `process_count`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Sequence

import numpy as np


@dataclasses.dataclass
class Table:
  """Columns of equal length: name -> [num_examples, ...] NumPy arrays."""

  columns: dict[str, np.ndarray]
  counters: dict[str, int] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    lengths = {k: len(v) for k, v in self.columns.items()}
    if len(set(lengths.values())) != 1:
      raise ValueError(f"dataset columns have different lengths: {lengths}")
    if not lengths or next(iter(lengths.values())) == 0:
      raise ValueError("dataset is empty")

  def __len__(self) -> int:
    return len(next(iter(self.columns.values())))


def batch_indices(num_examples: int, step: int, batch_size: int, seed: int) -> np.ndarray:
  """Global example indices of step `step`: consecutive positions of per-epoch permutations."""
  positions = step * batch_size + np.arange(batch_size)
  epochs, offsets = np.divmod(positions, num_examples)
  out = np.empty(batch_size, np.int64)
  for epoch in np.unique(epochs):
    perm = np.random.default_rng([seed, int(epoch)]).permutation(num_examples)
    sel = epochs == epoch
    out[sel] = perm[offsets[sel]]
  return out


def get_batch(table: Table, step: int, batch_size: int, seed: int, process_index: int = 0,
              process_count: int = 1) -> dict[str, np.ndarray]:
  """This process's slice of the global batch of step `step`."""
  if batch_size % process_count:
    raise ValueError(f"data.batch_size ({batch_size}) must be divisible by the number of "
                     f"processes ({process_count})")
  idx = batch_indices(len(table), step, batch_size, seed)
  per = batch_size // process_count
  idx = idx[process_index * per:(process_index + 1) * per]
  return {k: v[idx] for k, v in table.columns.items()}


def _pad(rows: Sequence[Sequence[int]], max_len: int, pad_id: int, left: bool):
  """Token rows (each <= max_len long) padded to exactly `max_len`: tokens int32, mask bool."""
  tokens = np.full((len(rows), max_len), pad_id, np.int32)
  mask = np.zeros((len(rows), max_len), bool)
  for i, ids in enumerate(rows):
    cols = slice(max_len - len(ids), max_len) if left else slice(0, len(ids))
    tokens[i, cols], mask[i, cols] = ids, True
  return tokens, mask


def _encode(tokenizer, texts: Sequence[str], max_len: int, add_bos: bool, counters,
            name: str, left: bool):
  """Encode and pad to exactly `max_len` (left-padded prompts, right-padded completions)."""
  rows = []
  for text in texts:
    ids = tokenizer.encode(text, add_bos=add_bos)
    if len(ids) > max_len:
      counters[f"{name}_truncated"] += 1
      ids = ids[-max_len:] if left else ids[:max_len]
    rows.append(ids)
  return _pad(rows, max_len, tokenizer.pad_id, left)


TRUNCATIONS = ("keep_end", "keep_start")


def prompt_table(texts: Sequence[str], tokenizer, max_prompt_len: int,
                 template: str = "{}", truncation: str = "keep_end") -> Table:
  """Left-padded prompts `template.format(text)`, bos first, `max_prompt_len` tokens at most.

  A prompt that is too long loses tokens of its `text` only: bos and the template's fixed parts
  (e.g. "Summarize:\n{}\n") stay whole. `truncation` keeps the end of the text ("keep_end": a
  chat turn's request is at its end) or its start ("keep_start": an article's lead). Only
  truncated prompts are encoded piecewise (bos + prefix, text, suffix), so their token
  boundaries at the joins can differ from encoding the whole string; they are counted in
  `counters['prompt_truncated']`.
  """
  if truncation not in TRUNCATIONS:
    raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
  parts = template.split("{}")
  if len(parts) != 2:
    raise ValueError(f"prompt template must contain exactly one '{{}}', got {template!r}")
  prefix, suffix = parts
  head = tokenizer.encode(prefix, add_bos=True)                   # fixed parts, encoded once
  tail = tokenizer.encode(suffix, add_bos=False) if suffix else []
  budget = max_prompt_len - len(head) - len(tail)
  counters = collections.Counter(examples=len(texts))
  rows = []
  for text in texts:
    ids = tokenizer.encode(prefix + text + suffix, add_bos=True)
    if len(ids) > max_prompt_len:
      counters["prompt_truncated"] += 1
      if budget < 1:
        raise ValueError(f"data.max_prompt_len={max_prompt_len} leaves no room for the text in "
                         f"template {template!r} ({len(head) + len(tail)} tokens with bos)")
      body = tokenizer.encode(text, add_bos=False)
      ids = head + (body[:budget] if truncation == "keep_start" else body[-budget:]) + tail
    rows.append(ids)
  tokens, mask = _pad(rows, max_prompt_len, tokenizer.pad_id, left=True)
  return Table({"prompt_tokens": tokens, "prompt_mask": mask}, dict(counters))


class Records(list):
  """JSONL records (dicts) that remember where each came from, so errors name `file:line`."""

  def __init__(self, records: Sequence[dict], path: str, lines: Sequence[int]):
    super().__init__(records)
    self.path, self.lines = path, list(lines)

  def where(self, i: int) -> str:
    return f"{self.path}:{self.lines[i]}"


def _where(records: Sequence[dict], i: int) -> str:
  return records.where(i) if isinstance(records, Records) else f"record {i}"


def pairs_table(records: Sequence[dict], tokenizer, max_prompt_len: int,
                max_completion_len: int) -> Table:
  """Preference pairs {prompt, chosen, rejected} (BoN data also accepts best/worst)."""
  counters = collections.Counter(examples=len(records))
  prompts, chosen, rejected = [], [], []
  for i, r in enumerate(records):
    fields = []
    for names in (("prompt",), ("chosen", "best"), ("rejected", "worst")):
      name = next((n for n in names if n in r), None)
      if name is None:
        raise ValueError(f"{_where(records, i)}: preference records need 'prompt', "
                         "'chosen'/'best' and 'rejected'/'worst' fields; missing "
                         f"{'/'.join(repr(n) for n in names)}")
      if not isinstance(r[name], str):
        raise ValueError(f"{_where(records, i)}: field {name!r} must be a string, got "
                         f"{type(r[name]).__name__}")
      fields.append(r[name])
    for column, text in zip((prompts, chosen, rejected), fields):
      column.append(text)
  cols = {}
  cols["prompt_tokens"], cols["prompt_mask"] = _encode(
      tokenizer, prompts, max_prompt_len, True, counters, "prompt", left=True)
  for name, texts in (("chosen", chosen), ("rejected", rejected)):
    cols[f"{name}_tokens"], cols[f"{name}_mask"] = _encode(
        tokenizer, texts, max_completion_len, False, counters, name, left=False)
  return Table(cols, dict(counters))


def read_jsonl(path: str) -> Records:
  """The JSON objects of a JSONL file (blank lines skipped); errors name `path:line`."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no such data file {path!r}")
  records, lines = [], []
  with open(path) as f:
    for line_no, line in enumerate(f, 1):
      if line.strip():
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{line_no}: not valid JSON ({e})") from None
        if not isinstance(record, dict):
          raise ValueError(f"{path}:{line_no}: expected a JSON object, got "
                           f"{type(record).__name__}")
        records.append(record)
        lines.append(line_no)
  if not records:
    raise ValueError(f"{path} holds no records")
  return Records(records, path, lines)


def jsonl_prompts(path: str, key: str = "prompt") -> list[str]:
  records = read_jsonl(path)
  for i, r in enumerate(records):
    if key not in r:
      raise ValueError(f"{records.where(i)}: no field {key!r} (data.prompt_key)")
    if not isinstance(r[key], str):
      raise ValueError(f"{records.where(i)}: field {key!r} must be a string, got "
                       f"{type(r[key]).__name__}")
  return [r[key] for r in records]


def tfds_prompts(name: str, split: str, key: str, data_dir: str | None = None,
                 limit: int | None = None) -> list[str]:
  """Prompt texts from a TFDS dataset through the random-access `data_source` API."""
  import tensorflow_datasets as tfds  # heavy import, only when used
  source = tfds.data_source(name, split=split, data_dir=data_dir or None)
  n = len(source) if limit is None else min(limit, len(source))
  texts = []
  for i in range(n):
    value = source[i][key]
    texts.append(value.decode("utf-8") if isinstance(value, bytes) else str(value))
  return texts
