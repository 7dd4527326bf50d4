r"""KV capacity at an equal memory budget: static vs shared (kvcached-like) vs CrossPool.

Builds, for one fleet on D devices of --device_gib each, the host-side pools of each memory
organisation (`crosspool_jax.pools.capacity.measure_capacity`: the rules are in its docstring)
and probes them: the longest context one request of each model can reach (grown until the pool
is exhausted; capped by the model's max_context, the raw capacity reported too), the KV tokens
each model can reach when it alone is active, and the tokens held with every model active.
Writes JSON (with the git revision) to --out and prints a table.

  # 8 Qwen1.5-MoE-A2.7B-shaped models (public config values) on 8 x 80 GiB, bf16, 256 KiB pages:
  python scripts/capacity.py --reference=qwen1.5-moe-a2.7b --copies=8 --num_devices=8 \
      --device_gib=80 --page_kib=256 --dtype=bfloat16 --max_batch=16 \
      --out=workdir/capacity/qwen_x8.json
  # 8 Mixtral-8x7B-shaped models on the same budget (static/shared fit only 4 of them):
  python scripts/capacity.py --reference=mixtral-8x7b --copies=8 --num_devices=8 \
      --device_gib=80 --page_kib=256 --dtype=bfloat16 --max_batch=16
  # tiny configs scaled up, or HF config.json files:
  python scripts/capacity.py --families=mixtral,qwen3_moe --scale=8 --copies=2 \
      --num_devices=4 --device_gib=0.05
  python scripts/capacity.py --config_json=a/config.json,b/config.json --num_devices=4

Table for the first command (closed forms agree with every probe):

  org        W  KV GiB  model                longest      (raw)  reachable  fleet fill
  static     -   426.7  qwen1.5-moe-a2.7b-0     8192     291264     131072      131072
  shared     -   426.7  qwen1.5-moe-a2.7b-0     8192     291264     291264      291264
  crosspool  3   365.4  qwen1.5-moe-a2.7b-0     8192    1995424    1995424      253952

(one row per model; all 8 alike. Fleet fill totals: static 1048576, shared 2330112, crosspool
1995424 tokens. Static reserves max_batch x max_context per model, so most of its partition
idles; CrossPool leaves 18.1 GiB free on each of its 3 weights devices (185.6 GiB of experts)
and strands 6.9 GiB on its 5 KV devices, so its pool is smaller, but one request can use all of
it: 1995424 tokens raw vs 291264 — the 8192-token max_position caps all three.)
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from collections.abc import Sequence

from absl import app, flags

from crosspool_jax.models.config import FAMILIES, ModelConfig, load_hf_config, tiny_config
from crosspool_jax.pools.capacity import (
  ORGANISATIONS,
  REFERENCE_HF_CONFIGS,
  measure_capacity,
  reference_config,
)
from crosspool_jax.provenance import git_dirty, git_revision

_FAMILIES = flags.DEFINE_list("families", [], f"Tiny configs of these families ({FAMILIES}).")
_SCALE = flags.DEFINE_integer("scale", 1, "Tiny configs: multiply d_model, heads, KV heads, "
                              "expert/dense/shared widths and vocab by this.", lower_bound=1)
_REFERENCE = flags.DEFINE_list("reference", [], "Public configs: "
                               f"{', '.join(REFERENCE_HF_CONFIGS)}.")
_CONFIG_JSON = flags.DEFINE_list("config_json", [], "HF config.json paths (or their dirs).")
_COPIES = flags.DEFINE_integer("copies", 1, "Models per listed config (fine-tunes of one base).",
                               lower_bound=1)
_NUM_DEVICES = flags.DEFINE_integer("num_devices", 8, "Devices D.", lower_bound=1)
_DEVICE_GIB = flags.DEFINE_float("device_gib", 80.0, "Memory per device, GiB.")
_PAGE_KIB = flags.DEFINE_float("page_kib", 256.0, "KV page size, KiB (all organisations).")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Weights and KV dtype.")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 16, "Requests per model static reserves for.",
                                  lower_bound=1)
_WEIGHT_DEVICES = flags.DEFINE_integer("weight_devices", None, "CrossPool W (default: the "
                                       "fewest devices holding all experts).")
_RESERVE = flags.DEFINE_float("reserve_fraction", 0.0, "Per-device fraction kept for "
                              "activations/workspace (all organisations).")
_ORGS = flags.DEFINE_list("organisations", list(ORGANISATIONS), "Which to measure.")
_OUT = flags.DEFINE_string("out", None, "JSON output path (directories are created).")


def scaled_tiny(family: str, scale: int) -> ModelConfig:
  """`tiny_config(family)` widened by `scale` (head_dim and depth unchanged)."""
  base = tiny_config(family)
  if scale == 1:
    return base
  return tiny_config(family, d_model=base.d_model * scale, num_heads=base.num_heads * scale,
                     num_kv_heads=base.num_kv_heads * scale,
                     d_ff_expert=base.d_ff_expert * scale, d_ff_dense=base.d_ff_dense * scale,
                     d_ff_shared=base.d_ff_shared * scale, vocab_size=base.vocab_size * scale)


def build_fleet() -> dict[str, ModelConfig]:
  """{model id: config} from the flags, each listed config repeated --copies times."""
  named: list[tuple[str, ModelConfig]] = []
  named += [(f, scaled_tiny(f, _SCALE.value)) for f in _FAMILIES.value]
  named += [(r, reference_config(r)) for r in _REFERENCE.value]
  for path in _CONFIG_JSON.value:
    directory = path if os.path.isdir(path) else os.path.dirname(path) or "."
    named.append((os.path.basename(os.path.normpath(directory)), load_hf_config(directory)))
  if not named:
    raise app.UsageError("give --families, --reference or --config_json")
  return {f"{name}-{i}": cfg for name, cfg in named for i in range(_COPIES.value)}


def format_table(result: dict) -> str:
  """One row per (organisation, model)."""
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


def main(argv: Sequence[str]) -> None:
  del argv
  fleet = build_fleet()
  result = measure_capacity(
      fleet, num_devices=_NUM_DEVICES.value, device_bytes=int(_DEVICE_GIB.value * (1 << 30)),
      page_bytes=int(_PAGE_KIB.value * 1024), dtype=_DTYPE.value, max_batch=_MAX_BATCH.value,
      crosspool_weight_devices=_WEIGHT_DEVICES.value, reserve_fraction=_RESERVE.value,
      organisations=_ORGS.value)
  result["header"] = {
      "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "git_revision": git_revision(), "git_dirty": git_dirty(),
      "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])}
  print(format_table(result))
  if _OUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=1)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
