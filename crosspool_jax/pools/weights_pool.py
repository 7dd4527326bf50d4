"""The weights pool (host side): expert slots per shape class, residency, swap planning.

Host-side only (numpy, no JAX device call); the device buffers and swap-ins it plans are in
`weights_buffers.py`. `access` / `prefetch` update the residency table and the per-layer slot
tables at once and return a `SwapPlan`, the loads the device side must perform before the layer
runs. Invariant: a MoE layer's experts are resident only on its home weights device, and the
experts of the running layer (and the keys passed as `protect`) are never victims. Vocabulary
(shape class, partition, home device, pinned): WORKSPACE.md, "The pools".
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from crosspool_jax.pools.expert_policies import ExpertKey, ExpertPolicy, make_policy


class PoolExhaustedError(RuntimeError):
  """A layer needs more experts resident at once than its partition has evictable slots."""


@dataclasses.dataclass(frozen=True)
class ShapeClass:
  """Experts interchangeable in one slot: SwiGLU expert of width d_ff over d_model, in dtype.

  Attributes:
    d_model: D.
    d_ff: F of one routed expert.
    dtype: numpy dtype name of the weights ("float32", "bfloat16", ...).
  """

  d_model: int
  d_ff: int
  dtype: str

  @property
  def itemsize(self) -> int:
    if self.dtype == "bfloat16":
      return 2
    return np.dtype(self.dtype).itemsize

  @property
  def expert_bytes(self) -> int:
    """Bytes of one expert (gate, up and down)."""
    return 3 * self.d_model * self.d_ff * self.itemsize


@dataclasses.dataclass(frozen=True)
class ExpertModelSpec:
  """What the weights pool needs to know about a model.

  Attributes:
    model_id: unique name.
    shape_class: shape of its routed experts.
    num_experts: E routed experts per MoE layer.
    top_k: experts per token.
    moe_layers: indices of its MoE layers (the others are dense, not pooled).
  """

  model_id: str
  shape_class: ShapeClass
  num_experts: int
  top_k: int
  moe_layers: tuple[int, ...]

  def __post_init__(self):
    if self.num_experts < 1 or not 1 <= self.top_k <= self.num_experts:
      raise ValueError(f"ExpertModelSpec {self.model_id!r}: need 1 <= top_k <= num_experts, got "
                       f"top_k={self.top_k}, num_experts={self.num_experts}")
    if len(set(self.moe_layers)) != len(self.moe_layers):
      raise ValueError(f"ExpertModelSpec {self.model_id!r}: moe_layers has duplicates")

  @classmethod
  def from_config(cls, model_id: str, cfg, dtype: str = "float32") -> ExpertModelSpec:
    """The spec of a `ModelConfig` whose expert weights have numpy dtype name `dtype`."""
    return cls(model_id, ShapeClass(cfg.d_model, cfg.d_ff_expert, str(dtype)), cfg.num_experts,
               cfg.top_k, tuple(i for i, moe in enumerate(cfg.moe_layers) if moe))

  @property
  def num_pooled_experts(self) -> int:
    return self.num_experts * len(self.moe_layers)


@dataclasses.dataclass
class SwapPlan:
  """Loads the device side must perform (in order) before the layer that needs them runs.

  Attributes:
    loads: (key, device, slot) of each expert to copy from the host store into its slot.
    evicted: keys whose slots were taken (their weights are simply overwritten).
    prefetch: True if issued ahead of the layer (by prediction), False if on demand.
  """

  loads: list[tuple[ExpertKey, int, int]] = dataclasses.field(default_factory=list)
  evicted: list[ExpertKey] = dataclasses.field(default_factory=list)
  prefetch: bool = False


@dataclasses.dataclass
class PoolStats:
  """Counters of one pool. Times are seconds, filled by the device side (`weights_buffers`).

  Attributes:
    accesses: (layer access, expert) pairs requested.
    hits: of those, resident when asked (prefetched experts count as hits).
    misses: loaded on demand.
    prefetch_loads: experts loaded by prefetch.
    prefetch_hits: hits on experts that a prefetch loaded and no layer had read yet.
    pin_loads: experts loaded by `pin` (pin_all: at registration).
    evictions: experts dropped to make room.
    bytes_swapped: host -> device bytes of all loads (demand + prefetch).
    swap_calls: device update calls issued.
    swap_s_hidden: swap time that elapsed before the consuming layer needed the weights.
    swap_s_exposed: swap time the consuming layer had to wait for (all of a demand swap).
    swap_s_unused: time of prefetch swaps whose layer never ran.
    swap_s_prefetch: time of prefetch swaps whose layer ran (hidden + exposed parts).
  """

  accesses: int = 0
  hits: int = 0
  misses: int = 0
  prefetch_loads: int = 0
  prefetch_hits: int = 0
  pin_loads: int = 0
  evictions: int = 0
  bytes_swapped: int = 0
  swap_calls: int = 0
  swap_s_hidden: float = 0.0
  swap_s_exposed: float = 0.0
  swap_s_unused: float = 0.0
  swap_s_prefetch: float = 0.0

  @property
  def hit_rate(self) -> float:
    return self.hits / self.accesses if self.accesses else 0.0

  @property
  def loads(self) -> int:
    return self.misses + self.prefetch_loads + self.pin_loads

  @property
  def prefetch_accuracy(self) -> float:
    """Share of the prefetched experts that a layer read before they were evicted."""
    return self.prefetch_hits / self.prefetch_loads if self.prefetch_loads else 0.0

  @property
  def hidden_fraction(self) -> float:
    """Hidden share of the swap time of swaps whose layer ran."""
    total = self.swap_s_hidden + self.swap_s_exposed
    return self.swap_s_hidden / total if total else 0.0

  def to_dict(self) -> dict:
    return dataclasses.asdict(self) | {"hit_rate": self.hit_rate, "loads": self.loads,
                                       "prefetch_accuracy": self.prefetch_accuracy,
                                       "hidden_fraction": self.hidden_fraction}


class _Partition:
  """Slots of one shape class on one device; at most `limit` of them owned at once."""

  def __init__(self, slots: int):
    self.owner: list[ExpertKey | None] = [None] * slots
    self.pinned = np.zeros(slots, bool)
    self.free = list(range(slots - 1, -1, -1))  # stack; pops slot 0 first
    self.limit = slots
    # (policy priority, key) of resident experts, for policies with a static priority: an
    # entry is current while its key is resident here with that priority (others are stale).
    self.victims: list[tuple] = []

  @property
  def owned(self) -> int:
    return len(self.owner) - len(self.free)

  @property
  def usable_free(self) -> int:
    """Free slots a load may take without evicting (free and under the limit)."""
    return max(0, min(len(self.free), self.limit - self.owned))

  def _evictable(self, protect: set[ExpertKey]) -> Iterator[int]:
    return (s for s, k in enumerate(self.owner)
            if k is not None and not self.pinned[s] and k not in protect)

  def evictable(self, protect: set[ExpertKey]) -> list[int]:
    return list(self._evictable(protect))

  def any_evictable(self, protect: set[ExpertKey]) -> bool:
    """`bool(evictable(protect))`, stopping at the first one."""
    return next(self._evictable(protect), None) is not None


@dataclasses.dataclass
class _Class:
  shape: ShapeClass
  slots_per_device: int
  partitions: list[_Partition]
  next_device: int = 0  # round robin of home devices

  @property
  def limit(self) -> int:
    """Slots per device that may be owned at once (`WeightsPool.set_slot_limit`)."""
    return self.partitions[0].limit


class WeightsPool:
  """Residency and swap planning for the expert slots of many models.

  Args:
    device_bytes: bytes of expert slots each weights device may hold (all classes together).
    num_devices: weights devices.
    policy: an `ExpertPolicy` or its registry name ("pin_all", "lru", "lfu",
      "activation_aware").
  """

  def __init__(self, *, device_bytes: int, num_devices: int = 1,
               policy: ExpertPolicy | str = "lru"):
    if device_bytes <= 0:
      raise ValueError(f"device_bytes must be > 0, got {device_bytes}")
    if num_devices < 1:
      raise ValueError(f"num_devices must be >= 1, got {num_devices}")
    self.device_bytes = device_bytes
    self.num_devices = num_devices
    self.policy = make_policy(policy) if isinstance(policy, str) else policy
    self.classes: list[_Class] = []
    self.models: dict[str, ExpertModelSpec] = {}
    self._class_of: dict[str, int] = {}
    self._home: dict[tuple[str, int], int] = {}  # (model, layer) -> device
    self._tables: dict[tuple[str, int], np.ndarray] = {}  # local slot per expert, -1 if absent
    self._residency: dict[ExpertKey, tuple[int, int]] = {}
    self._prefetched: set[ExpertKey] = set()
    self.clock = 0
    self.version = 0  # counts residency changes (loads, evictions): slot tables changed
    self.stats = PoolStats()

  # --- classes and models -----------------------------------------------------------------

  def free_bytes(self) -> int:
    """Bytes per device not yet given to a class."""
    return self.device_bytes - sum(c.slots_per_device * c.shape.expert_bytes
                                   for c in self.classes)

  def add_class(self, shape: ShapeClass, slots_per_device: int) -> int:
    """Creates the slots of a shape class on every device; returns its index.

    Raises:
      ValueError: the class exists, slots_per_device < 1, or no room left on the devices.
    """
    if any(c.shape == shape for c in self.classes):
      raise ValueError(f"shape class {shape} already exists")
    if not isinstance(slots_per_device, int | np.integer) or slots_per_device < 1:
      raise ValueError(f"slots_per_device must be an integer >= 1, got {slots_per_device!r}")
    need = slots_per_device * shape.expert_bytes
    if need > self.free_bytes():
      raise ValueError(
          f"no room for a new shape class {shape}: {slots_per_device} slots x "
          f"{shape.expert_bytes} B = {need} B per device, only {self.free_bytes()} B of "
          f"device_bytes={self.device_bytes} left (classes: {[c.shape for c in self.classes]})")
    self.classes.append(_Class(shape, int(slots_per_device),
                               [_Partition(int(slots_per_device))
                                for _ in range(self.num_devices)]))
    return len(self.classes) - 1

  def class_index(self, shape: ShapeClass) -> int | None:
    return next((i for i, c in enumerate(self.classes) if c.shape == shape), None)

  def register_model(self, spec: ExpertModelSpec, *, slots_per_device: int | None = None) -> int:
    """Adds a model's experts to the pool (none resident yet unless the policy pins all).

    Joins the class of its expert shape, or creates it with `slots_per_device` slots per
    device. On any error the pool is unchanged.

    Returns:
      The class index.
    Raises:
      ValueError: model already registered; its shape matches no class and slots_per_device
        is not given or does not fit; slots per device smaller than its top_k (the slot budget
        of one layer) or its num_experts (the kernel's slot table is [E] into S >= E slots);
        pin_all policy and its experts do not fit.
    """
    if spec.model_id in self.models:
      raise ValueError(f"model {spec.model_id!r} is already registered")
    c = self.class_index(spec.shape_class)
    slots = self.classes[c].limit if c is not None else slots_per_device
    if c is None:
      if slots_per_device is None:
        raise ValueError(
            f"model {spec.model_id!r}: expert shape {spec.shape_class} matches no shape class "
            f"(have {[k.shape for k in self.classes]}); pass slots_per_device to create one")
      if spec.shape_class.expert_bytes * slots_per_device > self.free_bytes():
        raise ValueError(
            f"model {spec.model_id!r}: expert shape {spec.shape_class} matches no shape class "
            f"and there is no room for a new one: {slots_per_device} slots x "
            f"{spec.shape_class.expert_bytes} B > {self.free_bytes()} B free per device")
    elif slots_per_device is not None and slots_per_device != self.classes[c].slots_per_device:
      raise ValueError(f"model {spec.model_id!r}: shape class {spec.shape_class} already has "
                       f"{self.classes[c].slots_per_device} slots per device, got "
                       f"slots_per_device={slots_per_device}")
    if slots < spec.top_k:
      raise ValueError(f"model {spec.model_id!r}: slot budget {slots} slots per device is "
                       f"smaller than one layer's top_k={spec.top_k}")
    if slots < spec.num_experts:
      raise ValueError(f"model {spec.model_id!r}: {slots} slots per device < num_experts="
                       f"{spec.num_experts}; the kernel's slot table needs S >= E")
    homes = self._plan_homes(spec, c)
    if self.policy.pins_all:
      self._check_pin_all_fits(spec, c, slots, homes)
    if c is None:
      c = self.add_class(spec.shape_class, slots_per_device)
    cls = self.classes[c]
    self.models[spec.model_id] = spec
    self._class_of[spec.model_id] = c
    cls.next_device = (cls.next_device + len(spec.moe_layers)) % self.num_devices
    for layer, device in homes.items():
      self._home[spec.model_id, layer] = device
      self._tables[spec.model_id, layer] = np.full(spec.num_experts, -1, np.int32)
    if self.policy.pins_all:
      for layer in spec.moe_layers:
        self.pin(spec.model_id, layer, range(spec.num_experts))
    return c

  def unregister_model(self, model_id: str) -> list[ExpertKey]:
    """Removes a model: its experts leave their slots (pinned ones too); returns them.

    Its shape class and the class's slots stay (other models may join it later).
    """
    self._spec(model_id)
    keys = [k for k in self._residency if k[0] == model_id]
    for key in keys:
      where = self._residency[key]
      self.classes[self._class_of[model_id]].partitions[where[0]].pinned[where[1]] = False
      self._evict(key, count=False)
    for layer in self.models[model_id].moe_layers:
      del self._home[model_id, layer], self._tables[model_id, layer]
    del self.models[model_id], self._class_of[model_id]
    return keys

  def set_slot_limit(self, c: int, slots: int) -> list[ExpertKey]:
    """Caps the slots of class `c` each device may have in use; returns the experts evicted.

    Lowering evicts (the policy's victims, never pinned experts) until every partition fits;
    raising lets later loads use the freed slots again. The device buffers keep their size.

    Raises:
      ValueError: `slots` outside [the class's largest num_experts (one layer's experts may
        all be routed to in one call), slots_per_device], or fewer than a partition's pinned
        experts; the pool is then unchanged.
    """
    self.check_slot_limit(c, slots)
    cls = self.classes[c]
    evicted = []
    for part in cls.partitions:
      part.limit = int(slots)
      while part.owned > part.limit:
        victim = self._victim(part, set())
        self._evict(victim)
        evicted.append(victim)
    return evicted

  def check_slot_limit(self, c: int, slots: int) -> None:
    """Raises the ValueError `set_slot_limit(c, slots)` would raise (and changes nothing)."""
    cls = self.classes[c]
    need = max((m.num_experts for i, m in self.models.items() if self._class_of[i] == c),
               default=1)
    if not isinstance(slots, int | np.integer) or not need <= slots <= cls.slots_per_device:
      raise ValueError(f"expert slot limit of class {cls.shape} must be an integer in "
                       f"[{need}, {cls.slots_per_device}] (its largest num_experts, its slots "
                       f"per device), got {slots!r}")
    pinned = max(int(p.pinned.sum()) for p in cls.partitions)
    if pinned > slots:
      raise ValueError(f"expert slot limit {slots} of class {cls.shape}: a device has {pinned} "
                       "pinned experts (pin_all pins every expert of every model)")

  def _plan_homes(self, spec: ExpertModelSpec, c: int | None) -> dict[int, int]:
    start = self.classes[c].next_device if c is not None else 0
    return {layer: (start + j) % self.num_devices for j, layer in enumerate(spec.moe_layers)}

  def _check_pin_all_fits(self, spec, c, slots, homes):
    used = np.zeros(self.num_devices, np.int64)
    if c is not None:
      for (m, _layer), d in self._home.items():
        if self._class_of[m] == c:
          used[d] += self.models[m].num_experts
    for d in homes.values():
      used[d] += spec.num_experts
    if (used > slots).any():
      raise ValueError(
          f"pin_all policy: model {spec.model_id!r} does not fit: its class "
          f"{spec.shape_class} would need {int(used.max())} slots on a device, has {slots}")

  def home_device(self, model_id: str, layer: int) -> int:
    self._check_layer(model_id, layer)
    return self._home[model_id, layer]

  def model_class(self, model_id: str) -> int:
    self._spec(model_id)
    return self._class_of[model_id]

  def _spec(self, model_id: str) -> ExpertModelSpec:
    if model_id not in self.models:
      raise KeyError(f"unknown model {model_id!r}; registered: {sorted(self.models)}")
    return self.models[model_id]

  def _check_layer(self, model_id: str, layer: int) -> ExpertModelSpec:
    spec = self._spec(model_id)
    if layer not in spec.moe_layers:
      raise ValueError(f"model {model_id!r}: layer {layer} is not a MoE layer "
                       f"(MoE layers: {list(spec.moe_layers)})")
    return spec

  def _check_experts(self, model_id: str, layer: int, experts: Iterable[int]) -> list[int]:
    spec = self._check_layer(model_id, layer)
    out = sorted({int(e) for e in experts})
    bad = [e for e in out if not 0 <= e < spec.num_experts]
    if bad:
      raise ValueError(f"model {model_id!r} layer {layer}: expert ids {bad} not in "
                       f"[0, {spec.num_experts})")
    return out

  # --- queries ------------------------------------------------------------------------------

  def residency(self, key: ExpertKey) -> tuple[int, int] | None:
    """(device, slot) of a resident expert, else None."""
    return self._residency.get(tuple(key))

  def is_pinned(self, key: ExpertKey) -> bool:
    where = self._residency.get(tuple(key))
    if where is None:
      return False
    return bool(self.classes[self._class_of[key[0]]].partitions[where[0]].pinned[where[1]])

  def resident_keys(self) -> list[ExpertKey]:
    return list(self._residency)

  def slot_table(self, model_id: str, layer: int) -> np.ndarray:
    """The int32 [E] slot table the kernel reads for this layer (slots of its home device).

    Resident experts map to their slots. The others map to distinct filler slots (never
    routed to: the executor makes every chosen expert resident first), so the table is
    injective, as the kernel requires.
    """
    self._check_layer(model_id, layer)
    table = self._tables[model_id, layer].copy()
    missing = table < 0
    if missing.any():
      taken = np.zeros(self.classes[self._class_of[model_id]].slots_per_device, bool)
      taken[table[~missing]] = True
      table[missing] = np.flatnonzero(~taken)[: int(missing.sum())]
    return table

  def resident_mask(self, model_id: str, layer: int) -> np.ndarray:
    """bool [E]: which experts of the layer are resident."""
    self._check_layer(model_id, layer)
    return self._tables[model_id, layer] >= 0

  # --- swapping -----------------------------------------------------------------------------

  def access(self, model_id: str, layer: int, experts: Iterable[int], *,
             protect: Iterable[ExpertKey] = ()) -> SwapPlan:
    """A layer is about to run with `experts`: makes them resident (misses load on demand).

    Counts hits and misses, tells the policy, ticks the clock. The returned plan's loads must
    be performed on the device before the layer runs.

    Args:
      model_id, layer: the MoE layer.
      experts: expert ids its router chose.
      protect: keys that must stay resident too (never victims): the experts of the other
        layers that share this layer's kernel call (a fused call over several micro-batches).

    Raises:
      PoolExhaustedError: more experts than the home partition can hold at once besides
        `protect` (pool unchanged).
    """
    experts = self._check_experts(model_id, layer, experts)
    keys = [(model_id, layer, e) for e in experts]
    missing = [k for k in keys if k not in self._residency]
    part = self._partition(model_id, layer)
    protect = set(keys) | set(map(tuple, protect))
    if len(missing) > part.usable_free:  # else no need to scan the slots for victims
      room = part.usable_free + self._evictable_count(part, protect)
      if len(missing) > room:
        raise PoolExhaustedError(
            f"model {model_id!r} layer {layer} needs {len(missing)} more experts resident at "
            f"once on device {self._home[model_id, layer]}, only {room} slots are free or "
            "evictable")
    self.clock += 1
    plan = SwapPlan()
    for key in keys:
      self.stats.accesses += 1
      if key in self._residency:
        self.stats.hits += 1
        if key in self._prefetched:
          self.stats.prefetch_hits += 1
      else:
        self.stats.misses += 1
        self._load(key, protect, plan)
      self._prefetched.discard(key)
      self.policy.on_access(key, self.clock)
      self._push_priority(key)
    return plan

  def can_hold(self, keys: Iterable[ExpertKey]) -> bool:
    """Whether these experts, all of one partition (one shape class, one home device), can be
    resident at the same time: their number plus the pinned slots they do not own fits the
    partition's slots. (Then `access` of each with the earlier ones in `protect` never raises.)
    """
    keys = {(str(m), int(layer), int(e)) for m, layer, e in keys}
    if not keys:
      return True
    layers: dict[tuple[str, int], list[int]] = {}
    for m, layer, e in keys:
      layers.setdefault((m, layer), []).append(e)
    parts = set()
    for (m, layer), experts in layers.items():
      self._check_experts(m, layer, experts)
      parts.add((self._class_of[m], self._home[m, layer]))
    if len(parts) > 1:
      raise ValueError(f"can_hold: the experts span {len(parts)} partitions "
                       f"(class, device) {sorted(parts)}; one expected")
    (c, d), = parts
    part = self.classes[c].partitions[d]
    pinned_other = sum(1 for s in np.flatnonzero(part.pinned) if part.owner[s] not in keys)
    return len(keys) + pinned_other <= part.limit

  def prefetch(self, model_id: str, layer: int, experts: Iterable[int], *,
               protect: Iterable[ExpertKey] = ()) -> SwapPlan:
    """Best effort: loads predicted `experts` of a later layer without counting an access.

    Never evicts `protect` (the experts of the layer now running) nor the prediction itself;
    stops when nothing else is evictable.
    """
    experts = self._check_experts(model_id, layer, experts)
    keys = [(model_id, layer, e) for e in experts]
    plan = SwapPlan(prefetch=True)
    missing = [k for k in keys if k not in self._residency]
    if not missing:  # the usual case once predictions repeat: no protect set to build
      return plan
    protect = set(map(tuple, protect)) | set(keys)
    part = self._partition(model_id, layer)
    for key in missing:
      if not part.usable_free and not part.any_evictable(protect):
        break
      self._load(key, protect, plan)
      self._prefetched.add(key)
      self.stats.prefetch_loads += 1
    return plan

  def pin(self, model_id: str, layer: int, experts: Iterable[int]) -> SwapPlan:
    """Makes experts resident and never evicted; returns the loads to perform.

    Raises:
      PoolExhaustedError: not enough unpinned slots on the layer's home device (unchanged).
    """
    experts = self._check_experts(model_id, layer, experts)
    keys = [(model_id, layer, e) for e in experts]
    part = self._partition(model_id, layer)
    missing = [k for k in keys if k not in self._residency]
    room = part.usable_free + self._evictable_count(part, set(keys))
    if len(missing) > room:
      raise PoolExhaustedError(f"cannot pin {len(missing)} more experts of model {model_id!r} "
                               f"layer {layer}: {room} slots free or evictable")
    plan = SwapPlan()
    for key in keys:
      if key not in self._residency:
        self._load(key, set(keys), plan)
        self.stats.pin_loads += 1
      _, s = self._residency[key]
      part.pinned[s] = True
    return plan

  def unpin(self, model_id: str, layer: int, experts: Iterable[int]) -> None:
    for e in self._check_experts(model_id, layer, experts):
      where = self._residency.get((model_id, layer, e))
      if where is not None:
        self._partition(model_id, layer).pinned[where[1]] = False

  def _partition(self, model_id: str, layer: int) -> _Partition:
    return self.classes[self._class_of[model_id]].partitions[self._home[model_id, layer]]

  def _evictable_count(self, part: _Partition, protect: set[ExpertKey]) -> int:
    """`len(part.evictable(protect))` without visiting every slot: the unpinned owned slots
    less the protected experts among them."""
    slots = (self._slot_in(part, key) for key in protect)
    protected = sum(1 for s in slots if s is not None and not part.pinned[s])
    return part.owned - int(part.pinned.sum()) - protected

  def _slot_in(self, part: _Partition, key: ExpertKey) -> int | None:
    """`key`'s slot if it is resident in `part`, else None (resident elsewhere, or not)."""
    where = self._residency.get(key)
    if where is None or where[1] >= len(part.owner) or part.owner[where[1]] != key:
      return None
    return where[1]

  def _victim(self, part: _Partition, protect: set[ExpertKey]) -> ExpertKey:
    """The expert policy's victim among the partition's evictable experts (resident, not
    pinned, not in `protect`): from its heap of priorities when the policy has static ones
    (O(log n) an eviction), else by a scan of the slots."""
    if not self.policy.has_priority:
      owners = part.evictable(protect)
      return self.policy.choose_victim([part.owner[s] for s in owners], self.clock)
    held, victim = [], None
    while part.victims:
      entry = heapq.heappop(part.victims)
      key = entry[-1]
      slot = self._slot_in(part, key)
      if slot is None or self.policy.priority(key) != entry[0]:
        continue  # stale: evicted (its model perhaps gone), or accessed since (a newer entry)
      held.append(entry)
      if not part.pinned[slot] and key not in protect:
        victim = key
        break
    for entry in held:
      heapq.heappush(part.victims, entry)
    if victim is None:
      raise AssertionError("no evictable expert in the partition (the caller checks room)")
    return victim

  def _push_priority(self, key: ExpertKey) -> None:
    """Records `key`'s current priority in its partition's victim heap (compacted when stale
    entries outnumber the resident experts 4 to 1)."""
    if not self.policy.has_priority:
      return
    part = self._partition(key[0], key[1])
    heapq.heappush(part.victims, (self.policy.priority(key), key))
    if len(part.victims) > 4 * part.owned + 64:
      part.victims = [(self.policy.priority(k), k) for k in part.owner if k is not None]
      heapq.heapify(part.victims)

  def _load(self, key: ExpertKey, protect: set[ExpertKey], plan: SwapPlan) -> None:
    model_id, layer, expert = key
    device = self._home[model_id, layer]
    part = self._partition(model_id, layer)
    if not part.usable_free:
      victim = self._victim(part, protect)
      self._evict(victim)  # its slot goes on top of the free stack
      plan.evicted.append(victim)
    slot = part.free.pop()
    part.owner[slot] = key
    self._residency[key] = (device, slot)
    self.version += 1
    self._tables[model_id, layer][expert] = slot
    self.policy.on_insert(key, self.clock)
    self._push_priority(key)
    self.stats.bytes_swapped += self.models[model_id].shape_class.expert_bytes
    plan.loads.append((key, device, slot))

  def _evict(self, key: ExpertKey, *, count: bool = True) -> None:
    model_id, layer, expert = key
    _, slot = self._residency.pop(key)
    self.version += 1
    part = self._partition(model_id, layer)
    assert not part.pinned[slot], "evicting a pinned expert"
    part.owner[slot] = None
    part.free.append(slot)
    self._tables[model_id, layer][expert] = -1
    self._prefetched.discard(key)
    self.policy.on_evict(key)
    self.stats.evictions += count

  # --- invariants (tests, debugging) ------------------------------------------------------

  def check_invariants(self) -> None:
    """Raises AssertionError if residency, slot tables and slot owners disagree."""
    owned = 0
    for c, cls in enumerate(self.classes):
      for d, part in enumerate(cls.partitions):
        assert len(part.owner) == cls.slots_per_device
        assert part.owned <= part.limit, "more slots owned than the limit"
        assert len(set(part.free)) == len(part.free), "slot twice in the free list"
        some = {k for k in part.owner[::2] if k is not None}  # a protect set, half of them
        for protect in (set(), some):
          assert self._evictable_count(part, protect) == len(part.evictable(protect))
        for s in range(cls.slots_per_device):
          key = part.owner[s]
          if key is None:
            assert s in part.free, f"slot {s} neither owned nor free"
            assert not part.pinned[s], "free slot pinned"
            continue
          owned += 1
          assert s not in part.free, f"owned slot {s} in the free list"
          assert self._residency.get(key) == (d, s), f"residency of {key} != ({d}, {s})"
          assert self._class_of[key[0]] == c and self._home[key[0], key[1]] == d
          assert self._tables[key[0], key[1]][key[2]] == s, "slot table disagrees"
    assert owned == len(self._residency), "residency has entries no slot owns"
    for (model_id, layer), table in self._tables.items():
      for e in np.flatnonzero(table >= 0):
        assert self._residency.get((model_id, layer, int(e))) is not None, "stale table entry"
      live = table[table >= 0]
      assert np.unique(live).size == live.size, "two experts of a layer on one slot"
    assert self._prefetched <= set(self._residency), "prefetched key not resident"


def fleet_experts(specs: Sequence[ExpertModelSpec]) -> int:
  """Total pooled experts of a fleet (the denominator of 'x % resident')."""
  return sum(s.num_pooled_experts for s in specs)
