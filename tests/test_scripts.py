"""The absl scripts end to end, as a user runs them (subprocesses)."""

import json
import os
import struct
import subprocess
import sys
import textwrap

import pytest

from crosspool_jax.models.checkpoint import save_params
from crosspool_jax.models.config import tiny_config, to_hf_config
from crosspool_jax.models.decode import generate
from crosspool_jax.models.model import init_params
from crosspool_jax.models.tokenizer import byte_level_tokenizer, load_tokenizer
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
  assert out == {"tokens": expected[0],
                 "text": byte_level_tokenizer(cfg.vocab_size).decode(expected[0])}


def test_generate_random_tiny_model_from_text():
  out = _run("generate.py", "--family=mixtral", "--prompt=Hello", "--max_new_tokens=4")
  assert 1 <= len(out["tokens"]) <= 4
  assert out["text"] and out["text"] == byte_level_tokenizer(
      tiny_config("mixtral").vocab_size).decode(out["tokens"])


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
  config = json.loads((tmp_path / "c" / "config.json").read_text())
  assert config["num_hidden_layers"] == 3
  assert load_tokenizer(tmp_path / "c").get_vocab_size() == config["vocab_size"]



def _fails(script, *args):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", script), *args],
                        capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert proc.returncode != 0, proc.stdout[-2000:]
  return proc.stderr


def _write_config(checkpoint_dir, **changes):
  hf = to_hf_config(tiny_config("mixtral")) | changes
  (checkpoint_dir / "config.json").write_text(json.dumps(hf))


def _empty_checkpoint(d):
  return "generate.py", f"--checkpoint={d}", "--prompt_ids=1"


def _truncated_safetensors(d):
  """config.json and a model.safetensors cut short: its one tensor ends past the file's end."""
  _write_config(d)
  header = json.dumps({"embed": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})
  blob = struct.pack("<Q", len(header)) + header.encode() + bytes(8)  # 8 of the 16 data bytes
  (d / "model.safetensors").write_bytes(blob)
  return "generate.py", f"--checkpoint={d}", "--prompt_ids=1"


def _unsupported_model_type(d):
  _write_config(d, model_type="llama")
  return "generate.py", f"--checkpoint={d}", "--prompt_ids=1"


def _checkpoint_without_tokenizer(d):
  cfg = tiny_config("mixtral")
  save_params(d / "orbax", cfg, init_params(cfg, seed=0))
  return "generate.py", f"--checkpoint={d / 'orbax'}", "--prompt=Hi"


def _missing_serve_config(d):
  return "serve.py", "--config=configs/serve/nope.py", f"--workdir={d}"


@pytest.mark.parametrize("command, problem", [
    (_empty_checkpoint, "no config.json in checkpoint directory"),
    (_truncated_safetensors, "model.safetensors: truncated file: tensor 'embed' ends at byte"),
    (_unsupported_model_type, "model_type 'llama' is not supported"),
    (_checkpoint_without_tokenizer, "--prompt needs tokenizer.json in the --checkpoint"),
    (_missing_serve_config, "No such file or directory: 'configs/serve/nope.py'"),
], ids=lambda c: getattr(c, "__name__", ""))
def test_expected_error_is_one_line_and_a_traceback_with_verbosity(tmp_path, command, problem):
  script, *args = command(tmp_path)
  lines = _fails(script, *args).splitlines()
  assert len(lines) == 1, lines
  assert lines[0].startswith(f"{script}: error: ") and problem in lines[0], lines[0]
  verbose = _fails(script, *args, "--verbosity=1")
  assert "Traceback (most recent call last)" in verbose
  assert lines[0] in verbose.splitlines()  # INFO logs may follow it under --verbosity


_RAISES = textwrap.dedent("""
    import sys
    from crosspool_jax.cli import run_script

    def main(argv):
      raise {}("the message\\nits second line")

    sys.argv[0] = "prog.py"
    run_script(main)
""")


@pytest.mark.parametrize("error, one_line", [("ValueError", True), ("FileNotFoundError", True),
                                             ("KeyError", False), ("ZeroDivisionError", False)])
def test_run_script_shortens_expected_errors_only(error, one_line):
  proc = subprocess.run([sys.executable, "-c", _RAISES.format(error)], capture_output=True,
                        text=True, timeout=60, cwd=ROOT)
  assert proc.returncode == 1
  if one_line:
    assert proc.stderr == "prog.py: error: the message its second line\n"
  else:  # a bug: Python's own report, traceback and all
    assert proc.stderr.startswith("Traceback (most recent call last)")
    assert f"\n{error}: " in proc.stderr and "prog.py: error" not in proc.stderr
