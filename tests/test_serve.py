"""scripts/serve.py end to end (subprocesses, the config's small `runlocal` variant).

Run A serves the seeded trace on its wall-clock schedule. Run B replays A's trace.jsonl, with
two bad records appended, all at once into a KV pool too small for the longest contexts: the
bad and the never-fitting records are rejected with reasons, others are preempted, and every
served request's tokens equal A's (seeded sampling does not depend on timing or batching).
"""

import json
import os
import subprocess
import sys

import pytest

from crosspool_jax.workloads import TraceRecord, read_jsonl, write_jsonl
from tests.conftest import ROOT

CONFIG = os.path.join(ROOT, "configs", "serve", "demo.py") + ":runlocal"


def _serve(workdir, *overrides, ok=True):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "serve.py"),
                         f"--config={CONFIG}", f"--workdir={workdir}", *overrides],
                        capture_output=True, text=True, timeout=300, cwd=ROOT)
  if ok:
    assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.json")) as f:
    return json.load(f)


def _check_run(m, num_requests):
  serve = m["serve"]
  assert len(serve["request_ids"]) == num_requests
  rows = {r["request_id"]: r for r in m["requests"]}
  rejected = {r["request_id"]: r for r in serve["rejected"]}
  for rid in serve["request_ids"]:  # every request finished or was rejected with a reason
    if rid in rejected:
      assert rejected[rid]["reason"] and rid not in rows
    else:
      assert rows[rid]["status"] == "finished", rows[rid]
      assert len(serve["outputs"][rid]) == rows[rid]["output_tokens"] > 0
  assert not serve["cancelled_at_timeout"]
  for scope in [m["summary"]["overall"], *m["summary"]["per_model"].values()]:
    for key in ("ttft_s", "tbt_s", "e2e_s"):
      p = scope[key]
      assert None not in (p["p50"], p["p90"], p["p99"]), (key, p)
      assert 0 <= p["p50"] <= p["p90"] <= p["p99"], (key, p)
  assert all(pool["used_pages_now"] == 0 for pool in m["pools"].values())
  assert m["backend_compiles_since_start"] == 0
  assert m["compile_count"] == m["compile_count_at_start"]
  assert m["serve_config"]["variant"] == "runlocal"
  assert "git_revision" in m


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("serve_a")
  proc = _serve(workdir)
  return workdir, proc


def test_serves_the_trace_on_schedule(run_a):
  workdir, proc = run_a
  m = _metrics(workdir)
  _check_run(m, num_requests=24)
  assert m["config"]["kv_policy"] == "shared"
  assert m["serve"]["rejected"], "the runlocal trace's long tail should exceed max_context"
  assert all("exceeds model" in r["reason"] for r in m["serve"]["rejected"])
  assert "done 24/24" in proc.stderr  # the live progress line
  assert "overall" in proc.stdout and "KV pool 0 (shared)" in proc.stdout  # the table
  assert len(read_jsonl(os.path.join(workdir, "trace.jsonl"))) == 24


def test_replay_with_bad_records_gives_the_same_tokens(run_a, tmp_path):
  workdir_a, _ = run_a
  a = _metrics(workdir_a)
  trace = read_jsonl(os.path.join(workdir_a, "trace.jsonl"))
  end = trace[-1].arrival_s + 1.0
  trace += [TraceRecord(arrival_s=end, model_id="ghost", prompt_len=4, max_new_tokens=2, seed=1),
            TraceRecord(arrival_s=end, model_id="mixtral_0", prompt_len=64, max_new_tokens=8,
                        seed=2)]
  write_jsonl(tmp_path / "trace.jsonl", trace)
  workdir_b = tmp_path / "b"
  # A pool of 12 pages: contexts over 48 tokens never fit (2 layers x 8 tokens a page), and
  # 24 requests at once force preemptions.
  _serve(workdir_b, f"--config.workload.trace={tmp_path / 'trace.jsonl'}",
         "--config.arrival_mode=all_at_once", "--config.engine.pages_per_device=13")
  b = _metrics(workdir_b)
  _check_run(b, num_requests=26)
  assert b["pools"]["0"]["preemptions"] > 0
  reasons = {r["request_id"]: r["reason"] for r in b["serve"]["rejected"]}
  assert "unknown model_id 'ghost'" in reasons["r00024"]
  assert "exceeds model 'mixtral_0' max context 64" in reasons["r00025"]
  too_big = {rid for rid, why in reasons.items() if "KV pages, more than the pool's 12" in why}
  rejected_a = {r["request_id"] for r in a["serve"]["rejected"]}
  assert too_big and too_big.isdisjoint(rejected_a)
  assert set(reasons) == rejected_a | too_big | {"r00024", "r00025"}
  # Same seed, same tokens, whatever the timing, batching and preemptions.
  assert b["serve"]["outputs"] == {rid: out for rid, out in a["serve"]["outputs"].items()
                                   if rid not in too_big}


@pytest.mark.parametrize("override, error", [
    ("--config.arrival_mode=sometimes", "config.arrival_mode must be one of"),
    ("--config.workload.cv=0", "config.workload: cv must be a finite number > 0"),
    ("--config.fleet.mixtral_0.family=llama", "config.fleet.mixtral_0.family must be one of"),
    ("--config.workload.popularity=mixtral_0,ghost", "names models not in config.fleet"),
])
def test_bad_config_fails_before_compiling(tmp_path, override, error):
  proc = _serve(tmp_path, override, ok=False)
  assert proc.returncode != 0 and error in proc.stderr, proc.stderr[-2000:]
  assert not os.path.exists(tmp_path / "metrics.json")


def test_bad_trace_line_names_file_and_line(tmp_path):
  path = tmp_path / "t.jsonl"
  path.write_text('{"arrival_s": 0.0, "model_id": "mixtral_0", "prompt_len": 3, '
                  '"max_new_tokens": 2, "seed": 0}\n{"arrival_s": "soon"}\n')
  proc = _serve(tmp_path / "w", f"--config.workload.trace={path}", ok=False)
  assert proc.returncode != 0 and "t.jsonl:2:" in proc.stderr, proc.stderr[-2000:]
