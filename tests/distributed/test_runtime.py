"""The multi-process config layer without processes: ProcessConfig through the environment,
device groups parsed, checked and resolved (in this one process, the 4 CPU devices of
tests/conftest.py are process 0's), and their errors."""

import jax
import pytest

from crosspool_jax.distributed.runtime import (
    ENV_COORDINATOR,
    ENV_NUM_PROCESSES,
    ENV_PROCESS_ID,
    DeviceGroups,
    ProcessConfig,
    parse_group,
)


def test_process_config_round_trips_through_the_environment():
  config = ProcessConfig("10.0.0.1:1234", num_processes=4, process_id=3, local_cpu_devices=2,
                         host="10.0.0.7", init_timeout_s=30, heartbeat_timeout_s=7,
                         shutdown_timeout_s=8, transfer_timeout_s=9)
  assert ProcessConfig.from_environ(config.environ()) == config
  assert ProcessConfig.from_environ({ENV_COORDINATOR: "h:1", ENV_NUM_PROCESSES: "2",
                                     ENV_PROCESS_ID: "1"}) == ProcessConfig("h:1", 2, 1)


@pytest.mark.parametrize("environ,message", [
    ({}, "CROSSPOOL_COORDINATOR_ADDRESS, CROSSPOOL_NUM_PROCESSES, CROSSPOOL_PROCESS_ID unset"),
    ({ENV_COORDINATOR: "h:1", ENV_NUM_PROCESSES: "two", ENV_PROCESS_ID: "0"},
     "CROSSPOOL_NUM_PROCESSES='two' is not an integer"),
    ({ENV_COORDINATOR: "h:1", ENV_NUM_PROCESSES: "2", ENV_PROCESS_ID: "2"},
     r"process_id 2 is not in \[0, 2\)"),
    ({ENV_COORDINATOR: "h", ENV_NUM_PROCESSES: "2", ENV_PROCESS_ID: "0"},
     "coordinator address 'h' is not host:port"),
    ({ENV_COORDINATOR: "h:1", ENV_NUM_PROCESSES: "2", ENV_PROCESS_ID: "0",
      "CROSSPOOL_HEARTBEAT_TIMEOUT_S": "0"}, "heartbeat_timeout_s must be >= 1 second, got 0"),
    ({ENV_COORDINATOR: "h:1", ENV_NUM_PROCESSES: "2", ENV_PROCESS_ID: "0",
      "CROSSPOOL_LOCAL_CPU_DEVICES": "0"}, "local_cpu_devices must be >= 1, got 0"),
])
def test_process_config_rejects_a_bad_environment(environ, message):
  with pytest.raises(ValueError, match=message):
    ProcessConfig.from_environ(environ)


def test_parse_group():
  assert parse_group("0:0, 1:3") == ((0, 0), (1, 3))
  for bad in ("0", "0:x", "0:1,", "-1:0", "0:0;1:0"):
    with pytest.raises(ValueError, match="is not process:local_index"):
      parse_group(bad)


@pytest.mark.parametrize("kv,weights,message", [
    ((), ((0, 0),), "the KV group has no devices"),
    (((0, 0),), (), "the weights group has no devices"),
    (((0, 0), (0, 0)), ((1, 0),), "the KV group names 0:0 twice"),
    (((0, 0),), ((1, 2),), r"the weights group names 1:2, not in the run \(process 0: 2 "
                           r"devices, process 1: 2 devices\)"),
    (((2, 0),), ((1, 0),), "the KV group names 2:0, not in the run"),
    (((0, 0), (1, 1)), ((1, 1), (0, 0)), "0:0, 1:1 in both the KV and the weights group"),
])
def test_device_groups_reject_bad_groups(kv, weights, message):
  with pytest.raises(ValueError, match=f"device groups: {message}"):
    DeviceGroups(kv, weights).check({0: 2, 1: 2})


def test_device_groups_resolve_to_this_runs_devices():
  devices = sorted(jax.devices(), key=lambda d: d.id)
  kv, weights = DeviceGroups.parse("0:1,0:0", "0:3").resolve()
  assert kv == [devices[1], devices[0]] and weights == [devices[3]]
  with pytest.raises(ValueError, match=r"names 1:0, not in the run \(process 0: 4 devices\)"):
    DeviceGroups.parse("0:0", "1:0").resolve()
