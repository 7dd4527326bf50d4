r"""Where the paper's latency claim lives: TBT under bursts of long-ish contexts at one budget.

  python scripts/run_experiment.py --config=configs/experiments/paper_tbt.py:cpu
  python scripts/run_experiment.py --config=configs/experiments/paper_tbt.py:full \
      --config.fleet.m0.checkpoint=DIR0 ... --config.fleet.m7.checkpoint=DIR7

Each model in turn bursts (6x its rate for 2 s) with requests that each fit one device's KV
alone but not four at once. static and shared hold a model's KV on its own device: under its
burst, running requests outgrow the pages and the newest are preempted (recomputed later: a
TBT gap) or wait at admission. CrossPool's pooled KV over the KV devices holds the burst.
The report gives P99 TBT, TTFT and goodput per policy with the preemptions and rejections
behind them. Arrivals follow a logical clock (repeatable counts); latencies are wall clock.
"""

from __future__ import annotations

from crosspool_jax.experiments import config_lib as cl


def get_config(arg: str | None = None):
  c = cl.experiment_base("paper_tbt", arg, "P99 TBT under per-model bursts of contexts that "
                         "fit a device alone but not together, one memory budget")
  cl.cpu_setup(c)
  models = list(c.fleet.keys())
  c.workload = cl.workload_block(
      popularity=",".join(models), num_requests=40, total_rate=3.0, cv=1.0,
      bursts=tuple(((m,), 1.0 + 3.0 * i, 2.0, 6.0) for i, m in enumerate(models)),
      prompt_len=cl.length_dist(median=300.0, sigma=0.25, low=200, high=400),
      output_len=cl.length_dist("uniform", low=16, high=40))
  cl.loop_fields(c, arrival_mode="logical", logical_step_s=0.05)
  if c.variant == "full":
    cl.full_scale(c)
    models = list(c.fleet.keys())
    c.workload.popularity = ",".join(models)
    c.workload.bursts = tuple(((m,), 5.0 + 10.0 * i, 5.0, 6.0) for i, m in enumerate(models))
    c.workload.num_requests, c.workload.total_rate = 1000, 10.0
    c.workload.prompt_len = cl.length_dist(median=3072.0, sigma=0.3, low=1024, high=6144)
    c.workload.output_len = cl.length_dist("uniform", low=128, high=512)
  return c
