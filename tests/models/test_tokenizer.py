"""The byte-level tokenizer: text round-trips byte for byte, the vocabulary is the model's."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crosspool_jax.models.config import FAMILIES, tiny_config
from crosspool_jax.models.tokenizer import (
  MIN_VOCAB_SIZE,
  SPECIAL_TOKENS,
  byte_level_tokenizer,
  load_tokenizer,
  save_tokenizer,
)

TOKENIZER = byte_level_tokenizer(tiny_config("mixtral").vocab_size)


@pytest.mark.parametrize("text", ["Hello", "héllo wörld — 日本語 🙂", "  two\n\tlines  ", ""])
def test_text_round_trips_one_id_per_byte(text):
  ids = TOKENIZER.encode(text).ids
  assert len(ids) == len(text.encode("utf-8"))
  assert all(len(SPECIAL_TOKENS) <= i < MIN_VOCAB_SIZE for i in ids)  # byte tokens only
  assert TOKENIZER.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(st.text().filter(lambda t: not any(s in t for s in SPECIAL_TOKENS)))
def test_any_text_round_trips(text):
  assert TOKENIZER.decode(TOKENIZER.encode(text).ids) == text


@pytest.mark.parametrize("vocab_size", [MIN_VOCAB_SIZE, 512, 1000])
def test_vocab_is_the_models_and_every_id_decodes(vocab_size):
  tok = byte_level_tokenizer(vocab_size)
  assert tok.get_vocab_size() == vocab_size
  assert sorted(tok.get_vocab().values()) == list(range(vocab_size))
  assert [tok.id_to_token(i) for i in range(len(SPECIAL_TOKENS))] == list(SPECIAL_TOKENS)
  for i in range(vocab_size):
    assert tok.decode([i], skip_special_tokens=False), i
    if i >= len(SPECIAL_TOKENS):
      assert tok.decode([i]), i
  if vocab_size > MIN_VOCAB_SIZE:
    assert tok.decode([vocab_size - 1]) == f"<unused_{vocab_size - 1 - MIN_VOCAB_SIZE}>"


def test_every_tiny_config_has_room_for_it():
  for family in FAMILIES:
    vocab_size = tiny_config(family).vocab_size
    assert byte_level_tokenizer(vocab_size).get_vocab_size() == vocab_size


def test_too_small_vocab_is_rejected():
  with pytest.raises(ValueError, match=f"vocab_size {MIN_VOCAB_SIZE - 1} cannot hold"):
    byte_level_tokenizer(MIN_VOCAB_SIZE - 1)


def test_save_then_load(tmp_path):
  assert load_tokenizer(tmp_path) is None
  path = save_tokenizer(TOKENIZER, tmp_path)
  assert path == str(tmp_path / "tokenizer.json")
  loaded = load_tokenizer(tmp_path)
  assert loaded.get_vocab() == TOKENIZER.get_vocab()
  text = "saved and loaded: ü"
  assert loaded.encode(text).ids == TOKENIZER.encode(text).ids
  assert loaded.decode(TOKENIZER.encode(text).ids) == text
