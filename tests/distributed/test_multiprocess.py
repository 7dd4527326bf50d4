"""Two local CPU processes started by scripts/launch_local.py: hidden states' round trips by
each transport, three shapes in flight at once (exact, against the states and a stand-in
expert computed locally; tests/distributed/worker.py), a process
killed mid-run, a process that never joins. Each launch is bounded by the launcher's own
timeouts and by the subprocess timeout (a hang fails the test)."""

import os
import subprocess
import sys

import pytest
from jax._src.lib import _jax

from tests.conftest import ROOT

pytestmark = [
    pytest.mark.multiprocess,
    pytest.mark.skipif(not hasattr(_jax, "make_gloo_tcp_collectives"),
                       reason="this jaxlib has no gloo: no CPU collectives across processes"),
]

WORKER = os.path.join(ROOT, "tests", "distributed", "worker.py")


def _launch(*worker_args, local_cpu_devices=1, target=WORKER, **flags):
  args = {"num_processes": 2, "local_cpu_devices": local_cpu_devices, "heartbeat_timeout_s": 10,
          "shutdown_timeout_s": 5, "transfer_timeout_s": 20, "join_timeout_s": 40,
          "timeout_s": 50, **flags}
  cmd = [sys.executable, os.path.join(ROOT, "scripts", "launch_local.py"), f"--target={target}",
         f"--target_args={' '.join(worker_args)}", *(f"--{k}={v}" for k, v in args.items())]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT,
                        env={**os.environ, "PYTHONPATH": ROOT})


@pytest.mark.parametrize("transport,local_cpu_devices,kv,weights,target", [
    ("pull", 1, "0:0", "1:0", WORKER),
    ("pull", 2, "0:1", "1:1", "tests.distributed.worker"),  # a module target (python -m)
    ("put", 1, "0:0", "1:0", WORKER),
    ("permute", 1, "0:0", "1:0", WORKER),
], ids=["pull", "pull-2-devices-module", "put", "permute"])
def test_hidden_state_round_trip_is_exact(transport, local_cpu_devices, kv, weights, target):
  proc = _launch("roundtrip", transport, kv, weights, local_cpu_devices=local_cpu_devices,
                 target=target)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "[p0] process 0: roundtrip ok" in proc.stdout
  assert "[p1] process 1: roundtrip ok" in proc.stdout


def test_a_killed_process_fails_the_run_and_the_survivor():
  proc = _launch("die", "pull", "0:0", "1:0", grace_s=30, heartbeat_timeout_s=5)
  assert proc.returncode == 1
  assert "launch_local.py: error: process 1 was killed by SIGKILL" in proc.stderr
  assert "[p1] process 1: killing itself" in proc.stderr  # its last lines
  # The survivor ended by itself within the grace (the coordination service noticed the
  # missing heartbeats) with JAX's fatal error, not terminated by the launcher (which sends
  # only SIGTERM and SIGKILL). JAX's fatal error aborts the process; under load its log line
  # was once missing from the survivor's last lines (CI, 2026-12-03), the abort was not.
  assert "process 0 (running)" not in proc.stderr
  assert ("JAX distributed service detected fatal errors" in proc.stderr
          or "process 0 (was killed by SIGABRT)" in proc.stderr)
  assert "roundtrip ok" not in proc.stdout


def test_a_process_that_never_joins_fails_the_run():
  proc = _launch("never_join", "pull", "0:0", "1:0", init_timeout_s=5)
  assert proc.returncode == 1
  # Process 0's own joining timed out (initialization_timeout): JAX ended it (an abort, on
  # jax 0.10.2) with the deadline in its last lines; process 1 was still asleep.
  error = proc.stderr.strip().splitlines()[-1]
  assert error.startswith("launch_local.py: error: process 0 "), error
  assert error.endswith("(not joined: process(es) [0, 1])"), error
  p0_last_lines = proc.stderr.split("process 1 (running), last lines:")[0]
  assert "DEADLINE_EXCEEDED" in p0_last_lines and "RegisterTask" in p0_last_lines
  assert "crosspool-distributed: joined" not in proc.stdout


def test_the_launcher_fails_a_run_whose_processes_have_not_joined_in_time():
  proc = _launch("never_join", "pull", "0:0", "1:0", init_timeout_s=60, join_timeout_s=5)
  assert proc.returncode == 1
  assert "launch_local.py: error: process(es) [0, 1] did not join within 5 s" in proc.stderr
  assert "process 0 (running)" in proc.stderr and "process 1 (running)" in proc.stderr
