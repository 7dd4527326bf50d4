"""The simulator's event loop: a trace served by the real engine in simulated time.

`Simulation` builds an `Engine` of the given config (its policy, `Scheduler`, `KVPool`,
`WeightsPool` and expert policy: the real ones) on a `HostBackend` whose executor is a
`SimExecutor`, with a `SimClock` as the engine's clock. `run` offers each trace record at its
arrival time (a record reaches the engine at the first step boundary at or after it, its
arrival stamped with its trace time; when the engine is idle the clock jumps to the next
arrival; or on the serving loop's logical clock, `arrival_mode="logical"`), steps the
engine, and the executor advances the clock by each step's modelled seconds. So every time
the engine records (arrival, admission, tokens, finish) is simulated. `simulate` returns a
run's `counts` and, under `simulated`, the fields a measured run has under `wall_clock`
(`experiments.runner.summarize_run`), in simulated seconds: a simulated and a measured run
compare column by column. Invariant: the schedule depends on the trace,
the config and the modelled times only (no wall clock).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence

from crosspool_jax.engine import Engine, EngineConfig
from crosspool_jax.experiments.runner import summarize_run
from crosspool_jax.experiments.serving import ARRIVAL_MODES, never_fits
from crosspool_jax.models.config import ModelConfig
from crosspool_jax.roofline import DeviceSpec
from crosspool_jax.sim.backend import HostBackend
from crosspool_jax.sim.cost_model import CostModel, Efficiency
from crosspool_jax.sim.executor import SimClock, SimExecutor
from crosspool_jax.sim.routing import Router, Routing
from crosspool_jax.workloads import TraceRecord, prompt_ids


@dataclasses.dataclass(frozen=True)
class SimModel:
  """One model of a simulated fleet: its config, requests at once, context served, KV group
  (its home KV device under CrossPool)."""

  cfg: ModelConfig
  max_batch: int
  max_context: int
  group: int = 0


@dataclasses.dataclass(frozen=True)
class SLO:
  """A finished request meets it if its TTFT and the p90 of its token gaps are within these."""

  ttft_s: float = 1.0
  tbt_s: float = 0.2


def offer(engine: Engine, record: TraceRecord, request_id: str, model: SimModel | None
          ) -> str | None:
  """Submits a trace record (greedy, no stop id); returns why it was rejected, or None."""
  try:
    why = None if model is None else never_fits(engine, record, model.cfg, model.max_context)
    if why:
      raise ValueError(why)
    vocab = model.cfg.vocab_size if model else 1
    engine.submit(model_id=record.model_id, max_new_tokens=record.max_new_tokens,
                  prompt_ids=prompt_ids(record, vocab, low=min(3, vocab - 1)),
                  request_id=request_id)
  except ValueError as e:  # the engine changes nothing on a bad request
    return str(e)
  return None


class Simulation:
  """One engine config and fleet, served in simulated time (see the module docstring).

  Args:
    config: the engine config (its policy, pages, devices, micro-batches, expert slots).
    fleet: model id -> `SimModel`, registered in this order.
    device: the device kind of every device (a `roofline.DEVICES` name, or a `DeviceSpec`:
      one with calibrated launch and transfer latencies).
    weight_dtype: the models' weight dtype.
    efficiency: the cost model's efficiency factors (default: all 1, the roofline).
    host_step_s, first_run_s: the host's seconds per engine step, and a program's extra
      seconds the first time it runs at a shape (`CostModel`; 0 unless calibrated).
    routing: the routing model of CrossPool policies (default: uniform, seed 0).
    log: where progress lines go (None: nowhere).
    progress_interval_s: wall seconds between progress lines.
  """

  def __init__(self, config: EngineConfig, fleet: Mapping[str, SimModel], *,
               device: str | DeviceSpec, weight_dtype: str = "bfloat16",
               efficiency: Efficiency | None = None, host_step_s: float = 0.0,
               first_run_s: float = 0.0,
               routing: Routing | None = None, log: Callable[[str], None] | None = None,
               progress_interval_s: float = 5.0):
    if not fleet:
      raise ValueError("fleet is empty: add at least one model")
    cost = CostModel(device, weight_dtype=weight_dtype, kv_dtype=config.kv_dtype,
                     efficiency=efficiency or Efficiency(), host_step_s=host_step_s,
                     first_run_s=first_run_s)
    self.clock = SimClock()
    self.fleet = dict(fleet)
    self.log = log or (lambda msg: None)
    self.progress_interval_s = progress_interval_s
    self.executor: SimExecutor | None = None

    def make_executor(models, config, weights_pool, kv_pools):
      self.executor = SimExecutor(models, config, cost, self.clock, weights_pool=weights_pool,
                                  router=Router(routing or Routing()), kv_pools=kv_pools)
      return self.executor

    self.engine = Engine(config, clock=self.clock,
                         backend=HostBackend(make_executor, weight_dtype=weight_dtype))
    for model_id, m in self.fleet.items():
      self.engine.register_model(model_id, cfg=m.cfg, params={}, max_batch=m.max_batch,
                                 max_context=m.max_context, group=m.group)
    self.engine.start()
    self.offered: list[tuple[int, int]] = []  # (engine step it preceded, record index)
    self.rejected: list[dict] = []

  def run(self, records: Sequence[TraceRecord], *, arrival_mode: str = "trace",
          logical_step_s: float = 0.05) -> dict:
    """Serves the records (sorted by arrival); returns the engine's metrics with a `serve`
    section shaped as `experiments.serving.serve`'s (times simulated).

    Args:
      records: the trace.
      arrival_mode: as the serving loop's (`experiments.serving.serve`): "trace", a record
        arrives at its trace time (stamped with it); "logical", at the first step boundary
        where a clock advancing `logical_step_s` per engine step (jumping to the next arrival
        when idle) has passed it, stamped with the simulated time then: the measured loop's
        schedule exactly, whatever the steps cost; "all_at_once", every record at the start.
      logical_step_s: the logical clock's seconds per step.
    """
    if arrival_mode not in ARRIVAL_MODES:
      raise ValueError(f"arrival_mode must be one of {ARRIVAL_MODES}, got {arrival_mode!r}")
    records = sorted(records, key=lambda r: r.arrival_s)
    ids = [f"r{i:05d}" for i in range(len(records))]
    engine, clock = self.engine, self.clock
    trace = arrival_mode == "trace"
    logical = 0.0  # the logical clock, arrival_mode "logical"

    def arrived(i: int) -> bool:
      if arrival_mode == "all_at_once":
        return True
      return records[i].arrival_s <= (clock.now if trace else logical)

    wall0 = last = time.perf_counter()
    done, i = 0, 0
    while True:
      while i < len(records) and arrived(i):
        now = clock.now
        if trace:  # stamped with its arrival
          clock.now = records[i].arrival_s
        why = offer(engine, records[i], ids[i], self.fleet.get(records[i].model_id))
        clock.now = now
        self.offered.append((engine.steps, i))
        if why:
          self.rejected.append({"request_id": ids[i], "model_id": records[i].model_id,
                                "arrival_s": records[i].arrival_s, "reason": why})
          done += 1
        i += 1
      if engine.scheduler.has_work():
        done += sum(ev.finished for ev in engine.step())
        logical += logical_step_s
        if engine.blocked:  # nothing can run before the next arrival
          if i == len(records):
            break
          if trace:
            clock.now = max(clock.now, records[i].arrival_s)
      elif i < len(records):
        if trace:
          clock.now = max(clock.now, records[i].arrival_s)
        else:
          logical = max(logical, records[i].arrival_s)
      else:
        break
      if time.perf_counter() - last >= self.progress_interval_s:
        last = time.perf_counter()
        self.log(f"[{last - wall0:6.1f}s] simulated {clock.now:9.2f}s | steps "
                 f"{engine.steps:7d} | done {done}/{len(records)} | preemptions "
                 f"{sum(p.preemptions for p in engine.pools.values())}")
    metrics = engine.metrics()
    rejected = {r["request_id"] for r in self.rejected}
    submitted = [rid for rid in ids if rid not in rejected]
    outputs = {rid: engine.output(rid) for rid in submitted}
    start = records[0].arrival_s if trace and records else 0.0
    metrics["serve"] = {
        "request_ids": ids, "submitted": len(submitted), "rejected": self.rejected,
        "cancelled_at_timeout": [], "outputs": outputs, "startup_s": 0.0,
        "serve_wall_s": clock.now - start,
        "output_tokens": sum(len(o) for o in outputs.values()),
        "output_tokens_per_s": sum(len(o) for o in outputs.values()) / max(clock.now - start,
                                                                           1e-9),
        "wall_s": time.perf_counter() - wall0}
    return metrics


def simulate(config: EngineConfig, fleet: Mapping[str, SimModel],
             records: Sequence[TraceRecord], *, device: str | DeviceSpec, slo: SLO = SLO(),
             arrival_mode: str = "trace", logical_step_s: float = 0.05,
             work: list | None = None, **kwargs) -> dict:
  """Serves `records` in simulated time (`Simulation`'s arguments in `kwargs`, `run`'s
  arrival mode).

  Returns:
    {"counts": as a measured run's, "simulated": a measured run's `wall_clock` fields in
    simulated seconds (plus `step_s`: percentiles of the modelled step times), "wall_s": the
    simulation's own wall time}; `work`, if given, gets every step's `Work` (calibration).
  """
  sim = Simulation(config, fleet, device=device, **kwargs)
  metrics = sim.run(records, arrival_mode=arrival_mode, logical_step_s=logical_step_s)
  summary = summarize_run(metrics, metrics["serve"], slo)
  step_s = sim.executor.step_s
  summary["simulated"] = summary.pop("wall_clock") | {
      "step_s": {"mean": sum(step_s) / len(step_s) if step_s else 0.0,
                 "max": max(step_s, default=0.0), "steps": len(step_s)}}
  if work is not None:
    work.extend(sim.executor.step_work)
  return summary | {"wall_s": metrics["serve"]["wall_s"]}
