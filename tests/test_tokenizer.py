"""Tokenizers: round trips, left padding, specials, and the GGUF vocabulary against transformers."""

import os

import numpy as np
import pytest

from bond import tokenizer as tokenizer_lib
from bond.tokenizer import ByteTokenizer, Tokenizer

TEXTS = ["Hello world", "Two  spaces and\nnew lines\n\n", "ünïcödé 日本語 🤖", "", "a"]


def test_byte_tokenizer_round_trip_and_ids():
  tok = ByteTokenizer()
  assert (tok.vocab_size, tok.pad_id, tok.eos_id, tok.bos_id) == (259, 0, 1, 2)
  assert tok.encode("Hi") == [2, ord("H") + 3, ord("i") + 3]
  for text in TEXTS:
    assert tok.decode(tok.encode(text)) == text


def test_batch_encode_left_pads():
  tok = ByteTokenizer()
  tokens, mask = tok.batch_encode(["abc", "a", ""])
  assert tokens.dtype == np.int32 and mask.dtype == np.bool_
  np.testing.assert_array_equal(mask, [[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]])
  np.testing.assert_array_equal(tokens, [[2, 100, 101, 102], [0, 0, 2, 100], [0, 0, 0, 2]])
  tokens, mask = tok.batch_encode(["ab"], max_len=5, add_bos=False)
  np.testing.assert_array_equal(tokens, [[0, 0, 0, 100, 101]])
  np.testing.assert_array_equal(mask, [[0, 0, 0, 1, 1]])


def test_batch_encode_too_long():
  tok = ByteTokenizer()
  with pytest.raises(ValueError, match="text 1 has 6 tokens > max_len=4"):
    tok.batch_encode(["ab", "abcde"], max_len=4)
  tokens, mask = tok.batch_encode(["ab", "abcde"], max_len=4, truncate=True)
  assert tok.decode(tokens[1]) == "cde" and tokens[1, 0] == tok.bos_id and mask[1].all()


def test_decode_skips_pad_and_bos_and_can_stop_at_eos():
  tok = ByteTokenizer()
  ids = [0, 0, 2] + tok.encode("ok", add_bos=False) + [1] + tok.encode("junk", add_bos=False)
  assert tok.decode(ids, stop_at_eos=True) == "ok"
  assert tok.decode(np.asarray(ids)).startswith("ok")


@pytest.fixture(scope="module")
def sentencepiece_path(tmp_path_factory):
  import io
  import sentencepiece as spm
  corpus = ["the quick brown fox jumps over the lazy dog", "hello world, hello again",
            "tokenizers split text into pieces", "numbers like 42 and 7"] * 20
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=buf,
                                 vocab_size=320, model_type="bpe", byte_fallback=True,
                                 minloglevel=2, pad_id=0, eos_id=1, bos_id=2, unk_id=3)
  path = tmp_path_factory.mktemp("spm") / "tok.model"
  path.write_bytes(buf.getvalue())
  return str(path)


def test_sentencepiece(sentencepiece_path):
  import sentencepiece as spm
  tok = tokenizer_lib.load(sentencepiece_path)
  reference = spm.SentencePieceProcessor(model_file=sentencepiece_path)
  assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.vocab_size) == (0, 1, 2, 320)
  for text in ["hello quick world", "the dog 42"]:
    assert tok.encode(text) == [2] + reference.encode(text)
    assert tok.decode(tok.encode(text)) == text


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory):
  """A byte-level BPE trained with `tokenizers`, saved as an HF tokenizer directory."""
  import tokenizers
  import transformers
  backend = tokenizers.Tokenizer(tokenizers.models.BPE())
  backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  backend.train_from_iterator(TEXTS * 10 + ["the quick brown fox"] * 10, trainer)
  wrapped = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                                 eos_token="<eos>", bos_token="<bos>",
                                                 unk_token="<unk>")
  path = tmp_path_factory.mktemp("hf_tok")
  wrapped.save_pretrained(path)
  return str(path), backend


@pytest.mark.parametrize("as_file", [False, True], ids=["dir", "tokenizer.json"])
def test_hf_tokenizer(hf_tokenizer_dir, as_file):
  path, backend = hf_tokenizer_dir
  tok = tokenizer_lib.load(os.path.join(path, "tokenizer.json") if as_file else path)
  specials = (tok.pad_id, tok.eos_id, tok.bos_id, tok.vocab_size)
  assert specials == (0, 1, 2, backend.get_vocab_size())
  for text in TEXTS + ["the quick brown fox"]:
    assert tok.encode(text) == [2] + backend.encode(text, add_special_tokens=False).ids
    assert tok.decode(tok.encode(text) + [1], stop_at_eos=True) == text
  tokens, mask = tok.batch_encode(["the quick", "fox"])
  assert tokens[1, 0] == tok.pad_id and not mask[1, 0] and mask[0].all()


def test_missing_files_raise(tmp_path):
  with pytest.raises(FileNotFoundError, match="SentencePiece"):
    Tokenizer.from_sentencepiece(str(tmp_path / "nope.model"))
  with pytest.raises(FileNotFoundError, match="HF tokenizer"):
    Tokenizer.from_hf(str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match="GGUF"):
    Tokenizer.from_gguf(str(tmp_path / "nope.gguf"))


GGUF_TEXTS = [
    "The capital of France is", "Hello, world!  Two  spaces   three.", "  leading", "trailing  ",
    "Numbers 1234567 and 3.14159", "Tabs\tand\nnewlines\n\n\nend", "Emoji 🤖🎉 ünïcödé 日本語",
    "<start_of_turn>user\nWrite a poem<end_of_turn>\n<start_of_turn>model\n",
    "def f(x):\n    return x**2  # comment", "supercalifragilisticexpialidocious", "   ", ""]


@pytest.mark.slow
def test_gguf_tokenizer_matches_transformers():
  import transformers
  from bond import assets
  path = assets.gemma3_270m_gguf_path()
  tok = tokenizer_lib.load(path)
  reference = transformers.AutoTokenizer.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path))
  assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.vocab_size) == (
      reference.pad_token_id, reference.eos_token_id, reference.bos_token_id, 262_144)
  for text in GGUF_TEXTS:
    ids = tok.encode(text)
    assert ids == reference(text)["input_ids"], text
    assert tok.decode(ids) == text
  ids = np.random.default_rng(0).integers(4, tok.vocab_size, 300)
  assert tok.decode(ids) == reference.decode(ids)
