"""Starting N local processes of one Python program as a multi-process JAX run
(`launch`; scripts/launch_local.py is its command line).

Each process gets its `ProcessConfig` in the environment (`ProcessConfig.environ`; the program
calls `runtime.initialize(ProcessConfig.from_environ())`); its stdout and stderr come out on
the launcher's stdout line by line, prefixed `[pN] `. Invariant: the launcher never hangs.
It fails (`LaunchError`: which process, why, its last lines) when a process exits non-zero,
when some process has not printed `runtime.JOINED` within the join timeout, or when the run
outlives its timeout; the other processes then get `grace_s` seconds to end by themselves
(a survivor's own error shows) before they are terminated.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

from crosspool_jax.distributed.runtime import JOINED, ProcessConfig

_POLL_S = 0.05
_STACK_FRAME = re.compile(r"\s+@\s+0x[0-9a-f]+ ")


class LaunchError(ChildProcessError):
  """A launched process failed, never joined, or the run timed out: the message says which
  and why in one line, `details` holds each process's state and last lines."""

  def __init__(self, message: str, details: str):
    super().__init__(message)
    self.details = details


@dataclasses.dataclass
class _Child:
  process_id: int
  popen: subprocess.Popen
  tail: collections.deque
  joined: threading.Event
  reader: threading.Thread | None = None


def _forward(child: _Child, stream, out: Callable[[str], None]) -> None:
  for raw in stream:
    line = raw.rstrip("\n")
    if not _STACK_FRAME.match(line):  # a fatal error's frames would push its message out
      child.tail.append(line)
    if line.startswith(JOINED):
      child.joined.set()
    out(f"[p{child.process_id}] {line}")


def launch(command: Sequence[str], base: ProcessConfig, *, join_timeout_s: float,
           timeout_s: float, grace_s: float = 0.0, tail_lines: int = 20) -> None:
  """Runs `command` (argv) once per process of `base.num_processes`, each with its process
  id in the environment, until all exit 0; LaunchError otherwise (module docstring)."""
  lock = threading.Lock()

  def emit(line: str) -> None:
    with lock:
      print(line, flush=True)

  in_main = threading.current_thread() is threading.main_thread()
  previous = signal.signal(signal.SIGTERM, _terminated) if in_main else None
  children: list[_Child] = []
  try:
    for process_id in range(base.num_processes):
      config = dataclasses.replace(base, process_id=process_id)
      env = {**os.environ, **config.environ(), "PYTHONUNBUFFERED": "1"}
      popen = subprocess.Popen(list(command), env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, errors="replace",
                               start_new_session=True)
      child = _Child(process_id, popen, collections.deque(maxlen=tail_lines),
                     threading.Event())
      child.reader = threading.Thread(target=_forward, args=(child, popen.stdout, emit),
                                      daemon=True)
      child.reader.start()
      children.append(child)
    _watch(children, join_timeout_s=join_timeout_s, timeout_s=timeout_s, grace_s=grace_s)
  finally:
    _stop(children)
    if in_main:
      signal.signal(signal.SIGTERM, previous)


def _terminated(signum, frame) -> None:
  raise LaunchError("the launcher was terminated (SIGTERM)", "")


def _watch(children: list[_Child], *, join_timeout_s: float, timeout_s: float,
           grace_s: float) -> None:
  start = time.monotonic()
  while True:
    now = time.monotonic() - start
    failed = [c for c in children if c.popen.poll() not in (None, 0)]
    if failed:
      first = failed[0]
      absent = [c.process_id for c in children if not c.joined.is_set()]
      _grace(children, grace_s)
      raise LaunchError(f"process {first.process_id} {_status(first.popen.returncode)}"
                        + (f" (not joined: process(es) {absent})" if absent else ""),
                        _report(children))
    if all(c.popen.poll() == 0 for c in children):
      return
    absent = [c.process_id for c in children if not c.joined.is_set()]
    if absent and now > join_timeout_s:
      raise LaunchError(f"process(es) {absent} did not join within {join_timeout_s:g} s",
                        _report(children))
    if now > timeout_s:
      running = [c.process_id for c in children if c.popen.poll() is None]
      raise LaunchError(f"process(es) {running} still running after {timeout_s:g} s",
                        _report(children))
    time.sleep(_POLL_S)


def _grace(children: list[_Child], grace_s: float) -> None:
  """Waits up to `grace_s` for the processes still running to end by themselves."""
  deadline = time.monotonic() + grace_s
  while any(c.popen.poll() is None for c in children) and time.monotonic() < deadline:
    time.sleep(_POLL_S)


def _status(returncode: int) -> str:
  if returncode < 0:
    return f"was killed by {signal.Signals(-returncode).name}"
  return f"exited with status {returncode}"


def _report(children: list[_Child]) -> str:
  """Each process's state and last lines."""
  parts = []
  for c in children:
    code = c.popen.poll()
    if code is not None:
      c.reader.join(timeout=1.0)  # the lines it printed before it ended
    state = "running" if code is None else _status(code)
    parts.append(f"process {c.process_id} ({state}), last lines:")
    parts.extend(f"  [p{c.process_id}] {line}" for line in c.tail)
  return "\n".join(parts)


def _stop(children: list[_Child]) -> None:
  """Terminates the processes still running (their whole session), killing after 5 s."""
  for c in children:
    if c.popen.poll() is None:
      _signal_session(c.popen, signal.SIGTERM)
  deadline = time.monotonic() + 5.0
  for c in children:
    try:
      c.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      _signal_session(c.popen, signal.SIGKILL)
      c.popen.wait()
    c.reader.join(timeout=1.0)


def _signal_session(popen: subprocess.Popen, signum: int) -> None:
  try:
    os.killpg(popen.pid, signum)
  except ProcessLookupError:  # it ended meanwhile
    pass


def python_command(target: str, args: Sequence[str]) -> list[str]:
  """argv running `target` with this interpreter: a .py path as a script, else a module."""
  if target.endswith(".py"):
    return [sys.executable, target, *args]
  return [sys.executable, "-m", target, *args]
