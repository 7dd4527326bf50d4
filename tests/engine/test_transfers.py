"""`put_local`, the executors' puts within one process: what `jax.device_put` gives (values,
devices, committed results, the array itself when it is already there, an error for a donated
array, allowed under the transfer guard as an explicit put), by the batched copy for arrays
already on a device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crosspool_jax.engine.executors import api
from crosspool_jax.engine.executors.api import LocalTransfers, put_local


def test_the_batched_copy_is_there():
  # The pinned jax has it; a jax without it would fall back to `jax.device_put` silently.
  assert api._BATCHED_COPY is not None


def test_put_local_equals_device_put():
  d = jax.devices()
  x = jax.jit(lambda a: a * 2)(jax.device_put(np.arange(12.0).reshape(3, 4), d[0]))
  ids = jax.device_put(np.arange(6, dtype=np.int32), d[1])
  host = np.ones((2, 2), np.float32)
  with jax.transfer_guard("disallow"):  # explicit, as `jax.device_put` is
    got = put_local([(x, d[2]), (ids, d[3]), (host, d[2]), (x, d[0])])
  want = jax.device_put([x, ids, host, x], [d[2], d[3], d[2], d[0]])
  for g, w in zip(got, want, strict=True):
    assert g.devices() == w.devices()
    assert g.dtype == w.dtype and g._committed
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
  assert got[3] is x  # already there: the array itself, as `jax.device_put` returns
  assert not x.is_deleted() and not ids.is_deleted()
  out = jax.jit(lambda a, b: a.sum() + b.sum())(got[0], got[2])  # committed to d[2] together
  assert out.devices() == {d[2]}


def test_local_transfers_put_keeps_the_tree_structure():
  d = jax.devices()
  a, b = (jax.device_put(np.full(3, i, np.float32), d[0]) for i in range(2))
  one = LocalTransfers.put((a, {"b": b}), d[1])
  assert one[0].devices() == {d[1]} and one[1]["b"].devices() == {d[1]}
  many = LocalTransfers.put([(a,), (b, a)], [d[2], d[3]])
  assert [[x.devices() for x in t] for t in many] == [[{d[2]}], [{d[3]}, {d[3]}]]
  np.testing.assert_array_equal(np.asarray(many[1][0]), np.asarray(b))


def test_a_donated_array_is_refused_not_copied():
  d = jax.devices()
  x = jax.device_put(jnp.arange(4.0), d[0])
  jax.jit(lambda a: a + 1, donate_argnums=0)(x)
  assert x.is_deleted()
  with pytest.raises(RuntimeError, match="deleted"):
    put_local([(x, d[1])])
