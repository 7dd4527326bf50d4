"""What the engine needs of an executor (and the types both share), and a fake executor whose
tokens are known by hand.

Invariant: an executor only runs the batches the scheduler built; it never admits, preempts
or frees anything (the scheduler and the pools do), so the scheduler can be tested on the fake.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Protocol

import jax
import numpy as np
from jax.sharding import SingleDeviceSharding

from crosspool_jax.engine.scheduler import ModelBatch
from crosspool_jax.models.config import ModelConfig
from crosspool_jax.models.sampling import NO_TOKEN
from crosspool_jax.pools.kv_pool import KVPool


class PeerLostError(RuntimeError):
  """Another process of a multi-process run is gone (a transfer to or from it failed): no step
  can run any more. The engine fails every unfinished request with this reason and re-raises
  it (never isolated to the models of one step, as a `StepError` is)."""


class StepError(RuntimeError):
  """A model's part of a step raised; `model_ids` names the models whose work it was."""

  def __init__(self, model_ids, cause: BaseException):
    self.model_ids = frozenset(model_ids)
    self.cause = cause
    super().__init__(f"step of model(s) {sorted(self.model_ids)} failed: "
                     f"{type(cause).__name__}: {cause}")


@contextlib.contextmanager
def blame(model_ids):
  """Turns an exception raised inside into a `StepError` naming `model_ids`."""
  try:
    yield
  except (StepError, PeerLostError):
    raise
  except Exception as e:
    raise StepError(model_ids, e) from e


@dataclasses.dataclass
class LoadedModel:
  """A registered model: config, params (on its group's device) and KV group."""

  model_id: str
  cfg: ModelConfig
  params: dict
  group: int


class Transfers(Protocol):
  """How an executor moves arrays between devices and reads them on the host: in one
  process `LocalTransfers`; in a multi-process run, arrays of other processes' devices cross
  by JAX's distributed transfers (`crosspool_jax.distributed.serving`)."""

  def put(self, tree, device):
    """`jax.device_put(tree, device)`: one device, or a list of devices for a list of trees."""

  def read(self, arrays: list) -> list:
    """`jax.device_get(arrays)`: the arrays' values on the host."""


try:  # the one copy `jax.device_put` of a jax.Array to another device ends in (jax 0.10.2)
  from jax._src.config import explicit_device_put_scope as _explicit_put
  from jax._src.lib import xla_client as _xc
  _BATCHED_COPY = _xc.batched_copy_array_to_devices_with_sharding
  _REUSE_INPUT = _xc.ArrayCopySemantics.REUSE_INPUT
except (ImportError, AttributeError):  # another jax: every put takes `jax.device_put`
  _BATCHED_COPY = None


@functools.cache
def _sharding(device: jax.Device) -> SingleDeviceSharding:
  return SingleDeviceSharding(device)


def flatten_puts(tree, device):
  """A put's leaves with their destinations, and how to rebuild its result from theirs.

  `tree` goes to `device`, or each tree of the list `tree` to its device of the list
  `device` (`jax.device_put`'s two forms the executors use). Returns ([(leaf, device)],
  rebuild: list of the leaves' results -> the put's result).
  """
  many = isinstance(device, (list, tuple))
  trees, devices = (list(tree), list(device)) if many else ([tree], [device])
  flat = [jax.tree.flatten(t) for t in trees]
  leaves = [(x, d) for (xs, _), d in zip(flat, devices, strict=True) for x in xs]

  def rebuild(out: list):
    it = iter(out)
    rebuilt = [jax.tree.unflatten(treedef, [next(it) for _ in xs]) for xs, treedef in flat]
    return rebuilt if many else rebuilt[0]

  return leaves, rebuild


def put_local(leaves: list) -> list:
  """`jax.device_put` of each (value, device) of this process, in one call per kind.

  A single-device jax.Array bound for another device is copied by ONE
  `batched_copy_array_to_devices_with_sharding` for all of them: the call `jax.device_put`
  itself ends in, without its per-call Python path (measured on the 2-core CPU, per array:
  ~40 us instead of ~290 for an array whose program is still running, the executors' usual
  case, ~7 instead of ~80 for a ready one). As `jax.device_put`: an explicit transfer under
  `jax.transfer_guard`, a committed result, the array itself when it is already there, a
  RuntimeError for a deleted (donated) array. Host data takes `jax.device_put`.
  """
  out: list = [None] * len(leaves)
  copy, other = [], []
  for i, (x, device) in enumerate(leaves):
    if (_BATCHED_COPY is not None and isinstance(x, jax.Array)
        and isinstance(x.sharding, SingleDeviceSharding)):
      if x.is_deleted():  # the batched copy does not check (it crashes the process)
        raise RuntimeError(f"Array has been deleted with shape={x.aval.str_short()}.")
      if x.sharding == _sharding(device):
        out[i] = x
      else:
        copy.append(i)
    else:
      other.append(i)
  if copy:
    shardings = [_sharding(leaves[i][1]) for i in copy]
    with _explicit_put():
      copied = _BATCHED_COPY([leaves[i][0] for i in copy],
                             [s._internal_device_list for s in shardings], shardings,
                             [_REUSE_INPUT] * len(copy))
    for i, y in zip(copy, copied, strict=True):
      out[i] = y
  if other:
    for i, y in zip(other, jax.device_put([leaves[i][0] for i in other],
                                          [leaves[i][1] for i in other]), strict=True):
      out[i] = y
  return out


class LocalTransfers:
  """Every device in this process: `put_local` (`jax.device_put`) and `jax.device_get`."""

  @staticmethod
  def put(tree, device):
    leaves, rebuild = flatten_puts(tree, device)
    return rebuild(put_local(leaves))

  @staticmethod
  def read(arrays: list) -> list:
    return jax.device_get(arrays)


@dataclasses.dataclass
class HostCounters:
  """What the host did for the steps an executor ran (its control cost, per step and token).

  Counted where the executor issues work: `dispatches`, jitted programs enqueued; `transfers`,
  arrays it put explicitly, from the host or between devices (the tests run steps under JAX's
  transfer guard, so no implicit transfer hides beside them); `blocking_reads`, arrays read
  back that the host waited on (the sampled tokens included); `host_s`, wall time inside
  `run_many` (`hosting`) minus the time blocked in those reads (`blocked`); `host_cpu_s`, the
  same span's CPU time of the thread that ran it (`time.thread_time`): the host's own work,
  programs that XLA:CPU runs inline in the calling thread included (those its cost analysis
  puts under ~1000 flops), time the thread waited for a core excluded (on a CPU machine the
  devices' programs run on the same cores, so `host_s` also counts their compute whenever
  the host thread is descheduled for it); `tokens`, tokens the steps generated; `steps`,
  model-loop iterations (a `run_many` call, or the most decode steps one of its multi-step
  dispatches ran).
  """

  steps: int = 0
  dispatches: int = 0
  transfers: int = 0
  blocking_reads: int = 0
  host_s: float = 0.0
  host_cpu_s: float = 0.0
  tokens: int = 0
  _blocked: list = dataclasses.field(default_factory=lambda: [0.0, 0.0], repr=False)

  @contextlib.contextmanager
  def hosting(self):
    """Counts the block (a `run_many`) as host time, less what `blocked` spans in it waited."""
    self._blocked[:] = [0.0, 0.0]
    wall, cpu = time.perf_counter(), time.thread_time()
    yield
    self.host_s += time.perf_counter() - wall - self._blocked[0]
    self.host_cpu_s += time.thread_time() - cpu - self._blocked[1]

  @contextlib.contextmanager
  def blocked(self):
    """A blocking device read inside `hosting`: not host time."""
    wall, cpu = time.perf_counter(), time.thread_time()
    yield
    self._blocked[0] += time.perf_counter() - wall
    self._blocked[1] += time.thread_time() - cpu

  def summary(self) -> dict:
    """Per-step means and host microseconds per generated token."""
    per = max(1, self.steps)
    return {"steps": self.steps, "dispatches_per_step": self.dispatches / per,
            "transfers_per_step": self.transfers / per,
            "blocking_reads_per_step": self.blocking_reads / per,
            "host_us_per_token": 1e6 * self.host_s / self.tokens if self.tokens else 0.0,
            "host_cpu_us_per_token": (1e6 * self.host_cpu_s / self.tokens if self.tokens
                                      else 0.0),
            "dispatches_per_token": self.dispatches / max(1, self.tokens),
            "blocking_reads_per_token": self.blocking_reads / max(1, self.tokens),
            "tokens": self.tokens}


class Executor(Protocol):
  """Runs each iteration's model batches (the colocated and the CrossPool executors)."""

  counters: HostCounters  # the host's control cost of the steps run so far

  @property
  def compile_count(self) -> int:
    """Executables (or warmed shapes) prepared so far."""

  def compile_all(self, log: Callable[[str], None] | None = None) -> int:
    """Prepares every shape a step can take, before serving; returns `compile_count`."""

  def run_many(self, batches: list[ModelBatch]) -> list[np.ndarray]:
    """Feeds every batch; returns, per batch, the token sampled after each request's fed
    tokens. Raises `StepError` naming the models whose work failed."""

  def restore_lost_buffers(self) -> list[KVPool]:
    """After a failed step: re-creates buffers the failure consumed; returns the KV pools
    whose pages were lost with them."""

  def remove_model(self, model_id: str) -> None:
    """Stops running a model (the engine returns its pages and slots)."""


def fake_token(position: int, vocab_size: int) -> int:
  """The token a model-less executor samples for `position`."""
  return position % vocab_size


def fake_tokens(batches: list[ModelBatch], vocab_size: int) -> list[np.ndarray]:
  """`run_many`'s result for a model-less executor: the token after a request's fed tokens is
  `fake_token` of the position it will occupy. A multi-step batch (`decode_steps`) gets each
  request's k tokens (positions num_cached + 1 .. + k), `NO_TOKEN` after them (no stop id is
  checked: the commit does)."""
  out = []
  for b in batches:
    if b.decode_steps is None:
      out.append(np.array([fake_token(r.num_cached + n, vocab_size) for r, n in
                           zip(b.requests, b.num_new, strict=True)], np.int32))
      continue
    rows = np.full((len(b.requests), max(b.decode_steps)), NO_TOKEN, np.int32)
    for i, (r, k) in enumerate(zip(b.requests, b.decode_steps, strict=True)):
      rows[i, :k] = [fake_token(r.num_cached + 1 + j, vocab_size) for j in range(k)]
    out.append(rows)
  return out


FAKE_VOCAB = 97  # the default vocabulary of the fake tokens (`FakeExecutor`, the simulator)


class FakeExecutor:
  """An executor with no model: the token sampled after a request's fed tokens is
  `fake_token(position)` of the position it will occupy, so every output is known by hand
  and a recomputed (preempted) request must reproduce it. Records every batch it ran."""

  def __init__(self, vocab_size: int = FAKE_VOCAB):
    self.vocab_size = vocab_size
    self.batches: list[list[ModelBatch]] = []
    self.counters = HostCounters()

  def fake_token(self, position: int) -> int:
    return fake_token(position, self.vocab_size)

  @property
  def compile_count(self) -> int:
    return 0

  def compile_all(self, log=None) -> int:
    return 0

  def run_many(self, batches: list[ModelBatch]) -> list[np.ndarray]:
    self.batches.append([ModelBatch(b.model_id, list(b.requests), list(b.num_new),
                                    None if b.decode_steps is None else list(b.decode_steps))
                         for b in batches])
    return fake_tokens(batches, self.vocab_size)

  def restore_lost_buffers(self) -> list[KVPool]:
    return []

  def remove_model(self, model_id: str) -> None:
    del model_id
