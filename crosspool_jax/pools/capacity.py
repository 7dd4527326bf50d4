"""KV capacity of a fleet under the three memory organisations, at one memory budget.

`measure_capacity` builds the host-side pools each organisation would run with (`KVPool` with
its real page accounting, `WeightsPool` for CrossPool's experts) on D devices of
`device_bytes` each, and probes them: one request grown until `PoolExhaustedError` (longest
context), requests of one model only until the memory is full (KV tokens that model can
reach), all models at once round robin (the fleet's fill). A closed form of each number is
reported next to the probe as a cross-check. Numpy only, no device call.

Rules (the same page size in bytes, dtype, reserve and `max_batch` for all three):

  * Weights bytes per model: `param_bytes` (attention + norms, embeddings + LM head, routers,
    dense FFN = shared expert and dense MLP layers, routed experts).
  * Placement of `static` and `shared` (`place_models`): a model needs the fewest devices
    whose memory holds its weights with room for 2 pages each (tensor parallel over them,
    weights split evenly). If every model can have devices of its own, each gets its minimum,
    and the spare devices are dealt one at a time to the models in fleet order; a model's
    group runs tensor parallel over all its devices (the baselines' most generous choice for
    long context), so its KV heads are split over the ranks: ceil(K / tp) heads per rank,
    i.e. a model with fewer KV heads than ranks replicates its KV. Otherwise the models that
    need several devices get them first (fleet order) and the others are packed onto the
    remaining devices, heaviest first onto the device with most free memory; a model that
    finds no room does not fit.
  * `static`: on a device (group) with m models, each reserves an equal share of its free
    pages (`KVPool(policy="static")`) for max_batch requests of the served context
    C = min(max_context, share / (L * max_batch) pages): the longest context is C (the cap); the
    raw capacity is the whole share for one request.
  * `shared` (kvcached-like): same placement; the free memory of each device (group) is one
    `KVPool(policy="shared")` for its models.
  * `crosspool`: W weights devices hold all routed experts in a `WeightsPool` (pin_all when
    they fit; else as many as the slots hold, the rest swapped: the resident fraction is
    reported). W: the given number, else the smallest that holds all experts, else the
    share of the devices proportional to expert bytes. The D - W KV devices hold every model's
    other parameters, partitioned: each model has one home KV device (heaviest first onto the
    device with most free memory), where its attention runs, and one
    `KVPool(num_devices=D-W, policy="shared")` spreads any sequence over all of them. KV
    buffers are equal on every device, so a device with more free memory strands the excess
    (reported).

A model that does not fit in an organisation is reported under `not_fit` with the reason; its
numbers are absent there. Activations and compiler workspace are `reserve_fraction` of each
device (same for all). `format_table` renders a result as the table `scripts/capacity.py` prints.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from crosspool_jax.models.config import ModelConfig, from_hf_config
from crosspool_jax.pools.kv_pool import (
  KVModelSpec,
  KVPool,
  PoolExhaustedError,
  plan_pages_per_device,
)
from crosspool_jax.pools.weights_pool import ExpertModelSpec, WeightsPool, fleet_experts
from crosspool_jax.pools.weights_pool import PoolExhaustedError as WeightsExhaustedError

ORGANISATIONS = ("static", "shared", "crosspool")

# Public config.json values of two real MoE checkpoints (for the realistic example).
REFERENCE_HF_CONFIGS: dict[str, dict[str, Any]] = {
    "mixtral-8x7b": dict(
        model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768,
        rope_theta=1e6, rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=None),
    "qwen1.5-moe-a2.7b": dict(
        model_type="qwen2_moe", vocab_size=151936, hidden_size=2048, intermediate_size=5632,
        moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
        num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
        num_experts=60, num_experts_per_tok=4, max_position_embeddings=8192,
        decoder_sparse_step=1, norm_topk_prob=False, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=False, use_sliding_window=False),
}


def reference_config(name: str) -> ModelConfig:
  """ModelConfig of a `REFERENCE_HF_CONFIGS` entry."""
  if name not in REFERENCE_HF_CONFIGS:
    raise ValueError(f"unknown reference config {name!r}; have {sorted(REFERENCE_HF_CONFIGS)}")
  return from_hf_config(REFERENCE_HF_CONFIGS[name])


def dtype_itemsize(dtype: str) -> int:
  """Bytes per element of a dtype name ("bfloat16", "float32", "float8_e4m3fn", ...)."""
  try:
    return np.dtype(dtype).itemsize
  except TypeError:
    import ml_dtypes  # registers bfloat16 / float8 names with numpy

    return np.dtype(getattr(ml_dtypes, dtype)).itemsize


# =============================================================================================
# Parameter bytes


def param_counts(cfg: ModelConfig) -> dict[str, int]:
  """Parameter counts of a model by where they live.

  Returns:
    {"attention": q/k/v/o (+ biases, q/k norms) and the two RMSNorms of every layer,
     "embedding": embedding, LM head (unless tied), final norm,
     "router": routers of the MoE layers,
     "dense_ffn": shared experts (+ their gates) and the MLPs of dense layers,
     "routed_experts": the routed experts,
     "non_expert": all but the routed experts, "total"}.
  """
  d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  attn = 2 * d * n * h + 2 * d * k * h + 2 * d
  if cfg.qkv_bias:
    attn += n * h + 2 * k * h
  if cfg.qk_norm == "per_head":
    attn += 2 * h
  elif cfg.qk_norm == "full":
    attn += (n + k) * h
  moe = sum(cfg.moe_layers)
  dense = cfg.num_layers - moe
  out = {
      "attention": cfg.num_layers * attn,
      "embedding": cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2) + d,
      "router": moe * d * cfg.num_experts,
      "dense_ffn": (moe * (3 * d * cfg.d_ff_shared + d) if cfg.d_ff_shared else 0)
                   + dense * 3 * d * cfg.d_ff_dense,
      "routed_experts": moe * cfg.num_experts * 3 * d * cfg.d_ff_expert,
  }
  out["non_expert"] = out["attention"] + out["embedding"] + out["router"] + out["dense_ffn"]
  out["total"] = out["non_expert"] + out["routed_experts"]
  return out


def param_bytes(cfg: ModelConfig, dtype: str) -> dict[str, int]:
  """`param_counts` in bytes of `dtype`."""
  size = dtype_itemsize(dtype)
  return {key: v * size for key, v in param_counts(cfg).items()}


def kv_bytes_per_token(cfg: ModelConfig, dtype: str) -> int:
  """K and V of one token over all layers."""
  return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype_itemsize(dtype)


# =============================================================================================
# Placement (static and shared)


@dataclasses.dataclass
class Unit:
  """A device, or a tensor-parallel group of devices, with the models whose weights it holds.

  Attributes:
    devices: device indices.
    models: model ids (several only when tp == 1).
    weights_bytes_per_device: resident weights on each device of the unit.
  """

  devices: list[int]
  models: list[str]
  weights_bytes_per_device: int = 0

  @property
  def tp(self) -> int:
    return len(self.devices)


def _usable(device_bytes: int, reserve_fraction: float) -> float:
  return device_bytes * (1 - reserve_fraction)


def _min_devices(weights: int, *, num_devices: int, device_bytes: int, page_bytes: int,
                 reserve_fraction: float) -> int | None:
  """Fewest devices holding `weights` (split evenly) with 2 pages free on each, or None."""
  for n in range(1, num_devices + 1):
    if _usable(device_bytes, reserve_fraction) - weights / n >= 2 * page_bytes:
      return n
  return None


def place_models(weights: Mapping[str, int], *, num_devices: int, device_bytes: int,
                 page_bytes: int, reserve_fraction: float = 0.0
                 ) -> tuple[list[Unit], dict[str, str]]:
  """Places models with their full weights on devices (the module's rule for static/shared).

  Args:
    weights: bytes of each model's weights, in fleet order.

  Returns:
    (units, not_fit): the device units, and {model: reason} for models left out.
  """
  not_fit: dict[str, str] = {}
  need: dict[str, int] = {}
  for m, w in weights.items():
    n = _min_devices(w, num_devices=num_devices, device_bytes=device_bytes,
                     page_bytes=page_bytes, reserve_fraction=reserve_fraction)
    if n is None:
      not_fit[m] = (f"weights {w} B do not fit on all {num_devices} devices of {device_bytes} B "
                    "with 2 KV pages each")
    else:
      need[m] = n
  units: list[Unit] = []
  if sum(need.values()) <= num_devices:
    groups = {m: need[m] for m in need}
    spare = num_devices - sum(groups.values())
    order = list(groups)
    for i in range(spare if order else 0):
      groups[order[i % len(order)]] += 1
    start = 0
    for m in order:
      units.append(Unit(list(range(start, start + groups[m])), [m]))
      start += groups[m]
  else:
    start = 0
    for m in [m for m in need if need[m] > 1]:
      if start + need[m] > num_devices:
        not_fit[m] = (f"needs {need[m]} devices for its weights, only {num_devices - start} "
                      "left after the models before it")
        continue
      units.append(Unit(list(range(start, start + need[m])), [m]))
      start += need[m]
    singles = [Unit([d], []) for d in range(start, num_devices)]
    load = [0] * len(singles)
    for m in sorted((m for m in need if need[m] == 1), key=lambda m: -weights[m]):
      if not singles:
        not_fit[m] = "no device left for it"
        continue
      j = int(np.argmin(load))
      if _usable(device_bytes, reserve_fraction) - load[j] - weights[m] < 2 * page_bytes:
        not_fit[m] = (f"weights {weights[m]} B do not fit next to {load[j]} B already on the "
                      f"emptiest remaining device (of {device_bytes} B, 2 KV pages kept)")
        continue
      singles[j].models.append(m)
      load[j] += weights[m]
    units += [u for u in singles if u.models]
  for u in units:
    u.weights_bytes_per_device = math.ceil(sum(weights[m] for m in u.models) / u.tp)
  order = {m: i for i, m in enumerate(weights)}
  for u in units:
    u.models.sort(key=order.__getitem__)
  return units, not_fit


# =============================================================================================
# Probes


def _grow_max(pool: KVPool, model: str, request_id: str, cap_tokens: int) -> int:
  """Grows a request of `model` (doubling its pages, then bisecting) until PoolExhaustedError.

  `KVPool.grow` is all-or-nothing, so a failed step leaves the request as it was. Returns the
  tokens it holds: the most (<= cap_tokens) that the pool could give it.
  """
  pt = pool.page_tokens(model)
  max_pages = math.ceil(cap_tokens / pt)
  tokens = lambda p: min(p * pt, cap_tokens)  # noqa: E731
  lo, hi, p = 0, max_pages + 1, 1  # lo: held; hi: known to fail (or past the cap)
  while p <= max_pages:
    try:
      pool.grow(request_id, tokens(p))
      lo, p = p, 2 * p
    except PoolExhaustedError:
      hi = p
      break
  if lo < max_pages and p > max_pages:
    p = max_pages
    try:
      pool.grow(request_id, tokens(p))
      lo = p
    except PoolExhaustedError:
      hi = p
  while hi - lo > 1:
    mid = (lo + hi) // 2
    try:
      pool.grow(request_id, tokens(mid))
      lo = mid
    except PoolExhaustedError:
      hi = mid
  return tokens(lo) if lo else 0


def _fill(pool: KVPool, models: Sequence[str], caps: Mapping[str, int]) -> dict[str, int]:
  """Admits requests of `models` round robin, each grown to its cap, until nothing fits.

  Returns tokens held per model. The pool keeps the requests (callers use a fresh pool).
  """
  held = dict.fromkeys(models, 0)
  active = list(models)
  n = 0
  while active:
    for m in list(active):
      rid = f"fill-{m}-{n}"
      n += 1
      try:
        pool.add_request(m, rid)
      except PoolExhaustedError:  # no row left
        active.remove(m)
        continue
      got = _grow_max(pool, m, rid, caps[m])
      if got == 0:
        pool.release(rid)
        active.remove(m)
      held[m] += got
  pool.check_invariants()
  return held


def _longest(pool: KVPool, model: str, cap: int) -> int:
  """One request of `model` alone in `pool`, grown until the pool (or cap) stops it."""
  rid = f"longest-{model}"
  pool.add_request(model, rid)
  got = _grow_max(pool, model, rid, cap)
  pool.check_invariants()
  pool.release(rid)
  return got


def _fill_closed_form(pages: int, layers: int, page_tokens: int, cap: int, rows: int) -> int:
  """Tokens of requests of one model (each up to `cap`, at most `rows`) in `pages` pages."""
  per_req = math.ceil(cap / page_tokens)
  full = min(rows, pages // (layers * per_req))
  rest = (pages - full * layers * per_req) // layers if full < rows else 0
  return full * cap + min(rest * page_tokens, cap)


# =============================================================================================
# Organisations


@dataclasses.dataclass(frozen=True)
class _Fleet:
  cfgs: dict[str, ModelConfig]
  dtype: str
  page_bytes: int
  page_elems: int
  max_batch: int
  device_bytes: int
  num_devices: int
  reserve_fraction: float


def _heads_per_rank(cfg: ModelConfig, tp: int) -> int:
  return math.ceil(cfg.num_kv_heads / tp)


def _page_tokens(fleet: _Fleet, cfg: ModelConfig, tp: int = 1) -> int | None:
  per_token = 2 * _heads_per_rank(cfg, tp) * cfg.head_dim
  return fleet.page_elems // per_token if fleet.page_elems % per_token == 0 else None


def _spec(model: str, cfg: ModelConfig, tp: int, max_context: int, rows: int) -> KVModelSpec:
  # A TP group is one KV "device" whose page is the same local page on every rank; a model
  # holds ceil(K / tp) heads per rank (tp * that in the group: replicated when K < tp).
  return KVModelSpec(model, cfg.num_layers, tp * _heads_per_rank(cfg, tp), cfg.head_dim,
                     max_context, rows)


def _rows_to_fill(pages: int, cfg: ModelConfig, page_tokens: int, cap: int) -> int:
  return pages // (cfg.num_layers * math.ceil(cap / page_tokens)) + 1


def _unit_pages(fleet: _Fleet, unit: Unit) -> int:
  return plan_pages_per_device(
      device_bytes=fleet.device_bytes, resident_bytes=unit.weights_bytes_per_device,
      page_bytes=fleet.page_bytes, reserve_fraction=fleet.reserve_fraction)


def _check_pages(fleet: _Fleet, models: Sequence[str], tp: int, not_fit: dict[str, str]
                 ) -> list[str]:
  ok = []
  for m in models:
    cfg = fleet.cfgs[m]
    if _page_tokens(fleet, cfg, tp) is None:
      not_fit[m] = (f"page of {fleet.page_elems} elements is not a multiple of 2 x "
                    f"{_heads_per_rank(cfg, tp)} KV heads x head_dim {cfg.head_dim}")
    else:
      ok.append(m)
  return ok


def _model_record(fleet: _Fleet, m: str, *, pool_pages: int, total_pages: int, tp: int,
                  longest: int, cap: int, raw: int, reachable: int, closed: dict[str, int]
                  ) -> dict[str, Any]:
  cfg = fleet.cfgs[m]
  pt = _page_tokens(fleet, cfg, tp)
  rec = {"page_tokens": pt, "tp": tp, "pool_pages": pool_pages,
         "longest_context": longest, "longest_context_cap": cap, "longest_context_raw": raw,
         "kv_tokens_reachable": reachable,
         "kv_tokens_equiv": (total_pages // cfg.num_layers) * pt,
         "closed_form": closed}
  rec["closed_form_agrees"] = all(rec[k] == v for k, v in closed.items())
  return rec


def _colocated(fleet: _Fleet, policy: str) -> dict[str, Any]:
  """`static` or `shared`: full weights next to the KV on the same devices."""
  weights = {m: param_bytes(c, fleet.dtype)["total"] for m, c in fleet.cfgs.items()}
  units, not_fit = place_models(weights, num_devices=fleet.num_devices,
                                device_bytes=fleet.device_bytes, page_bytes=fleet.page_bytes,
                                reserve_fraction=fleet.reserve_fraction)
  out: dict[str, Any] = {"placement": [], "models": {}, "fleet_fill": {}}
  total_pages = 0
  for u in units:
    ppd = _unit_pages(fleet, u)
    total_pages += ppd - 1
  for u in units:
    ppd = _unit_pages(fleet, u)
    pages = ppd - 1
    page_elems = u.tp * fleet.page_elems
    models = _check_pages(fleet, u.models, u.tp, not_fit)
    share = pages // max(1, len(models))
    specs, caps, rows = {}, {}, {}
    for m in models:
      cfg = fleet.cfgs[m]
      pt = _page_tokens(fleet, cfg, u.tp)
      if policy == "static":
        per_req = share // (cfg.num_layers * fleet.max_batch)
        caps[m] = min(cfg.max_context, per_req * pt)
        if caps[m] == 0:
          not_fit[m] = (f"static: its share of {share} pages cannot give each of max_batch="
                        f"{fleet.max_batch} requests one page in each of {cfg.num_layers} "
                        "layers")
          continue
        rows[m] = fleet.max_batch
      else:
        if pages < cfg.num_layers:
          not_fit[m] = (f"shared: {pages} pages cannot give one token a page in each of "
                        f"{cfg.num_layers} layers")
          continue
        caps[m] = cfg.max_context
        rows[m] = max(fleet.max_batch, _rows_to_fill(pages, cfg, pt, caps[m]))
      specs[m] = _spec(m, cfg, u.tp, caps[m], rows[m])

    def build(specs=specs, ppd=ppd, page_elems=page_elems):
      pool = KVPool(page_elems=page_elems, pages_per_device=ppd, policy=policy)
      for s in specs.values():
        pool.register_model(s)
      return pool

    out["placement"].append({"devices": u.devices, "tp": u.tp, "models": u.models,
                             "weights_bytes_per_device": u.weights_bytes_per_device,
                             "kv_pages": pages, "kv_bytes_per_device": pages * fleet.page_bytes})
    if not specs:
      continue
    pool = build()
    fill = _fill(pool, list(specs), caps)
    out["fleet_fill"].update(fill)
    for m, s in specs.items():
      cfg = fleet.cfgs[m]
      pt = _page_tokens(fleet, cfg, u.tp)
      longest = _longest(build(), m, caps[m])
      mine = share if policy == "static" else pages  # what one request of m could ever reach
      raw_cap = (mine // cfg.num_layers) * pt
      probe = KVPool(page_elems=page_elems, pages_per_device=mine + 1, policy=policy)
      probe.register_model(dataclasses.replace(s, max_context=max(raw_cap, 1), max_batch=1))
      raw = _longest(probe, m, max(raw_cap, 1))
      reach = _fill(build(), [m], caps)[m]
      closed = {"longest_context": min(caps[m], raw_cap), "longest_context_raw": raw_cap,
                "kv_tokens_reachable": _fill_closed_form(
                    s.num_layers * rows[m] * math.ceil(caps[m] / pt) if policy == "static"
                    else pages, cfg.num_layers, pt, caps[m], rows[m])}
      out["models"][m] = _model_record(
          fleet, m, pool_pages=pages, total_pages=total_pages, tp=u.tp, longest=longest,
          cap=caps[m], raw=raw, reachable=reach, closed=closed)
  out["kv_pages"] = total_pages
  out["kv_bytes"] = total_pages * fleet.page_bytes
  out["fleet_fill_tokens"] = sum(out["fleet_fill"].values())
  out["not_fit"] = not_fit
  return out


def _weights_pool(fleet: _Fleet, w: int, models: Sequence[str]
                  ) -> tuple[WeightsPool | None, dict[str, Any]]:
  """CrossPool's weights pool on `w` devices: all experts pinned if they fit, else partial."""
  specs = [ExpertModelSpec.from_config(m, fleet.cfgs[m], fleet.dtype) for m in models]
  budget = int(_usable(fleet.device_bytes, fleet.reserve_fraction))
  # Slots per class per device that pin everything: replay the pool's round robin of homes.
  need: dict[Any, np.ndarray] = {}
  nxt: dict[Any, int] = {}
  for s in specs:
    c = s.shape_class
    need.setdefault(c, np.zeros(w, np.int64))
    start = nxt.get(c, 0)
    for j in range(len(s.moe_layers)):
      need[c][(start + j) % w] += s.num_experts
    nxt[c] = (start + len(s.moe_layers)) % w
  slots = {c: int(v.max()) for c, v in need.items()}
  all_fit = sum(slots[c] * c.expert_bytes for c in slots) <= budget
  if not all_fit:  # shrink each class in proportion, keeping S >= E of its models
    scale = budget / sum(slots[c] * c.expert_bytes for c in slots)
    min_e = {c: max(s.num_experts for s in specs if s.shape_class == c) for c in slots}
    slots = {c: max(min_e[c], int(slots[c] * scale)) for c in slots}
    if sum(slots[c] * c.expert_bytes for c in slots) > budget:
      return None, {"error": f"{w} weights device(s) of {fleet.device_bytes} B cannot hold one "
                             "layer's experts of every expert shape class"}
  pool = WeightsPool(device_bytes=budget, num_devices=w, policy="pin_all" if all_fit else "lru")
  for s in specs:
    pool.register_model(s, slots_per_device=None if pool.class_index(s.shape_class) is not None
                        else slots[s.shape_class])
  if not all_fit:  # pin layer by layer until each partition is full (a measured fill)
    for s in specs:
      for layer in s.moe_layers:
        try:
          pool.pin(s.model_id, layer, range(s.num_experts))
        except WeightsExhaustedError:  # the partition is nearly full: expert by expert
          for e in range(s.num_experts):
            try:
              pool.pin(s.model_id, layer, [e])
            except WeightsExhaustedError:
              break
  pool.check_invariants()
  total = fleet_experts(specs)
  resident = len(pool.resident_keys())
  closed = sum(min(slots[c] * w, int(need[c].sum())) for c in slots)
  return pool, {"slots_per_device": {f"{c.d_model}x{c.d_ff}:{c.dtype}": slots[c] for c in slots},
                "experts": total, "resident_experts": resident,
                "resident_fraction": resident / total if total else 1.0,
                "resident_experts_upper_bound": closed,
                "slot_bytes_per_device": sum(slots[c] * c.expert_bytes for c in slots),
                "all_resident": all_fit}


def _crosspool(fleet: _Fleet, weight_devices: int | None) -> dict[str, Any]:
  not_fit: dict[str, str] = {}
  models = _check_pages(fleet, list(fleet.cfgs), 1, not_fit)
  pb = {m: param_bytes(fleet.cfgs[m], fleet.dtype) for m in fleet.cfgs}
  d = fleet.num_devices
  out: dict[str, Any] = {"models": {}, "fleet_fill": {}, "not_fit": not_fit}
  if d < 2:
    not_fit.update(dict.fromkeys(models, "crosspool needs >= 2 devices (weights + KV)"))
    return out | {"kv_pages": 0, "kv_bytes": 0, "fleet_fill_tokens": 0}
  if weight_devices is not None:
    if not 1 <= weight_devices <= d - 1:
      raise ValueError(f"crosspool_weight_devices must be in [1, {d - 1}], got {weight_devices}")
    w, rule = weight_devices, "given"
  else:
    w, rule = None, "smallest holding all experts"
    for cand in range(1, d):
      _, info = _weights_pool(fleet, cand, models)
      if info.get("all_resident"):
        w = cand
        break
    if w is None:
      expert = sum(pb[m]["routed_experts"] for m in models)
      total = sum(pb[m]["total"] for m in models)
      w = min(d - 1, max(1, round(d * expert / max(1, total))))
      rule = "experts do not fit on d-1 devices: share proportional to expert bytes"
  wpool, winfo = _weights_pool(fleet, w, models)
  out["weights_pool"] = winfo | {"devices": list(range(w)), "rule": rule,
                                 "free_bytes_per_device":
                                 int(fleet.device_bytes - winfo.get("slot_bytes_per_device", 0))}
  if wpool is None:
    not_fit.update(dict.fromkeys(models, winfo["error"]))
    return out | {"kv_pages": 0, "kv_bytes": 0, "fleet_fill_tokens": 0}
  # Non-expert parameters: one home KV device per model, heaviest first onto the emptiest.
  kv_devices = list(range(w, d))
  load = dict.fromkeys(kv_devices, 0)
  home: dict[str, int] = {}
  usable = _usable(fleet.device_bytes, fleet.reserve_fraction)
  for m in sorted(models, key=lambda m: -pb[m]["non_expert"]):
    dev = min(kv_devices, key=lambda x: (load[x], x))
    if usable - load[dev] - pb[m]["non_expert"] < 2 * fleet.page_bytes:
      not_fit[m] = (f"non-expert weights {pb[m]['non_expert']} B do not fit next to {load[dev]} B "
                    f"on the emptiest KV device (of {fleet.device_bytes} B, 2 KV pages kept)")
      continue
    home[m] = dev
    load[dev] += pb[m]["non_expert"]
  models = [m for m in models if m in home]
  per_dev = {x: plan_pages_per_device(device_bytes=fleet.device_bytes, resident_bytes=load[x],
                                      page_bytes=fleet.page_bytes,
                                      reserve_fraction=fleet.reserve_fraction)
             for x in kv_devices}
  ppd = min(per_dev.values())
  pages = len(kv_devices) * (ppd - 1)
  for m in [m for m in models if pages < fleet.cfgs[m].num_layers]:
    not_fit[m] = (f"crosspool: {pages} KV pages cannot give one token a page in each of "
                  f"{fleet.cfgs[m].num_layers} layers")
  models = [m for m in models if m not in not_fit]
  out["kv_pool"] = {"devices": kv_devices, "pages_per_device": ppd,
                    "non_expert_bytes_per_device": {str(x): load[x] for x in kv_devices},
                    "home_device": home,
                    "stranded_bytes": sum((per_dev[x] - ppd) * fleet.page_bytes
                                          for x in kv_devices)}
  caps = {m: fleet.cfgs[m].max_context for m in models}
  rows = {m: max(fleet.max_batch, _rows_to_fill(pages, fleet.cfgs[m],
                                                _page_tokens(fleet, fleet.cfgs[m]), caps[m]))
          for m in models}

  def build():
    pool = KVPool(page_elems=fleet.page_elems, pages_per_device=ppd,
                  num_devices=len(kv_devices), policy="shared")
    for m in models:
      pool.register_model(_spec(m, fleet.cfgs[m], 1, caps[m], rows[m]))
    return pool

  if models:
    out["fleet_fill"] = _fill(build(), models, caps)
  for m in models:
    cfg = fleet.cfgs[m]
    pt = _page_tokens(fleet, cfg)
    raw_cap = (pages // cfg.num_layers) * pt
    probe = KVPool(page_elems=fleet.page_elems, pages_per_device=ppd,
                   num_devices=len(kv_devices), policy="shared")
    probe.register_model(_spec(m, cfg, 1, max(raw_cap, 1), 1))
    closed = {"longest_context": min(caps[m], raw_cap), "longest_context_raw": raw_cap,
              "kv_tokens_reachable": _fill_closed_form(pages, cfg.num_layers, pt, caps[m],
                                                       rows[m])}
    out["models"][m] = _model_record(
        fleet, m, pool_pages=pages, total_pages=pages, tp=1,
        longest=_longest(build(), m, caps[m]), cap=caps[m],
        raw=_longest(probe, m, max(raw_cap, 1)), reachable=_fill(build(), [m], caps)[m],
        closed=closed)
  out["kv_pages"] = pages
  out["kv_bytes"] = pages * fleet.page_bytes
  out["fleet_fill_tokens"] = sum(out["fleet_fill"].values())
  return out


def measure_capacity(fleet: Sequence[ModelConfig] | Mapping[str, ModelConfig], *,
                     num_devices: int, device_bytes: int, page_bytes: int, dtype: str,
                     max_batch: int, crosspool_weight_devices: int | None = None,
                     reserve_fraction: float = 0.0,
                     organisations: Sequence[str] = ORGANISATIONS) -> dict[str, Any]:
  """KV capacity of `fleet` under each memory organisation, probed on the real host pools.

  Args:
    fleet: model configs (ids "m<i>-<family>") or {model id: config}.
    num_devices: D devices, each of `device_bytes` (the equal budget: D x device_bytes).
    page_bytes: one KV page (one layer's K and V of page_tokens tokens), all organisations.
    dtype: dtype name of weights and KV.
    max_batch: concurrent requests per model that `static` reserves for.
    crosspool_weight_devices: W; default the smallest number of devices holding all experts.
    reserve_fraction: fraction of each device kept for activations / workspace.
    organisations: which of ORGANISATIONS to measure.

  Returns:
    {"settings", "models": per model bytes, "organisations": {name: {"kv_pages", "kv_bytes",
    "models": {id: {"longest_context" (probed, capped), "longest_context_cap",
    "longest_context_raw" (one request, no context cap), "kv_tokens_reachable" (probed: only
    this model active), "kv_tokens_equiv" (all the organisation's KV pages in this model's
    tokens), "closed_form", "closed_form_agrees", ...}}, "fleet_fill" (tokens per model with
    every model active at once), "fleet_fill_tokens", placement details, "not_fit":
    {id: reason}}}.

  Raises:
    ValueError: settings that no organisation could use (sizes <= 0, a page that is not a
      whole number of elements, an unknown organisation, a W outside [1, D-1]).
  """
  if isinstance(fleet, Mapping):
    cfgs = dict(fleet)
  else:
    cfgs = {f"m{i}-{c.family}": c for i, c in enumerate(fleet)}
  if not cfgs:
    raise ValueError("the fleet is empty")
  for name, v in (("num_devices", num_devices), ("device_bytes", device_bytes),
                  ("page_bytes", page_bytes), ("max_batch", max_batch)):
    if v <= 0:
      raise ValueError(f"{name} must be > 0, got {v}")
  bad = set(organisations) - set(ORGANISATIONS)
  if bad:
    raise ValueError(f"unknown organisations {sorted(bad)}; have {ORGANISATIONS}")
  size = dtype_itemsize(dtype)
  if page_bytes % size:
    raise ValueError(f"page_bytes {page_bytes} is not a multiple of the {dtype} itemsize {size}")
  f = _Fleet(cfgs, dtype, page_bytes, page_bytes // size, max_batch, device_bytes, num_devices,
             reserve_fraction)
  result: dict[str, Any] = {
      "settings": {"num_devices": num_devices, "device_bytes": device_bytes,
                   "budget_bytes": num_devices * device_bytes, "page_bytes": page_bytes,
                   "page_elems": f.page_elems, "dtype": dtype, "max_batch": max_batch,
                   "reserve_fraction": reserve_fraction,
                   "crosspool_weight_devices": crosspool_weight_devices},
      "models": {m: {"config": dataclasses.asdict(c) | {"moe_layers": sum(c.moe_layers)},
                     "param_bytes": param_bytes(c, dtype),
                     "kv_bytes_per_token": kv_bytes_per_token(c, dtype)}
                 for m, c in cfgs.items()},
      "organisations": {},
  }
  for org in organisations:
    if org == "crosspool":
      result["organisations"][org] = _crosspool(f, crosspool_weight_devices)
    else:
      result["organisations"][org] = _colocated(f, org)
  return result


def format_table(result: Mapping[str, Any]) -> str:
  """A fixed-width table of a `measure_capacity` result: one row per (organisation, model)."""
  gib = 1 << 30
  head = (f"{'org':<10} {'W':>2} {'KV GiB':>8}  {'model':<24} {'longest':>9} {'(raw)':>10} "
          f"{'reachable':>10} {'fleet fill':>10} {'cf ok':>5}")
  lines = [head, "-" * len(head)]
  for org, res in result["organisations"].items():
    w = res.get("weights_pool", {}).get("devices")
    w = str(len(w)) if w else "-"
    for m, rec in res["models"].items():
      lines.append(f"{org:<10} {w:>2} {res['kv_bytes'] / gib:>8.1f}  {m:<24} "
                   f"{rec['longest_context']:>9} {rec['longest_context_raw']:>10} "
                   f"{rec['kv_tokens_reachable']:>10} {res['fleet_fill'].get(m, 0):>10} "
                   f"{'yes' if rec['closed_form_agrees'] else 'NO':>5}")
    for m, why in res["not_fit"].items():
      lines.append(f"{org:<10} {w:>2} {res['kv_bytes'] / gib:>8.1f}  {m:<24} does not fit: {why}")
    extra = [f"fleet fill total {res['fleet_fill_tokens']} tokens"]
    if "weights_pool" in res:
      wp = res["weights_pool"]
      extra.append(f"experts resident {wp.get('resident_fraction', 0):.3f} ({wp['rule']})")
      if "kv_pool" in res:
        extra.append(f"stranded {res['kv_pool']['stranded_bytes'] / gib:.2f} GiB on KV devices, "
                     f"{wp['free_bytes_per_device'] / gib:.1f} GiB free per weights device")
    lines.append(f"{org:<10}    " + "; ".join(extra))
  return "\n".join(lines)
