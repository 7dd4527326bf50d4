"""The engine under the crosspool policy in each process of a 2-process run (started by
scripts/launch_local.py from tests/distributed/test_engine_multiprocess.py):
`python engine_worker.py SPEC OUT MODE`.

SPEC (JSON): `checkpoints` {model: dir}, `engine` (EngineConfig fields but the devices),
`kv` and `weights` (device groups, process:local), `work` [[model, prompt, max_new_tokens,
sampling fields or null], ...]. Every process registers the models and submits the requests
alike; process 0 writes OUT (JSON: each request's tokens, status and error, the executor's
stats, the transfers' counts (all, and `serving_transfers`: those after start-up), the serving
loop's wall time `serve_s`).

  serve  runs every request to completion.
  die    process 1 kills itself (SIGKILL) after `die_after_steps` (SPEC) steps; process 0
         should fail every unfinished request and exit with the transfer's error.

`serve` is also what the test runs in one process for the reference.
"""

import json
import os
import signal
import sys
import time

import jax

from crosspool_jax.distributed import runtime
from crosspool_jax.distributed.serving import (
    CrossProcessTransfers,
    ProcessBackend,
    engine_devices,
)
from crosspool_jax.distributed.transfer import make_transport
from crosspool_jax.engine import Engine, EngineConfig
from crosspool_jax.engine.executors.api import PeerLostError
from crosspool_jax.models.sampling import SamplingParams


def build(spec: dict, *, devices, weight_devices, backend=None) -> tuple[Engine, list[str]]:
  """The engine of `spec` started on those devices, every request submitted; the request ids."""
  engine = Engine(EngineConfig(kv_policy="crosspool", devices=tuple(devices),
                               weight_devices=tuple(weight_devices), **spec["engine"]),
                  backend=backend)
  for model, checkpoint in spec["checkpoints"].items():
    engine.register_model(model, checkpoint=checkpoint, max_context=spec["max_context"])
  engine.start()
  rids = [engine.submit(model_id=m, prompt_ids=p, max_new_tokens=n,
                        sampling=SamplingParams(**s) if s else None)
          for m, p, n, s in spec["work"]]
  return engine, rids


def result(engine: Engine, rids: list[str]) -> dict:
  metrics = engine.metrics()
  rows = {row["request_id"]: row for row in metrics["requests"]}
  return {"outputs": [engine.output(r) for r in rids],
          "status": [rows[r]["status"] for r in rids], "errors": [rows[r]["error"] for r in rids],
          "preemptions": metrics["pools"]["0"]["preemptions"],
          "weights_pool": metrics["weights_pool"], "expert_calls": metrics["expert_calls"],
          "steps": engine.steps, "host": metrics["host"]}


def main(spec_path: str, out_path: str, mode: str) -> None:
  with open(spec_path) as f:
    spec = json.load(f)
  config = runtime.ProcessConfig.from_environ()
  runtime.initialize(config)
  transfers = CrossProcessTransfers(make_transport("pull", config))
  engine, rids = build(spec, **engine_devices(runtime.DeviceGroups.parse(spec["kv"],
                                                                        spec["weights"])),
                       backend=ProcessBackend(transfers))
  at_start = transfers.stats()  # start-up's transfers (compile_all's warm-up steps)
  me = jax.process_index()
  print(f"process {me}: started, serving {len(rids)} requests", flush=True)
  start = time.perf_counter()
  try:
    while engine.scheduler.has_work():
      engine.step()
      if mode == "die" and me == 1 and engine.steps == spec["die_after_steps"]:
        print(f"process 1: killing itself after step {engine.steps} at {time.time():.3f}",
              flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
  except PeerLostError:
    failed = [r for r in rids if engine.status(r).name == "FAILED"]
    print(f"process {me}: peer lost at step {engine.steps} at {time.time():.3f}; failed "
          f"{len(failed)} of {len(rids)} requests: {', '.join(failed)}", flush=True)
    if me == 0:
      with open(out_path, "w") as f:
        json.dump(result(engine, rids), f)
    raise
  if me == 0:
    with open(out_path, "w") as f:
      serving = {k: v - at_start[k] for k, v in transfers.stats().items()
                 if k != "transport"}
      json.dump(result(engine, rids) | {"transfers": transfers.stats(),
                                         "serving_transfers": serving,
                                         "serve_s": time.perf_counter() - start}, f)
  print(f"process {me}: served, {engine.steps} steps, transfers {transfers.stats()}",
        flush=True)
  runtime.barrier("served", config.transfer_timeout_s)  # every offer taken


if __name__ == "__main__":
  main(*sys.argv[1:])
