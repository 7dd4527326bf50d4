"""An experiment's refusals and preparation for a multi-process run, without processes:
wall-clock arrivals, no crosspool run, device counts other than the groups', a KV planner;
the runs not served named, the served ones on the groups' devices (`Processes.prepare` in this
one process, its devices named 0:i)."""

import os
import subprocess
import sys

import pytest

from crosspool_jax.distributed import runtime
from crosspool_jax.experiments.processes import Processes, check_processes, served_runs
from tests.conftest import ROOT, get_config


def _config(arg="smoke_2proc", **fields):
  c = get_config(arg, ("experiments", "demo.py"))
  c.update(fields)
  return c


def test_wall_clock_arrivals_are_refused():
  check_processes(_config())  # logical arrivals: fine
  check_processes(_config(arrival_mode="all_at_once"))
  with pytest.raises(ValueError, match=r"config.arrival_mode='trace' submits requests by the "
                     r"wall clock.*use 'logical' or 'all_at_once'"):
    check_processes(_config(arrival_mode="trace"))


def test_only_crosspool_runs_are_served_and_the_others_named():
  c = _config("smoke")
  served, not_served = served_runs(c)
  assert served == ["crosspool"] and list(not_served) == ["static", "shared"]
  assert "kv_policy 'static'" in not_served["static"]
  del c.policies.crosspool
  with pytest.raises(ValueError, match=r"config.policies has no crosspool-family run \(static, "
                     r"shared\)"):
    check_processes(c)


def test_device_counts_other_than_the_groups_and_the_kv_planner_are_refused():
  with pytest.raises(ValueError, match=r"config.policies.crosspool.devices has 2 device\(s\), "
                     r"config.processes.kv='0:0' names 1"):
    check_processes(_config("smoke"))  # its crosspool run: KV devices 0, 1
  c = _config()
  c.processes.weights = "1:0,1:1"
  with pytest.raises(ValueError, match="config.policies.crosspool.weight_devices has 1"):
    check_processes(c)
  c = _config()
  c.budget.kv_planner = True
  with pytest.raises(ValueError, match="config.policies.crosspool: kv_planner splits"):
    check_processes(c)
  c = _config()
  c.processes.kv = "0"
  with pytest.raises(ValueError, match="config.processes: device '0'"):
    check_processes(c)
  with pytest.raises(ValueError, match="only measured runs"):
    check_processes(_config(mode="sim"))


def test_prepare_keeps_the_crosspool_runs_on_the_groups_devices():
  c = _config("smoke")
  c.policies.crosspool.devices, c.policies.crosspool.weight_devices = (0,), (1,)
  c.processes.kv, c.processes.weights = "0:3", "0:1"  # this process's devices 3 and 1
  lines = []
  processes = Processes(runtime.ProcessConfig("127.0.0.1:1", 1, 0), transport=None)
  prepared = processes.prepare(c, lines.append)
  assert list(prepared.policies) == ["crosspool"]
  assert prepared.policies.crosspool.devices == (3,)
  assert prepared.policies.crosspool.weight_devices == (1,)
  assert sorted(c.policies) == ["crosspool", "shared", "static"]  # the given config unchanged
  assert list(processes.not_served) == ["static", "shared"]
  assert sum("not served across processes" in line for line in lines) == 2
  assert processes.devices == {"kv": ["cpu:3"], "weights": ["cpu:1"]}


def test_the_script_refuses_wall_clock_arrivals_before_joining():
  env = {**os.environ, "PYTHONPATH": ROOT,
         **runtime.ProcessConfig("127.0.0.1:1", 2, 0).environ()}  # no coordinator there
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "scripts", "run_experiment.py"),
       f"--config={os.path.join(ROOT, 'configs', 'experiments', 'demo.py')}:smoke_2proc",
       "--config.arrival_mode=trace", f"--workdir={os.path.join(ROOT, 'workdir', 'never')}"],
      capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
  assert proc.returncode != 0
  assert "config.arrival_mode='trace' submits requests by the wall clock" in proc.stderr
  assert runtime.JOINED not in proc.stderr
