"""The KV-cache pool: one shared paged pool for the KV of every request of every model.

Host-side only (numpy, no JAX device call); the device buffers it manages are in
`kv_buffers.py`. Pages have global ids over the KV devices, each model's block tables map its
requests' logical pages to them, and the `static` / `shared` policy decides admission and the
preemption victim (the most recently admitted). Invariant: local page 0 of every device is the
null page, never allocated, so 0 in a page table means "no page here" (a device's local view
reads other devices' pages as 0). Vocabulary and the victim rule: WORKSPACE.md, "The pools".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import numpy as np

POLICIES = ("static", "shared")


class PoolExhaustedError(RuntimeError):
  """The pool cannot provide the pages asked for, even after preemption."""


@dataclasses.dataclass(frozen=True)
class KVModelSpec:
  """What the pool needs to know about a model.

  Attributes:
    model_id: unique name.
    num_layers: L; each logical page exists once per layer.
    kv_heads: K.
    head_dim: H.
    max_context: longest sequence (tokens) of a request; sizes the block tables.
    max_batch: most concurrent requests of this model (rows of its block tables; also the
      reservation of the `static` policy).
    stores: arrays cached per head and token: 2 (K and V) or 1 (a latent-attention model's
      one row of `head_dim`, no V).
  """

  model_id: str
  num_layers: int
  kv_heads: int
  head_dim: int
  max_context: int
  max_batch: int
  stores: int = 2

  def __post_init__(self):
    for name in ("num_layers", "kv_heads", "head_dim", "max_context", "max_batch"):
      if getattr(self, name) <= 0:
        raise ValueError(f"KVModelSpec.{name} must be > 0, got {getattr(self, name)}")
    if self.stores not in (1, 2):
      raise ValueError(f"KVModelSpec.stores must be 1 (latent rows) or 2 (K and V), got "
                       f"{self.stores}")

  @property
  def elems_per_token(self) -> int:
    """Elements one token of one layer takes in a page."""
    return self.stores * self.kv_heads * self.head_dim


@dataclasses.dataclass
class _Request:
  request_id: str
  model_id: str
  row: int
  admitted_seq: int
  pages: int = 0  # logical pages held in each layer


class _ModelView:
  """The virtualizer of one model: its block tables and rows."""

  def __init__(self, spec: KVModelSpec, page_tokens: int):
    self.spec = spec
    self.page_tokens = page_tokens
    self.max_pages = math.ceil(spec.max_context / page_tokens)
    self.tables_LRP = np.zeros((spec.num_layers, spec.max_batch, self.max_pages), np.int32)
    self.free_rows = list(range(spec.max_batch - 1, -1, -1))
    self.used_pages = 0  # physical pages held, all layers
    self.reserved_pages = 0  # static policy quota
    self.home_device: int | None = None  # pages come from here first (attention runs there)


class KVPool:
  """Page allocator, per-model virtualizer and admission/preemption for one KV pool.

  Args:
    page_elems: elements per page (the page size; bytes = page_elems * itemsize).
    pages_per_device: pages of each device's buffer, the null page included.
    num_devices: KV devices; one sequence may spread over several.
    policy: "static" or "shared".
  """

  def __init__(self, *, page_elems: int, pages_per_device: int, num_devices: int = 1,
               policy: str = "shared"):
    if policy not in POLICIES:
      raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if page_elems <= 0:
      raise ValueError(f"page_elems must be > 0, got {page_elems}")
    if pages_per_device < 2:
      raise ValueError(f"pages_per_device must be >= 2 (null page + one), got {pages_per_device}")
    if num_devices < 1:
      raise ValueError(f"num_devices must be >= 1, got {num_devices}")
    self.page_elems = page_elems
    self.pages_per_device = pages_per_device
    self.num_devices = num_devices
    self.policy = policy
    # Free stacks per device: free_[d][:top[d]] are free local ids (1..ppd-1).
    self._free = [np.arange(pages_per_device - 1, 0, -1, dtype=np.int32)
                  for _ in range(num_devices)]
    self._top = [pages_per_device - 1] * num_devices
    # owner of each global page: -1 free, -2 null page, else the owner's admitted_seq.
    self._owner = np.full(num_devices * pages_per_device, -1, np.int64)
    self._owner[::pages_per_device] = -2
    self._models: dict[str, _ModelView] = {}
    self._requests: dict[str, _Request] = {}
    self._admissions = 0
    self.capacity = num_devices * (pages_per_device - 1)
    self.limit = self.capacity
    self.preemptions = 0

  # --- models -----------------------------------------------------------------------------

  def register_model(self, spec: KVModelSpec, *, home_device: int | None = None) -> int:
    """Registers a model; returns its page_tokens.

    `home_device`: the KV device its pages come from while it has free pages (the device that
    runs the model's attention, so a step touches no other); None: the device with most free.

    Raises:
      ValueError: duplicate model id, a head shape that does not divide the page, or (static
        policy) not enough unreserved pages for max_context x max_batch.
    """
    if spec.model_id in self._models:
      raise ValueError(f"model {spec.model_id!r} is already registered")
    per_token = spec.elems_per_token
    if self.page_elems % per_token:
      raise ValueError(f"model {spec.model_id!r}: page_elems {self.page_elems} is not a multiple "
                       f"of stores * kv_heads * head_dim = {spec.stores} * {spec.kv_heads} * "
                       f"{spec.head_dim} = {per_token}")
    if home_device is not None and not 0 <= home_device < self.num_devices:
      raise ValueError(f"model {spec.model_id!r}: home_device {home_device} out of range "
                       f"[0, {self.num_devices})")
    view = _ModelView(spec, self.page_elems // per_token)
    view.home_device = home_device
    if self.policy == "static":
      need = spec.num_layers * view.max_pages * spec.max_batch
      left = self.limit - sum(m.reserved_pages for m in self._models.values())
      if need > left:
        raise ValueError(f"static policy: model {spec.model_id!r} needs {need} pages "
                         f"(max_context {spec.max_context} x max_batch {spec.max_batch} x "
                         f"{spec.num_layers} layers), only {left} unreserved")
      view.reserved_pages = need
    self._models[spec.model_id] = view
    return view.page_tokens

  def unregister_model(self, model_id: str) -> None:
    view = self._model(model_id)
    if view.used_pages or len(view.free_rows) != view.spec.max_batch:
      raise ValueError(f"model {model_id!r} still has requests")
    del self._models[model_id]

  def page_tokens(self, model_id: str) -> int:
    return self._model(model_id).page_tokens

  def _model(self, model_id: str) -> _ModelView:
    if model_id not in self._models:
      raise KeyError(f"unknown model {model_id!r}; registered: {sorted(self._models)}")
    return self._models[model_id]

  # --- requests ---------------------------------------------------------------------------

  def add_request(self, model_id: str, request_id: str) -> int:
    """Gives a request a row of its model's block tables (no pages yet); returns the row."""
    view = self._model(model_id)
    if request_id in self._requests:
      raise ValueError(f"request {request_id!r} already exists")
    if not view.free_rows:
      raise PoolExhaustedError(f"model {model_id!r} already has max_batch="
                               f"{view.spec.max_batch} requests")
    row = view.free_rows.pop()
    self._admissions += 1
    self._requests[request_id] = _Request(request_id, model_id, row, self._admissions)
    return row

  def has_free_row(self, model_id: str) -> bool:
    """Whether the model can take another request (it holds fewer than max_batch)."""
    return bool(self._model(model_id).free_rows)

  def has_request(self, request_id: str) -> bool:
    """Whether the request holds a row (and its pages) here."""
    return request_id in self._requests

  def request_pages(self, request_id: str) -> int:
    """Logical pages held per layer."""
    return self._request(request_id).pages

  def _request(self, request_id: str) -> _Request:
    if request_id not in self._requests:
      raise KeyError(f"unknown request {request_id!r}")
    return self._requests[request_id]

  def pages_needed(self, request_id: str, num_tokens: int) -> int:
    """Physical pages (all layers) a request must add to hold `num_tokens` tokens."""
    req = self._request(request_id)
    view = self._models[req.model_id]
    if num_tokens > view.spec.max_context:
      raise ValueError(f"request {request_id!r}: {num_tokens} tokens exceed model "
                       f"{req.model_id!r} max_context {view.spec.max_context}")
    logical = math.ceil(num_tokens / view.page_tokens)
    return max(0, logical - req.pages) * view.spec.num_layers

  def free_pages(self, model_id: str | None = None) -> int:
    """Pages an allocation may still take (for `model_id`'s quota under `static`)."""
    left = self.limit - self.used_pages
    if self.policy == "static" and model_id is not None:
      view = self._model(model_id)
      left = min(left, view.reserved_pages - view.used_pages)
    return max(0, min(left, sum(self._top)))

  @property
  def used_pages(self) -> int:
    return sum(m.used_pages for m in self._models.values())

  def can_grow(self, request_id: str, num_tokens: int) -> bool:
    """Admission test: can the request hold `num_tokens` tokens without preempting anyone?"""
    req = self._request(request_id)
    return self.pages_needed(request_id, num_tokens) <= self.free_pages(req.model_id)

  def grow(self, request_id: str, num_tokens: int) -> None:
    """Allocates pages so the request holds `num_tokens` tokens in every layer (all or none).

    Raises:
      PoolExhaustedError: not enough free pages (nothing is allocated then).
    """
    req = self._request(request_id)
    view = self._models[req.model_id]
    need = self.pages_needed(request_id, num_tokens)
    if need == 0:
      return
    if need > self.free_pages(req.model_id):
      raise PoolExhaustedError(f"request {request_id!r} needs {need} pages, "
                               f"{self.free_pages(req.model_id)} free")
    new_logical = need // view.spec.num_layers
    ids = self._alloc(need, view.home_device).reshape(view.spec.num_layers, new_logical)
    view.tables_LRP[:, req.row, req.pages:req.pages + new_logical] = ids
    self._owner[ids.ravel()] = req.admitted_seq
    req.pages += new_logical
    view.used_pages += need

  def grow_with_preemption(self, request_id: str, num_tokens: int) -> list[str]:
    """`grow`, preempting victims (see the module's rule) until the pages can be had.

    Returns:
      The preempted request ids (their pages are freed; the caller re-queues them).
    Raises:
      PoolExhaustedError: even preempting every eligible request would not make room; then
        nothing is preempted or allocated.
    """
    req = self._request(request_id)
    need = self.pages_needed(request_id, num_tokens)
    victims = self._pick_victims(need - self.free_pages(req.model_id), req)
    for victim in victims:
      self.release(victim)
      self.preemptions += 1
    self.grow(request_id, num_tokens)
    return victims

  def _pick_victims(self, shortfall: int, requester: _Request | None) -> list[str]:
    if shortfall <= 0:
      return []
    eligible = [r for r in self._requests.values()
                if r is not requester and r.pages
                and (self.policy == "shared" or requester is None
                     or r.model_id == requester.model_id)]
    eligible.sort(key=lambda r: -r.admitted_seq)
    victims, freed = [], 0
    for r in eligible:
      if freed >= shortfall:
        break
      victims.append(r.request_id)
      freed += r.pages * self._models[r.model_id].spec.num_layers
    if freed < shortfall:
      raise PoolExhaustedError(f"{shortfall} more pages are needed; preempting every eligible "
                               f"request frees only {freed}")
    return victims

  def release(self, request_id: str) -> None:
    """Frees every page of a request and its row (finish, cancel or preemption)."""
    req = self._request(request_id)
    view = self._models[req.model_id]
    ids = view.tables_LRP[:, req.row, :req.pages].ravel().copy()
    self._free_ids(ids)
    self._owner[ids] = -1
    view.tables_LRP[:, req.row, :] = 0
    view.used_pages -= ids.size
    view.free_rows.append(req.row)
    del self._requests[request_id]

  def set_limit(self, pages: int) -> list[str]:
    """Changes how many pages may be in use; returns requests preempted to get under it.

    Lowering first takes free pages away (no one notices), then preempts (the victim rule)
    until the used pages fit. Raising is capped at the physical capacity. Safe under a running
    engine between steps: its scheduler re-queues the preempted requests (recomputed later).
    The device buffers keep their size: the limit caps what is allocated from them.
    """
    if not 0 <= pages <= self.capacity:
      raise ValueError(f"limit must be in [0, {self.capacity}] pages, got {pages}")
    self.limit = pages
    victims = self._pick_victims(self.used_pages - pages, None)
    for victim in victims:
      self.release(victim)
      self.preemptions += 1
    return victims

  # --- page allocation --------------------------------------------------------------------

  def _alloc(self, n: int, home: int | None = None) -> np.ndarray:
    """n global page ids: from `home` first, then from the devices with most free pages."""
    out = []
    order = np.argsort([-t for t in self._top], kind="stable").tolist()
    if home is not None:
      order.remove(home)
      order.insert(0, home)
    for d in order:
      take = min(n - sum(a.size for a in out), self._top[d])
      if take <= 0:
        continue
      top = self._top[d]
      out.append(self._free[d][top - take:top] + d * self.pages_per_device)
      self._top[d] = top - take
    ids = np.concatenate(out) if out else np.zeros(0, np.int32)
    assert ids.size == n, (ids.size, n)
    return ids.astype(np.int32)

  def _free_ids(self, ids: np.ndarray) -> None:
    devices = ids // self.pages_per_device
    for d in np.unique(devices):
      local = (ids[devices == d] % self.pages_per_device).astype(np.int32)
      top = self._top[d]
      self._free[d][top:top + local.size] = local
      self._top[d] = top + local.size

  # --- what the kernels read ----------------------------------------------------------------

  def tables(self, model_id: str, request_ids: Iterable[str], *, width: int | None = None
             ) -> np.ndarray:
    """Global block tables [L, B, width] of a batch (0 past each request's pages)."""
    view = self._model(model_id)
    rows = np.array([self._request(r).row for r in request_ids], np.int32)
    width = view.max_pages if width is None else width
    out = np.zeros((view.spec.num_layers, rows.size, width), np.int32)
    w = min(width, view.max_pages)
    out[:, :, :w] = view.tables_LRP[:, rows, :w]
    return out

  def devices_holding(self, model_id: str, request_ids: Iterable[str]) -> set[int]:
    """The KV devices holding a page of any of these requests (of one model)."""
    view = self._model(model_id)
    rows = [self._request(r).row for r in request_ids]
    held = view.tables_LRP[:, rows]
    return set(np.unique(held[held > 0] // self.pages_per_device).tolist())

  def local_tables(self, tables: np.ndarray, device: int) -> np.ndarray:
    """The view of global tables on one device: local ids there, 0 (skipped) elsewhere."""
    on_device = (tables // self.pages_per_device == device) & (tables > 0)
    return np.where(on_device, tables % self.pages_per_device, 0).astype(np.int32)

  def slot_mapping(self, tables: np.ndarray, batch_index: np.ndarray, positions: np.ndarray,
                   page_tokens: int, device: int) -> np.ndarray:
    """Where new tokens' K/V go on `device`: [L, T] slot = local page * page_tokens + offset.

    Tokens whose page is on another device, and padding tokens (position < 0), map into the
    null page (slots 0..page_tokens-1), which is never read.
    """
    if tables.shape[1] == 0:  # an empty batch: every token is padding
      return np.zeros((tables.shape[0], positions.size), np.int32)
    pos = np.maximum(positions, 0)
    g = tables[:, batch_index, pos // page_tokens]  # [L, T]
    local = self.local_tables(g, device)
    slots = local * page_tokens + pos % page_tokens
    return np.where((local > 0) & (positions >= 0), slots, 0).astype(np.int32)

  # --- invariants (tests, debugging) ------------------------------------------------------

  def check_invariants(self) -> None:
    """Raises AssertionError if any page is owned twice, leaked, or mis-tabled."""
    seen = np.zeros(self._owner.size, np.int64)
    for req in self._requests.values():
      view = self._models[req.model_id]
      ids = view.tables_LRP[:, req.row, :req.pages].ravel()
      assert (ids > 0).all() and (ids % self.pages_per_device != 0).all(), "null page tabled"
      assert (view.tables_LRP[:, req.row, req.pages:] == 0).all(), "stale table entries"
      np.add.at(seen, ids, 1)
      assert (self._owner[ids] == req.admitted_seq).all(), "owner mismatch"
    assert seen.max(initial=0) <= 1, "a page is tabled twice"
    owned = self._owner >= 0
    assert (seen[owned] == 1).all() and (seen[~owned] == 0).all(), "owner table disagrees"
    free = sum(self._top)
    assert free + int(owned.sum()) == self.capacity, "leaked pages"
    for d in range(self.num_devices):
      stack = self._free[d][:self._top[d]] + d * self.pages_per_device
      assert (self._owner[stack] == -1).all(), "free list holds an owned page"
      assert np.unique(stack).size == stack.size, "page twice in the free list"
    assert self.used_pages == int(owned.sum()), "used-page accounting is off"
    for view in self._models.values():
      if self.policy == "static":
        assert view.used_pages <= view.reserved_pages, "static quota exceeded"

  @property
  def requests(self) -> list[str]:
    return list(self._requests)
