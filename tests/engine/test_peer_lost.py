"""A lost process of a multi-process run (`PeerLostError` from the executor): the engine fails
every unfinished request, running or waiting, returns their pages and re-raises; requests
already finished stay finished. Host only (the fake executor through the simulator's backend);
the 2-process run is tests/distributed/test_engine_multiprocess.py."""

import pytest

from crosspool_jax.engine import Engine, EngineConfig, Status
from crosspool_jax.engine.executors.api import FakeExecutor, PeerLostError
from crosspool_jax.models.config import tiny_config
from crosspool_jax.sim.backend import HostBackend


class _LosesItsPeer(FakeExecutor):
  """The fake executor, whose run number `lost_at` (from 1) finds the other process gone."""

  def __init__(self, lost_at: int):
    super().__init__()
    self.lost_at = lost_at

  def run_many(self, batches):
    if len(self.batches) + 1 == self.lost_at:
      raise PeerLostError("a transfer between processes failed (test)")
    return super().run_many(batches)

  def expert_call_stats(self) -> dict:
    return {}


def test_a_lost_peer_fails_every_unfinished_request_and_is_raised():
  fake = _LosesItsPeer(lost_at=4)
  logged = []
  engine = Engine(EngineConfig(kv_policy="crosspool", page_elems=256, pages_per_device=31,
                               token_budget=24, token_buckets=(8, 24), max_batch=2,
                               devices=(0,), weight_devices=(1,), expert_slots_per_device=8),
                  backend=HostBackend(lambda models, config, weights, kv_pools: fake),
                  log=logged.append)
  engine.register_model("m", cfg=tiny_config("mixtral"), params={}, max_context=64)
  engine.start()
  short = engine.submit(model_id="m", prompt_ids=[1, 2], max_new_tokens=1)  # done in step 1
  rids = [engine.submit(model_id="m", prompt_ids=[1, 2, 3], max_new_tokens=8)
          for _ in range(3)]  # max_batch 2: one of them still waits
  for _ in range(3):
    engine.step()
  assert engine.status(short) == Status.FINISHED
  assert {engine.status(r) for r in rids} == {Status.RUNNING, Status.WAITING}
  with pytest.raises(PeerLostError, match="test"):
    engine.step()
  assert engine.status(short) == Status.FINISHED
  for r in rids:
    assert engine.status(r) == Status.FAILED
  rows = {row["request_id"]: row for row in engine.metrics()["requests"]}
  assert [rows[r]["error"] for r in rids] == ["a transfer between processes failed (test)"] * 3
  assert engine.kv_pool("m").used_pages == 0 and not engine.scheduler.has_work()
  assert logged[-1].endswith(f"3 unfinished request(s) failed: {', '.join(rids)}")
