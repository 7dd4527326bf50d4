"""scripts/run_experiment.py across 2 CPU processes (scripts/launch_local.py): the smoke demo's
crosspool run on 1 KV + 1 weights device (configs/experiments/demo.py:smoke_2proc) serves the
tokens and counts of the same config in one process, the KV pool in process 0 and the weights
pool in process 1; process 0 alone writes the results, with the processes, the device groups
and every process's transfers; `make_benchmarks.py --update` puts the two side by side in a
copy of BENCHMARKS.md, every other section unchanged. The weights process killed while serving
fails the experiment (PeerLostError) without a hang or results. Each launch is bounded by the
launcher's timeouts and the subprocess timeout."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from jax._src.lib import _jax

from crosspool_jax.distributed import runtime
from tests.conftest import ROOT

pytestmark = [
    pytest.mark.multiprocess,
    pytest.mark.skipif(not hasattr(_jax, "make_gloo_tcp_collectives"),
                       reason="this jaxlib has no gloo: no CPU collectives across processes"),
]

CONFIG = f"--config={os.path.join(ROOT, 'configs', 'experiments', 'demo.py')}:smoke_2proc"


def _script(name, *args):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", name), *args],
                        capture_output=True, text=True, timeout=300, cwd=ROOT,
                        env={**os.environ, "PYTHONPATH": ROOT})
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc


def _read(workdir):
  with open(workdir / "results.json") as f, open(workdir / "outputs.json") as g:
    return json.load(f), json.load(g)


def _sections(text):
  return ["## " + part for part in text.split("\n## ")[1:]]


def test_the_experiment_across_two_processes_serves_the_tokens_of_one(tmp_path):
  one, two = tmp_path / "one", tmp_path / "two"
  _script("run_experiment.py", CONFIG, f"--workdir={one}")
  proc = _script("launch_local.py", "--num_processes=2", "--heartbeat_timeout_s=10",
                 "--shutdown_timeout_s=5", "--transfer_timeout_s=20", "--timeout_s=240",
                 f"--target={os.path.join(ROOT, 'scripts', 'run_experiment.py')}",
                 f"--target_args={CONFIG} --workdir={two}")
  (want, want_out), (got, got_out) = _read(one), _read(two)
  assert "processes" not in want
  assert len(want_out["crosspool@"]) == want["runs"][0]["counts"]["finished"] == 8
  assert got_out == want_out  # every request's tokens (seeded sampling)
  # The replicated host state agreed with the one-process run's: every count alike.
  (w,), (g,) = want["runs"], got["runs"]
  cross = g["counts"].pop("cross_process")
  assert g["counts"] == w["counts"] and g["engine"] == w["engine"]
  assert got["processes"] == {"count": 2, "transport": "pull",
                              "groups": {"kv": "0:0", "weights": "1:0"},
                              "devices": {"kv": ["cpu:0"], "weights": ["cpu:2048"]},
                              "not_served": {}}
  p0, p1 = cross["per_process"]
  for phase in ("start_up", "serving"):  # what one process sent, the other received
    assert p0[phase]["sent"] == p1[phase]["received"] > 0
    assert p1[phase]["sent_bytes"] == p0[phase]["received_bytes"] > 0
  assert cross["arrays_per_step"] == (p0["serving"]["sent"] + p1["serving"]["sent"]) / \
      g["counts"]["steps"]
  # Process 0 alone wrote the workdir.
  assert "[p0] wrote" in proc.stdout and "[p1] wrote" not in proc.stdout
  assert f"[p1] process 1: served; process 0 writes {two}" in proc.stdout

  # make_benchmarks --update: the new section added, then replaced; the others unchanged.
  md = tmp_path / "BENCHMARKS.md"
  shutil.copy(os.path.join(ROOT, "BENCHMARKS.md"), md)
  original = md.read_text()
  args = ["--update", f"--multiprocess={one}/results.json",
          f"--multiprocess={two}/results.json", f"--out={md}"]
  _script("make_benchmarks.py", *args)
  first = md.read_text()
  title = "## demo across 2 processes (cpu)\n"
  assert [s for s in _sections(first) if not s.startswith(title)] == \
      [s for s in _sections(original) if not s.startswith(title)]
  (section,) = [s for s in _sections(first) if s.startswith(title)]  # added or replaced
  assert f"Source: `{os.path.relpath(two / 'results.json', ROOT)}`" in section
  assert "| 2 | crosspool | 8/0 |" in section and "| identical |" in section
  assert first.count('Section "demo across 2 processes (cpu)" replaced in place by') == 1
  _script("make_benchmarks.py", *args)
  assert md.read_text() == first


def _pid_of(process_id, coordinator):
  """The pid of the run's process `process_id` (the run named by its coordinator address)."""
  want = {f"{runtime.ENV_PROCESS_ID}={process_id}".encode(),
          f"{runtime.ENV_COORDINATOR}={coordinator}".encode()}
  for entry in os.listdir("/proc"):
    try:
      with open(f"/proc/{entry}/environ", "rb") as f:
        if want <= set(f.read().split(b"\0")):
          return int(entry)
    except (OSError, ValueError):
      continue
  return None


def test_a_killed_weights_process_fails_the_experiment_without_hanging(tmp_path):
  port = runtime.free_port()
  workdir = tmp_path / "killed"
  longer = ("--config.workload.num_requests=24 --config.workload.output_len.low=20 "
            "--config.workload.output_len.high=30 --config.progress_interval_s=0.5")
  launcher = subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "scripts", "launch_local.py"), "--num_processes=2",
       f"--port={port}", "--heartbeat_timeout_s=10", "--shutdown_timeout_s=5",
       "--transfer_timeout_s=20", "--timeout_s=240", "--grace_s=60",
       f"--target={os.path.join(ROOT, 'scripts', 'run_experiment.py')}",
       f"--target_args={CONFIG} {longer} --workdir={workdir}"],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
      env={**os.environ, "PYTHONPATH": ROOT})
  lines = []
  for line in launcher.stdout:  # until process 1 reports serving progress
    lines.append(line)
    if line.startswith("[p1] [") and "steps" in line:
      break
  pid = _pid_of(1, f"127.0.0.1:{port}")
  assert pid is not None, "".join(lines[-20:])
  os.kill(pid, signal.SIGKILL)
  killed = time.monotonic()
  out, err = launcher.communicate(timeout=120)
  assert time.monotonic() - killed < 60
  assert launcher.returncode == 1
  assert "launch_local.py: error: process 1 was killed by SIGKILL" in err
  out = "".join(lines) + out
  assert "PeerLostError: a transfer between processes failed" in out, out[-3000:]
  assert not (workdir / "results.json").exists()  # no results of a run that failed
