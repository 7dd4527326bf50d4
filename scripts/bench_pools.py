r"""Benchmarks of the memory pools: weights pool (expert residency) and, to come, the KV pool.

Weights pool section: a fleet of seeded tiny MoE models of one expert shape class serves a
stream of requests (each picks a model, Zipf-skewed, and greedily generates from a random
prompt). The routing trace of that run is recorded (all experts resident) and replayed through
the host-side pool under each policy at several pool sizes (fractions of the fleet's experts
resident), next to Belady's MIN on the same trace: hit rate, experts loaded, bytes swapped.
Then, per size, the same requests run live with the experts in the pool (swapping every step)
under the live policies: the tokens must equal the recording run's, and the swap time split
into hidden (elapsed before the layer needed the experts) and exposed is reported. On a CPU
host that split shows the order of events, not a speedup. A recorded trace (JSONL) can be
replayed instead of running models (--trace_in).

Hit rates: a hit is an expert resident when its layer runs (prefetched ones count). MIN bounds
the hits of demand-fetching policies and the loads (fetches) of every policy; a prefetching
policy can beat MIN's hit rate only by loading more experts, so compare "loads" too.

  # record + replay + live on a 4-model tiny fleet (about a minute on 2 CPU cores):
  python scripts/bench_pools.py --families=mixtral,qwen3_moe --models_per_family=2 \
      --requests=16 --out=workdir/bench/pools.json --trace_out=workdir/bench/trace.jsonl
  # replay a recorded trace only:
  python scripts/bench_pools.py --trace_in=workdir/bench/trace.jsonl --out=workdir/bench/replay.json
  # the random fleet and a trained one (scripts/make_fleet.py) side by side, prompts from the
  # trained fleet's held-out text:
  python scripts/bench_pools.py --fleet=workdir/fleet --families=mixtral,qwen3_moe \
      --models_per_family=4 --requests=16 --out=workdir/bench/pools_trained.json

Writes JSON ({"header", "weights_pool", "kv_pool"}; with --fleet also "weights_pool_trained")
to --out and a table to stdout (with --fleet: both fleets' tables and a side-by-side one).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from absl import app, flags

from crosspool_jax.cli import run_script, start_script
from crosspool_jax.engine.weights_generate import generate_pooled
from crosspool_jax.experiments.report import policy_rows
from crosspool_jax.models.checkpoint import load_checkpoint
from crosspool_jax.models.config import FAMILIES, tiny_config
from crosspool_jax.models.model import init_params
from crosspool_jax.pools.expert_policies import POLICIES
from crosspool_jax.pools.expert_trace import (
  TraceEvent,
  belady_stats,
  prediction_accuracy,
  read_jsonl,
  replay,
  write_jsonl,
)
from crosspool_jax.pools.weights_buffers import DeviceWeightsPool
from crosspool_jax.pools.weights_pool import (
  ExpertModelSpec,
  ShapeClass,
  WeightsPool,
  fleet_experts,
)
from crosspool_jax.provenance import git_revision
from crosspool_jax.train.corpus import build_corpus
from crosspool_jax.train.fleet import read_fleet

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the flags; called only when the script runs as a program."""
  flags.DEFINE_list("sections", ["weights", "kv"], "Sections to run: weights, kv.")
  flags.DEFINE_list("families", ["mixtral", "qwen3_moe"],
                    "Tiny-config families of the fleet (one shape class: D=64, F=32).")
  flags.DEFINE_integer("models_per_family", 2, "Seeds per family (fine-tunes of one base).")
  flags.DEFINE_integer("requests", 16, "Requests in the workload.")
  flags.DEFINE_integer("prompt_len", 8, "Prompt tokens per request.")
  flags.DEFINE_integer("new_tokens", 8, "Generated tokens per request.")
  flags.DEFINE_integer("batch", 1, "Prompts per request (one batch).")
  flags.DEFINE_float("zipf", 1.0, "Skew of model popularity (weight of rank r: r^-zipf).")
  flags.DEFINE_integer("seed", 0, "Seed of the workload and the models.")
  flags.DEFINE_list("fractions", ["0.25", "0.5", "0.75"],
                    "Pool sizes as fractions of the fleet's experts resident.")
  flags.DEFINE_list("policies", ["lru", "lfu", "activation_aware"],
                    "Policies to replay (pin_all is added where everything fits).")
  flags.DEFINE_list("live_policies", ["activation_aware", "lru"],
                    "Policies run live (empty: replay only).")
  flags.DEFINE_string("trace_in", None, "Replay this JSONL trace (no model runs).")
  flags.DEFINE_string("trace_out", None, "Write the recorded trace here (JSONL).")
  flags.DEFINE_integer("trace_num_experts", None,
                       "--trace_in: experts per layer (default: max id + 1).")
  flags.DEFINE_list("trace_shape", ["64", "32", "float32"],
                    "--trace_in: d_model, d_ff, dtype of the experts (for bytes).")
  flags.DEFINE_string("out", None, "Write the JSON result here.")
  flags.DEFINE_string("fleet", None, "A trained fleet directory (scripts/make_fleet.py): the "
                      "weights section runs on the seeded random fleet AND on this fleet's "
                      "models of --families (up to --models_per_family each: the base, then "
                      "its fine-tunes), on the same requests with prompts from the fleet's "
                      "held-out text, side by side.")


# =============================================================================================
# Weights pool section


def make_fleet(families: Sequence[str], per_family: int, seed: int):
  """{model_id: (cfg, params)} of seeded tiny models."""
  fleet = {}
  for f in families:
    cfg = tiny_config(f)
    for i in range(per_family):
      fleet[f"{f}-{i}"] = (cfg, init_params(cfg, seed=seed * 1000 + len(fleet)))
  return fleet


def trained_fleet(fleet_dir: str, families: Sequence[str], per_family: int):
  """{model_id: (cfg, params)} of a trained fleet's models of `families`, up to `per_family`
  each in the fleet's order (its base, then its fine-tunes), and the fleet's held-out text
  (one int32 stream of every domain's held-out tokens)."""
  manifest = read_fleet(fleet_dir)
  fleet = {}
  for f in families:
    entries = [m for m in manifest["models"] if m["family"] == f][:per_family]
    if not entries:
      raise app.UsageError(f"--fleet {fleet_dir} has no {f} model; it has "
                           f"{sorted({m['family'] for m in manifest['models']})}")
    for entry in entries:
      fleet[entry["id"]] = load_checkpoint(entry["dir"])
  vocab = min(cfg.vocab_size for cfg, _ in fleet.values())
  corpus = build_corpus(seed=manifest["seed"], vocab_size=vocab,
                        **manifest["config"]["corpus"])
  return fleet, np.concatenate(list(corpus.heldout.values()))


def make_workload(model_ids: Sequence[str], vocab: int, *, requests: int, prompt_len: int,
                  batch: int, zipf: float, seed: int, text: np.ndarray | None = None
                  ) -> list[tuple[str, list[list[int]]]]:
  """(model_id, prompts) per request; model popularity Zipf-skewed, prompts random ids, or
  random windows of `text` (token ids) if given."""
  rng = np.random.default_rng(seed)
  weights = np.arange(1, len(model_ids) + 1, dtype=np.float64) ** -zipf
  picks = rng.choice(len(model_ids), size=requests, p=weights / weights.sum())
  if text is None:
    return [(model_ids[m], rng.integers(3, vocab, size=(batch, prompt_len)).tolist())
            for m in picks]
  return [(model_ids[m], [text[s:s + prompt_len].tolist()
                          for s in rng.integers(0, text.size - prompt_len, batch)])
          for m in picks]


def _slots(specs: Sequence[ExpertModelSpec], fraction: float) -> int:
  return max(max(s.num_experts for s in specs), round(fraction * fleet_experts(specs)))


def _host_pool(specs, slots, policy) -> WeightsPool:
  shape = specs[0].shape_class
  pool = WeightsPool(device_bytes=slots * shape.expert_bytes, policy=policy)
  for i, spec in enumerate(specs):
    pool.register_model(spec, slots_per_device=slots if i == 0 else None)
  return pool


def run_workload(wpool: DeviceWeightsPool, workload, new_tokens: int,
                 trace: list[TraceEvent] | None = None) -> list[list[list[int]]]:
  outs, step = [], 0
  for model_id, prompts in workload:
    outs.append(generate_pooled(wpool, model_id, prompts, max_new_tokens=new_tokens,
                                trace=trace, step_offset=step))
    step += new_tokens
  return outs


def replay_records(events: Sequence[TraceEvent], specs: Sequence[ExpertModelSpec],
                   fractions: Sequence[float], policies: Sequence[str]) -> list[dict[str, Any]]:
  """Hit rate etc. of each policy and Belady at each pool size, by trace replay."""
  records = []
  total = fleet_experts(specs)
  for fraction in fractions:
    slots = _slots(specs, fraction)
    bound = belady_stats(events, _host_pool(specs, slots, "lru"))
    todo = list(policies) + (["pin_all"] if slots >= total and "pin_all" not in policies
                             else [])
    for policy in todo:
      rec: dict[str, Any] = {"fraction": fraction, "slots": slots, "policy": policy,
                             "belady_hit_rate": bound["hit_rate"],
                             "belady_loads": bound["misses"]}
      try:
        stats = replay(events, _host_pool(specs, slots, policy))
        rec |= {k: v for k, v in stats.to_dict().items() if not k.startswith("swap_")}
      except ValueError as e:  # pin_all that does not fit
        rec["error"] = str(e)
      records.append(rec)
  return records


def live_records(fleet, workload, reference, fractions, policies, new_tokens):
  """Runs the workload with experts in the pool at each size; tokens and swap timing."""
  specs = [ExpertModelSpec.from_config(m, cfg) for m, (cfg, _) in fleet.items()]
  records = []
  for fraction in fractions:
    slots = _slots(specs, fraction)

    def fresh(policy, slots=slots):
      wpool = DeviceWeightsPool(WeightsPool(
          device_bytes=slots * specs[0].shape_class.expert_bytes, policy=policy))
      for i, (m, (cfg, params)) in enumerate(fleet.items()):
        wpool.register(m, cfg, params, slots_per_device=slots if i == 0 else None)
      return wpool

    # Untimed warm-up: the MoE step compiles once per pool size (S is part of its shapes);
    # a compilation in flight would delay the swap watcher's timestamps.
    warm = fresh(policies[0]) if policies else None
    for m in fleet:
      if warm is not None:
        generate_pooled(warm, m, workload[0][1], max_new_tokens=min(2, new_tokens))
    for policy in policies:
      wpool = fresh(policy)
      outs = run_workload(wpool, workload, new_tokens)
      stats = wpool.sync_stats()
      records.append({"fraction": fraction, "slots": slots, "policy": policy,
                      "tokens_match": outs == reference} | stats.to_dict())
      print(f"live {policy} @ {fraction:.2f}: hit rate {stats.hit_rate:.3f}, hidden "
            f"{stats.hidden_fraction:.3f}, tokens match {outs == reference}", file=sys.stderr,
            flush=True)
  return records


def specs_from_trace(events: Sequence[TraceEvent], num_experts: int | None,
                     shape: ShapeClass) -> list[ExpertModelSpec]:
  """Model specs implied by a trace (layers seen; experts per layer: flag or max id + 1).

  Models that the trace never requests are unknown to it, so pool sizes are fractions of the
  experts of the models in the trace.
  """
  layers: dict[str, set[int]] = {}
  top: dict[str, int] = {}
  for ev in events:
    layers.setdefault(ev.model, set()).add(ev.layer)
    if ev.next_layer is not None:
      layers[ev.model].add(ev.next_layer)
    top[ev.model] = max([top.get(ev.model, 0), *ev.experts, *(ev.predicted or ())])
  e_max = max(top.values()) + 1
  if num_experts is not None and num_experts < e_max:
    raise ValueError(f"--trace_num_experts={num_experts} but the trace has expert id "
                     f"{e_max - 1}")
  e = num_experts or e_max
  return [ExpertModelSpec(m, shape, e, 1, tuple(sorted(ls))) for m, ls in layers.items()]


def run_weights_section(fractions: Sequence[float]) -> dict[str, Any]:
  """The weights-pool benchmark (see the module docstring): {"weights_pool": ...}, and with
  --fleet also {"weights_pool_trained": ...} on the same requests."""
  if FLAGS.trace_in:
    events = read_jsonl(FLAGS.trace_in)
    if not events:
      raise app.UsageError(f"--trace_in {FLAGS.trace_in} holds no events")
    d, f, dtype = FLAGS.trace_shape
    specs = specs_from_trace(events, FLAGS.trace_num_experts, ShapeClass(int(d), int(f), dtype))
    return {"weights_pool": {
        "source": "trace", "trace_events": len(events),
        "fleet": {s.model_id: s.num_pooled_experts for s in specs},
        "prediction": _prediction(events, specs),
        "replay": replay_records(events, specs, fractions, FLAGS.policies), "live": []}}
  fleet = make_fleet(FLAGS.families, FLAGS.models_per_family, FLAGS.seed)
  trained, text = (None, None) if FLAGS.fleet is None else trained_fleet(
      FLAGS.fleet, FLAGS.families, FLAGS.models_per_family)
  vocab = min(cfg.vocab_size for cfg, _ in fleet.values())
  workload = make_workload(range(len(fleet)), vocab, requests=FLAGS.requests,
                           prompt_len=FLAGS.prompt_len, batch=FLAGS.batch, zipf=FLAGS.zipf,
                           seed=FLAGS.seed, text=text)
  result = {"weights_pool": weights_benchmark(fleet, workload, fractions,
                                              trace_out=FLAGS.trace_out)}
  if trained is not None:
    if len(trained) != len(fleet):
      raise app.UsageError(f"--fleet {FLAGS.fleet} holds {len(trained)} models of "
                           f"--families, the random fleet {len(fleet)}: lower "
                           "--models_per_family")
    result["weights_pool_trained"] = {"fleet_dir": FLAGS.fleet} | weights_benchmark(
        trained, workload, fractions)
  return result


def _prediction(events: Sequence[TraceEvent], specs: Sequence[ExpertModelSpec]
                ) -> dict[str, int | float]:
  return prediction_accuracy(events, {s.model_id: s.num_experts for s in specs})


def weights_benchmark(fleet, workload, fractions: Sequence[float], *,
                      trace_out: str | None = None) -> dict[str, Any]:
  """Records the routing of `workload` (requests name models by their index in `fleet`) with
  every expert resident, replays it under each policy and size, and runs it live."""
  specs = [ExpertModelSpec.from_config(m, cfg) for m, (cfg, _) in fleet.items()]
  if len({s.shape_class for s in specs}) != 1:
    raise app.UsageError(f"--families must share one expert shape class, got "
                         f"{sorted({str(s.shape_class) for s in specs})}")
  ids = list(fleet)
  workload = [(ids[m], prompts) for m, prompts in workload]
  # Recording run: everything resident, so routing is recorded as the models compute it.
  total = fleet_experts(specs)
  recorder = DeviceWeightsPool(WeightsPool(
      device_bytes=total * specs[0].shape_class.expert_bytes, policy="pin_all"))
  for i, (m, (cfg, params)) in enumerate(fleet.items()):
    recorder.register(m, cfg, params, slots_per_device=total if i == 0 else None)
  events: list[TraceEvent] = []
  reference = run_workload(recorder, workload, FLAGS.new_tokens, trace=events)
  print(f"recorded {len(events)} layer accesses of {len(fleet)} models", file=sys.stderr)
  if trace_out:
    os.makedirs(os.path.dirname(os.path.abspath(trace_out)), exist_ok=True)
    write_jsonl(events, trace_out)
  return {"source": "recorded", "trace_events": len(events),
          "fleet": {s.model_id: s.num_pooled_experts for s in specs},
          "workload": [{"model": m, "prompts": len(p)} for m, p in workload],
          "prediction": _prediction(events, specs),
          "replay": replay_records(events, specs, fractions, FLAGS.policies),
          "live": live_records(fleet, workload, reference, fractions, FLAGS.live_policies,
                               FLAGS.new_tokens)}


def format_table(result: dict[str, Any]) -> str:
  """Replay hit rates vs Belady (and live hidden fractions) as a fixed-width table."""
  live = {(r["fraction"], r["policy"]): r for r in result.get("live", [])}
  rows = [("resident", "slots", "policy", "hit rate", "MIN hit rate", "loads", "MIN loads",
           "MiB swapped", "live hidden", "tokens ok")]
  for r in result["replay"]:
    lv = live.get((r["fraction"], r["policy"]), {})
    if "error" in r:
      rows.append((f"{r['fraction']:.0%}", str(r["slots"]), r["policy"], "-", "-", "-", "-",
                   "-", "-", "does not fit"))
      continue
    rows.append((f"{r['fraction']:.0%}", str(r["slots"]), r["policy"], f"{r['hit_rate']:.3f}",
                 f"{r['belady_hit_rate']:.3f}", str(r["loads"]), str(r["belady_loads"]),
                 f"{r['bytes_swapped'] / 2**20:.2f}",
                 f"{lv['hidden_fraction']:.2f}" if lv else "-",
                 str(lv["tokens_match"]) if lv else "-"))
  return _fixed_width(rows)


def _fixed_width(rows: Sequence[Sequence[str]]) -> str:
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                   for row in rows)


def format_comparison(random: dict[str, Any], trained: dict[str, Any]) -> str:
  """Replay hit rates and loads against MIN's, the random fleet's next to the trained one's,
  and the activation-aware predictor's precision and recall on each."""
  lines = [_fixed_width(policy_rows(random, trained)), ""]
  for name, result in (("random", random), ("trained", trained)):
    p = result["prediction"]
    lines.append(f"next-layer prediction ({name}): precision {p['precision']:.3f} (chance "
                 f"{p['chance_precision']:.3f}), recall {p['recall']:.3f}")
  return "\n".join(lines)


# =============================================================================================
# KV pool section
#
# To add a KV-pool benchmark: write a function () -> dict (read its settings from flags of
# its own, defined above with a `kv_` prefix) and register it in KV_POOL_BENCHES; its result
# is written to result["kv_pool"][name]. None exists yet: the section is an empty dict.

KV_POOL_BENCHES: dict[str, Callable[[], dict[str, Any]]] = {}


def run_kv_section() -> dict[str, Any]:
  """Runs every registered KV-pool benchmark."""
  return {name: fn() for name, fn in KV_POOL_BENCHES.items()}


# =============================================================================================


def main(argv: Sequence[str]) -> None:
  start_script(argv)
  for s in FLAGS.sections:
    if s not in ("weights", "kv"):
      raise app.UsageError(f"--sections: unknown section {s!r}; known: weights, kv")
  for f in FLAGS.families:
    if f not in FAMILIES:
      raise app.UsageError(f"--families: unknown family {f!r}; known: {', '.join(FAMILIES)}")
  for p in [*FLAGS.policies, *FLAGS.live_policies]:
    if p not in POLICIES:
      raise app.UsageError(f"unknown policy {p!r}; known: {', '.join(POLICIES)}")
  try:
    fractions = [float(x) for x in FLAGS.fractions]
  except ValueError as e:
    raise app.UsageError(f"--fractions must be numbers: {e}") from e
  if not fractions or not all(0 < x <= 1 for x in fractions):
    raise app.UsageError(f"--fractions must be in (0, 1], got {FLAGS.fractions}")
  for name in ("requests", "prompt_len", "new_tokens", "batch", "models_per_family"):
    if FLAGS[name].value < 1:
      raise app.UsageError(f"--{name} must be >= 1, got {FLAGS[name].value}")
  header = {
      "jax_version": jax.__version__, "backend": jax.default_backend(),
      "device_kind": jax.devices()[0].device_kind,
      "git_revision": git_revision(),
      "flags": {name: FLAGS[name].value for name in (
          "sections", "families", "models_per_family", "requests", "prompt_len", "new_tokens",
          "batch", "zipf", "seed", "fractions", "policies", "live_policies", "trace_in",
          "trace_out", "trace_num_experts", "trace_shape", "out", "fleet")},
      "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
  }
  result: dict[str, Any] = {"header": header}
  if "weights" in FLAGS.sections:
    result |= run_weights_section(fractions)
  if "kv" in FLAGS.sections:
    result["kv_pool"] = run_kv_section()
  if FLAGS.out:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w") as f:
      json.dump(result, f, indent=1)
    print(f"wrote {FLAGS.out}", file=sys.stderr)
  if "weights_pool_trained" in result:
    print("random fleet (seeded init):")
    print(format_table(result["weights_pool"]))
    print(f"trained fleet ({FLAGS.fleet}):")
    print(format_table(result["weights_pool_trained"]))
    print("side by side (replay):")
    print(format_comparison(result["weights_pool"], result["weights_pool_trained"]))
  elif "weights_pool" in result:
    print(format_table(result["weights_pool"]))


if __name__ == "__main__":
  define_flags()
  run_script(main)
