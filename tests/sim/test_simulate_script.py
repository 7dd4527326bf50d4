"""scripts/simulate.py end to end: a policy the budget cannot hold is a refused row, the others
are simulated."""

import json
import os
import subprocess
import sys

from crosspool_jax.capacity import reference_config
from crosspool_jax.engine.policies.sizes import dtype_itemsize
from crosspool_jax.roofline import device_spec

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_a_fleet_too_big_for_static_is_refused_and_crosspool_runs(tmp_path):
  out = tmp_path / "sim.json"
  copies, devices = 12, 2
  usable = 0.9 * device_spec("h100_sxm").memory_bytes  # the script's --reserve_fraction=0.1
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "scripts", "simulate.py"),
       "--reference=olmoe-1b-7b", f"--copies={copies}", f"--num_devices={devices}",
       "--weight_devices=1", "--num_requests=6", "--prompt_median=32", "--output_median=4",
       "--max_context=256", "--policies=static,crosspool", f"--out={out}"],
      capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # By hand: the copies' weights alone (a lower bound: attention and experts only) exceed both
  # devices' usable memory, so static cannot hold them.
  cfg = reference_config("olmoe-1b-7b")
  per_layer = (2 * cfg.d_model * cfg.num_heads * cfg.head_dim
               + 2 * cfg.d_model * cfg.num_kv_heads * cfg.head_dim
               + 3 * cfg.num_experts * cfg.d_model * cfg.d_ff_expert)
  weights = copies * cfg.num_layers * per_layer * dtype_itemsize("bfloat16")
  assert weights > devices * usable
  runs = json.loads(out.read_text())["runs"]
  assert "does not fit" in runs["static"]["refused"]
  counts = runs["crosspool"]["counts"]
  assert counts["finished"] + counts["rejected"] == counts["requests"] == 6
  assert "refused: budget: static" in proc.stdout
