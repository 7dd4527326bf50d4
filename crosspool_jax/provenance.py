"""Where a result came from: the git revision of the code that produced it."""

from __future__ import annotations

import os
import subprocess


def _git(*args: str) -> str | None:
  """stdout of a git command in this package's checkout, or None (no git, not a checkout)."""
  try:
    proc = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                          cwd=os.path.dirname(os.path.abspath(__file__)))
  except (OSError, subprocess.SubprocessError):
    return None
  return proc.stdout.strip() if proc.returncode == 0 else None


def git_revision() -> str | None:
  """HEAD's commit hash, or None outside a git checkout."""
  return _git("rev-parse", "HEAD") or None


def git_dirty() -> bool | None:
  """True if tracked files differ from HEAD (results may not be reproducible from the hash)."""
  status = _git("status", "--porcelain", "--untracked-files=no")
  return None if status is None else bool(status)
