"""config.mode="sim": an experiment config served in simulated time.

The same config file, fleet, workload, engine and budget blocks, policies and sweep as a
measured experiment (`experiments.runner.run_experiment`, its one loop over sweep points and
runs); each run is served by `simulate` on devices of `config.sim.device` instead of by an
engine on this machine. A fleet entry may name a public reference shape
(`fleet.<id>.reference`), since nothing needs weights. The results dict has the measured
schema, with each run's times under `simulated` (the fields a measured run has under
`wall_clock`, in simulated seconds) and `wall_clock` holding only the simulation's own
seconds; `mode` is "sim" and `device` names the simulated device, so every table and plot
says the times are modelled. A budget that cannot hold the fleet under a policy is a result:
the run is recorded as `refused` with the plan's reason.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from crosspool_jax.engine.policies.sizes import dtype_itemsize
from crosspool_jax.experiments.runner import check_experiment, run_experiment
from crosspool_jax.experiments.serving import engine_config, fleet_model_config
from crosspool_jax.roofline import DEVICES, DeviceSpec, device_spec
from crosspool_jax.sim.cost_model import Efficiency
from crosspool_jax.sim.routing import Routing
from crosspool_jax.sim.simulator import SLO, SimModel, simulate

# config.sim fields: the host's terms of the cost model, and those that replace the device's
# launch and transfer latencies where set
HOST_TERMS = ("host_step_s", "first_run_s")
SPEC_OVERRIDES = ("dispatch_s", "link_latency_s")


def sim_config(config):
  """A resolved, unlocked copy of `config` for simulation: config.sim checked (ValueError
  naming the field) and, if config.sim.weight_dtype is set, every fleet entry's dtype set to
  it (the plan and the cost model then count the same bytes)."""
  c = config.copy_and_resolve_references()
  c.unlock()
  if c.sim.device not in DEVICES:
    raise ValueError(f"config.sim.device must be one of {sorted(DEVICES)}, got "
                     f"{c.sim.device!r}")
  if c.sim.weight_dtype:
    try:
      dtype_itemsize(c.sim.weight_dtype)
    except (TypeError, ValueError) as e:
      raise ValueError(f"config.sim.weight_dtype: {e}") from e
    for entry in c.fleet.values():
      entry.dtype = c.sim.weight_dtype
  elif len({e.dtype for e in c.fleet.values()}) > 1:
    raise ValueError("config.sim.weight_dtype is unset and the fleet entries' dtypes differ "
                     f"({sorted({e.dtype for e in c.fleet.values()})}): the cost model has one")
  for block, make in (("efficiency", Efficiency), ("routing", Routing)):
    try:
      make(**c.sim[block].to_dict())
    except (TypeError, ValueError) as e:
      raise ValueError(f"config.sim.{block}: {e}") from e
  for name in (*HOST_TERMS, *SPEC_OVERRIDES):
    value = c.sim.get(name)
    if value is not None and not (isinstance(value, int | float) and value >= 0):
      raise ValueError(f"config.sim.{name} must be a number of seconds >= 0, got {value!r}")
  return c


def sim_device(c) -> DeviceSpec:
  """config.sim.device's spec with config.sim's launch and transfer latencies, where set."""
  overrides = {name: c.sim.get(name) for name in SPEC_OVERRIDES}
  return dataclasses.replace(device_spec(c.sim.device),
                             **{k: float(v) for k, v in overrides.items() if v is not None})


def sim_fleet(c) -> dict[str, SimModel]:
  """The simulated fleet of a run's config (`runner.run_config`: groups and contexts planned)."""
  return {m: SimModel(fleet_model_config(e), e.max_batch, e.max_context, e.group)
          for m, e in c.fleet.items()}


def simulate_run(c, records, *, run_id: str, log: Callable[[str], None],
                 work: dict | None = None) -> tuple[dict, None]:
  """Serves one run in simulated time (`runner.run_experiment`'s `serve_run` in mode "sim");
  if `work` is given, `work[run_id]` gets every step's `Work` (calibration).

  Returns:
    ({"counts", "simulated", "wall_clock": {"simulation_s"}}, None: no tokens are computed).
  """
  weight_dtype = next(iter(c.fleet.values())).dtype
  run = simulate(engine_config(c.engine), sim_fleet(c), records, device=sim_device(c),
                 slo=SLO(ttft_s=c.slo.ttft_s, tbt_s=c.slo.tbt_s), weight_dtype=weight_dtype,
                 efficiency=Efficiency(**c.sim.efficiency.to_dict()),
                 **{name: float(c.sim.get(name) or 0.0) for name in HOST_TERMS},
                 routing=Routing(**c.sim.routing.to_dict()), log=log,
                 progress_interval_s=c.progress_interval_s, arrival_mode=c.arrival_mode,
                 logical_step_s=c.logical_step_s,
                 work=None if work is None else work.setdefault(run_id, []))
  log(f"   {run_id}: {run['simulated']['serve_wall_s']:.1f}s simulated, "
      f"{run['counts']['steps']} steps, in {run['wall_s']:.1f}s")
  return {"counts": run["counts"], "simulated": run["simulated"],
          "wall_clock": {"simulation_s": run["wall_s"]}}, None


def simulate_experiment(config, *, log: Callable[[str], None], command: str = "",
                        trace_dir: str | None = None) -> dict:
  """`run_experiment` of a config with mode "sim" (module docstring); its results dict, with
  `device` the simulated devices."""
  if config.get("mode") != "sim":
    raise ValueError(f"config.mode must be 'sim' to simulate, got {config.get('mode')!r}")
  c = sim_config(config)
  check_experiment(c)
  results = run_experiment(c, log=log, command=command, trace_dir=trace_dir,
                           serve_run=simulate_run)
  spec = sim_device(c)
  count = max(len(r["engine"]["devices"]) + len(r["engine"]["weight_devices"])
              for r in results["runs"])
  return results | {"device": {"platform": "sim", "device_kind": spec.name, "count": count,
                               "spec": dataclasses.asdict(spec)}}
