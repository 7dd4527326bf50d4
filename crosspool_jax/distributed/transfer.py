"""Moving an array (a hidden state `[T, D]`) from one process's device to another's, by JAX's
own mechanisms, each behind the same call `Transport.move`:

  put      `jax.device_put` onto the other process's device (JAX's cross-host transfers,
           enabled by `runtime.initialize`): the call the single-process executor already makes.
  pull     `jax.experimental.transfer`: every process runs a transfer server, their addresses
           are exchanged through the distributed runtime's key-value store; the source offers
           the array (`await_pull`), the destination pulls it.
  permute  a program over a global mesh of the two devices: `jax.shard_map` + `lax.ppermute`
           (a collective: gloo on CPU).

Multi-controller rule: both processes of a transfer call `move` for it, in the same order
(the source with the array, the destination with its `jax.ShapeDtypeStruct`); no other process
takes part. The choice between them, measured: WORKSPACE.md, "Multi-process".
"""

from __future__ import annotations

import datetime
import functools
import itertools
from collections.abc import Callable
from typing import Protocol

import jax
import numpy as np
from jax.experimental import transfer
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from crosspool_jax.distributed.runtime import ProcessConfig, coordination_client

Spec = jax.Array | jax.ShapeDtypeStruct


class Transport(Protocol):
  name: str

  def move(self, x: Spec, src: jax.Device, dst: jax.Device) -> jax.Array | None:
    """In the source process `x` is the array on `src` (returns None); in the destination
    process `x` gives its shape and dtype (returns the array on `dst`)."""

  def move_all(self, xs: list[Spec], src: jax.Device, dst: jax.Device
               ) -> list[jax.Array] | None:
    """`move` of several arrays of one device pair (one exchange where the transport can)."""


def move_each(transport: Transport, xs: list[Spec], src: jax.Device, dst: jax.Device
              ) -> list[jax.Array] | None:
  """`move_all` as one `move` per array (the transports with no batched exchange)."""
  out = [transport.move(x, src, dst) for x in xs]
  return None if out and out[0] is None else out


def _role(src: jax.Device, dst: jax.Device) -> bool:
  """True in the destination process; ValueError in a process that is neither end, or for a
  transfer within one process (a plain `jax.device_put`)."""
  me = jax.process_index()
  if src.process_index == dst.process_index:
    raise ValueError(f"transfer {src} -> {dst} is within process {me}: not a cross-process one")
  if me not in (src.process_index, dst.process_index):
    raise ValueError(f"process {me} is neither end of the transfer {src} -> {dst}")
  return me == dst.process_index


class PutTransport:
  """`jax.device_put` to the other process's device; the destination names the source's
  array by a placeholder without local data."""

  name = "put"

  def move(self, x: Spec, src: jax.Device, dst: jax.Device) -> jax.Array | None:
    if not _role(src, dst):
      jax.device_put(x, SingleDeviceSharding(dst))
      return None
    remote = jax.make_array_from_single_device_arrays(x.shape, SingleDeviceSharding(src), [],
                                                      dtype=x.dtype)
    return jax.device_put(remote, SingleDeviceSharding(dst))

  def move_all(self, xs: list[Spec], src: jax.Device, dst: jax.Device
               ) -> list[jax.Array] | None:
    return move_each(self, xs, src, dst)


class PullTransport:
  """`jax.experimental.transfer`: the source offers the array under an id both ends count
  alike (one sequence per device pair), the destination pulls it from the source's server.
  The server lives as long as this object: keep it until the peers have pulled what it
  offered (`runtime.barrier`)."""

  name = "pull"

  def __init__(self, config: ProcessConfig):
    self._timeout = datetime.timedelta(seconds=config.transfer_timeout_s)
    local = jax.local_devices()
    self._server = transfer.start_transfer_server(
        local[0].client, f"{config.host}:0", [f"{config.host}:0"] * len(local))
    self._store = coordination_client()
    self._store.key_value_set(self._key(jax.process_index()), self._server.address())
    self._connections: dict[int, transfer.TransferConnection] = {}
    self._sequences: dict[tuple[int, int], itertools.count] = {}

  @staticmethod
  def _key(process: int) -> str:
    return f"crosspool/transfer_server/{process}"

  def _connection(self, process: int) -> transfer.TransferConnection:
    if process not in self._connections:
      address = self._store.blocking_key_value_get(
          self._key(process), int(self._timeout.total_seconds() * 1000))
      self._connections[process] = self._server.connect(address)
    return self._connections[process]

  def _uuid(self, src: jax.Device, dst: jax.Device) -> int:
    if max(src.id, dst.id) >= 1 << 16:
      raise ValueError(f"device ids {src.id}, {dst.id} do not fit the transfer id's 16 bits")
    sequence = self._sequences.setdefault((src.id, dst.id), itertools.count())
    return next(sequence) << 32 | src.id << 16 | dst.id

  def move(self, x: Spec, src: jax.Device, dst: jax.Device) -> jax.Array | None:
    out = self.move_all([x], src, dst)
    return None if out is None else out[0]

  def move_all(self, xs: list[Spec], src: jax.Device, dst: jax.Device
               ) -> list[jax.Array] | None:
    """One offer and one pull of all of `xs` under one id."""
    is_dst, uuid = _role(src, dst), self._uuid(src, dst)
    deadline = datetime.datetime.now() + self._timeout
    if not is_dst:
      self._server.await_pull(uuid, list(xs), timeout=deadline)
      return None
    want = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=SingleDeviceSharding(dst))
            for x in xs]
    return self._connection(src.process_index).pull(uuid, want, timeout=deadline)


class PermuteTransport:
  """One program over the global mesh (src, dst): `lax.ppermute` of the block on src to dst.
  The destination contributes a zero block (kept per shape) as its half of the input."""

  name = "permute"

  def __init__(self):
    self._zeros: dict[tuple, jax.Array] = {}

  def move(self, x: Spec, src: jax.Device, dst: jax.Device) -> jax.Array | None:
    is_dst = _role(src, dst)
    mesh = _pair_mesh(src, dst)
    if is_dst:
      key = (x.shape, np.dtype(x.dtype), dst)
      if key not in self._zeros:
        self._zeros[key] = jax.device_put(np.zeros(x.shape, x.dtype), dst)
      block = self._zeros[key]
    else:
      block = x
    pair = jax.make_array_from_single_device_arrays(
        (2 * x.shape[0], *x.shape[1:]), NamedSharding(mesh, PartitionSpec("pair")), [block])
    out = _send_first_block(mesh)(pair)
    return out.addressable_data(0) if is_dst else None

  def move_all(self, xs: list[Spec], src: jax.Device, dst: jax.Device
               ) -> list[jax.Array] | None:
    return move_each(self, xs, src, dst)


@functools.cache
def _pair_mesh(src: jax.Device, dst: jax.Device) -> Mesh:
  return Mesh(np.array([src, dst]), ("pair",))


@functools.cache
def _send_first_block(mesh: Mesh):
  spec = PartitionSpec("pair")
  return jax.jit(jax.shard_map(lambda x: jax.lax.ppermute(x, "pair", [(0, 1)]), mesh=mesh,
                               in_specs=spec, out_specs=spec))


# Each transport's name and how it is made from this process's config.
TRANSPORTS: dict[str, Callable[[ProcessConfig], Transport]] = {
    "put": lambda config: PutTransport(),
    "pull": PullTransport,
    "permute": lambda config: PermuteTransport(),
}


def make_transport(name: str, config: ProcessConfig) -> Transport:
  """The transport called `name` (`TRANSPORTS`); ValueError for another name."""
  if name not in TRANSPORTS:
    raise ValueError(f"unknown transport {name!r}: one of {', '.join(TRANSPORTS)}")
  return TRANSPORTS[name](config)
