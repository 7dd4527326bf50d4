"""The engine in one process of a multi-process run: the crosspool executor's transfers across
processes (`CrossProcessTransfers`) and the backend that serves with them (`ProcessBackend`).

Control design (replicated, deterministic): every process runs the same engine loop on the
same registrations and requests, so the scheduler, the KV pool's and the weights pool's host
state agree in every process without being sent. Every process issues every program; JAX runs
a program only where its devices are (an array of another process's device is a placeholder
with no local data), so each process computes on its own devices only. What crosses processes
goes through the one transport of `transfer.py` in the same order in every process: hidden
states, routing and expert outputs (`put`), and the device values the host state depends on,
the sampled tokens and the experts each layer chose (`read`: the owner sends them to every
other process). Invariant: a process's host state is a function of the registrations, the
requests and the values `read` returns, which are the same everywhere. WORKSPACE.md,
"Multi-process".
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import SingleDeviceSharding

from crosspool_jax.distributed.runtime import DeviceGroups
from crosspool_jax.distributed.transfer import Transport
from crosspool_jax.engine.backend import DeviceBackend
from crosspool_jax.engine.executors.api import PeerLostError, flatten_puts, put_local


def _device(x: jax.Array) -> jax.Device:
  (device,) = x.sharding.device_set
  return device


def _placeholder(shape, dtype, device: jax.Device) -> jax.Array:
  """An array of another process's device, with no local data (JAX runs nothing of it here)."""
  return jax.make_array_from_single_device_arrays(shape, SingleDeviceSharding(device), [],
                                                  dtype=dtype)


class CrossProcessTransfers:
  """The executor's `Transfers` across processes (the module docstring).

  `put` of arrays between two processes' devices is, per device pair, one
  `transport.move_all` in both (the source sends, the destination receives; any other
  process, and the source, make placeholders); a put within one process is `put_local`
  there and a placeholder elsewhere; host data is put by `jax.device_put` everywhere (a
  placeholder where the device is another process's). `read` gives every process the values:
  the owner of each array sends it to every other process's first device. A failed move, or
  a read of values a failed transfer fed, raises `PeerLostError`: in a multi-process run a
  runtime error of a read is taken for a lost peer (a pull from a process that is gone fails
  the programs downstream of it asynchronously, so the error shows at the next read, with no
  way to tell it from another device error).

  Counts the arrays and bytes this process sent and received (`stats`).
  """

  def __init__(self, transport: Transport):
    self.transport = transport
    self.process = jax.process_index()
    self._first = {}
    for device in sorted(jax.devices(), key=lambda d: d.id):
      self._first.setdefault(device.process_index, device)
    self.sent = self.received = self.sent_bytes = self.received_bytes = 0

  def stats(self) -> dict:
    return {"transport": self.transport.name, "sent": self.sent, "received": self.received,
            "sent_bytes": self.sent_bytes, "received_bytes": self.received_bytes}

  def _move_all(self, xs: list, src: jax.Device, dst: jax.Device) -> list | None:
    """One `transport.move_all` of arrays of one device pair: sent (None) or received."""
    try:
      out = self.transport.move_all(xs, src, dst)
    except Exception as e:
      raise PeerLostError(f"a transfer between processes failed ({src} -> {dst}, "
                          f"{self.transport.name}): {type(e).__name__}: {e}") from e
    moved = sum(x.nbytes for x in (xs if out is None else out))
    if out is None:
      self.sent, self.sent_bytes = self.sent + len(xs), self.sent_bytes + moved
    else:
      self.received, self.received_bytes = self.received + len(xs), self.received_bytes + moved
    return out

  def _exchange(self, moves: dict[tuple, list[tuple[int, jax.Array]]], out: list) -> None:
    """Per (source, destination) device pair, in order of first use (the same in every
    process), one `_move_all` of its arrays: `out[i]` gets what this process received."""
    for (src, dst), items in moves.items():
      if self.process == src.process_index:
        self._move_all([x for _, x in items], src, dst)
      else:
        specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for _, x in items]
        for (i, _), y in zip(items, self._move_all(specs, src, dst), strict=True):
          out[i] = y

  def put(self, tree, device):
    leaves, rebuild = flatten_puts(tree, device)
    out: list = [None] * len(leaves)
    local: list[int] = []  # leaves `put_local` puts: host data, or within this process
    moves: dict[tuple, list] = {}
    for i, (x, dst) in enumerate(leaves):
      src = _device(x) if isinstance(x, jax.Array) else None
      if src is None or src.process_index == dst.process_index == self.process:
        local.append(i)
      elif (src.process_index == dst.process_index
            or self.process not in (src.process_index, dst.process_index)):
        out[i] = _placeholder(x.shape, x.dtype, dst)  # other processes' business
      else:
        moves.setdefault((src, dst), []).append((i, x))
        if self.process == src.process_index:
          out[i] = _placeholder(x.shape, x.dtype, dst)
    self._exchange(moves, out)
    for i, y in zip(local, put_local([leaves[i] for i in local]), strict=True):
      out[i] = y
    return rebuild(out)

  def read(self, arrays: list) -> list:
    received: list = list(arrays)
    moves: dict[tuple, list] = {}
    for i, x in enumerate(arrays):
      src = _device(x)
      if src.process_index == self.process:  # sent to every other process
        for process, first in self._first.items():
          if process != self.process:
            moves.setdefault((src, first), []).append((i, x))
      else:
        moves.setdefault((src, self._first[self.process]), []).append((i, x))
    self._exchange(moves, received)
    try:
      return jax.device_get(received)
    except jax.errors.JaxRuntimeError as e:
      # A transfer that failed fails the programs fed by its array, and shows here (the
      # first blocking read after it), in this process's own arrays too.
      raise PeerLostError(f"a transfer between processes failed (seen reading a step's "
                          f"values: is another process gone?): {e}") from e


def engine_devices(groups: DeviceGroups) -> dict[str, tuple[int, ...]]:
  """The `EngineConfig` fields `devices` and `weight_devices` (indices into `jax.devices()`,
  which lists every process's devices) of the KV and weights groups, resolved and checked
  once (`DeviceGroups.resolve`)."""
  kv, weights = groups.resolve()
  index = {d: i for i, d in enumerate(jax.devices())}
  return {"devices": tuple(index[d] for d in kv),
          "weight_devices": tuple(index[d] for d in weights)}


class ProcessBackend(DeviceBackend):
  """Serves the crosspool policies in one process of a multi-process run: params stay on the
  host until the policy places them (every process keeps a host copy, since the weights pool's
  expert store reads them in every process), and the executor moves and reads arrays by
  `transfers`. `EngineConfig.devices` and `weight_devices` index `jax.devices()`, which lists
  every process's devices (`engine_devices` gives them from the groups named by process)."""

  def __init__(self, transfers: CrossProcessTransfers):
    self.transfers = transfers

  def place(self, config, params: dict, group: int) -> dict:
    del config, group
    return jax.tree.map(np.asarray, params)

  def start(self, policy, config, models, specs):
    if not policy.pools_experts:
      raise ValueError(f"policy {policy.name!r}: a multi-process run serves the crosspool "
                       f"policies only (the KV pool and the weights pool in different "
                       f"processes)")
    runtime = policy.start(config, models, specs)
    runtime.executor.transfers = self.transfers
    return runtime
