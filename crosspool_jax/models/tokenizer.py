"""The byte-level tokenizer of the tiny random models, and a checkpoint's `tokenizer.json`.

`byte_level_tokenizer(vocab_size)` has exactly `vocab_size` tokens and every id decodes to a
non-empty string: ids 0-2 are the special tokens, 3-258 the 256 bytes (GPT-2's byte-level
alphabet, no merges, so any text encodes and decodes back byte for byte), the rest fillers
`<unused_N>` that encoding never produces, so a random model's sampled ids still decode.
"""

from __future__ import annotations

import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
NUM_BYTE_TOKENS = 256
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + NUM_BYTE_TOKENS
TOKENIZER_FILE = "tokenizer.json"


def byte_level_tokenizer(vocab_size: int) -> Tokenizer:
  """The byte-level tokenizer of `vocab_size` tokens (see the module docstring).

  Args:
    vocab_size: the model's vocabulary size, at least MIN_VOCAB_SIZE (3 + 256).

  Returns:
    A `tokenizers.Tokenizer` whose vocabulary size is `vocab_size`.
  """
  if vocab_size < MIN_VOCAB_SIZE:
    raise ValueError(f"vocab_size {vocab_size} cannot hold the byte-level tokenizer's "
                     f"{MIN_VOCAB_SIZE} tokens ({len(SPECIAL_TOKENS)} special + "
                     f"{NUM_BYTE_TOKENS} bytes)")
  tokens = [*SPECIAL_TOKENS, *sorted(pre_tokenizers.ByteLevel.alphabet()),
            *(f"<unused_{i}>" for i in range(vocab_size - MIN_VOCAB_SIZE))]
  tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[]))
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
  return tokenizer


def save_tokenizer(tokenizer: Tokenizer, checkpoint_dir: str | os.PathLike) -> str:
  """Writes `tokenizer` as the checkpoint directory's `tokenizer.json`; returns its path."""
  path = os.path.join(os.fspath(checkpoint_dir), TOKENIZER_FILE)
  tokenizer.save(path)
  return path


def load_tokenizer(checkpoint_dir: str | os.PathLike) -> Tokenizer | None:
  """The checkpoint directory's `tokenizer.json`, or None when it has none."""
  path = os.path.join(os.fspath(checkpoint_dir), TOKENIZER_FILE)
  return Tokenizer.from_file(path) if os.path.exists(path) else None
