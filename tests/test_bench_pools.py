"""scripts/bench_pools.py end to end on CPU, tiny, in subprocesses (scripts share flag names)."""

import json
import os
import subprocess
import sys

from crosspool_jax.pools.expert_trace import TraceEvent, write_jsonl
from tests.conftest import ROOT

SCRIPT = os.path.join(ROOT, "scripts", "bench_pools.py")


def _run(*args, ok=True, timeout=120):
  proc = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                        timeout=timeout, cwd=ROOT)
  assert (proc.returncode == 0) == ok, proc.stderr[-3000:]
  return proc


def test_record_replay_and_live_tiny(tmp_path):
  out, trace = tmp_path / "pools.json", tmp_path / "trace.jsonl"
  _run("--families=mixtral", "--models_per_family=2", "--requests=3", "--prompt_len=4",
       "--new_tokens=3", "--zipf=0", "--fractions=0.5,1", "--live_policies=activation_aware",
       f"--out={out}", f"--trace_out={trace}")
  result = json.loads(out.read_text())
  assert result["kv_pool"] == {} and result["header"]["flags"]["requests"] == 3
  w = result["weights_pool"]
  assert w["fleet"] == {"mixtral-0": 16, "mixtral-1": 16}
  assert w["trace_events"] == 3 * 3 * 2 == len(trace.read_text().splitlines())
  by = {(r["fraction"], r["policy"]): r for r in w["replay"]}
  assert set(by) == {(f, p) for f in (0.5, 1.0) for p in ("lru", "lfu", "activation_aware")
                     } | {(1.0, "pin_all")}
  for (frac, policy), r in by.items():
    assert r["slots"] == (16 if frac == 0.5 else 32)
    if policy in ("lru", "lfu"):  # demand fetching: MIN bounds the hits
      assert r["hit_rate"] <= r["belady_hit_rate"] + 1e-12
    assert r["loads"] >= r["belady_loads"]
    assert r["bytes_swapped"] == r["loads"] * 3 * 64 * 32 * 4
  assert by[1.0, "pin_all"]["misses"] == 0 and by[1.0, "pin_all"]["hit_rate"] == 1.0
  for r in w["live"]:
    assert r["tokens_match"] and r["policy"] == "activation_aware"
    assert r["hit_rate"] == by[r["fraction"], "activation_aware"]["hit_rate"]  # live == replay
    assert 0 <= r["hidden_fraction"] <= 1 and r["swap_calls"] > 0

  # Replaying the written trace gives the same replay records.
  out2 = tmp_path / "replay.json"
  proc = _run(f"--trace_in={trace}", "--fractions=0.5,1", f"--out={out2}", "--sections=weights")
  again = json.loads(out2.read_text())["weights_pool"]
  assert again["source"] == "trace" and again["live"] == []
  assert again["fleet"] == w["fleet"]  # both models were requested (zipf=0, seed 0)
  assert again["replay"] == w["replay"] and "MIN hit rate" in proc.stdout


def test_hand_made_trace_and_bad_flags(tmp_path):
  trace = tmp_path / "t.jsonl"
  keys = [(0, 0), (0, 1), (1, 0), (0, 0), (1, 1), (0, 0), (0, 1), (1, 0)]  # A B C A D A B C
  write_jsonl([TraceEvent(i, "m", layer, (e,)) for i, (layer, e) in enumerate(keys)], trace)
  out = tmp_path / "r.json"
  _run(f"--trace_in={trace}", "--fractions=0.5", "--policies=lru", f"--out={out}",
       "--sections=weights")
  (r,) = json.loads(out.read_text())["weights_pool"]["replay"]
  assert (r["slots"], r["hits"], r["belady_hit_rate"], r["belady_loads"]) == (2, 1, 0.25, 6)
  assert "unknown policy 'nope'" in _run("--policies=nope", ok=False).stderr
  assert "--fractions must be in (0, 1]" in _run("--fractions=0", ok=False).stderr
  assert "unknown section" in _run("--sections=foo", ok=False).stderr
