r"""The operability soak: many requests through a running engine under random cancels, memory
limit changes (KV pages; expert slots under crosspool) and one model arriving and one retiring.

Checks that every page and slot comes back, that nothing compiles after start-up except the
arriving model, and that a sample of outputs equals the reference generation; writes JSON.

  python scripts/soak.py --policy=shared --requests=10000 --out=workdir/soak/shared.json
  python scripts/soak.py --policy=crosspool --requests=2000 --out=workdir/soak/crosspool.json
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from collections.abc import Sequence

import jax
from absl import flags

from crosspool_jax.cli import run_script, start_script
from crosspool_jax.experiments.soak import SoakConfig, run_soak
from crosspool_jax.provenance import git_dirty, git_revision

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the flags; called only when the script runs as a program."""
  flags.DEFINE_enum("policy", "shared", ["shared", "crosspool"], "Engine memory organisation.")
  flags.DEFINE_integer("requests", 10_000, "Requests submitted over the run.", lower_bound=3)
  flags.DEFINE_integer("seed", 0, "Seed of the models, the workload and the random events.")
  flags.DEFINE_integer("sample", 64, "Finished requests checked against the reference.",
                       lower_bound=1)
  flags.DEFINE_string("out", None, "JSON output path (directories are created); unset: "
                      "stdout only.")


def main(argv: Sequence[str]) -> None:
  start_script(argv)
  if FLAGS.policy == "crosspool":  # 2 KV + 2 weights devices; before any JAX computation
    jax.config.update("jax_num_cpu_devices", 4)
  config = SoakConfig(policy=FLAGS.policy, requests=FLAGS.requests, seed=FLAGS.seed,
                      sample=FLAGS.sample)
  result = run_soak(config, log=lambda msg: print(msg, file=sys.stderr, flush=True))
  result |= {"git_revision": git_revision(), "git_dirty": git_dirty(),
             "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
             "device_kind": jax.devices()[0].device_kind}
  text = json.dumps(result, indent=1)
  if FLAGS.out:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w") as f:
      f.write(text)
  print(text)
  ok = (result["sample_equal"] == result["sample_checked"]
        and result["pages_in_use_at_end"] == 0 and result["slots_of_retired_model"] == 0
        and result["compiles_after_start"] == result["compiles_registering"])
  if not ok:
    raise SystemExit("soak: a check failed (see the JSON above)")


if __name__ == "__main__":
  define_flags()
  run_script(main)
