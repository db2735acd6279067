"""Text <-> token ids with explicit pad/bos/eos, and left-padded batches for generation.

Backends: a SentencePiece model (`.model` file, or the vocabulary inside a Gemma GGUF), an HF
`tokenizers` tokenizer (`tokenizer.json` or an HF directory), and a byte-level tokenizer for
toy tasks. `load(path)` picks the backend from the path.

Shapes: B batch, P padded prompt length.
"""

from __future__ import annotations

import abc
import os
from typing import Sequence

import numpy as np


class Tokenizer(abc.ABC):
  """Common interface: `encode`, `decode`, `batch_encode` and the special ids."""

  def __init__(self, vocab_size: int, pad_id: int, bos_id: int, eos_id: int):
    self._vocab_size, self._pad_id, self._bos_id, self._eos_id = vocab_size, pad_id, bos_id, eos_id

  @property
  def vocab_size(self) -> int:
    return self._vocab_size

  @property
  def pad_id(self) -> int:
    return self._pad_id

  @property
  def bos_id(self) -> int:
    return self._bos_id

  @property
  def eos_id(self) -> int:
    return self._eos_id

  @abc.abstractmethod
  def _encode(self, text: str) -> list[int]:
    """Ids of `text`, no specials added."""

  @abc.abstractmethod
  def _decode(self, ids: list[int]) -> str:
    """Text of `ids` (pad and bos already removed)."""

  def encode(self, text: str, add_bos: bool = True) -> list[int]:
    return ([self.bos_id] if add_bos else []) + self._encode(text)

  def decode(self, ids: Sequence[int], stop_at_eos: bool = False) -> str:
    """Text of `ids`, skipping pad and bos; with `stop_at_eos`, ends before the first eos."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    if stop_at_eos and self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    return self._decode([i for i in ids if i not in (self.pad_id, self.bos_id)])

  def batch_encode(self, texts: Sequence[str], max_len: int | None = None, add_bos: bool = True,
                   truncate: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded batch: tokens int32 [B, P] (pad_id on the left) and mask bool [B, P].

    P = `max_len` if given, else the longest sequence. A longer sequence is an error unless
    `truncate`, which keeps bos and the last tokens (the end of a prompt carries the request).
    """
    seqs = [self.encode(t, add_bos) for t in texts]
    width = max_len if max_len is not None else max((len(s) for s in seqs), default=0)
    tokens = np.full((len(seqs), width), self.pad_id, np.int32)
    mask = np.zeros((len(seqs), width), np.bool_)
    for b, seq in enumerate(seqs):
      if len(seq) > width:
        if not truncate:
          raise ValueError(f"text {b} has {len(seq)} tokens > max_len={width}; "
                           "pass truncate=True or a larger max_len")
        keep = width - add_bos
        seq = seq[:add_bos] + (seq[len(seq) - keep:] if keep > 0 else [])
        seq = seq[:width]
      if seq:
        tokens[b, width - len(seq):] = seq
        mask[b, width - len(seq):] = True
    return tokens, mask

  @staticmethod
  def from_sentencepiece(path: str) -> "SentencePieceTokenizer":
    import sentencepiece as spm
    if not os.path.isfile(path):
      raise FileNotFoundError(f"no SentencePiece model at {path!r}")
    return SentencePieceTokenizer(spm.SentencePieceProcessor(model_file=path))

  @staticmethod
  def from_hf(path_or_dir: str) -> "HFTokenizer":
    """From an HF tokenizer directory, or a `tokenizer.json` in one (AutoTokenizer, offline).

    The directory's `tokenizer_config.json` names the special tokens a bare file lacks.
    """
    import transformers
    path = os.path.dirname(path_or_dir) if os.path.isfile(path_or_dir) else path_or_dir
    if not os.path.isdir(path):
      raise FileNotFoundError(f"no HF tokenizer directory or tokenizer.json at {path_or_dir!r}")
    return HFTokenizer(transformers.AutoTokenizer.from_pretrained(path, local_files_only=True))

  @staticmethod
  def from_gguf(path: str) -> "SentencePieceTokenizer":
    """The SentencePiece (BPE, byte fallback) vocabulary stored in a Gemma GGUF file."""
    import sentencepiece as spm
    proto = _gguf_sentencepiece_proto(path)
    return SentencePieceTokenizer(spm.SentencePieceProcessor(model_proto=proto))


class SentencePieceTokenizer(Tokenizer):

  def __init__(self, sp):
    if min(sp.pad_id(), sp.bos_id(), sp.eos_id()) < 0:
      raise ValueError(f"SentencePiece model must define pad, bos and eos; got pad={sp.pad_id()} "
                       f"bos={sp.bos_id()} eos={sp.eos_id()}")
    super().__init__(sp.get_piece_size(), sp.pad_id(), sp.bos_id(), sp.eos_id())
    self.sp = sp

  def _encode(self, text: str) -> list[int]:
    return self.sp.encode(text)

  def _decode(self, ids: list[int]) -> str:
    return self.sp.decode(ids)


class HFTokenizer(Tokenizer):
  """Wraps a transformers fast tokenizer; pad falls back to eos when the tokenizer has none."""

  def __init__(self, tok):
    if tok.bos_token_id is None or tok.eos_token_id is None:
      raise ValueError(f"HF tokenizer must define bos and eos tokens; got bos={tok.bos_token_id} "
                       f"eos={tok.eos_token_id}")
    pad = tok.eos_token_id if tok.pad_token_id is None else tok.pad_token_id
    super().__init__(len(tok), pad, tok.bos_token_id, tok.eos_token_id)
    self.tok = tok

  def _encode(self, text: str) -> list[int]:
    return self.tok(text, add_special_tokens=False)["input_ids"]

  def _decode(self, ids: list[int]) -> str:
    return self.tok.decode(ids)


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes shifted past the specials: pad 0, eos 1, bos 2, byte b -> b + 3 (V = 259)."""

  OFFSET = 3

  def __init__(self):
    super().__init__(256 + self.OFFSET, pad_id=0, bos_id=2, eos_id=1)

  def _encode(self, text: str) -> list[int]:
    return [b + self.OFFSET for b in text.encode("utf-8")]

  def _decode(self, ids: list[int]) -> str:
    return bytes(i - self.OFFSET for i in ids if i >= self.OFFSET).decode("utf-8", "replace")


def _gguf_sentencepiece_proto(path: str) -> bytes:
  """Serialized SentencePiece ModelProto from a GGUF's `tokenizer.ggml.*` metadata.

  GGUF token types use SentencePiece's numbering. Two Gemma specifics, as in transformers'
  GGUF `gemma_tokenizer`: tokens made of 2+ spaces are stored with real spaces (SentencePiece
  spells them with U+2581), and control tokens other than pad/eos/bos/unk (e.g.
  `<start_of_turn>`) are matched in text, so they become user-defined pieces here.
  """
  from sentencepiece import sentencepiece_model_pb2 as pb

  from bond.models import gguf_file

  fields = gguf_file.read(path).fields
  if fields.get("tokenizer.ggml.model") != "llama":
    raise ValueError(f"GGUF tokenizer model {fields.get('tokenizer.ggml.model')!r} is not "
                     "a SentencePiece ('llama') vocabulary")
  tokens = fields["tokenizer.ggml.tokens"]
  ids = {k: int(fields[f"tokenizer.ggml.{k}_token_id"])
         for k in ("unknown", "bos", "eos", "padding")}
  proto = pb.ModelProto()
  spec = proto.trainer_spec
  spec.model_type = pb.TrainerSpec.BPE
  spec.byte_fallback = True
  # SentencePiece finds its specials by piece name, so the names must match the ids.
  spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = (
      ids["unknown"], ids["bos"], ids["eos"], ids["padding"])
  spec.unk_piece, spec.bos_piece, spec.eos_piece, spec.pad_piece = (
      tokens[ids["unknown"]], tokens[ids["bos"]], tokens[ids["eos"]], tokens[ids["padding"]])
  norm = proto.normalizer_spec
  norm.name = "identity"
  norm.add_dummy_prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", False))
  norm.remove_extra_whitespaces = False
  norm.escape_whitespaces = True
  control = pb.ModelProto.SentencePiece.CONTROL
  specials = set(ids.values())
  for i, (token, score, kind) in enumerate(zip(tokens, fields["tokenizer.ggml.scores"].tolist(),
                                               fields["tokenizer.ggml.token_type"].tolist())):
    piece = proto.pieces.add()
    piece.piece = "\u2581" * len(token) if token and not token.strip(" ") else token
    piece.score = score
    piece.type = pb.ModelProto.SentencePiece.USER_DEFINED if (
        kind == control and i not in specials) else kind
  return proto.SerializeToString()


def load(path: str) -> Tokenizer:
  """Tokenizer for `path`: `.gguf`, SentencePiece `.model`, `tokenizer.json` or an HF directory."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"no tokenizer at {path!r}: expected a .gguf file, a SentencePiece "
                            ".model, a tokenizer.json or an HF tokenizer directory")
  if path.endswith(".gguf"):
    return Tokenizer.from_gguf(path)
  if path.endswith(".model"):
    return Tokenizer.from_sentencepiece(path)
  return Tokenizer.from_hf(path)
