"""The one placement rule, and the page arithmetic every memory policy plans with.

`place` puts each model's resident weights (the policy says which: all of them, or all but the
routed experts) on devices of one byte budget; `lay_out_kv` makes the KV buffers equal on every
KV device (the most loaded device sets them and strands less than a page; every other KV device
strands that remainder plus its difference in resident bytes). Invariant: fleet order, so
appending a one-device model (a cold model arriving) never moves the ones already placed. The
rule's steps and why: WORKSPACE.md, "The engine and its memory policies".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from crosspool_jax.models.config import ModelConfig


def usable_bytes(device_bytes: int, reserve_fraction: float) -> float:
  """What a device of `device_bytes` may hold with `reserve_fraction` of it kept free."""
  if not 0 <= reserve_fraction < 1:
    raise ValueError(f"reserve_fraction must be in [0, 1), got {reserve_fraction}")
  return device_bytes * (1 - reserve_fraction)


def pages_that_fit(*, device_bytes: int, resident_bytes: int, page_bytes: int,
                   reserve_fraction: float = 0.0) -> int:
  """KV pages (the null page among them) that fit on a device next to `resident_bytes`.

  Args:
    device_bytes: memory budget of the device.
    resident_bytes: what already lives there (weights).
    page_bytes: bytes per page.
    reserve_fraction: fraction of device_bytes kept free (activations, compiler scratch).
  """
  if page_bytes <= 0:
    raise ValueError(f"page_bytes must be > 0, got {page_bytes}")
  free = usable_bytes(device_bytes, reserve_fraction) - resident_bytes
  return max(0, int(free // page_bytes))


def heads_per_rank(cfg: ModelConfig, tp: int) -> int:
  """KV heads each of `tp` tensor-parallel ranks holds (replicated when K < tp).

  A rank caches ceil(K / tp) heads of every token, so a group of tp devices with P usable pages
  each (page_elems elements) holds P · page_elems / (stores · ceil(K / tp) · H) / L tokens of
  the model: tp / ceil(K / tp) times what one device holds, which is tp while tp <= K (heads
  divide) and only K once tp > K (each head replicated tp / K times). A latent-attention model
  caches one row per token (K = 1: `ModelConfig.kv_stores`): every rank holds the whole row,
  so its group holds what one device holds, whatever tp; over a fleet of D devices in D / tp
  groups, its KV tokens fall as 1 / tp (a GQA model's as min(1, K / tp)) at equal weights per
  device. A policy that splits KV by pages over KV devices of its own (CrossPool) replicates
  nothing.
  """
  return math.ceil(cfg.num_kv_heads / tp)


def check_tensor_parallel(cfg: ModelConfig, tp: int) -> None:
  """Raises ValueError unless a model can be sharded over `tp` ranks by heads: tp divides the
  query heads, and the KV heads divide among the ranks (K % tp == 0) or are replicated evenly
  (tp % K == 0)."""
  if tp < 1:
    raise ValueError(f"tensor_parallel must be >= 1, got {tp}")
  k = cfg.num_kv_heads
  if cfg.num_heads % tp or (k % tp and tp % k):
    raise ValueError(f"tensor_parallel={tp} cannot shard a {cfg.family} model of "
                     f"{cfg.num_heads} query heads and {k} KV heads: it must divide the query "
                     "heads, and divide or be a multiple of the KV heads")


def page_tokens(cfg: ModelConfig, page_elems: int, tp: int = 1) -> int:
  """Tokens of one layer a page holds for `cfg` (per rank under tensor parallelism).

  Raises:
    ValueError: the page is not a whole number of the model's per-token K and V (or latent
      row: `ModelConfig.kv_stores`).
  """
  per_token = cfg.kv_stores * heads_per_rank(cfg, tp) * cfg.head_dim
  if page_elems % per_token:
    raise ValueError(f"page_elems={page_elems} is not a multiple of stores x kv_heads x "
                     f"head_dim = {cfg.kv_stores} x {heads_per_rank(cfg, tp)} x {cfg.head_dim} = "
                     f"{per_token} of a {cfg.family} model"
                     + (f" ({heads_per_rank(cfg, tp)} KV heads per rank of {tp})" if tp > 1
                        else ""))
  return page_elems // per_token


def fill_closed_form(pages: int, layers: int, page_tokens: int, cap: int,
                     rows: int | None = None) -> int:
  """Tokens that requests of one model (each up to `cap`, at most `rows` of them, None: no
  limit) hold in `pages` pages."""
  per_req = math.ceil(cap / page_tokens)
  full = pages // (layers * per_req)
  if rows is not None and full >= rows:
    return rows * cap
  rest = (pages - full * layers * per_req) // layers
  return full * cap + min(rest * page_tokens, cap)


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where `place` put each model.

  Attributes:
    device: model -> its device (the first of its devices when split), fleet order.
    tp: model -> devices its weights are split over (1: one device).
    resident: resident bytes on each device.
    not_fit: model -> why it has no place.
  """

  device: dict[str, int]
  tp: dict[str, int]
  resident: list[int]
  not_fit: dict[str, str]


def place(weights: Mapping[str, int], *, num_devices: int, device_bytes: int, page_bytes: int,
          reserve_fraction: float = 0.0, split: bool = False,
          tensor_parallel: int = 1) -> Placement:
  """Places the models' resident weights on `num_devices` devices (the module's rule).

  Args:
    weights: resident bytes of each model, in fleet order.
    num_devices: devices of `device_bytes` each.
    page_bytes: one KV page; two must fit next to the weights on every device used.
    reserve_fraction: kept free on every device.
    split: a model may be split over several devices (tensor parallel).
    tensor_parallel: t; every model is sharded over t devices at least: the devices form
      num_devices / t groups of t, placed by the rule as devices holding a t-th of each
      model's weights (`split`: a model that does not fit a group takes several). Every
      weight is counted split; what real tensor parallelism replicates (norms, latent
      attention's down-projections: 0.2% of DeepSeek-V2-Lite) is left out.

  Raises:
    ValueError: t does not divide num_devices.
  """
  if tensor_parallel > 1:
    if num_devices % tensor_parallel:
      raise ValueError(f"tensor_parallel={tensor_parallel} does not divide the {num_devices} "
                       "devices into groups")
    t = tensor_parallel
    groups = place({m: math.ceil(w / t) for m, w in weights.items()},
                   num_devices=num_devices // t, device_bytes=device_bytes,
                   page_bytes=page_bytes, reserve_fraction=reserve_fraction, split=split)
    return Placement({m: g * t for m, g in groups.device.items()},
                     {m: n * t for m, n in groups.tp.items()},
                     [r for r in groups.resident for _ in range(t)],
                     {m: f"{why} (tensor_parallel={t}: a device here is a group of {t}, "
                         f"each holding 1/{t} of the weights)"
                      for m, why in groups.not_fit.items()})
  room = usable_bytes(device_bytes, reserve_fraction) - 2 * page_bytes
  need: dict[str, int] = {}
  not_fit: dict[str, str] = {}
  for m, w in weights.items():
    most = num_devices if split else 1
    n = next((n for n in range(1, most + 1) if w / n <= room), None)
    if n is None:
      where = f"all {num_devices} devices" if split else "one device"
      not_fit[m] = (f"weights {w} B do not fit on {where} of {device_bytes} B with 2 KV pages "
                    "each")
    else:
      need[m] = n
  resident = [0] * num_devices
  device: dict[str, int] = {}
  tp: dict[str, int] = {}
  fresh = 0
  for m in [m for m in need if need[m] > 1]:
    if fresh + need[m] > num_devices:
      not_fit[m] = (f"needs {need[m]} devices for its weights, only {num_devices - fresh} left "
                    "after the models before it")
      continue
    device[m], tp[m] = fresh, need[m]
    for d in range(fresh, fresh + need[m]):
      resident[d] = math.ceil(weights[m] / need[m])
    fresh += need[m]
  singles = range(fresh, num_devices)
  for m in [m for m in need if need[m] == 1]:
    if not singles:
      not_fit[m] = "no device left for it"
      continue
    d = min(singles, key=lambda x: (resident[x], x))
    if resident[d] + weights[m] > room:
      not_fit[m] = (f"weights {weights[m]} B do not fit next to {resident[d]} B on the emptiest "
                    f"device (of {device_bytes} B, 2 KV pages kept)")
      continue
    device[m], tp[m] = d, 1
    resident[d] += weights[m]
  order = [m for m in weights if m in device]
  return Placement({m: device[m] for m in order}, {m: tp[m] for m in order}, resident,
                   {m: not_fit[m] for m in weights if m in not_fit})


@dataclasses.dataclass(frozen=True)
class KVLayout:
  """Placement plus the equal KV buffers of the KV devices.

  Attributes:
    placement: the `place` result.
    pages_per_device: KV pages of every buffer, the null page included.
    page_tokens: tokens per page of each placed model whose KV shape divides the page.
    not_fit: the placement's, plus models whose KV shape does not divide the page.
    accounting: bytes per device (resident, KV, stranded), what a results file reports.
      Stranded: what a device may hold (`usable_bytes`) that is neither weights nor its KV
      buffer (the null page counts as the buffer's); a device without a buffer strands all
      but its weights.
  """

  placement: Placement
  pages_per_device: int
  page_tokens: dict[str, int]
  not_fit: dict[str, str]
  accounting: dict


def lay_out_kv(cfgs: Mapping[str, ModelConfig], weights: Mapping[str, int], *, num_devices: int,
               device_bytes: int, page_elems: int, page_bytes: int,
               reserve_fraction: float = 0.0, split: bool = False,
               buffers_everywhere: bool = False, tensor_parallel: int = 1) -> KVLayout:
  """Places the models (`place`) and sizes the KV buffers: the most loaded device sets them.

  Args:
    cfgs: the fleet's configs, in fleet order.
    weights: resident bytes of each model.
    num_devices: the KV devices.
    device_bytes, page_elems, page_bytes, reserve_fraction, split, tensor_parallel: as
      `place`.
    buffers_everywhere: every KV device holds a buffer (one pool over all of them), not only
      those a model was placed on.

  Raises:
    ValueError: a tensor_parallel degree that does not shard a model's heads
      (`check_tensor_parallel`) or divide the devices.
  """
  for cfg in cfgs.values():
    check_tensor_parallel(cfg, tensor_parallel)
  placement = place(weights, num_devices=num_devices, device_bytes=device_bytes,
                    page_bytes=page_bytes, reserve_fraction=reserve_fraction, split=split,
                    tensor_parallel=tensor_parallel)
  used = sorted({d + i for m, d in placement.device.items() for i in range(placement.tp[m])})
  with_buffer = list(range(num_devices)) if buffers_everywhere else used
  fit = {d: pages_that_fit(device_bytes=device_bytes, resident_bytes=placement.resident[d],
                           page_bytes=page_bytes, reserve_fraction=reserve_fraction)
         for d in with_buffer}
  pages = min(fit.values(), default=0)
  not_fit = dict(placement.not_fit)
  tokens = {}
  for m in placement.device:
    try:
      tokens[m] = page_tokens(cfgs[m], page_elems, placement.tp[m])
    except ValueError as e:
      not_fit[m] = str(e)
  usable = int(usable_bytes(device_bytes, reserve_fraction))
  stranded = [usable - placement.resident[d] - (pages * page_bytes if d in fit else 0)
              for d in range(num_devices)]
  accounting = {
      "device_bytes": device_bytes, "page_elems": page_elems, "page_bytes": page_bytes,
      "kv_devices": num_devices,
      "kv_buffer_devices": with_buffer,
      "resident_bytes_per_kv_device": placement.resident,
      "kv_bytes": len(with_buffer) * max(0, pages - 1) * page_bytes,
      "stranded_bytes_per_kv_device": stranded,
      "stranded_bytes": sum(stranded),
  }
  return KVLayout(placement, pages, tokens, not_fit, accounting)
