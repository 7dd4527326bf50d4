"""scripts/bench_kernels.py: end to end on CPU (a subprocess), and its sweep runner."""

import io
import json
import math
import os
import subprocess
import sys

import jax.numpy as jnp

from crosspool_jax import roofline
from scripts import bench_kernels
from tests.conftest import ROOT

RECORD_KEYS = {"kernel", "impl", "dtype", "shape", "flops", "bytes", "info", "median_ms",
               "p90_ms", "tflops", "gbps", "frac_peak_flops", "frac_peak_bw", "roofline_ms",
               "frac_roofline", "compile_s", "finite", "iters"}
HEADER_KEYS = {"jax_version", "backend", "device_kind", "device_count", "git_revision", "flags",
               "peak_tflops", "peak_gbps", "peak_source", "peak_measurement", "date"}


def _python(*args, timeout=120):
  proc = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                        timeout=timeout, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def test_small_sweep_writes_sane_json(tmp_path):
  out = tmp_path / "bench.json"
  proc = _python(os.path.join(ROOT, "scripts", "bench_kernels.py"), "--sweep=small",
                 "--iters=2", "--warmup=1", "--impls=reference,interpret", "--dtype=float32",
                 "--peak_tflops=100", "--peak_gbps=1000", f"--out={out}")
  result = json.loads(out.read_text())
  header, records = result["header"], result["records"]
  assert HEADER_KEYS <= set(header)
  assert header["backend"] == "cpu" and header["device_count"] >= 1
  assert header["flags"]["iters"] == 2 and header["peak_tflops"] == 100.0
  assert header["peak_source"] == "override" and header["peak_measurement"] is None
  assert len(records) == 14 and {r["impl"] for r in records} == {"reference", "interpret"}
  assert {r["kernel"] for r in records} == {"expert_dispatch", "ragged_paged_attention",
                                            "kv_write"}
  for r in records:
    assert RECORD_KEYS <= set(r) and "error" not in r, r
    assert r["dtype"] == "float32" and r["finite"]
    positive = ("median_ms", "p90_ms", "gbps", "frac_peak_bw", "bytes")
    if r["kernel"] != "kv_write":  # a pure data movement: no FLOPs
      positive += ("tflops", "frac_peak_flops", "flops")
    for key in positive:
      assert math.isfinite(r[key]) and r[key] > 0, (key, r)
    assert r["p90_ms"] >= r["median_ms"]
    assert math.isclose(r["tflops"], r["flops"] / (r["median_ms"] * 1e-3) / 1e12)
    assert math.isclose(r["frac_peak_flops"], r["tflops"] / 100)
    assert math.isclose(r["frac_peak_bw"], r["gbps"] / 1000)
    # The roofline: the slower of the FLOPs at 100 TFLOP/s and the bytes at 1000 GB/s.
    assert math.isclose(r["roofline_ms"], max(r["flops"] / 100e12, r["bytes"] / 1000e9) * 1e3)
    assert math.isclose(r["frac_roofline"], r["roofline_ms"] / r["median_ms"])

  attn = {(r["shape"]["prefill"], r["impl"]): r for r in records
          if r["kernel"] == "ragged_paged_attention"}
  # Decode: 4 sequences x 128 keys; QK^T + PV = 4 flops per (key, head, dim).
  assert attn[0, "interpret"]["flops"] == 4 * (4 * 128) * 8 * 64
  # A 32-token chunk ending a 64-token context sees 32*32 + 32*33/2 keys; plus one decode of 64.
  assert attn[1, "interpret"]["flops"] == 4 * (32 * 32 + 528 + 64) * 8 * 64
  (kvw,) = [r for r in records if r["kernel"] == "kv_write" and r["impl"] == "reference"
            and r["shape"]["T"] == 16]
  assert kvw["bytes"] == 2 * (2 * 16 * 2 * 64) * 4  # K and V of 16 tokens, read and written

  (r,) = [r for r in records if r["kernel"] == "expert_dispatch" and r["impl"] == "interpret"
          and r["shape"]["T"] == 16 and r["shape"]["K"] == 2]
  assert r["shape"] == {"T": 16, "D": 1024, "F": 512, "E": 8, "S": 16, "K": 2}
  assert r["flops"] == 2 * 16 * 2 * 1024 * 512 * 3 == 100_663_296  # gate, up, down
  touched = r["info"]["experts_touched"]
  assert 1 <= touched <= 8
  assert r["bytes"] == (touched * 3 * 1024 * 512 + 2 * 16 * 1024) * 4  # experts + x in, y out
  assert proc.stdout.splitlines()[0].split()[:4] == [
      "kernel", "impl", "dtype", "shape"]
  assert "[14/14] kv_write interpret" in proc.stderr


def test_failing_case_is_recorded_and_the_sweep_goes_on():
  def build(shape, impl, dtype):
    if shape["n"] == 0:
      raise ValueError("no such shape")
    y = jnp.ones((shape["n"], 3), dtype)
    return bench_kernels.Case(lambda x, y: x @ y, (jnp.ones((4, 4), dtype), y), 96, 64)

  fake = {"fake": bench_kernels.KernelBench(build, {"small": [{"n": 0}, {"n": 5}, {"n": 4}]})}
  log = io.StringIO()
  records = bench_kernels.run_benchmarks(["fake"], ["reference"], "float32", "small", iters=2,
                                         warmup=0, peaks=roofline.Peaks(None, None, "unknown"),
                                         registry=fake, log=log)
  assert [r["shape"]["n"] for r in records] == [0, 5, 4]
  assert log.getvalue().splitlines()[0] == ("[1/3] fake reference float32 n=0: "
                                            "ERROR ValueError: no such shape")
  assert records[0]["error"] == "ValueError: no such shape" and records[0]["median_ms"] is None
  assert records[1]["error"].startswith("TypeError: dot_general")  # fails to trace
  assert "error" not in records[2] and records[2]["median_ms"] > 0
  assert records[2]["frac_peak_flops"] is None and records[2]["tflops"] > 0
  assert records[2]["frac_roofline"] is None and records[2]["roofline_ms"] is None
