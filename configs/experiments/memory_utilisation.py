r"""Memory utilisation under cold load: many models, little traffic each.

  python scripts/run_experiment.py --config=configs/experiments/memory_utilisation.py:cpu
  python scripts/run_experiment.py --config=configs/experiments/memory_utilisation.py:full \
      --config.fleet.m0.checkpoint=DIR0 ... --config.fleet.m7.checkpoint=DIR7

The paper's first claim: cold models rarely peak together, so a pooled KV cache is used far
better than per-model reservations. Eight models on four devices (cpu: tiny models of the four
GQA families and a tiny DeepSeek-V2, whose latent rows share the pages) share a steep Zipf
popularity (exponent 1.2): most of them are idle most of the time. Read the KV columns: pool
size in pages, peak and mean use, and the rejections each organisation needs.
"""

from __future__ import annotations

from crosspool_jax.experiments import config_lib as cl


def get_config(arg: str | None = None):
  c = cl.experiment_base("memory_utilisation", arg, "KV memory use of 8 cold models under "
                      "steep Zipf popularity, static vs shared vs crosspool")
  # 5 MiB per device: two models' weights per device under static and shared. The fleet cycles
  # through the four GQA families and DeepSeek-V2 (latent rows in the same pages).
  cl.cpu_setup(c, models=8, max_context=1024, device_bytes=5 * 2**20, token_buckets=(64,),
               families=(*cl.CPU_FAMILIES, "deepseek_v2"))
  c.workload = cl.workload_block(
      popularity=",".join(c.fleet.keys()), num_requests=80, total_rate=8.0, cv=2.0,
      zipf_exponent=1.2, random_bursts=2, burst_group_size=3, burst_duration_s=1.0,
      prompt_len=cl.length_dist(median=64.0, sigma=0.8, low=4, tail_fraction=0.05, tail_low=400,
                             tail_high=900),
      output_len=cl.length_dist("uniform", low=8, high=24))
  cl.loop_fields(c, arrival_mode="logical", logical_step_s=0.05)
  if c.variant == "full":
    cl.full_scale(c)
    c.workload.num_requests, c.workload.total_rate = 2000, 20.0
    c.workload.prompt_len = cl.length_dist(median=512.0, sigma=1.0, low=16, tail_fraction=0.05,
                                        tail_low=4096, tail_high=7936)
    c.workload.output_len = cl.length_dist("uniform", low=64, high=256)
    c.arrival_mode = "trace"
  return c
