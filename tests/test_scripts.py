"""The absl scripts end to end, as a user runs them (subprocesses)."""

import json
import os
import subprocess
import sys

import pytest

from crosspool_jax.models.config import tiny_config
from crosspool_jax.models.decode import generate
from crosspool_jax.models.model import init_params
from tests.conftest import ROOT


def _run(script, *args):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", script), *args],
                        capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_generate_random_tiny_model_matches_library():
  out = _run("generate.py", "--family=olmoe", "--prompt_ids=1,2,3", "--max_new_tokens=6",
             "--stop_at_eos=false", "--seed=5")
  cfg = tiny_config("olmoe")
  expected = generate(init_params(cfg, seed=5), cfg, [[1, 2, 3]], max_new_tokens=6)
  assert out == {"tokens": expected[0]}


def test_generate_from_hf_then_orbax_gives_same_tokens(tiny_checkpoint, tmp_path):
  hf_dir = tiny_checkpoint("qwen3_moe")
  args = ["--prompt=hello pools", "--max_new_tokens=8", "--temperature=0.9", "--top_p=0.9",
          "--seed=4", "--stop_at_eos=false"]
  from_hf = _run("generate.py", f"--checkpoint={hf_dir}", *args)
  assert len(from_hf["tokens"]) == 8 and isinstance(from_hf["text"], str)
  converted = _run("convert_checkpoint.py", f"--checkpoint={hf_dir}", f"--out={tmp_path}/o")
  assert converted["family"] == "qwen3_moe"
  from_orbax = _run("generate.py", f"--checkpoint={tmp_path}/o", *args)
  assert from_orbax == from_hf


def test_generate_rejects_bad_flags():
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "generate.py"),
                         "--prompt_ids=1,x"], capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and "--prompt_ids must be comma-separated integers" in proc.stderr


@pytest.mark.parametrize("family", ["mixtral"])
def test_make_tiny_checkpoint_cli(tmp_path, family):
  out = _run("make_tiny_checkpoint.py", f"--family={family}", f"--out={tmp_path}/c",
             "--override=num_layers=3")
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(out["files"])
  assert json.loads((tmp_path / "c" / "config.json").read_text())["num_hidden_layers"] == 3
