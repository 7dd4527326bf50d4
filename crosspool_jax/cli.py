"""What every absl script does first (`start_script`) and how it runs (`run_script`).

The one rule: an expected error (a bad flag, config or argument, a missing or corrupt file, a
checkpoint this implementation does not support) ends the script with one line on stderr,
`<script>: error: <message>`; a bug keeps its traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import NoReturn

from absl import app, flags, logging

# Flag and usage errors, then what the package raises for bad input: ValueError (with its
# subclasses UnsupportedConfigError and CheckpointError) and OSError (FileNotFoundError, and
# what ml_collections raises for a config file it cannot load).
EXPECTED_ERRORS = (flags.Error, app.UsageError, ValueError, OSError)


def progress(line: str) -> None:
  """A script's progress or log line: on stderr, flushed (stdout keeps the results)."""
  print(line, file=sys.stderr, flush=True)


def start_script(argv: Sequence[str]) -> None:
  """Rejects stray positional arguments; keeps library INFO logs off unless --verbosity is set."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def _error_line(error: BaseException) -> str:
  """`<script>: error: <message>`, the message's lines joined into one."""
  message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
  return f"{os.path.basename(sys.argv[0])}: error: {message or type(error).__name__}"


def _verbosity_given() -> bool:
  """--verbosity (or -v) is on the command line, also when parsing failed before it."""
  return flags.FLAGS["verbosity"].present or any(
      arg.split("=", 1)[0] in ("--verbosity", "-verbosity", "--v", "-v") for arg in sys.argv[1:])


def _exit_with(error: BaseException) -> NoReturn:
  if _verbosity_given():
    traceback.print_exc()
  print(_error_line(error), file=sys.stderr, flush=True)
  sys.exit(error.exitcode if isinstance(error, app.UsageError) else 1)


def _parse_flags(argv: Sequence[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except EXPECTED_ERRORS as e:
    _exit_with(e)


def run_script(main: Callable[[list[str]], None]) -> None:
  """`absl.app.run(main)`, where an expected error ends the script with one line on stderr.

  An error of `EXPECTED_ERRORS`, while parsing the flags or in `main`, prints
  `<script>: error: <message>` (after its traceback when --verbosity is given) and exits with
  status 1 (a UsageError's own exit code). Any other exception propagates with its traceback.

  Args:
    main: the script's main, called with the arguments left after the flags.
  """

  def guarded_main(argv: list[str]) -> None:
    try:
      main(argv)
    except EXPECTED_ERRORS as e:
      _exit_with(e)

  app.run(guarded_main, flags_parser=_parse_flags)
