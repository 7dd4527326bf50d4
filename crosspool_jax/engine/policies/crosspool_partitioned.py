"""`crosspool_partitioned`: CrossPool whose weights pool gives every model slots of its own.

The ablation of consolidation: everything is CrossPool's (one KV pool over the KV devices, the
disaggregated layers, swapping by `expert_policy`) except that expert slots are not shared
across models. Each model's experts form a shape class of their own (`ModelShapeClass`) with
`expert_slots_per_device` slots per weights device, so the memory of the weights pool grows
with the number of models, and no expert call serves two models. A model registered after
start needs a class of its own, which the slots sized at start leave no room for: it is
refused. Invariant: a slot only ever holds experts of the model owning its class, so one
model's accesses never evict another model's experts.
"""

from __future__ import annotations

import dataclasses

from crosspool_jax.engine.policies.crosspool import CrossPoolPolicy
from crosspool_jax.pools.weights_pool import ExpertModelSpec, ShapeClass, WeightsPool


@dataclasses.dataclass(frozen=True)
class ModelShapeClass(ShapeClass):
  """A shape class owned by one model: only its experts take the class's slots."""

  owner: str = ""


class PartitionedWeightsPool(WeightsPool):
  """A `WeightsPool` that puts every model's experts in a shape class of the model's own."""

  def register_model(self, spec: ExpertModelSpec, *, slots_per_device: int | None = None
                     ) -> int:
    shape = spec.shape_class
    owned = ModelShapeClass(shape.d_model, shape.d_ff, shape.dtype, owner=spec.model_id)
    return super().register_model(dataclasses.replace(spec, shape_class=owned),
                                  slots_per_device=slots_per_device)


class PartitionedCrossPoolPolicy(CrossPoolPolicy):
  """CrossPool without consolidation: expert slots partitioned per model."""

  name = "crosspool_partitioned"

  def new_weights_pool(self, *, device_bytes: int, num_devices: int,
                       expert_policy: str) -> WeightsPool:
    return PartitionedWeightsPool(device_bytes=device_bytes, num_devices=num_devices,
                                  policy=expert_policy)
