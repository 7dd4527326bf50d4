r"""Simulates one paper-scale fleet under each memory policy over one seeded bursty trace.

The real engine, scheduler, pools and expert policies serve the trace in simulated time; a
cost model charges each step (`crosspool_jax/sim/`, WORKSPACE.md "The simulator"). Every
policy plans the same fleet on the same devices (`MemoryPolicy.plan`, as the experiments and
the capacity analysis do): placement, KV pages per device, context caps, expert slots.
Prints a per-policy table (TTFT / TBT p50 and p99, goodput against the SLO, preemptions,
rejections, mean modelled step) and writes JSON to --out.

  # 8 Qwen1.5-MoE-A2.7B (public config values) on 8 x H100 SXM, CrossPool with 3 weights
  # devices, 300 requests of a bursty trace:
  python scripts/simulate.py --reference=qwen1.5-moe-a2.7b --copies=8 --device=h100_sxm \
      --num_devices=8 --weight_devices=3 --out=workdir/sim/qwen_x8_h100.json
  # the same on H200, Zipf routing over the experts:
  python scripts/simulate.py --device=h200 --routing=zipf --routing_exponent=1.0
  # 8 DeepSeek-V2-Lite (latent rows: 144 KiB pages hold 128 rows of 576 bf16), 100 requests:
  python scripts/simulate.py --reference=deepseek-v2-lite --page_kib=144 --num_requests=100
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence

from absl import flags

from crosspool_jax.capacity import REFERENCE_HF_CONFIGS, reference_config
from crosspool_jax.cli import progress, run_script, start_script
from crosspool_jax.engine import EngineConfig
from crosspool_jax.engine.policies import POLICIES, FleetModel, get_policy
from crosspool_jax.engine.policies.sizes import dtype_itemsize
from crosspool_jax.experiments.budget import plan_policy, refusal
from crosspool_jax.provenance import git_dirty, git_revision
from crosspool_jax.roofline import DEVICES, device_spec
from crosspool_jax.sim import SLO, Routing, SimModel, simulate
from crosspool_jax.sim.routing import ROUTING_KINDS
from crosspool_jax.workloads import LengthDist, WorkloadConfig, generate_trace, trace_stats

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the flags; called only when the script runs as a program."""
  flags.DEFINE_string("reference", "qwen1.5-moe-a2.7b",
                      f"Public config of every model: {', '.join(REFERENCE_HF_CONFIGS)}.")
  flags.DEFINE_integer("copies", 8, "Models (fine-tunes of the one base).", lower_bound=1)
  flags.DEFINE_enum("device", "h100_sxm", list(DEVICES), "Device kind of every device.")
  flags.DEFINE_integer("num_devices", 8, "Devices.", lower_bound=1)
  flags.DEFINE_integer("weight_devices", 3, "CrossPool: devices of the weights pool (the rest "
                       "hold the KV pool).", lower_bound=1)
  flags.DEFINE_string("dtype", "bfloat16", "Weights and KV dtype.")
  flags.DEFINE_float("page_kib", 128.0, "KV page size, KiB.")
  flags.DEFINE_float("reserve_fraction", 0.1, "Per-device fraction kept for activations.")
  flags.DEFINE_integer("max_batch", 16, "Requests per model at once.", lower_bound=1)
  flags.DEFINE_integer("max_context", 8192, "Longest prompt + output served.", lower_bound=1)
  flags.DEFINE_integer("token_budget", 2048, "Tokens fed per step over all models.",
                       lower_bound=1)
  flags.DEFINE_list("token_buckets", ["64", "256", "1024", "2048"], "Token buckets.")
  flags.DEFINE_integer("micro_batches", 2, "CrossPool micro-batches.", lower_bound=1)
  flags.DEFINE_integer("micro_batch_min_tokens", 64, "CrossPool: cut a batch only if each "
                       "micro-batch gets this many tokens.", lower_bound=0)
  flags.DEFINE_string("expert_policy", "lru", "CrossPool expert policy.")
  flags.DEFINE_list("policies", list(POLICIES), "Memory policies to simulate.")
  flags.DEFINE_integer("num_requests", 300, "Requests of the trace.", lower_bound=1)
  flags.DEFINE_float("total_rate", 8.0, "Requests per second over the fleet, outside bursts.")
  flags.DEFINE_float("cv", 3.0, "Coefficient of variation of the gaps (1 = Poisson).")
  flags.DEFINE_float("zipf_exponent", 1.0, "Popularity skew over the models.")
  flags.DEFINE_integer("random_bursts", 3, "Correlated bursts drawn from the seed.",
                       lower_bound=0)
  flags.DEFINE_float("prompt_median", 512.0, "Median prompt tokens (lognormal body).")
  flags.DEFINE_float("long_fraction", 0.05, "Fraction of long-context prompts.")
  flags.DEFINE_float("output_median", 128.0, "Median output tokens (lognormal).")
  flags.DEFINE_enum("routing", "uniform", list(ROUTING_KINDS), "Routing model of the experts.")
  flags.DEFINE_float("routing_exponent", 1.0, "Zipf exponent of --routing=zipf.")
  flags.DEFINE_integer("seed", 0, "Seed of the trace and of the routing.", lower_bound=0)
  flags.DEFINE_float("slo_ttft_s", 2.0, "SLO on the time to first token.")
  flags.DEFINE_float("slo_tbt_s", 0.1, "SLO on the p90 of a request's token gaps.")
  flags.DEFINE_float("progress_interval_s", 5.0, "Wall seconds between progress lines.")
  flags.DEFINE_string("out", None, "Write the results JSON here.")


def _engine_config(policy: str, plan, page_elems: int, kv_devices: int,
                   weight_devices: int) -> EngineConfig:
  return EngineConfig(
      kv_policy=policy, page_elems=page_elems, pages_per_device=plan.pages_per_device,
      kv_dtype=FLAGS.dtype, token_budget=FLAGS.token_budget,
      token_buckets=tuple(int(b) for b in FLAGS.token_buckets), max_batch=FLAGS.max_batch,
      devices=tuple(range(kv_devices)),
      weight_devices=tuple(range(kv_devices, kv_devices + weight_devices)),
      micro_batches=FLAGS.micro_batches, micro_batch_min_tokens=FLAGS.micro_batch_min_tokens,
      expert_policy=FLAGS.expert_policy, timeline_every=0,
      **({} if plan.expert_slots_per_device is None
         else {"expert_slots_per_device": plan.expert_slots_per_device}))


def _ms(p: dict, key: str) -> str:
  return "-" if p[key] is None else f"{1000 * p[key]:.0f}"


def format_table(runs: dict) -> str:
  """One row per policy: KV pages, finished / rejected, preemptions, latencies, goodput."""
  head = (f"{'policy':<22}{'KV pages':>10}{'done':>6}{'rej':>5}{'pre':>6}  "
          f"{'TTFT ms p50/p99':>16}  {'TBT ms p50/p99':>15}  {'goodput/s':>9}  "
          f"{'step ms':>7}  {'hits':>5}")
  lines = [head, "-" * len(head)]
  for name, run in runs.items():
    if "refused" in run:  # the budget cannot hold the fleet under this policy
      lines.append(f"{name:<22}refused: {run['refused']}")
      continue
    c, s = run["counts"], run["simulated"]
    hits = "-" if c["expert_hit_rate"] is None else f"{c['expert_hit_rate']:.2f}"
    lines.append(
        f"{name:<22}{c['kv_capacity_pages']:>10}{c['finished']:>6}{c['rejected']:>5}"
        f"{c['preemptions']:>6}  {_ms(s['ttft_s'], 'p50') + '/' + _ms(s['ttft_s'], 'p99'):>16}"
        f"  {_ms(s['tbt_s'], 'p50') + '/' + _ms(s['tbt_s'], 'p99'):>15}  "
        f"{s['goodput_requests_per_s']:>9.2f}  {1000 * s['step_s']['mean']:>7.2f}  {hits:>5}")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  start_script(argv)
  unknown = [p for p in FLAGS.policies if p not in POLICIES]
  if unknown:
    raise ValueError(f"--policies: unknown {unknown}; known: {', '.join(POLICIES)}")
  if FLAGS.weight_devices >= FLAGS.num_devices:
    raise ValueError(f"--weight_devices={FLAGS.weight_devices} leaves no KV device of "
                     f"--num_devices={FLAGS.num_devices}")
  spec = device_spec(FLAGS.device)
  cfg = reference_config(FLAGS.reference)
  ids = [f"{FLAGS.reference}-{i}" for i in range(FLAGS.copies)]
  fleet = {m: FleetModel(cfg, FLAGS.dtype, FLAGS.max_batch, min(FLAGS.max_context,
                                                                cfg.max_context)) for m in ids}
  page_elems = int(FLAGS.page_kib * 1024) // dtype_itemsize(FLAGS.dtype)
  workload = WorkloadConfig(
      model_ids=tuple(ids), num_requests=FLAGS.num_requests, total_rate=FLAGS.total_rate,
      cv=FLAGS.cv, zipf_exponent=FLAGS.zipf_exponent, random_bursts=FLAGS.random_bursts,
      burst_group_size=min(2, len(ids)), burst_duration_s=10.0, burst_factor=4.0,
      prompt_len=LengthDist(median=FLAGS.prompt_median, sigma=0.8, low=8,
                            high=FLAGS.max_context // 2, tail_fraction=FLAGS.long_fraction,
                            tail_low=FLAGS.max_context // 4,
                            tail_high=FLAGS.max_context * 3 // 4),
      output_len=LengthDist(median=FLAGS.output_median, sigma=0.6, low=4,
                            high=FLAGS.max_context // 4),
      seed=FLAGS.seed)
  records = generate_trace(workload)
  routing = Routing(kind=FLAGS.routing, exponent=FLAGS.routing_exponent, seed=FLAGS.seed)
  slo = SLO(ttft_s=FLAGS.slo_ttft_s, tbt_s=FLAGS.slo_tbt_s)
  progress(f"simulating {FLAGS.copies} x {FLAGS.reference} on {FLAGS.num_devices} x "
           f"{FLAGS.device}, {len(records)} requests, policies {', '.join(FLAGS.policies)}")
  runs, start = {}, time.perf_counter()
  for policy in FLAGS.policies:
    pools_experts = get_policy(policy).pools_experts
    kv = FLAGS.num_devices - FLAGS.weight_devices if pools_experts else FLAGS.num_devices
    weights = FLAGS.weight_devices if pools_experts else 0
    plan = plan_policy(fleet, policy=policy, kv_devices=kv, weight_devices=weights,
                       device_bytes=spec.memory_bytes, page_elems=page_elems,
                       kv_dtype=FLAGS.dtype, reserve_fraction=FLAGS.reserve_fraction,
                       check=False)
    why = refusal(plan)
    if why:
      progress(f"== {policy}: refused: {why}")
      runs[policy] = {"plan": dataclasses.asdict(plan), "refused": why}
      continue
    config = _engine_config(policy, plan, page_elems, kv, weights)
    models = {m: SimModel(cfg, FLAGS.max_batch, plan.max_context[m], plan.groups[m])
              for m in ids}
    progress(f"== {policy}: {kv} KV device(s) of {plan.pages_per_device} pages"
             + (f", {weights} weights device(s) of {plan.expert_slots_per_device} expert slots "
                f"per class" if weights else ""))
    run = simulate(config, models, records, device=FLAGS.device, slo=slo,
                   weight_dtype=FLAGS.dtype, routing=routing, log=progress,
                   progress_interval_s=FLAGS.progress_interval_s)
    c = run["counts"]
    progress(f"   {policy}: {c['finished']}/{c['requests']} finished, {c['rejected']} rejected, "
             f"{c['preemptions']} preemptions, {c['steps']} steps in {run['wall_s']:.1f}s")
    runs[policy] = {"engine": dataclasses.asdict(config), "plan": dataclasses.asdict(plan),
                    **run}
  print(f"\n{FLAGS.copies} x {FLAGS.reference} on {FLAGS.num_devices} x {FLAGS.device} "
        f"(simulated; SLO TTFT {slo.ttft_s}s, TBT p90 {slo.tbt_s}s)")
  print(format_table(runs))
  print(f"simulated in {time.perf_counter() - start:.1f}s")
  if FLAGS.out:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w") as f:
      json.dump({"command": shlex.join(["python", *sys.argv]), "git_revision": git_revision(),
                 "git_dirty": git_dirty(),
                 "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                 "device": dataclasses.asdict(spec), "reference": FLAGS.reference,
                 "copies": FLAGS.copies, "routing": dataclasses.asdict(routing),
                 "slo": dataclasses.asdict(slo), "workload": dataclasses.asdict(workload),
                 "trace": trace_stats(records), "runs": runs}, f, indent=1)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  define_flags()
  run_script(main)
