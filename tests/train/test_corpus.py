"""The stdlib corpus: a module splits into code, docstrings and comments; the corpus is a
function of its seed."""

import numpy as np
import pytest

from crosspool_jax.models.tokenizer import byte_level_tokenizer
from crosspool_jax.train.corpus import build_corpus, sample_windows, split_source

SOURCE = '''\
#!/usr/bin/env python3
"""Module doc."""

import os  # the os module


class A:
  """Class doc,
  on two lines."""

  # A comment block
  # of two lines.
  def f(self):
    \'\'\'Function doc.\'\'\'
    return "# not a comment"
'''


def test_split_source_by_hand():
  parts = split_source(SOURCE)
  assert parts["docstrings"] == "Module doc.\n\nClass doc,\non two lines.\n\nFunction doc."
  assert parts["comments"] == ("!/usr/bin/env python3\nthe os module\n"
                               "A comment block of two lines.")
  # Comments and docstrings cut out; runs of blank lines kept as one.
  assert parts["code"] == ('import os\n\nclass A:\n\n  def f(self):\n'
                           '    return "# not a comment"')
  assert split_source("def broken(:\n") is None


def test_corpus_is_a_function_of_its_seed():
  kwargs = dict(max_bytes=20_000, heldout_fraction=0.2, vocab_size=512)
  first, second = build_corpus(seed=1, **kwargs), build_corpus(seed=1, **kwargs)
  other = build_corpus(seed=2, **kwargs)
  for split in ("train", "heldout"):
    for domain, tokens in getattr(first, split).items():
      np.testing.assert_array_equal(tokens, getattr(second, split)[domain])
      assert not np.array_equal(tokens[:500], getattr(other, split)[domain][:500])
  summary = first.summary()
  assert 0 < summary["heldout_modules"] < summary["modules"]
  for domain in ("code", "docstrings", "comments"):
    # Every domain fills its bytes: 80 % train, 20 % held out (one token a byte, plus `</s>`s).
    assert 16_000 <= summary["train_tokens"][domain] < 16_100
    assert 4_000 <= summary["heldout_tokens"][domain] < 4_100
  text = byte_level_tokenizer(512).decode(first.train["docstrings"][:2000].tolist())
  assert sum(c.isalpha() or c.isspace() for c in text) > 0.9 * len(text)  # English prose


def test_windows_and_bad_arguments():
  corpus = build_corpus(seed=0, max_bytes=5_000, heldout_fraction=0.2, vocab_size=512,
                        domains=("code",))
  windows = sample_windows(corpus.train, ("code",), batch=3, length=16,
                           rng=np.random.default_rng(0))
  assert windows.shape == (3, 17) and windows.dtype == np.int32
  with pytest.raises(ValueError, match="fewer than a window of 100001"):
    sample_windows(corpus.train, ("code",), batch=1, length=100_000,
                   rng=np.random.default_rng(0))
  with pytest.raises(ValueError, match="corpus domains must be a non-empty subset"):
    build_corpus(seed=0, max_bytes=5_000, heldout_fraction=0.2, vocab_size=512,
                 domains=("poetry",))
  with pytest.raises(ValueError, match=r"corpus heldout_fraction must be in \(0, 1\)"):
    build_corpus(seed=0, max_bytes=5_000, heldout_fraction=1.0, vocab_size=512)
