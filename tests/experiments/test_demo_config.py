"""The demo's `cpu_equal` variant: the `cpu` trace's settings without the long-context tail."""

import json

from crosspool_jax.experiments.serving import load_trace
from tests.conftest import get_config


def _demo(arg):
  return get_config(arg, ("experiments", "demo.py"))


def test_cpu_equal_is_cpu_without_the_long_context_tail():
  cpu, equal = _demo("cpu"), _demo("cpu_equal")
  a, b = json.loads(cpu.to_json()), json.loads(equal.to_json())
  assert {k for k in a if a[k] != b[k]} == {"variant", "description", "workload"}
  b["workload"]["prompt_len"]["tail_fraction"] = a["workload"]["prompt_len"]["tail_fraction"]
  assert a["workload"] == b["workload"]  # only the tail differs
  tail_low = cpu.workload.prompt_len.tail_low
  long_cpu = [r for r in load_trace(cpu)[0] if r.prompt_len >= tail_low]
  records = load_trace(equal)[0]
  assert long_cpu, "the cpu trace has a long-context tail"
  assert len(records) == cpu.workload.num_requests
  assert max(r.prompt_len for r in records) < tail_low
