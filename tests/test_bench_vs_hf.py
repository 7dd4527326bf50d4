"""scripts/bench_vs_hf.py end to end (a subprocess): JSON structure, honest figures, and greedy
tokens equal to HF transformers' (the oracle) for generate and for the engine."""

import json
import math
import os
import subprocess
import sys

import jax
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.hf

RUNNERS = ("hf", "generate", "engine")
DECODE_STEPS = 3  # the engine's --decode_steps_per_dispatch: 4 decode steps take 2 dispatches
HEADER_KEYS = {"jax_version", "torch_version", "transformers_version", "backend", "device_kind",
               "cpu_cores", "torch_threads", "omp_wait_policy", "git_revision", "git_dirty",
               "flags", "model", "dtype", "engine", "loadavg_start", "loadavg_end", "date"}
RUN_KEYS = {"first_call_s", "median_s", "p90_s", "tokens_per_s", "times_s", "deterministic",
            "all_rows_full_length", "roofline_fraction"}


def test_tiny_run_writes_sane_json_and_agrees_with_hf(tmp_path):
  out = tmp_path / "vs_hf.json"
  new_tokens, prompt_len = 5, 6
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "scripts", "bench_vs_hf.py"), "--batch_sizes=1,2",
       f"--prompt_len={prompt_len}", f"--max_new_tokens={new_tokens}", "--iters=1",
       "--warmup=1", "--torch_threads=1", f"--decode_steps_per_dispatch={DECODE_STEPS}",
       f"--out={out}"],
      capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  header, records = result["header"], result["records"]
  assert HEADER_KEYS <= set(header)
  assert header["backend"] == "cpu" and header["dtype"] == "float32"
  assert header["torch_threads"] == 1 and header["omp_wait_policy"] == "PASSIVE"
  assert header["torch_version"].startswith("2.") and header["transformers_version"]
  assert header["git_revision"] is None or len(header["git_revision"]) == 40
  assert header["model"]["family"] == "mixtral" and header["model"]["params"] > 0
  assert header["flags"]["batch_sizes"] == ["1", "2"] and header["flags"]["iters"] == 1

  assert [r["batch"] for r in records] == [1, 2]
  for r in records:
    batch, runs = r["batch"], r["runs"]
    assert r["prompt_len"] == prompt_len and r["new_tokens"] == new_tokens
    for name in RUNNERS:
      run = runs[name]
      assert RUN_KEYS <= set(run), (name, run)
      assert len(run["times_s"]) == 1 and run["median_s"] > 0 and run["p90_s"] >= run["median_s"]
      assert run["tokens_per_s"] > 0
      assert math.isclose(run["tokens_per_s"], batch * new_tokens / run["median_s"])
      assert run["deterministic"] and run["all_rows_full_length"], (name, run)
    assert math.isclose(r["ratio_generate_vs_hf"],
                        runs["generate"]["tokens_per_s"] / runs["hf"]["tokens_per_s"])
    assert math.isclose(r["ratio_engine_vs_hf"],
                        runs["engine"]["tokens_per_s"] / runs["hf"]["tokens_per_s"])
    # The roofline: measured peaks (this is a CPU), one prefill and new_tokens - 1 decode steps.
    roof = r["roofline"]
    peaks = roof["peaks"]
    assert peaks["source"] == "measured" and peaks["measurement"]["matmul_dim"] == 1024
    assert peaks["flops_per_s"] > 0 and peaks["bytes_per_s"] > 0
    assert roof["prefill_step"]["steps"] == 1 and roof["decode_step"]["steps"] == new_tokens - 1
    assert math.isclose(roof["flops"], roof["prefill_step"]["flops"]
                        + (new_tokens - 1) * roof["decode_step"]["flops"])
    for step in ("prefill_step", "decode_step"):
      s = roof[step]
      assert math.isclose(s["time_s"], max(s["flops"] / peaks["flops_per_s"],
                                           s["bytes"] / peaks["bytes_per_s"]), rel_tol=1e-6)
    assert math.isclose(roof["tokens_per_s"], batch * new_tokens / roof["time_s"])
    for name in RUNNERS:
      assert math.isclose(runs[name]["roofline_fraction"],
                          roof["time_s"] / runs[name]["median_s"])
    # The oracle: greedy f32 tokens of both crosspool_jax paths equal HF transformers'.
    assert r["agreement"] == {"generate_vs_hf": 1.0, "engine_vs_hf": 1.0,
                              "engine_vs_generate": 1.0}, r["agreement"]
    # One prefill step, then the new_tokens - 1 decode steps, DECODE_STEPS per dispatch; two
    # bucket executables and the decode loop; nothing compiled while timing.
    assert runs["engine"]["steps_per_run"] == 1 + math.ceil((new_tokens - 1) / DECODE_STEPS)
    assert runs["engine"]["executables"] == 3 and runs["engine"]["startup_compile_s"] > 0
    assert r["jax_compiles_in_timed_rounds"] == 0
    assert runs["generate"]["compile_s"] == pytest.approx(
        runs["generate"]["first_call_s"] - runs["generate"]["median_s"])

  table = proc.stdout.strip().splitlines()
  assert table[0].split()[:4] == ["batch", "HF", "tok/s", "generate"] and len(table) == 3
  assert "eng roof" in table[0]
  assert "batch 2: round 1/1" in proc.stderr

  # BENCHMARKS.md renders the same figures.
  md = tmp_path / "B.md"
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "scripts", "make_benchmarks.py"), f"--vs_hf={out}",
       f"--out={md}"], capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  text = md.read_text()
  assert "## Peer benchmark" in text and "--batch_sizes=1,2" in text
  for r in records:
    assert (f"| {r['batch']} | {r['runs']['hf']['tokens_per_s']:.0f} | "
            f"{r['runs']['generate']['tokens_per_s']:.0f} |") in text


def test_preset_qwen3_moe_small_is_the_anchor_shape():
  """The preset's overrides make the small Qwen3-MoE of the roofline issue (~8 M params)."""
  from crosspool_jax.models.config import tiny_config
  from crosspool_jax.models.model import abstract_params
  from scripts import bench_vs_hf

  family, overrides = bench_vs_hf.PRESETS["qwen3_moe_small"]
  cfg = tiny_config(family, **{k: int(v) for k, v in (o.split("=") for o in overrides)})
  assert (cfg.family, cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.num_heads,
          cfg.num_kv_heads, cfg.head_dim, cfg.num_experts, cfg.top_k, cfg.d_ff_expert) == (
              "qwen3_moe", 2048, 256, 4, 8, 2, 32, 16, 4, 128)
  params = sum(x.size for x in jax.tree.leaves(abstract_params(cfg)))
  assert 7.9e6 < params < 8.1e6


def test_preset_rejects_a_family_or_checkpoint():
  for extra in ("--family=mixtral", "--checkpoint=nowhere"):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "bench_vs_hf.py"),
         "--preset=qwen3_moe_small", extra], capture_output=True, text=True, timeout=120,
        cwd=ROOT)
    assert proc.returncode != 0
    assert "--preset names a family and a shape" in proc.stderr
