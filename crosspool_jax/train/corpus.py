"""A text corpus every machine has without a network: the Python standard library's sources.

Each stdlib module (`*.py` under `sysconfig`'s stdlib directory; site-packages and the test
suites, which some installs leave out, excluded) is split into three domains:

- "code": the source without its comments and docstrings;
- "docstrings": its module, class and function docstrings (English prose, cleaned);
- "comments": its comments, a block of consecutive comment lines as one paragraph.

`build_corpus` draws modules in a seeded order, sends each module (all three of its domains)
to the held-out split with probability `heldout_fraction`, until each split of each domain
holds its share of `max_bytes` (held-out: `heldout_fraction` of it), and encodes the text with
the byte-level tokenizer, one document per module and domain, each ended by `</s>`. Nothing
is downloaded or written: the corpus is rebuilt from the seed on every run (the same seed
gives the same corpus on the same Python version).
"""

from __future__ import annotations

import ast
import dataclasses
import io
import os
import sysconfig
import tokenize

import numpy as np

from crosspool_jax.models.tokenizer import SPECIAL_TOKENS, byte_level_tokenizer

DOMAINS = ("code", "docstrings", "comments")
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_files() -> list[str]:
  """The standard library's `*.py` files (sorted paths), without site-packages and tests."""
  root = sysconfig.get_paths()["stdlib"]
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
    found.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
  if not found:
    raise FileNotFoundError(f"no Python sources under the standard library directory {root}")
  return sorted(found)


def split_source(source: str) -> dict[str, str] | None:
  """The text of each domain of one Python source (DOMAINS), or None if it does not parse."""
  try:
    tree = ast.parse(source)
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
  except (SyntaxError, ValueError, tokenize.TokenError):
    return None
  docstrings, docstring_lines = [], set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      text = ast.get_docstring(node, clean=True)
      if text:
        expr = node.body[0]
        docstrings.append((expr.lineno, text))
        docstring_lines.update(range(expr.lineno, expr.end_lineno + 1))
  lines = source.splitlines()
  comment_start: dict[int, int] = {}  # line number -> column of its comment
  blocks: list[list[str]] = []
  last_comment_line = None
  for tok in tokens:
    if tok.type != tokenize.COMMENT:
      continue
    row, col = tok.start
    comment_start[row] = col
    text = tok.string.lstrip("#").strip()
    if not text:
      continue
    if last_comment_line == row - 1 and blocks:
      blocks[-1].append(text)
    else:
      blocks.append([text])
    last_comment_line = row
  code = []
  for row, line in enumerate(lines, start=1):
    if row in docstring_lines:
      continue
    if row in comment_start:
      line = line[:comment_start[row]].rstrip()
      if not line:
        continue
    if line.strip() or (code and code[-1]):
      code.append(line.rstrip())
  return {"code": "\n".join(code).strip("\n"),
          "docstrings": "\n\n".join(text for _, text in sorted(docstrings)),
          "comments": "\n".join(" ".join(block) for block in blocks)}


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Token streams of each domain: `train[domain]`, `heldout[domain]` (int32, documents ended
  by the `</s>` id), and what they were built from."""

  train: dict[str, np.ndarray]
  heldout: dict[str, np.ndarray]
  seed: int
  modules: int
  heldout_modules: int

  def summary(self) -> dict:
    """Token counts per split and domain, the seed and module counts (JSON-able)."""
    return {"seed": self.seed, "modules": self.modules, "heldout_modules": self.heldout_modules,
            "train_tokens": {d: int(a.size) for d, a in self.train.items()},
            "heldout_tokens": {d: int(a.size) for d, a in self.heldout.items()}}


def build_corpus(*, seed: int, max_bytes: int, heldout_fraction: float, vocab_size: int,
                 domains: tuple[str, ...] = DOMAINS) -> Corpus:
  """The stdlib corpus of `domains` (module docstring), built from `seed`.

  Args:
    seed: the order modules are drawn in and which are held out.
    max_bytes: bytes of text per domain, train and held-out together (`heldout_fraction` of
      them held out); the last document of a split and domain is cut to fit.
    heldout_fraction: probability that a module goes to the held-out split, in (0, 1).
    vocab_size: the model's vocabulary (the byte-level tokenizer's size).
    domains: which of DOMAINS to build.

  Raises:
    ValueError: an unknown domain, a non-positive `max_bytes`, a fraction outside (0, 1), or a
      split of some domain left empty (too few bytes for the fraction).
  """
  unknown = [d for d in domains if d not in DOMAINS]
  if unknown or not domains:
    raise ValueError(f"corpus domains must be a non-empty subset of {DOMAINS}, got {domains}")
  if max_bytes <= 0:
    raise ValueError(f"corpus max_bytes must be > 0, got {max_bytes}")
  if not 0 < heldout_fraction < 1:
    raise ValueError(f"corpus heldout_fraction must be in (0, 1), got {heldout_fraction}")
  files = stdlib_files()
  rng = np.random.default_rng(seed)
  docs = {split: {d: [] for d in domains} for split in ("train", "heldout")}
  heldout_bytes = max(1, round(max_bytes * heldout_fraction))
  left = {"train": dict.fromkeys(domains, max_bytes - heldout_bytes),
          "heldout": dict.fromkeys(domains, heldout_bytes)}
  modules = heldout_modules = 0
  for index in rng.permutation(len(files)):
    if not any(n for by_domain in left.values() for n in by_domain.values()):
      break
    split = "heldout" if rng.random() < heldout_fraction else "train"
    if not any(left[split].values()):
      continue
    try:
      with open(files[index], encoding="utf-8") as f:
        parts = split_source(f.read())
    except (UnicodeDecodeError, OSError):
      continue
    if parts is None:
      continue
    modules += 1
    heldout_modules += split == "heldout"
    for domain in domains:
      text = parts[domain].encode("utf-8")[:left[split][domain]].decode("utf-8", errors="ignore")
      if text:
        docs[split][domain].append(text)
        left[split][domain] -= len(text.encode("utf-8"))
  tokenizer = byte_level_tokenizer(vocab_size)
  eos = tokenizer.token_to_id(SPECIAL_TOKENS[2])
  streams = {}
  for split, by_domain in docs.items():
    streams[split] = {}
    for domain, texts in by_domain.items():
      if not texts:
        raise ValueError(f"the {split} split of domain {domain!r} is empty: raise corpus "
                         f"max_bytes ({max_bytes}) or move heldout_fraction "
                         f"({heldout_fraction}) away from 0 and 1")
      ids = [np.asarray([*e.ids, eos], np.int32) for e in tokenizer.encode_batch(texts)]
      streams[split][domain] = np.concatenate(ids)
  return Corpus(train=streams["train"], heldout=streams["heldout"], seed=seed,
                modules=modules, heldout_modules=heldout_modules)


def sample_windows(streams: dict[str, np.ndarray], domains: tuple[str, ...], *, batch: int,
                   length: int, rng: np.random.Generator) -> np.ndarray:
  """[batch, length + 1] int32 windows: each row's domain drawn uniformly from `domains`, then a
  uniformly random window of that domain's stream."""
  rows_B = rng.integers(0, len(domains), batch)
  out = np.empty((batch, length + 1), np.int32)
  for b, d in enumerate(rows_B):
    stream = streams[domains[d]]
    if stream.size < length + 1:
      raise ValueError(f"domain {domains[d]!r} has {stream.size} tokens, fewer than a window "
                       f"of {length + 1}: raise corpus max_bytes or lower seq_len")
    start = rng.integers(0, stream.size - length)
    out[b] = stream[start:start + length + 1]
  return out
