r"""Cold models per accelerator at a P99 TBT SLO, simulated: a sweep over the fleet's size.

  python scripts/run_experiment.py --config=configs/experiments/models_per_gpu.py:sim \
      --workdir=workdir/models_per_gpu_sim --summary_out=benchmarks/sim/models_per_gpu.json

Copies (fine-tunes) of OLMoE-1B-7B (the public config's shape: 16 layers, 64 experts top-8 of
d_ff 1024; ~13.8 GB of bf16 weights, ~93 % of it routed experts) on 8 x H100 SXM 80 GB, the
same cold traffic (4 requests/s over the whole fleet, Zipf popularity, CV 4, bursts, a
long-context tail) spread over more and more models (`fleet_size`). static and shared must
keep every model's whole weights on one device, so their plan refuses a fleet beyond what the
devices hold; crosspool* keep only attention, embeddings and routers per model and swap the
routed experts through a weights pool on 3 devices. The report says at which fleet sizes each
policy meets the SLO (P99 TBT <= 100 ms, P99 TTFT <= 2 s, nothing rejected or refused); the
Aegaeon paper's anchor is 7 models per GPU (56 on 8). The sweep goes to 32 (4 per GPU): past
about 17 copies crosspool's pool swaps experts, and from 40 copies on a simulated crosspool
run takes several CPU minutes (static and shared hold 5 copies per device: 40 on 8).
Qwen3-30B-A3B is not the default here: one copy is ~61 GB, so static and shared hold 8 and
crosspool's pool holds the experts of 3; every other copy swaps, and a step that swaps loads
tens of thousands of experts, each a host-side pool update (WORKSPACE.md, "Simulated
experiments"): too slow for a CPU sweep.
"""

from __future__ import annotations

from crosspool_jax.experiments import config_lib as cl


def get_config(arg: str | None = None):
  """arg "sim" (the default): the sweep; "smoke": 2 and 4 models, 12 short requests (tests)."""
  c = cl.experiment_base("models_per_gpu", arg, "cold OLMoE-1B-7B-shaped models served within "
                         "a P99 TBT SLO on 8 x H100 SXM, by fleet size (simulated)",
                         variants=("sim", "smoke"))
  cl.paper_scale_setup(c, references={"olmoe-1b-7b": 1})
  c.sweep.field = "fleet_size"
  c.sweep.points = (8, 16, 24, 32)
  c.fleet_size = 8
  cl.paper_scale_workload(c, total_rate=4.0, burst_group_size=2)
  if c.variant == "smoke":
    c.sweep.points = (2, 4)
    c.workload.num_requests = 12
    c.workload.output_len.low, c.workload.output_len.high = 4, 16
  return c
