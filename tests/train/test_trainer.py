"""Training: the loss falls below the byte-uniform level, a seed fixes the run, and a run
resumed from its orbax checkpoint is the uninterrupted run, bit for bit."""

import math

import jax
import numpy as np
import pytest

from crosspool_jax.models.config import tiny_config
from crosspool_jax.models.model import init_params
from crosspool_jax.train.corpus import build_corpus
from crosspool_jax.train.trainer import TrainConfig, optimizer, train, train_config

CFG = tiny_config("qwen3_moe")
SHORT = TrainConfig(steps=4, batch_size=4, seq_len=32, learning_rate=3e-3, warmup_steps=1,
                    domains=("code", "docstrings"), eval_every=2, eval_batches=1, log_every=1,
                    checkpoint_every=2, seed=3)


@pytest.fixture(scope="module")
def corpus():
  return build_corpus(seed=0, max_bytes=40_000, heldout_fraction=0.1, vocab_size=CFG.vocab_size,
                      domains=("code", "docstrings"))


def _assert_same(a, b):
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
  assert a.history == b.history


def test_same_seed_same_run_other_seed_other_run(corpus):
  params = init_params(CFG, seed=0)
  first = train(CFG, params, corpus, SHORT, log=lambda _: None)
  second = train(CFG, params, corpus, SHORT, log=lambda _: None)
  _assert_same(first, second)
  assert len(first.history["loss"]) == 4 and len(first.history["eval"]) == 3
  other = train(CFG, params, corpus, train_config(vars(SHORT), seed=4), log=lambda _: None)
  assert other.history["loss"] != first.history["loss"]


def test_resume_from_checkpoint_equals_uninterrupted_run(corpus, tmp_path):
  params = init_params(CFG, seed=0)
  whole = train(CFG, params, corpus, SHORT, workdir=str(tmp_path / "whole"), log=lambda _: None)
  part = train(CFG, params, corpus, SHORT, workdir=str(tmp_path / "cut"), stop_at=3,
               log=lambda _: None)
  assert len(part.history["loss"]) == 3 and part.resumed_from is None
  lines = []
  resumed = train(CFG, params, corpus, SHORT, workdir=str(tmp_path / "cut"), log=lines.append)
  assert resumed.resumed_from == 3 and "resumed from the checkpoint of step 3" in lines[0]
  _assert_same(whole, resumed)


def test_training_lowers_heldout_loss_below_log_256(corpus):
  tc = train_config(vars(SHORT), steps=40, batch_size=8, seq_len=64, warmup_steps=4,
                    eval_every=40, checkpoint_every=0)
  result = train(CFG, init_params(CFG, seed=0), corpus, tc, log=lambda _: None)
  before, after = result.history["eval"][0], result.history["eval"][-1]
  for domain in tc.domains:
    assert before[domain] > math.log(256)  # an untrained model: ~log(vocab)
    assert after[domain] < math.log(256) - 1.0, (before, after)


def test_experts_only_fine_tune_changes_only_experts(corpus):
  params = init_params(CFG, seed=0)
  tc = train_config(vars(SHORT), steps=2, trainable="experts", checkpoint_every=0)
  tuned = train(CFG, params, corpus, tc, log=lambda _: None).params
  for i, layer in tuned["layers"].items():
    for name, value in layer["ffn"].items():
      changed = not np.array_equal(value, params["layers"][i]["ffn"][name])
      assert changed == (name in ("w_gate_EDF", "w_up_EDF", "w_down_EFD")), name
  np.testing.assert_array_equal(tuned["embed_VD"], params["embed_VD"])


def test_bad_config_names_the_field():
  with pytest.raises(ValueError, match=r"train.warmup_steps must be in \[0, steps=4\)"):
    train_config(vars(SHORT), warmup_steps=4)
  with pytest.raises(ValueError, match=r"unknown train config field\(s\) \['lr'\]"):
    train_config({"lr": 1.0})
  with pytest.raises(ValueError, match="train.trainable must be one of"):
    train_config(vars(SHORT), trainable="router")
  # Only the schedule differs: one transformation, one compiled step.
  assert optimizer(SHORT) is optimizer(train_config(vars(SHORT), seed=9, steps=50,
                                                    learning_rate=1e-4))
