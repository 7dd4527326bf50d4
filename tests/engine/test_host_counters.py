"""`HostCounters`: what counts as host time (wall and the thread's CPU) and what does not."""

import time

from crosspool_jax.engine.executors.api import HostCounters


def _spin(cpu_seconds: float) -> None:
  """Works until this thread has used `cpu_seconds` of CPU (however loaded the machine)."""
  end = time.thread_time() + cpu_seconds
  while time.thread_time() < end:
    pass


def test_host_time_excludes_blocked_reads_and_cpu_time_excludes_waiting():
  c = HostCounters()
  start = time.perf_counter()
  with c.hosting():
    _spin(0.05)  # host work: wall and CPU
    time.sleep(0.1)  # descheduled (as while the devices' threads hold the cores): wall only
    with c.blocked():  # a blocking read: neither
      time.sleep(0.2)
      _spin(0.05)
  total = time.perf_counter() - start
  assert 0.15 <= c.host_s <= total - 0.25
  assert 0.05 <= c.host_cpu_s < 0.07
  c.tokens = 10
  summary = c.summary()
  assert summary["host_us_per_token"] == 1e6 * c.host_s / 10
  assert summary["host_cpu_us_per_token"] == 1e6 * c.host_cpu_s / 10
  before = c.host_cpu_s
  with c.hosting():  # each run starts with nothing blocked
    _spin(0.01)
  assert 0.01 <= c.host_cpu_s - before < 0.03
