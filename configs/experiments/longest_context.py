r"""The longest context each organisation serves at a fixed memory budget.

  python scripts/run_experiment.py --config=configs/experiments/longest_context.py:cpu
  python scripts/run_experiment.py --config=configs/experiments/longest_context.py:full \
      --config.fleet.m0.checkpoint=DIR0 ... --config.fleet.m7.checkpoint=DIR7

Requests whose prompts grow from short to beyond what any one device can hold, one at a time
(low rate), on the same budget for every policy. `static` is capped by its reservation,
`shared` by one device's pool, `crosspool` by the KV pool over all KV devices (a sequence's
pages spread over them; attention runs per device and merges by LSE). Read "longest ctx" and
the rejections; `scripts/capacity.py` gives the same limits in closed form at paper scale.
"""

from __future__ import annotations

from crosspool_jax.experiments import config_lib as cl


def get_config(arg: str | None = None):
  c = cl.experiment_base("longest_context", arg, "longest context served at one memory "
                      "budget: prompts from 64 to 3,800 tokens, one request at a time")
  cl.cpu_setup(c, max_context=4096, token_budget=256, token_buckets=(16, 256))
  c.workload = cl.workload_block(
      popularity=",".join(c.fleet.keys()), num_requests=16, total_rate=0.5, cv=1.0,
      prompt_len=cl.length_dist("uniform", low=64, high=3800),
      output_len=cl.length_dist("constant", value=8))
  cl.loop_fields(c, arrival_mode="logical", logical_step_s=0.05)
  if c.variant == "full":
    cl.full_scale(c)
    c.workload.num_requests, c.workload.total_rate = 64, 0.2
    c.workload.prompt_len = cl.length_dist("uniform", low=1024, high=8000)
    c.workload.output_len = cl.length_dist("constant", value=64)
  return c
