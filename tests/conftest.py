"""Shared fixtures: tiny HF checkpoints written once per session with transformers."""

from __future__ import annotations

import gc
import importlib.util
import os
import sys

import jax
import pytest

# Several CPU devices for multi-device tests (KV spread, pools on device groups). Must run
# before any JAX computation; single-device code keeps using device 0.
jax.config.update("jax_num_cpu_devices", 4)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops JAX's compilation caches after each test module. Every XLA:CPU executable keeps a
  few memory mappings of its code, and the whole suite in one process (`-p no:xdist`) would
  otherwise pass the kernel's map-count limit (vm.max_map_count, 65530 by default) and crash
  inside a compilation."""
  yield
  jax.clear_caches()
  gc.collect()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
  """Returns a function family -> directory of a tiny random HF checkpoint (cached)."""
  from scripts.make_tiny_checkpoint import make_tiny_checkpoint

  made: dict[tuple, str] = {}

  def get(family: str, num_shards: int = 1, **overrides) -> str:
    key = (family, num_shards, repr(sorted(overrides.items())))
    if key not in made:
      out = tmp_path_factory.mktemp(f"ckpt_{family}")
      made[key] = make_tiny_checkpoint(family, str(out), num_shards=num_shards, **overrides)
    return made[key]

  return get


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory):
  """Returns a function family -> directory of a tiny model trained 10 steps on the stdlib
  corpus (weights moved away from their init; routing skewed) and exported as an HF
  checkpoint (cached)."""
  from crosspool_jax.models.config import tiny_config
  from crosspool_jax.models.model import init_params
  from crosspool_jax.train.corpus import build_corpus
  from crosspool_jax.train.export import export_model
  from crosspool_jax.train.trainer import TrainConfig, train

  made: dict[str, str] = {}
  tc = TrainConfig(steps=10, batch_size=4, seq_len=32, learning_rate=3e-3, warmup_steps=1,
                   eval_every=10, eval_batches=1, log_every=10)

  def get(family: str) -> str:
    if family not in made:
      cfg = tiny_config(family)
      corpus = build_corpus(seed=0, max_bytes=20_000, heldout_fraction=0.1,
                            vocab_size=cfg.vocab_size)
      result = train(cfg, init_params(cfg, seed=0), corpus, tc, log=lambda _: None)
      made[family] = export_model(tmp_path_factory.mktemp(f"trained_{family}"), cfg,
                                  result.params)
    return made[family]

  return get


def get_config(arg, path=("train", "fleet.py")):
  """A config file's config (default configs/train/fleet.py), loaded as the scripts load it."""
  spec = importlib.util.spec_from_file_location("config", os.path.join(ROOT, "configs", *path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)
