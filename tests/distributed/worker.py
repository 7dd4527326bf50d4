"""The program each process of tests/distributed/test_multiprocess.py runs (under
scripts/launch_local.py): `python worker.py MODE TRANSPORT KV WEIGHTS`.

  roundtrip   process 0 (the KV device, group KV) sends hidden states of several shapes to
              process 1 (the weights device, group WEIGHTS), all before process 1 takes the
              first; process 1 checks each against the same state computed locally, applies a
              stand-in expert and sends the results back; process 0 checks them against the
              stand-in computed locally in numpy. Exact equality.
  die         as roundtrip, but process 1 kills itself (SIGKILL) after receiving, while
              process 0 waits for the results.
  never_join  process 1 sleeps instead of joining.
"""

import os
import signal
import sys
import time

import jax
import numpy as np

from crosspool_jax.distributed import runtime
from crosspool_jax.distributed.transfer import make_transport

SHAPES = ((8, 256), (64, 2048), (1, 256))


def hidden_state(shape) -> np.ndarray:
  return np.random.default_rng(shape).standard_normal(shape, dtype=np.float32)


def stand_in_expert(x):
  return x * 2 - 1


def main(mode: str, transport_name: str, kv: str, weights: str) -> None:
  config = runtime.ProcessConfig.from_environ()
  if mode == "never_join" and config.process_id == 1:
    time.sleep(3600)
  runtime.initialize(config)
  (kv_device,), (weights_device,) = runtime.DeviceGroups.parse(kv, weights).resolve()
  transport = make_transport(transport_name, config)
  specs = [jax.ShapeDtypeStruct(shape, np.float32) for shape in SHAPES]
  if jax.process_index() == 0:
    for shape in SHAPES:
      transport.move(jax.device_put(hidden_state(shape), kv_device), kv_device, weights_device)
    for shape, spec in zip(SHAPES, specs, strict=True):
      back = transport.move(spec, weights_device, kv_device)
      assert back.devices() == {kv_device}, back.devices()
      np.testing.assert_array_equal(np.asarray(back), stand_in_expert(hidden_state(shape)))
  else:
    received = [transport.move(spec, kv_device, weights_device) for spec in specs]
    for shape, there in zip(SHAPES, received, strict=True):
      assert there.devices() == {weights_device}, there.devices()
      np.testing.assert_array_equal(np.asarray(there), hidden_state(shape))
    if mode == "die":
      print("process 1: killing itself", flush=True)
      os.kill(os.getpid(), signal.SIGKILL)
    for there in received:
      transport.move(jax.jit(stand_in_expert)(there), weights_device, kv_device)
  runtime.barrier("round trips done", config.transfer_timeout_s)  # all offers taken
  print(f"process {jax.process_index()}: {mode} ok", flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:])
