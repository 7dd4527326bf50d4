"""An experiment's crosspool runs across the processes of a multi-process run: the KV pool's
devices in one process, the weights pool's in another (`config.processes`), every process
running the same experiment loop (`scripts/run_experiment.py` started by
`scripts/launch_local.py`).

The engine's host state is replicated (`crosspool_jax/distributed/serving.py`), so the
experiment must be too: every process serves the same runs of the same config on the same
trace, and no decision of the loop follows the wall clock (`check_processes`: arrivals on the
logical clock or all at once, no time limit). Only the crosspool-family runs can be served
(`ProcessBackend`); the others are named as not served. Only process 0 writes results.
WORKSPACE.md, "The experiment runner across processes".
"""

from __future__ import annotations

import json
from collections.abc import Callable

import jax

from crosspool_jax.distributed import runtime
from crosspool_jax.distributed.serving import (
    CrossProcessTransfers,
    ProcessBackend,
    engine_devices,
)
from crosspool_jax.distributed.transfer import Transport, make_transport
from crosspool_jax.engine.policies import POLICIES, get_policy
from crosspool_jax.experiments.runner import measured_run, run_names
from crosspool_jax.experiments.serving import check_replicated

TRANSPORT = "pull"  # the one chosen by measurement (WORKSPACE.md, "Multi-process")
STATS = ("sent", "received", "sent_bytes", "received_bytes")


def served_runs(config) -> tuple[list[str], dict[str, str]]:
  """The runs of `config.policies` a multi-process run serves (the crosspool family, whose
  routed experts live in a weights pool), and {each other run: why it is not served}; in the
  order they are reported (`runner.run_names`)."""
  served, not_served = [], {}
  for name in run_names(config):
    policy = config.policies[name].get("kv_policy", config.engine.kv_policy)
    if get_policy(policy).pools_experts:
      served.append(name)
    else:
      not_served[name] = (f"kv_policy {policy!r} keeps a model's weights with its KV: a "
                          "multi-process run serves the crosspool policies only")
  return served, not_served


def check_processes(config) -> tuple[list[str], dict[str, str], runtime.DeviceGroups]:
  """Rejects an experiment config that cannot run across processes (ValueError naming the
  field): a simulated one, arrivals that follow the wall clock, no crosspool-family run, a
  KV planner that splits the devices itself, or a crosspool run whose device counts differ
  from `config.processes`' groups. Returns what it checked: `served_runs` and the groups."""
  if config.get("mode", "run") != "run":
    raise ValueError(f"config.mode={config.mode!r}: only measured runs (mode 'run') run across "
                     "processes")
  check_replicated(config)
  served, not_served = served_runs(config)
  if not served:
    pooled = [n for n, policy in POLICIES.items() if policy.pools_experts]
    raise ValueError(f"config.policies has no crosspool-family run ({', '.join(not_served)}): "
                     f"a multi-process run serves only those (kv_policy {' or '.join(pooled)})")
  try:
    groups = runtime.DeviceGroups.parse(config.processes.kv, config.processes.weights)
  except ValueError as e:
    raise ValueError(f"config.processes: {e}") from e
  for name in served:
    run = config.policies[name]
    if run.get("kv_planner", config.budget.kv_planner):
      raise ValueError(f"config.policies.{name}: kv_planner splits the devices itself; across "
                       "processes the devices are config.processes' groups (set "
                       "config.budget.kv_planner and the run's kv_planner to False)")
    for field, group, what in (("devices", groups.kv, "kv"),
                               ("weight_devices", groups.weights, "weights")):
      devices = run.get(field, config.engine[field])
      if len(devices) != len(group):
        raise ValueError(f"config.policies.{name}.{field} has {len(devices)} device(s), "
                         f"config.processes.{what}={config.processes[what]!r} names "
                         f"{len(group)}: the run's devices are that group's across processes")
  return served, not_served, groups


class Processes:
  """This process's part in an experiment across processes: joins the run (`join`), turns
  the config into the runs it serves on the groups' devices (`prepare`), serves each run
  through a `ProcessBackend` (`serve_run`, for `runner.run_experiment`) and records what
  crossed processes (`results`)."""

  def __init__(self, process_config: runtime.ProcessConfig, transport: Transport):
    self.process_config = process_config
    self.transport = transport
    self.process = jax.process_index()
    self.not_served: dict[str, str] = {}
    self.groups: dict[str, str] = {}
    self.devices: dict[str, list[str]] = {}

  @classmethod
  def join(cls) -> Processes:
    """Joins the run the launcher described in the environment, with the chosen transport."""
    process_config = runtime.ProcessConfig.from_environ()
    runtime.initialize(process_config)
    return cls(process_config, make_transport(TRANSPORT, process_config))

  @property
  def writes(self) -> bool:
    """Whether this process writes the results (process 0 only)."""
    return self.process == 0

  def prepare(self, config, log: Callable[[str], None]):
    """The experiment this run serves: `config` (checked, `check_processes`) with its runs
    that cannot run across processes removed (each logged and kept in `not_served`) and each
    served run's devices those of `config.processes`' groups."""
    served, self.not_served, groups = check_processes(config)
    indices = engine_devices(groups)
    kv, weights = groups.resolve()
    self.groups = {"kv": config.processes.kv, "weights": config.processes.weights}
    self.devices = {"kv": [str(d) for d in kv], "weights": [str(d) for d in weights]}
    c = config.copy_and_resolve_references()
    c.unlock()
    for name, why in self.not_served.items():
      del c.policies[name]
      log(f"   {name}: not served across processes ({why})")
    for name in served:
      c.policies[name].devices = indices["devices"]
      c.policies[name].weight_devices = indices["weight_devices"]
    log(f"process {self.process} of {jax.process_count()}: serving {', '.join(served)} with "
        f"KV devices {self.devices['kv']} and weights devices {self.devices['weights']}")
    return c

  def serve_run(self, c, records, *, run_id: str, log: Callable[[str], None]):
    """One run served in every process alike (`runner.measured_run` through a
    `ProcessBackend`); its counts gain `cross_process`: every process's transfers at start-up
    and while serving, and per served step (in process 0's results)."""
    transfers = CrossProcessTransfers(self.transport)
    at_start: dict = {}
    summary, finished = measured_run(
        c, records, run_id=run_id, log=log, backend=ProcessBackend(transfers), replicated=True,
        started=lambda: at_start.update(transfers.stats()))
    end = transfers.stats()
    mine = {"start_up": {k: at_start[k] for k in STATS},
            "serving": {k: end[k] - at_start[k] for k in STATS}}
    every = runtime.gather(f"transfers/{run_id}", json.dumps(mine),
                           self.process_config.transfer_timeout_s)
    if every is not None:
      per_process = [json.loads(x) for x in every]
      steps = max(1, summary["counts"]["steps"])
      serving = {k: sum(p["serving"][k] for p in per_process) for k in ("sent", "sent_bytes")}
      cross = {"transport": transfers.transport.name, "per_process": per_process,
               # every array sent is received once: the run's traffic between processes
               "serving_arrays": serving["sent"], "serving_bytes": serving["sent_bytes"],
               "arrays_per_step": serving["sent"] / steps,
               "bytes_per_step": serving["sent_bytes"] / steps}
      summary["counts"]["cross_process"] = cross
    return summary, finished

  def results(self) -> dict:
    """The results' `processes` block: the process count, the transport, the device groups
    and the runs not served (each run's transfers: its `counts.cross_process`)."""
    return {"count": jax.process_count(), "transport": self.transport.name,
            "groups": self.groups, "devices": self.devices, "not_served": self.not_served}

  def finish(self) -> None:
    """Waits until every process is done, so every array offered has been taken (a process
    that exits first would leave a peer's pull waiting out its deadline)."""
    runtime.barrier("experiment_served", self.process_config.transfer_timeout_s)
