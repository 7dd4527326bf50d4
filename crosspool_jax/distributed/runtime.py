"""One process of a multi-process run: its place in the run (`ProcessConfig`), joining JAX's
distributed runtime with every timeout set explicitly (`initialize`), and the device groups of
the two pools named by (process, local device) (`DeviceGroups`).

Invariant: every wait of a process on the others is bounded, so a process that dies or never
joins makes the others fail with an error, never hang: `initialize`'s joining
(`initialization_timeout`), the coordination service's liveness check (`heartbeat_timeout`),
the exit barrier (`shutdown_timeout`), and each cross-process transfer
(`jax_cross_host_transfer_timeout_seconds`, the transports' own timeout). WORKSPACE.md,
"Multi-process".
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Mapping

import jax
from jax._src import distributed as jax_distributed  # the coordination service's client

from crosspool_jax.cli import progress

# The environment a launcher gives each process (scripts/launch_local.py sets them all).
ENV_COORDINATOR = "CROSSPOOL_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "CROSSPOOL_NUM_PROCESSES"
ENV_PROCESS_ID = "CROSSPOOL_PROCESS_ID"
ENV_LOCAL_CPU_DEVICES = "CROSSPOOL_LOCAL_CPU_DEVICES"
ENV_HOST = "CROSSPOOL_HOST"
ENV_TIMEOUTS = {"init_timeout_s": "CROSSPOOL_INIT_TIMEOUT_S",
                "heartbeat_timeout_s": "CROSSPOOL_HEARTBEAT_TIMEOUT_S",
                "shutdown_timeout_s": "CROSSPOOL_SHUTDOWN_TIMEOUT_S",
                "transfer_timeout_s": "CROSSPOOL_TRANSFER_TIMEOUT_S"}

# The line `initialize` prints (stderr) once the process has joined: what a launcher waits for.
JOINED = "crosspool-distributed: joined"


@dataclasses.dataclass(frozen=True)
class ProcessConfig:
  """Where this process stands in a multi-process run, and how long it waits for the others.

  Attributes:
    coordinator_address: host:port of the coordination service, which process 0 starts.
    num_processes: processes in the run.
    process_id: this process, in [0, num_processes).
    local_cpu_devices: CPU devices of this process (`jax_num_cpu_devices`; the CPU backend
      only, accelerator backends see their own devices).
    host: the address the other processes reach this one at (its cross-process transfer
      servers bind there, each on a free port).
    init_timeout_s: `jax.distributed.initialize`'s `initialization_timeout`: how long joining
      waits for every process to connect.
    heartbeat_timeout_s: the coordination service declares a process dead after this long
      without a heartbeat, and the others' clients then stop with an error.
    shutdown_timeout_s: how long the exit barrier (`jax.distributed.shutdown`, run at exit)
      waits for the others.
    transfer_timeout_s: how long a cross-process transfer waits for its peer.
  """

  coordinator_address: str
  num_processes: int
  process_id: int
  local_cpu_devices: int = 1
  host: str = "127.0.0.1"
  init_timeout_s: int = 60
  heartbeat_timeout_s: int = 10
  shutdown_timeout_s: int = 10
  transfer_timeout_s: int = 30

  def check(self) -> None:
    """ValueError for a config no run can have."""
    if self.num_processes < 1:
      raise ValueError(f"num_processes must be >= 1, got {self.num_processes}")
    if not 0 <= self.process_id < self.num_processes:
      raise ValueError(f"process_id {self.process_id} is not in [0, {self.num_processes})")
    host, _, port = self.coordinator_address.rpartition(":")
    if not host or not port.isdigit():
      raise ValueError(f"coordinator address {self.coordinator_address!r} is not host:port")
    if self.local_cpu_devices < 1:
      raise ValueError(f"local_cpu_devices must be >= 1, got {self.local_cpu_devices}")
    for name in ENV_TIMEOUTS:
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1 second, got {getattr(self, name)}")

  def environ(self) -> dict[str, str]:
    """The environment variables `from_environ` reads back into this config."""
    env = {ENV_COORDINATOR: self.coordinator_address,
           ENV_NUM_PROCESSES: str(self.num_processes), ENV_PROCESS_ID: str(self.process_id),
           ENV_LOCAL_CPU_DEVICES: str(self.local_cpu_devices), ENV_HOST: self.host}
    env.update({var: str(getattr(self, name)) for name, var in ENV_TIMEOUTS.items()})
    return env

  @classmethod
  def from_environ(cls, environ: Mapping[str, str] | None = None) -> ProcessConfig:
    """The config a launcher put in the environment; ValueError naming a missing or bad
    variable."""
    environ = os.environ if environ is None else environ

    def integer(var: str) -> int:
      try:
        return int(environ[var])
      except ValueError:
        raise ValueError(f"{var}={environ[var]!r} is not an integer") from None

    missing = [v for v in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
               if v not in environ]
    if missing:
      raise ValueError(f"not a process of a multi-process run: {', '.join(missing)} unset "
                       f"(start it with scripts/launch_local.py)")
    optional = {name: integer(var) for name, var in ENV_TIMEOUTS.items() if var in environ}
    if ENV_LOCAL_CPU_DEVICES in environ:
      optional["local_cpu_devices"] = integer(ENV_LOCAL_CPU_DEVICES)
    if ENV_HOST in environ:
      optional["host"] = environ[ENV_HOST]
    config = cls(coordinator_address=environ[ENV_COORDINATOR],
                 num_processes=integer(ENV_NUM_PROCESSES), process_id=integer(ENV_PROCESS_ID),
                 **optional)
    config.check()
    return config


def initialize(config: ProcessConfig) -> None:
  """Joins the run: JAX's config for cross-process work, then `jax.distributed.initialize`
  with every timeout explicit; prints `JOINED` (stderr) when every process has joined.

  Must run before anything starts a JAX backend. Sets: `jax_num_cpu_devices`,
  `jax_cpu_collectives_implementation="gloo"` (CPU collectives across processes), the
  cross-host transfer server's address (`jax_cross_host_transfer_socket_address`: what a
  `jax.device_put` to another process's device goes through) and its timeout. The
  coordination service's heartbeat and shutdown timeouts bound how long a dead process goes
  unnoticed and how long the exit barrier waits.
  """
  config.check()
  jax.config.update("jax_num_cpu_devices", config.local_cpu_devices)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # A port of its own: with port 0 the other processes never reach it (jax 0.10.2, CPU).
  jax.config.update("jax_cross_host_transfer_socket_address",
                    f"{config.host}:{free_port(config.host)}")
  jax.config.update("jax_cross_host_transport_addresses", f"{config.host}:0")
  jax.config.update("jax_cross_host_transfer_timeout_seconds", config.transfer_timeout_s)
  jax.distributed.initialize(
      coordinator_address=config.coordinator_address, num_processes=config.num_processes,
      process_id=config.process_id, cluster_detection_method="deactivate",
      initialization_timeout=config.init_timeout_s,
      heartbeat_timeout_seconds=config.heartbeat_timeout_s,
      shutdown_timeout_seconds=config.shutdown_timeout_s)
  progress(f"{JOINED} process {config.process_id} of {config.num_processes}, "
           f"{jax.local_device_count()} local of {jax.device_count()} devices")


def coordination_client():
  """This process's client of the coordination service (its key-value store and barriers);
  None before `initialize`."""
  return jax_distributed.global_state.client


def barrier(name: str, timeout_s: int) -> None:
  """Waits until every process has reached the barrier `name` (each name once per run), at
  most `timeout_s` seconds (then an error). Before a process exits or drops a transport, so
  the arrays it offered have been taken: a pull from a server that is gone waits out its
  deadline."""
  coordination_client().wait_at_barrier(f"crosspool/{name}", timeout_s * 1000)


def gather(name: str, value: str, timeout_s: int) -> list[str] | None:
  """Every process's `value` (each `name` once per run), through the coordination service's
  key-value store: process 0 gets them in process order, waiting at most `timeout_s` seconds
  for each; the others publish theirs and get None."""
  client = coordination_client()
  client.key_value_set(f"crosspool/gather/{name}/{jax.process_index()}", value)
  if jax.process_index():
    return None
  return [client.blocking_key_value_get(f"crosspool/gather/{name}/{p}", timeout_s * 1000)
          for p in range(jax.process_count())]


def launched(environ: Mapping[str, str] | None = None) -> bool:
  """Whether this process was started as a process of a multi-process run (a launcher set its
  `ENV_PROCESS_ID`; `ProcessConfig.from_environ` reads the rest)."""
  return ENV_PROCESS_ID in (os.environ if environ is None else environ)


def free_port(host: str = "127.0.0.1") -> int:
  """A TCP port free on `host` now."""
  with socket.socket() as s:
    s.bind((host, 0))
    return s.getsockname()[1]


def parse_group(text: str) -> tuple[tuple[int, int], ...]:
  """`"0:0,1:0"` -> ((0, 0), (1, 0)): devices as process:local_index, comma-separated."""
  members = []
  for item in text.split(","):
    process, sep, local = item.strip().partition(":")
    if not sep or not process.isdigit() or not local.isdigit():
      raise ValueError(f"device {item.strip()!r} of {text!r} is not process:local_index "
                       f"(e.g. 0:1)")
    members.append((int(process), int(local)))
  return tuple(members)


@dataclasses.dataclass(frozen=True)
class DeviceGroups:
  """The KV pool's and the weights pool's devices, each named (process, local device index):
  the multi-process counterpart of the executor's `DeviceSplit`."""

  kv: tuple[tuple[int, int], ...]
  weights: tuple[tuple[int, int], ...]

  @classmethod
  def parse(cls, kv: str, weights: str) -> DeviceGroups:
    """From "process:local,..." strings (`parse_group`)."""
    return cls(parse_group(kv), parse_group(weights))

  def check(self, local_counts: Mapping[int, int]) -> None:
    """ValueError for an empty group, a device named twice or in both groups, or one that
    the run does not have; `local_counts`: each process's number of local devices."""
    for name, group in (("KV", self.kv), ("weights", self.weights)):
      if not group:
        raise ValueError(f"device groups: the {name} group has no devices")
      repeated = sorted({d for d in group if group.count(d) > 1})
      if repeated:
        raise ValueError(f"device groups: the {name} group names {_names(repeated)} twice")
      absent = [d for d in group if d[1] >= local_counts.get(d[0], 0)]
      if absent:
        raise ValueError(
            f"device groups: the {name} group names {_names(absent)}, not in the run "
            f"({', '.join(f'process {p}: {n} devices' for p, n in sorted(local_counts.items()))})")
    both = sorted(set(self.kv) & set(self.weights))
    if both:
      raise ValueError(f"device groups: {_names(both)} in both the KV and the weights group")

  def resolve(self) -> tuple[list[jax.Device], list[jax.Device]]:
    """The groups' jax devices (of every process, in the groups' order), checked against
    the run's devices (`check`)."""
    by_process: dict[int, list[jax.Device]] = {}
    for device in sorted(jax.devices(), key=lambda d: d.id):
      by_process.setdefault(device.process_index, []).append(device)
    self.check({p: len(devices) for p, devices in by_process.items()})
    return ([by_process[p][i] for p, i in self.kv],
            [by_process[p][i] for p, i in self.weights])


def _names(devices) -> str:
  return ", ".join(f"{p}:{i}" for p, i in devices)
