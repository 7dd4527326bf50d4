"""Every script imports cleanly next to every other one: scripts define absl flags only in main."""

import json
import subprocess
import sys
import textwrap

from tests.conftest import ROOT

# Imports every scripts/*.py into one process and prints the flags the imports added. The
# baseline holds absl's built-in flags and the two orbax defines on import (orbax is what
# crosspool_jax.models.checkpoint saves with), so any other new flag is a script's.
_IMPORT_ALL = textwrap.dedent("""
    import glob, importlib, json, os
    from absl import app, flags
    import orbax.checkpoint

    baseline = set(flags.FLAGS)
    names = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join("scripts", "*.py")))
    for name in names:
      importlib.import_module(f"scripts.{name}")
    print(json.dumps({"scripts": names, "new_flags": sorted(set(flags.FLAGS) - baseline)}))
""")


def test_all_scripts_import_in_one_process_without_defining_flags():
  proc = subprocess.run([sys.executable, "-c", _IMPORT_ALL], capture_output=True, text=True,
                        timeout=300, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert {"generate", "serve", "capacity", "make_tiny_checkpoint"} <= set(result["scripts"])
  assert len(result["scripts"]) >= 10
  assert result["new_flags"] == []
