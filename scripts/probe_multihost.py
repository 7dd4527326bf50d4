r"""Measures a hidden state's trip between two processes by each cross-process transport.

Runs in each process of a 2-process run started by scripts/launch_local.py. For each
transport of --transports (crosspool_jax.distributed.transfer: put, pull, permute) and each
[T, D] float32 hidden state of --tokens x --d_model: process 0 sends it to process 1's device,
process 1 waits for it and sends it back, process 0 waits for it; after --warmup untimed
round trips, --iters timed ones. The cost of one transfer is half a round trip (median, p10
and p90 over the iterations), timed by process 0 from the send to the returned array being
ready. The rounds interleave the transports (each round: every transport and shape for
--iters / --rounds trips), so load from other jobs hits them alike. The array that comes back
must equal the one sent (checked on each shape's first trip). With --local_cpu_devices=2 (of
launch_local.py) the baseline `one_process_put` is timed too: the same round trip between two
devices of process 0 by `jax.device_put`, what the single-process executor pays.

With --engine_path, each transport is also timed through the engine's own path
(crosspool_jax.distributed.serving.CrossProcessTransfers, what the crosspool executor calls in a
multi-process run): one MoE layer's exchange of a micro-batch of T tokens, the hidden state
[T, D] with its routing (ids and weights [T, --top_k]) put on the weights device in one call,
the expert output [T, D] put back (record `engine_layer/<transport>`: `median_us` etc. are half
the layer's round trip, `layer_*_us` the whole of it, `bytes_out` / `bytes_back` what crosses).

Process 0 writes JSON (header: jax version, git revision, load average at start and end,
iterations; one record per transport and shape) to --out and prints a table.

  python scripts/launch_local.py --num_processes=2 --target=scripts/probe_multihost.py \
      --target_args="--iters=400 --out=workdir/probe/multihost.json"
  python scripts/launch_local.py --num_processes=2 --target=scripts/probe_multihost.py \
      --target_args="--engine_path --transports=pull --tokens=4,16 --d_model=64,2048 \
      --out=workdir/probe/engine_layer.json"
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import time

import jax
import numpy as np
from absl import flags

from crosspool_jax.cli import progress, run_script, start_script
from crosspool_jax.distributed import runtime
from crosspool_jax.distributed.serving import CrossProcessTransfers
from crosspool_jax.distributed.transfer import TRANSPORTS, make_transport
from crosspool_jax.provenance import git_revision

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_list("transports", list(TRANSPORTS), "transports to measure")
  flags.DEFINE_list("tokens", ["8", "64"], "T of the [T, D] hidden state")
  flags.DEFINE_list("d_model", ["256", "2048"], "D of the [T, D] hidden state")
  flags.DEFINE_integer("iters", 200, "timed round trips per transport and shape")
  flags.DEFINE_integer("rounds", 4, "rounds the timed trips are spread over")
  flags.DEFINE_integer("warmup", 5, "untimed round trips per transport and shape first")
  flags.DEFINE_string("out", None, "JSON output (process 0)")
  flags.DEFINE_bool("engine_path", False, "also time a MoE layer's exchange through the "
                    "engine's CrossProcessTransfers, per transport")
  flags.DEFINE_integer("top_k", 2, "experts per token of --engine_path's routing")


def round_trip(transport, x, spec, *, a, b) -> tuple[float | None, jax.Array | None]:
  """One trip a -> b -> a; process 0 returns its seconds and the array back, process 1
  (None, None)."""
  if jax.process_index() == 0:
    start = time.perf_counter()
    transport.move(x, a, b)
    back = transport.move(spec, b, a)
    back.block_until_ready()
    return time.perf_counter() - start, back
  there = transport.move(spec, a, b)
  there.block_until_ready()
  transport.move(there, b, a)
  return None, None


def one_process_trip(x, spec, *, a, a2) -> tuple[float | None, jax.Array | None]:
  """The baseline in process 0: a -> a2 -> a by `jax.device_put` between two of its own
  devices (what the single-process executor pays); process 1 takes no part."""
  if jax.process_index() != 0:
    return None, None
  start = time.perf_counter()
  back = jax.device_put(jax.device_put(x, a2), a)
  back.block_until_ready()
  return time.perf_counter() - start, back


class EngineLayerTrip:
  """One MoE layer's exchange a -> b -> a as the crosspool executor makes it across processes
  (`CrossProcessTransfers.put`): (hidden state, ids, weights) to b in one put, the output
  back (here the hidden state itself: the expert call is not timed). Both processes hold the
  inputs as the executor's replicated program does (process 1's are placeholders of a's)."""

  def __init__(self, transfers: CrossProcessTransfers, top_k: int, *, a, b):
    self.transfers, self.top_k, self.a, self.b = transfers, top_k, a, b
    self._inputs: dict[tuple[int, int], tuple] = {}

  def inputs(self, spec) -> tuple:
    """The layer's inputs on a for a [T, D] hidden state (the probe's array of that shape)."""
    t, d = spec.shape
    if (t, d) not in self._inputs:
      host = np.random.default_rng(t * d).standard_normal((t, d), dtype=np.float32)
      ids = np.arange(t * self.top_k, dtype=np.int32).reshape(t, self.top_k) % 8
      weights = np.full((t, self.top_k), 1 / self.top_k, np.float32)
      self._inputs[t, d] = jax.device_put((host, ids, weights), self.a)
    return self._inputs[t, d]

  def bytes_out(self, spec) -> int:
    return sum(x.nbytes for x in self.inputs(spec))

  def __call__(self, x, spec) -> tuple[float | None, jax.Array | None]:
    del x
    inputs = self.inputs(spec)
    start = time.perf_counter()
    h, _, _ = self.transfers.put(inputs, self.b)
    back = self.transfers.put(h, self.a)
    if jax.process_index() != 0:
      return None, None
    back.block_until_ready()
    return time.perf_counter() - start, back


def main(argv: list[str]) -> None:
  start_script(argv)
  config = runtime.ProcessConfig.from_environ()
  if config.num_processes != 2:
    raise ValueError(f"the probe runs in 2 processes, this run has {config.num_processes}")
  runtime.initialize(config)
  a, b = runtime.DeviceGroups.parse("0:0", "1:0").resolve()
  a, b = a[0], b[0]
  shapes = [(int(t), int(d)) for t in FLAGS.tokens for d in FLAGS.d_model]
  transports = {name: make_transport(name, config) for name in FLAGS.transports}
  trips = {name: functools.partial(round_trip, transport, a=a, b=b)
           for name, transport in transports.items()}
  layer_trips = {}
  if FLAGS.engine_path:
    for name, transport in transports.items():
      layer_trips[f"engine_layer/{name}"] = EngineLayerTrip(
          CrossProcessTransfers(transport), FLAGS.top_k, a=a, b=b)
    trips.update(layer_trips)
  if config.local_cpu_devices > 1:
    a2 = runtime.DeviceGroups.parse("0:1", "1:1").resolve()[0][0]
    trips["one_process_put"] = functools.partial(one_process_trip, a=a, a2=a2)
  header = {"jax": jax.__version__, "git_revision": git_revision(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "loadavg_start": list(os.getloadavg()), "iters": FLAGS.iters,
            "rounds": FLAGS.rounds, "warmup": FLAGS.warmup, "dtype": "float32",
            "device_kind": a.device_kind, "top_k": FLAGS.top_k}
  arrays = {}
  for t, d in shapes:
    host = np.random.default_rng(t * d).standard_normal((t, d), dtype=np.float32)
    spec = jax.ShapeDtypeStruct((t, d), np.float32)
    arrays[t, d] = (jax.device_put(host, a) if jax.process_index() == 0 else spec, spec, host)
  times: dict[tuple[str, int, int], list[float]] = {}
  for name, trip in trips.items():
    for (t, d), (x, spec, host) in arrays.items():
      for i in range(FLAGS.warmup):
        _, back = trip(x, spec)
        if i == 0 and back is not None and not np.array_equal(np.asarray(back), host):
          raise RuntimeError(f"{name}: the [{t}, {d}] array came back changed")
      progress(f"probe: {name} [{t}, {d}] warm")
  per_round = max(1, FLAGS.iters // FLAGS.rounds)
  for r in range(FLAGS.rounds):
    for name, trip in trips.items():
      for (t, d), (x, spec, _) in arrays.items():
        for _ in range(per_round):
          seconds, _ = trip(x, spec)
          if seconds is not None:
            times.setdefault((name, t, d), []).append(seconds)
    progress(f"probe: round {r + 1} of {FLAGS.rounds}")
  runtime.barrier("probe done", config.transfer_timeout_s)  # every offer taken
  if jax.process_index() != 0:
    return
  header["loadavg_end"] = list(os.getloadavg())
  records = []
  for (name, t, d), seconds in times.items():
    one_way_us = np.asarray(seconds) * 1e6 / 2
    record = {"transport": name, "T": t, "D": d, "bytes": t * d * 4,
              "trips": len(seconds), "median_us": float(np.median(one_way_us)),
              "p10_us": float(np.percentile(one_way_us, 10)),
              "p90_us": float(np.percentile(one_way_us, 90))}
    if name in layer_trips:
      spec = arrays[t, d][1]
      record |= {"bytes_out": layer_trips[name].bytes_out(spec), "bytes_back": t * d * 4,
                 **{f"layer_{k}": 2 * record[k] for k in ("median_us", "p10_us", "p90_us")}}
    records.append(record)
  print(format_table(records))
  if FLAGS.out:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w") as f:
      json.dump({"header": header, "records": records}, f, indent=1)


def format_table(records: list[dict]) -> str:
  lines = ["| transport | T | D | KiB | median us | p10 us | p90 us |",
           "|---|---|---|---|---|---|---|"]
  lines += [f"| {r['transport']} | {r['T']} | {r['D']} | {r['bytes'] / 1024:g} | "
            f"{r['median_us']:.0f} | {r['p10_us']:.0f} | {r['p90_us']:.0f} |" for r in records]
  return "\n".join(lines)


if __name__ == "__main__":
  define_flags()
  run_script(main)
