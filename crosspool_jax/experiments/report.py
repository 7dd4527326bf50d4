"""Tables of results files: the terminal comparison table and BENCHMARKS.md sections.

Everything here is computed from the JSON alone (a results file is data; tables are views).
"""

from __future__ import annotations


def latency_row(run: dict) -> dict:
  """The comparison table's row of one run (strings), shared by the script and BENCHMARKS.md."""
  c, w = run["counts"], run["wall_clock"]

  def ms(p):
    return "-" if p["p50"] is None else "/".join(f"{1000 * p[k]:.0f}"
                                                 for k in ("p50", "p90", "p99"))

  hit = "-" if c["expert_hit_rate"] is None else f"{c['expert_hit_rate']:.2f}"
  return {
      "run": run["name"] + ("" if run["sweep_value"] is None else f" @ {run['sweep_value']}"),
      "done/rej": f"{c['finished']}/{c['rejected']}",
      "preempt": str(c["preemptions"]),
      "TTFT ms p50/90/99": ms(w["ttft_s"]),
      "TBT ms p50/90/99": ms(w["tbt_s"]),
      "tok/s": f"{w['output_tokens_per_s']:.0f}",
      "goodput req/s": f"{w['goodput_requests_per_s']:.2f}",
      "KV pages": str(c["kv_capacity_pages"]),
      "KV peak": f"{100 * c['kv_peak_utilization']:.0f}%",
      "longest ctx": str(c["longest_context_served"]),
      "expert hit": hit,
      "compiles after start": str(c["backend_compiles_after_start"]),
  }


def comparison_table(results: dict, *, markdown: bool = False) -> str:
  """The runs side by side (text for the terminal, or a markdown table)."""
  rows = [latency_row(r) for r in results["runs"]]
  cols = list(rows[0])
  if markdown:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r[c] for c in cols) + " |" for r in rows]
    return "\n".join(lines)
  width = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
  lines = ["  ".join(c.rjust(width[c]) for c in cols)]
  lines.append("-" * len(lines[0]))
  lines += ["  ".join(r[c].rjust(width[c]) for c in cols) for r in rows]
  return "\n".join(lines)


def _plan_line(run: dict) -> str:
  plan = run.get("plan")
  if not plan:
    return f"- `{run['name']}`: pages per device {run['engine']['pages_per_device']} (as given)"
  a = plan["accounting"]
  line = (f"- `{run['name']}`: {a['kv_devices']} KV device(s) x {plan['pages_per_device']} "
          f"pages of {a['page_bytes']} B = {a['kv_bytes'] / 2**20:.2f} MiB of KV")
  if a.get("expert_slots_per_device"):
    fractions = ", ".join(f"{v:.0%}" for v in a["resident_expert_fraction"].values())
    line += (f"; {a['weight_devices']} weights device(s)"
             + (f" of {a['weights_device_bytes'] / 2**20:.2f} MiB"
                if a["weights_device_bytes"] != a["device_bytes"] else "")
             + f" x {a['expert_slots_per_device']} expert slots per shape class ({fractions} "
             "of the experts resident)")
  caps = sorted(set(plan["max_context"].values()))
  return line + f"; context cap {'/'.join(map(str, caps))} tokens"


def benchmarks_section(results: dict, *, source: str) -> str:
  """A BENCHMARKS.md section of one results file: what ran, the command, the table."""
  dev = results.get("device", {})
  budget = results["config"]["budget"]["device_bytes"]
  lines = [
      f"## {results['experiment']} ({results['variant']})",
      "",
      results["description"] + ".",
      "",
      f"Command: `{results['command']}`  ",
      f"Source: `{source}`, git {results.get('git_revision', '?')[:12]}"
      + (" (uncommitted changes)" if results.get("git_dirty") else "")
      + f", {dev.get('count', '?')} x {dev.get('device_kind', '?')}, seed {results['seed']}, "
      f"arrivals: {results['config']['arrival_mode']}, {results.get('created', '')}.",
      "",
      comparison_table(results, markdown=True),
      "",
      f"Memory per run (budget {budget / 2**20:.2f} MiB per device):" if budget else
      "Memory per run:",
      "",
      *[_plan_line(r) for r in {r["name"]: r for r in results["runs"][::-1]}.values()][::-1],
      "",
      "Requests every policy finished that got the same tokens under all of them: "
      + ", ".join(f"{a['same']}/{a['compared']}" + (f" at {k}" if k else "")
                  for k, a in results["outputs_agree"].items()) + ".",
      "",
  ]
  return "\n".join(lines)


def vs_hf_section(bench: dict, *, source: str) -> str:
  """A BENCHMARKS.md section of a `scripts/bench_vs_hf.py` JSON file."""
  h = bench["header"]
  flags = h["flags"]
  rows = ["| batch | HF tok/s | generate tok/s | engine tok/s | generate / HF | engine / HF "
          "| greedy rows equal to HF (generate, engine) |", "|---|---|---|---|---|---|---|"]
  for r in bench["records"]:
    runs, agree = r["runs"], r["agreement"]
    rows.append(f"| {r['batch']} | {runs['hf']['tokens_per_s']:.0f} | "
                f"{runs['generate']['tokens_per_s']:.0f} | {runs['engine']['tokens_per_s']:.0f} "
                f"| {r['ratio_generate_vs_hf']:.2f} | {r['ratio_engine_vs_hf']:.2f} | "
                f"{agree['generate_vs_hf']:.0%}, {agree['engine_vs_hf']:.0%} |")
  model = h["model"]
  return "\n".join([
      "## Peer benchmark: HF transformers vs crosspool_jax",
      "",
      f"One tiny {model['family']} checkpoint ({model['params']:,} parameters, {h['dtype']}) "
      f"decoded greedily, prompt {flags['prompt_len']} tokens, {flags['max_new_tokens']} new "
      f"tokens per row; median of {flags['iters']} interleaved rounds; torch "
      f"{h['torch_version']} with {h['torch_threads']} threads, jax {h['jax_version']}, "
      f"{h['cpu_cores']} CPU cores (load average {h['loadavg_start'][0]:.1f} at the start).",
      "",
      f"Command: `python scripts/bench_vs_hf.py --batch_sizes="
      f"{','.join(flags['batch_sizes'])} --out={flags['out']}`  ",
      f"Source: `{source}`, git {h['git_revision'][:12]}"
      + (" (uncommitted changes)" if h.get("git_dirty") else "") + f", {h['date']}.",
      "",
      *rows,
      "",
  ])
