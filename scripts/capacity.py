r"""KV capacity at an equal memory budget under every memory policy (static, shared, CrossPool).

Builds, for one fleet on D devices of --device_gib each, the host-side pools of each memory
policy's plan (`crosspool_jax.capacity.measure_capacity`; the rules are the policies',
`crosspool_jax/engine/policies/`) and probes them: the longest context one request of each
model can reach (grown until the pool is exhausted; capped by the model's max_context, the raw
capacity reported too), the KV tokens each model can reach when it alone is active, and the
tokens held with every model active.
Writes JSON (with the git revision) to --out and prints a table.

  # 8 Qwen1.5-MoE-A2.7B-shaped models (public config values) on 8 x 80 GiB, bf16, 256 KiB pages:
  python scripts/capacity.py --reference=qwen1.5-moe-a2.7b --copies=8 --num_devices=8 \
      --device_gib=80 --page_kib=256 --dtype=bfloat16 --max_batch=16 \
      --out=workdir/capacity/qwen_x8.json
  # the same with CrossPool's KV planner choosing W (engine/policies/planner.py):
  python scripts/capacity.py --reference=qwen1.5-moe-a2.7b --copies=8 --num_devices=8 \
      --device_gib=80 --page_kib=256 --dtype=bfloat16 --max_batch=16 --kv_planner
  # 8 Mixtral-8x7B-shaped models on the same budget (static/shared fit only 4 of them):
  python scripts/capacity.py --reference=mixtral-8x7b --copies=8 --num_devices=8 \
      --device_gib=80 --page_kib=256 --dtype=bfloat16 --max_batch=16
  # 8 DeepSeek-V2-Lite-shaped models (288 KiB pages: 256 latent rows of 576 bf16), every
  # colocated model tensor parallel over t = 1, 2, 4, 8 devices (then Qwen3-30B-A3B, 4 KV heads):
  python scripts/capacity.py --reference=deepseek-v2-lite --copies=8 --num_devices=8 \
      --device_gib=80 --page_kib=288 --dtype=bfloat16 --max_batch=16 --tensor_parallel=1 \
      --tensor_parallel=2 --tensor_parallel=4 --tensor_parallel=8 \
      --organisations=static,shared,crosspool
  # tiny configs scaled up, or HF config.json files:
  python scripts/capacity.py --families=mixtral,qwen3_moe --scale=8 --copies=2 \
      --num_devices=4 --device_gib=0.05
  python scripts/capacity.py --config_json=a/config.json,b/config.json --num_devices=4

Tables for the first two commands (closed forms agree with every probe; `strand GiB`: what the
plan leaves unusable on all devices, neither weights, a KV buffer nor an expert slot):

  org        W  KV GiB strand GiB  model                longest    (raw)  reachable fleet fill
  static     -   426.7       0.00  qwen1.5-moe-a2.7b-0     8192   291264     131072     131072
  shared     -   426.7       0.00  qwen1.5-moe-a2.7b-0     8192   291264     291264     291264
  crosspool  3   365.4      61.30  qwen1.5-moe-a2.7b-0     8192  1995424    1995424     253952
  (--kv_planner: static and shared as above)
  crosspool  1   511.5      20.79  qwen1.5-moe-a2.7b-0     8192  2793600    2793600     352256

(one row per model; all 8 alike up to the fleet fill's split; crosspool_partitioned's rows equal
crosspool's. Fleet fill totals: static 1048576, shared 2330112, crosspool 1995424 tokens, with
the planner 2793600. Static reserves max_batch x max_context per model, so most of its
partition idles. Without the planner CrossPool takes the fewest weights devices that keep every
expert resident (3: 185.6 GiB of experts), each of which strands 18.1 GiB, and its 5 KV devices
hold 8 models' non-expert weights unevenly (equal buffers: 2 of them strand 3.5 GiB), so its
pool is smaller than shared's, though one request can use all of it: 1995424 tokens raw vs
291264. The planner's split has the most KV pages: 1 weights device filled with expert slots
(0.01 GiB left; 43% of the experts resident, the rest swapped in) and 7 KV devices, 6 of which
strand 3.5 GiB next to one model's weights; its pool holds 20% more than shared's. The
8192-token max_position caps every longest context.)

The tensor-parallel sweep's totals (closed forms agree with every probe), DeepSeek-V2-Lite,
then the same command with --reference=qwen3-30b-a3b (`longest (raw)`: one request of one
model, no context cap):

   t org                     KV GiB  fleet fill longest (raw)    fleet fill longest (raw)
   1 static                   406.0    13991936       1751552       2009088        252576
   1 shared                   406.0    14012416       1751552       2016768        252576
   1 crosspool                375.6    12964864      12964864       1493856       1496736
   2 static                   406.0     6979584        875776       1990656        252576
   2 shared                   406.0     7006208       1751552       2009856        505152
   4 static                   406.0     3473408        437760       1990656        252288
   4 shared                   406.0     3503104       1751552       1996032       1010304
   8 static                   406.0     1736704        218880        958464        126144
   8 shared                   406.0     1751552       1751552        998016       1010304
   (crosspool: the same at every t; Qwen3's KV GiB 185.0 colocated, 137.0 crosspool)

A rank caches ceil(K / t) KV heads of every token (`placement.heads_per_rank`): V2-Lite's
latent row is one "head", so every rank of a group holds the whole row and the fleet's KV
tokens fall as 1 / t (14.0 M, 7.0 M, 3.5 M, 1.75 M under shared), while one request's longest
context stays one device's; Qwen3-30B-A3B's 4 KV heads divide among up to 4 ranks (the
fleet's tokens hold, one request reaches t devices' worth) and are replicated at t = 8 (half
the tokens). CrossPool's KV pool splits a sequence by pages over its 5 KV devices, not by
heads: 12.96 M V2-Lite tokens at every t, one request may take all of them; at t = 1 shared
holds 8% more (CrossPool's 3 weights devices strand 7.8 GiB each).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from collections.abc import Sequence

from absl import app, flags

from crosspool_jax.capacity import (
  ORGANISATIONS,
  REFERENCE_HF_CONFIGS,
  format_table,
  format_totals,
  measure_capacity,
  reference_config,
)
from crosspool_jax.cli import run_script
from crosspool_jax.models.config import FAMILIES, ModelConfig, load_hf_config, tiny_config
from crosspool_jax.provenance import git_dirty, git_revision

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the flags; called only when the script runs as a program."""
  flags.DEFINE_list("families", [], f"Tiny configs of these families ({FAMILIES}).")
  flags.DEFINE_integer("scale", 1, "Tiny configs: multiply d_model, heads, KV heads, "
                       "expert/dense/shared widths and vocab by this.", lower_bound=1)
  flags.DEFINE_list("reference", [], f"Public configs: {', '.join(REFERENCE_HF_CONFIGS)}.")
  flags.DEFINE_list("config_json", [], "HF config.json paths (or their dirs).")
  flags.DEFINE_integer("copies", 1, "Models per listed config (fine-tunes of one base).",
                       lower_bound=1)
  flags.DEFINE_integer("num_devices", 8, "Devices D.", lower_bound=1)
  flags.DEFINE_float("device_gib", 80.0, "Memory per device, GiB.")
  flags.DEFINE_float("page_kib", 256.0, "KV page size, KiB (all organisations).")
  flags.DEFINE_string("dtype", "bfloat16", "Weights and KV dtype.")
  flags.DEFINE_integer("max_batch", 16, "Requests per model static reserves for.", lower_bound=1)
  flags.DEFINE_integer("weight_devices", None, "CrossPool W (default: --kv_planner's "
                       "choice, else the fewest devices holding all experts).")
  flags.DEFINE_bool("kv_planner", False, "CrossPool's KV planner: the W with the most KV "
                    "pages, expert slots filling every weights device.")
  flags.DEFINE_float("reserve_fraction", 0.0, "Per-device fraction kept for "
                     "activations/workspace (all organisations).")
  flags.DEFINE_multi_integer("tensor_parallel", [1], "Colocated policies: every model sharded "
                             "over this many devices, ceil(K / t) KV heads per rank; repeat "
                             "the flag for a sweep (one table each, then the totals; --out "
                             "a list of the results).",
                             lower_bound=1)
  flags.DEFINE_list("organisations", list(ORGANISATIONS), "Which to measure.")
  flags.DEFINE_string("out", None, "JSON output path (directories are created).")


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
  named += [(f, scaled_tiny(f, FLAGS.scale)) for f in FLAGS.families]
  named += [(r, reference_config(r)) for r in FLAGS.reference]
  for path in FLAGS.config_json:
    directory = path if os.path.isdir(path) else os.path.dirname(path) or "."
    named.append((os.path.basename(os.path.normpath(directory)), load_hf_config(directory)))
  if not named:
    raise app.UsageError("give --families, --reference or --config_json")
  return {f"{name}-{i}": cfg for name, cfg in named for i in range(FLAGS.copies)}


def main(argv: Sequence[str]) -> None:
  del argv
  fleet = build_fleet()
  header = {
      "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "git_revision": git_revision(), "git_dirty": git_dirty(),
      "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])}
  results = []
  for t in FLAGS.tensor_parallel:
    result = measure_capacity(
        fleet, num_devices=FLAGS.num_devices, device_bytes=int(FLAGS.device_gib * (1 << 30)),
        page_bytes=int(FLAGS.page_kib * 1024), dtype=FLAGS.dtype, max_batch=FLAGS.max_batch,
        crosspool_weight_devices=FLAGS.weight_devices, kv_planner=FLAGS.kv_planner,
        reserve_fraction=FLAGS.reserve_fraction, tensor_parallel=t,
        organisations=FLAGS.organisations)
    results.append(result | {"header": header})
    if len(FLAGS.tensor_parallel) > 1:
      print(f"tensor_parallel={t}")
    print(format_table(result))
  if len(results) > 1:
    print(format_totals(results))
  if FLAGS.out:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w") as f:
      json.dump(results[0] if len(results) == 1 else results, f, indent=1)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  define_flags()
  run_script(main)
