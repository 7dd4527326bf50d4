"""The device side of the KV pool: one `[pages_per_device, page_elems]` buffer per KV device.

Buffers are created once and then only ever updated in place by jitted functions that donate
them (`pallas_kernels.kv_write.write_kv` inside the model step): never copied, never resized.
`KVPool.set_limit` changes how many pages may be used, not the buffers.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from crosspool_jax.pools.kv_pool import KVPool


def allocate_kv_buffers(pool: KVPool, devices: Sequence[jax.Device], *, dtype=jnp.bfloat16,
                        fill: float = 0.0) -> list[jax.Array]:
  """One zero- (or `fill`-) initialised page buffer per KV device of `pool`.

  Args:
    pool: the host-side pool (its page size and pages per device).
    devices: the KV devices, one per `pool.num_devices`, from the device-split config.
    dtype: element dtype of every page (a model whose KV dtype differs must convert).
    fill: initial value; tests use NaN so a read of an unowned page shows.
  """
  if len(devices) != pool.num_devices:
    raise ValueError(f"pool has {pool.num_devices} KV devices, got {len(devices)} devices")
  return [allocate_kv_buffer(pool, d, dtype=dtype, fill=fill) for d in devices]


def allocate_kv_buffer(pool: KVPool, device: jax.Device, *, dtype=jnp.bfloat16,
                       fill: float = 0.0) -> jax.Array:
  """One page buffer of `pool` on `device` (a KV device's, or its replacement after a failed
  step consumed it), created there directly."""
  shape = (pool.pages_per_device, pool.page_elems)
  make = jax.jit(lambda: jnp.full(shape, fill, dtype))
  return jax.jit(make, out_shardings=jax.sharding.SingleDeviceSharding(device))()


def buffer_bytes(pool: KVPool, dtype) -> int:
  """Bytes of one device's buffer."""
  return pool.pages_per_device * pool.page_elems * jnp.dtype(dtype).itemsize
