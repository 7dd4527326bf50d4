"""The engine's crosspool policy across 2 CPU processes (scripts/launch_local.py): the KV pool
(KV device 0:0) in process 0, the weights pool (weights device 1:0) in process 1, every process
running the same engine loop (tests/distributed/engine_worker.py). Greedy and seeded-sampled
tokens equal the one-process engine's on the same devices' roles, under preemption and expert
swapping; the weights process killed mid-serve makes the KV process fail every unfinished
request and exit with the transfer's error. Each launch is bounded by the launcher's timeouts
and the subprocess timeout."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from jax._src.lib import _jax

from tests.conftest import ROOT
from tests.distributed.engine_worker import build, result

pytestmark = [
    pytest.mark.multiprocess,
    pytest.mark.skipif(not hasattr(_jax, "make_gloo_tcp_collectives"),
                       reason="this jaxlib has no gloo: no CPU collectives across processes"),
]

WORKER = os.path.join(ROOT, "tests", "distributed", "engine_worker.py")
# KV shapes 2 x 16, 1 x 32, 4 x 16; one expert shape class (fused expert calls).
MODELS = ("mixtral", "qwen3_moe", "olmoe")


def _spec(tiny_checkpoint, n=12, seed=0):
  """12 requests of 3 models, every other one seeded-sampled; 23 usable KV pages (an olmoe
  request holds up to 16: preemption) and 8 expert slots for the 3 x 8 experts of each layer
  (swaps, groups split over several calls)."""
  rng = np.random.default_rng(seed)
  sampled = {"temperature": 0.9, "top_k": 40, "top_p": 0.95}
  work = [[MODELS[i % len(MODELS)], rng.integers(0, 512, size=int(rng.integers(6, 25))).tolist(),
           8, sampled | {"seed": i} if i % 2 else None] for i in range(n)]
  return {"checkpoints": {m: tiny_checkpoint(m) for m in MODELS}, "max_context": 48,
          "kv": "0:0", "weights": "1:0", "die_after_steps": 3, "work": work,
          "engine": {"page_elems": 512, "pages_per_device": 24, "token_budget": 48,
                     "token_buckets": [16, 48], "max_batch": 4, "attn_impl": "reference",
                     "moe_impl": "reference", "expert_slots_per_device": 8,
                     "expert_policy": "lru", "micro_batches": 2, "timeline_every": 0}}


def _launch(tmp_path, spec, mode, **flags):
  spec_path, out_path = tmp_path / "spec.json", tmp_path / "out.json"
  spec_path.write_text(json.dumps(spec))
  args = {"num_processes": 2, "heartbeat_timeout_s": 10, "shutdown_timeout_s": 5,
          "transfer_timeout_s": 20, "join_timeout_s": 60, "timeout_s": 240, **flags}
  cmd = [sys.executable, os.path.join(ROOT, "scripts", "launch_local.py"), f"--target={WORKER}",
         f"--target_args={spec_path} {out_path} {mode}", *(f"--{k}={v}" for k, v in args.items())]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                        env={**os.environ, "PYTHONPATH": ROOT})
  return proc, (json.loads(out_path.read_text()) if out_path.exists() else None)


def test_two_processes_serve_the_tokens_of_one(tiny_checkpoint, tmp_path):
  spec = _spec(tiny_checkpoint)
  engine, rids = build(spec, devices=[0], weight_devices=[1])  # one process, its devices 0, 1
  engine.generate_all()
  want = result(engine, rids)
  # What is exercised: preemption, swaps, fused calls split for want of slots, missed runs.
  assert want["preemptions"] > 0 and want["weights_pool"]["evictions"] > 0
  assert want["expert_calls"]["splits"] > 0 and want["expert_calls"]["miss_steps"] > 0

  proc, got = _launch(tmp_path, spec, "serve")
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert got["status"] == ["finished"] * len(rids)
  assert got["outputs"] == want["outputs"]  # greedy and seeded-sampled alike
  # The host state agreed in both processes as in one: the same preemptions, swaps, expert
  # calls and misses (the speculative runs that missed and their reruns).
  assert got["preemptions"] == want["preemptions"]
  for key in ("hits", "misses", "evictions", "swap_calls"):
    assert got["weights_pool"][key] == want["weights_pool"][key], key
  assert got["expert_calls"] == want["expert_calls"]
  assert got["transfers"]["transport"] == "pull" and got["transfers"]["sent"] > 0
  assert "[p1] process 1: served" in proc.stdout


def test_a_killed_weights_process_fails_the_requests_in_flight(tiny_checkpoint, tmp_path):
  spec = _spec(tiny_checkpoint)
  proc, got = _launch(tmp_path, spec, "die", grace_s=60)
  assert proc.returncode == 1
  assert "launch_local.py: error: process 1 was killed by SIGKILL" in proc.stderr
  killed = float(re.search(r"killing itself after step 3 at ([\d.]+)", proc.stdout)[1])
  # The survivor ended by itself (not terminated by the launcher) after reporting every
  # unfinished request failed, well within 60 s of the kill.
  assert "process 0 (running)" not in proc.stderr
  report = re.search(r"\[p0\] process 0: peer lost at step \d+ at ([\d.]+); failed (\d+) of "
                     rf"{len(spec['work'])} requests", proc.stdout)
  assert report, proc.stdout[-3000:]
  assert float(report[1]) - killed < 60
  assert "PeerLostError" in proc.stdout
  unfinished = [s for s in got["status"] if s != "finished"]
  assert unfinished and set(unfinished) == {"failed"} and len(unfinished) == int(report[2])
  errors = [e for e, s in zip(got["errors"], got["status"], strict=True) if s == "failed"]
  assert all(e.startswith("a transfer between processes failed") for e in errors), errors
