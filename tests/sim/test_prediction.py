"""The executor's prediction of the experts a step needs (`predict_resident`), by hand on a
small weights pool."""

from crosspool_jax.engine.executors.crosspool import predict_resident, prefetch_predicted
from crosspool_jax.pools.weights_pool import ExpertModelSpec, ShapeClass, WeightsPool

SHAPE = ShapeClass(16, 8, "float32")


def _pool(slots: int) -> WeightsPool:
  """Models a and b, 4 experts in each of MoE layers 0 and 1, one shape class on 2 weights
  devices: layer l of either model is homed on device l (a's layers take devices 0, 1; b's
  continue at (0 + 2) mod 2 = 0)."""
  pool = WeightsPool(device_bytes=slots * SHAPE.expert_bytes, num_devices=2)
  for m in ("a", "b"):
    pool.register_model(ExpertModelSpec(m, SHAPE, 4, 2, (0, 1)), slots_per_device=slots)
  assert [pool.home_device(m, layer) for m in "ab" for layer in (0, 1)] == [0, 1, 0, 1]
  return pool


def test_prediction_by_hand():
  last = {("a", 0): [1], ("a", 1): [2, 3], ("b", 0): [0]}  # b's layer 1 has not run yet
  every = [0, 1, 2, 3]
  # 6 slots per device: one model's layer (4 experts) fits its partition: all of them, per
  # partition in order of first use (device 0, then device 1)
  pool = _pool(6)
  assert predict_resident(pool, [("a", 0), ("a", 1)], last) == [
      {("a", 0): every}, {("a", 1): every}]
  # both models: 8 experts per partition > 6 slots, so each layer's last choice
  layers = [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
  assert predict_resident(pool, layers, last) == [
      {("a", 0): [1], ("b", 0): [0]}, {("a", 1): [2, 3], ("b", 1): []}]
  # 8 slots: both models' layers fit together again
  assert predict_resident(_pool(8), layers, last) == [
      {("a", 0): every, ("b", 0): every}, {("a", 1): every, ("b", 1): every}]
  # applied: each layer's plan, the predicted experts loaded where they are homed
  plans = prefetch_predicted(pool.prefetch, predict_resident(pool, layers, last))
  assert [(k, [key for key, _, _ in p.loads]) for k, p in plans] == [
      (("a", 0), [("a", 0, 1)]), (("b", 0), [("b", 0, 0)]),
      (("a", 1), [("a", 1, 2), ("a", 1, 3)]), (("b", 1), [])]
  assert pool.stats.prefetch_loads == 4 and pool.stats.accesses == 0

