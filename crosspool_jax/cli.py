"""What every absl script does first."""

from __future__ import annotations

from collections.abc import Sequence

from absl import app, flags, logging


def start_script(argv: Sequence[str]) -> None:
  """Rejects stray positional arguments; keeps library INFO logs off unless --verbosity is set."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
