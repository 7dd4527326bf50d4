"""Shared fixtures: tiny HF checkpoints written once per session with transformers."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
  """Returns a function family -> directory of a tiny random HF checkpoint (cached)."""
  from scripts.make_tiny_checkpoint import make_tiny_checkpoint

  made: dict[tuple, str] = {}

  def get(family: str, num_shards: int = 1, **overrides) -> str:
    key = (family, num_shards, tuple(sorted(overrides.items())))
    if key not in made:
      out = tmp_path_factory.mktemp(f"ckpt_{family}")
      made[key] = make_tiny_checkpoint(family, str(out), num_shards=num_shards, **overrides)
    return made[key]

  return get
