"""scripts/train_tiny.py as a user runs it: trained, exported, loadable, rerun (resumes)."""

import json
import math
import os
import subprocess
import sys

from crosspool_jax.models.checkpoint import load_checkpoint
from crosspool_jax.models.config import tiny_config
from crosspool_jax.models.decode import generate
from crosspool_jax.models.tokenizer import load_tokenizer
from crosspool_jax.train.trainer import train_config
from tests.conftest import ROOT, get_config


def _train(workdir, *args):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "train_tiny.py"),
                         "--config=configs/train/tiny.py:smoke", "--config.family=olmoe",
                         f"--workdir={workdir}", *args],
                        capture_output=True, text=True, timeout=300, cwd=ROOT)
  return proc


def test_train_tiny_trains_exports_and_resumes(tmp_path):
  first = _train(tmp_path)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "expert-load entropy" in first.stderr and "tokens/s" in first.stderr
  summary = json.loads(first.stdout.strip().splitlines()[-1])
  assert summary["resumed_from"] is None and summary["steps"] == 6
  # 6 steps of 4 x 32 tokens: the loss falls, not yet far (the default run's figures are in
  # WORKSPACE.md).
  assert summary["heldout_before"]["code"] > math.log(256)
  assert summary["heldout_after"]["code"] < summary["heldout_before"]["code"] - 0.3
  assert os.path.exists(summary["plot"])
  history = json.loads((tmp_path / "history.json").read_text())
  assert len(history["loss"]) == 6
  cfg, params = load_checkpoint(summary["checkpoint"])
  tokenizer = load_tokenizer(summary["checkpoint"])
  (tokens,) = generate(params, cfg, [tokenizer.encode("def ").ids], max_new_tokens=4)
  assert len(tokens) == 4 and isinstance(tokenizer.decode(tokens), str)
  # The same command again finds the last checkpoint: nothing left to train, same history.
  again = _train(tmp_path)
  assert again.returncode == 0, again.stderr[-3000:]
  assert json.loads(again.stdout.strip().splitlines()[-1])["resumed_from"] == 6
  assert json.loads((tmp_path / "history.json").read_text()) == history


def test_train_tiny_names_a_bad_config_field(tmp_path):
  proc = _train(tmp_path, "--config.train.warmup_steps=6")
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      "train_tiny.py: error: train.warmup_steps must be in [0, steps=6), got 6")


def test_text_variant_is_a_valid_wider_code_model():
  config = get_config("text", ("train", "tiny.py"))
  cfg = tiny_config(config.family, **config.model)
  tc = train_config(config.train, seed=config.seed)
  assert (cfg.d_model, cfg.d_ff_expert) == (128, 128) and tc.domains == ("code",)
  assert tc.steps > get_config(None, ("train", "tiny.py")).train.steps
