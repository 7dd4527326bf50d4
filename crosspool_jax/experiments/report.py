"""Tables and sentences of results files: the terminal comparison and BENCHMARKS.md sections.

Everything here is computed from the JSON alone (a results file is data; tables and sentences
are views): no number in the text is typed, each is read from the results. KV page counts are
usable pages (each device's null page excluded), as everywhere in the results. A simulated
results file (mode "sim") has each run's times under `simulated` (`latencies` reads either),
and every title, table and sentence of it says "simulated"; a run whose plan cannot hold the
fleet (`refused`) is a row of its own.
"""

from __future__ import annotations

import re
import textwrap

from crosspool_jax.engine.policies import get_policy
from crosspool_jax.experiments.budget import device_bytes

WORKSPACE_SECTION = 'WORKSPACE.md, section "What the CPU demo shows, and why"'
SIM_WORKSPACE_SECTION = 'WORKSPACE.md, section "Simulated experiments"'


def _more(results: dict) -> str:
  return SIM_WORKSPACE_SECTION if is_simulated(results) else WORKSPACE_SECTION


def is_simulated(results: dict) -> bool:
  """Whether the results' times are modelled (config.mode "sim"), not measured."""
  return results.get("mode") == "sim"


def latencies(run: dict) -> dict:
  """A run's latency and throughput block: `simulated` (mode "sim") or `wall_clock`."""
  return run["simulated"] if "simulated" in run else run["wall_clock"]


def results_title(results: dict) -> str:
  """"demo (cpu)", or "paper_scale (sim), SIMULATED on 8 x h100_sxm" for modelled times."""
  title = f"{results['experiment']} ({results['variant']})"
  if is_simulated(results):
    dev = results["device"]
    title += f", SIMULATED on {dev['count']} x {dev['device_kind']}"
  return title


def run_label(run: dict) -> str:
  """A run's name, with its sweep point if it has one ("crosspool @ 2.0")."""
  return run["name"] + ("" if run["sweep_value"] is None else f" @ {run['sweep_value']}")


def latency_row(run: dict) -> dict:
  """The comparison table's row of one run (strings), shared by the script and BENCHMARKS.md;
  a refused run's row says so and is empty."""
  if run.get("refused"):
    return {col: "-" for col in COLUMNS} | {"run": run_label(run), "done/rej": "refused"}
  c, w = run["counts"], latencies(run)

  def ms(p):
    return "-" if p["p50"] is None else "/".join(f"{1000 * p[k]:.0f}"
                                                 for k in ("p50", "p90", "p99"))

  hit = "-" if c["expert_hit_rate"] is None else f"{c['expert_hit_rate']:.2f}"
  return {
      "run": run_label(run),
      "done/rej": f"{c['finished']}/{c['rejected']}",
      "preempt": str(c["preemptions"]),
      "TTFT ms p50/90/99": ms(w["ttft_s"]),
      "TBT ms p50/90/99": ms(w["tbt_s"]),
      "tok/s": f"{w['output_tokens_per_s']:.0f}",
      "goodput req/s": f"{w['goodput_requests_per_s']:.2f}",
      "usable KV pages": str(c["kv_capacity_pages"]),
      "KV peak": f"{100 * c['kv_peak_utilization']:.0f}%",
      "longest ctx": str(c["longest_context_served"]),
      "expert hit": hit,
      "compiles after start": str(c["backend_compiles_after_start"]),
  }


COLUMNS = ("run", "done/rej", "preempt", "TTFT ms p50/90/99", "TBT ms p50/90/99", "tok/s",
           "goodput req/s", "usable KV pages", "KV peak", "longest ctx", "expert hit",
           "compiles after start")


def comparison_table(results: dict, *, markdown: bool = False) -> str:
  """The runs side by side: for the terminal, the table and what it shows; or a markdown table.

  The terminal text is the table, then whether every policy gave the same tokens
  (`agreement_sentences`), what the crosspool run won and lost and why (`summary_sentences`)
  and where to read more. markdown=True gives the table alone (`benchmarks_section` puts the
  sentences after the memory lines).
  """
  rows = [latency_row(r) for r in results["runs"]]
  cols = list(COLUMNS)
  if markdown:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r[c] for c in cols) + " |" for r in rows]
    return "\n".join(lines)
  width = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
  lines = [f"{results_title(results)}: {simulated_note(results)}", ""] if is_simulated(
      results) else []
  lines += ["  ".join(c.rjust(width[c]) for c in cols)]
  lines.append("-" * len(lines[0]))
  lines += ["  ".join(r[c].rjust(width[c]) for c in cols) for r in rows]
  lines += ["", *agreement_sentences(results), *slo_sentences(results),
            *memory_at_slo_sentences(results)]
  summary = summary_sentences(results)
  if summary:
    summary.append(f"More: {_more(results)}; every experiment with its command: "
                   "BENCHMARKS.md.")
    lines += ["", textwrap.fill(" ".join(summary), width=100, break_on_hyphens=False)]
  return "\n".join(lines)


def simulated_note(results: dict) -> str:
  """What a simulated results file's times are."""
  sim = results["config"]["sim"]
  eff = sim["efficiency"]
  return (f"times are MODELLED by the simulator (crosspool_jax/sim: the real scheduler and "
          f"pools, a roofline cost model of {results['device']['device_kind']}, efficiency "
          + ", ".join(f"{k} {v:g}" for k, v in eff.items())
          + f", {sim['routing']['kind']} routing), not measured")


def agreement_sentences(results: dict) -> list[str]:
  """Per sweep point: did every policy give the requests they all finished the same tokens?"""
  if is_simulated(results):
    return ["Outputs not compared: a simulated run computes no tokens."]
  field = results["config"]["sweep"]["field"]
  out = []
  for point, a in results["outputs_agree"].items():
    head = "Same output tokens under every policy" + (f" at {field}={point}" if point else "")
    if not a["compared"]:
      out.append(f"{head}: nothing to compare (no request was finished by every policy).")
    elif a["all_same"]:
      out.append(f"{head}: yes, for all {a['compared']} requests that every policy finished.")
    else:
      out.append(f"{head}: NO, only for {a['same']} of the {a['compared']} requests that every "
                 "policy finished.")
  return out


def _names(names: list[str]) -> str:
  return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _against(values: dict[str, str]) -> str:
  """'466 for shared and static' or '1 for shared and 3 for static' (run name -> value)."""
  by_value: dict[str, list[str]] = {}
  for name, v in values.items():
    by_value.setdefault(v, []).append(name)
  return _names([f"{v} for {_names(names)}" for v, names in by_value.items()])


def _ratio(ours: float, theirs: list[float]) -> str:
  """'4.3x' or '4.1-5.4x': ours over each of theirs (zeros left out)."""
  ratios = sorted({f"{ours / t:.1f}" for t in theirs if t})
  return "" if not ratios else (f"{ratios[0]}x" if len(ratios) == 1
                                else f"{ratios[0]}-{ratios[-1]}x")


def _verdict(ours: float, theirs: list[float], *, higher_is_better: bool) -> str:
  """'won', 'lost', 'tie' or 'mixed' against every one of theirs."""
  sign = 1 if higher_is_better else -1
  if all(sign * (ours - t) > 0 for t in theirs):
    return "won"
  if all(sign * (ours - t) < 0 for t in theirs):
    return "lost"
  return "tie" if all(ours == t for t in theirs) else "mixed"


def _resident_experts(run: dict) -> str:
  """'83%' (or '80%, 83%' by shape class): the experts resident in a run's weights pool."""
  plan = run.get("plan") or {"accounting": {}}
  fractions = plan["accounting"].get("resident_expert_fraction") or {}
  return ", ".join(f"{v:.0%}" for v in sorted(set(fractions.values())))


def _memory_sentence(ours: dict, others: list[dict]) -> str:
  """KV pages, rejections and longest context against the others', and the expert hits."""
  c = ours["counts"]
  clauses, verdicts = [], []
  for key, higher, text in (
      ("kv_capacity_pages", True, "{:,} usable KV pages"),
      ("rejected", False, "{:,} of " + f"{c['requests']:,} requests rejected"),
      ("longest_context_served", True, "contexts up to {:,} tokens served")):
    theirs = {o["name"]: o["counts"][key] for o in others}
    verdicts.append(_verdict(c[key], list(theirs.values()), higher_is_better=higher))
    clause = (text.format(c[key]) + " against "
              + _against({n: f"{v:,}" for n, v in theirs.items()}))
    if key == "kv_capacity_pages":
      ratio = _ratio(c[key], list(theirs.values()))
      clause += f" ({ratio} as many)" if ratio else ""
    clauses.append(clause)
  decided = {v for v in verdicts if v != "tie"}
  verdict = decided.pop() if len(decided) == 1 and decided <= {"won", "lost"} else "mixed"
  run = f"{ours['name']} run"
  head = {"won": f"The {run} won on memory: ", "lost": f"The {run} lost on memory: ",
          "mixed": f"On memory, the {run} had "}[verdict]
  sentence = head + "; ".join(clauses)
  if c["expert_hit_rate"] is not None:
    resident = _resident_experts(ours)
    sentence += (f"; {c['expert_hit_rate']:.0%} of its expert accesses hit the weights pool"
                 + (f" with {resident} of the experts resident" if resident else ""))
  return sentence + "."


def _latency_sentence(ours: dict, others: list[dict], clock: str) -> tuple[str, bool]:
  """(sentence, whether it lost on some latency): TBT p50 and p99, TTFT p50 against the
  others'."""
  parts: dict[str, list[str]] = {"won": [], "lost": [], "mixed": [], "tie": []}
  for key, what, q in (("tbt_s", "TBT", "p50"), ("tbt_s", "TBT", "p99"),
                       ("ttft_s", "TTFT", "p50")):
    p50 = latencies(ours)[key][q]
    theirs = {o["name"]: latencies(o)[key][q] for o in others
              if latencies(o)[key][q] is not None}
    if p50 is None or not theirs:
      continue
    ratio = _ratio(p50, list(theirs.values()))
    parts[_verdict(p50, list(theirs.values()), higher_is_better=False)].append(
        f"{what} {q} {1000 * p50:,.0f} ms against "
        + _against({n: f"{1000 * v:,.0f} ms" for n, v in theirs.items()})
        + (f" ({ratio} theirs)" if ratio else ""))
  heads = {"lost": f"It lost on latency ({clock})", "won": f"It won on latency ({clock})",
           "mixed": "Its latency was mixed", "tie": "Its latency was the same"}
  sentences = [f"{heads[v]}: {'; '.join(p)}." for v, p in parts.items() if p]
  return " ".join(sentences), bool(parts["lost"])


def _steps_sentence(ours: dict, others: list[dict]) -> str:
  """Which steps the runs' tokens came from: steps that fed a prompt chunk against decode-only
  steps, their counts, token shares and median times (a TBT percentile is a step time of the
  kind most tokens came from). Empty where a run lacks `wall_clock.steps_by_kind`."""
  runs = [ours, *others]
  kinds = [r.get("wall_clock", {}).get("steps_by_kind") for r in runs]
  if not all(kinds):
    return ""

  def ms(k: dict) -> str:
    p50 = k["step_s"]["p50"]
    return "-" if p50 is None else f"{1000 * p50:,.1f} ms"

  parts = [f"{r['name']} {k['prefill']['steps']} of "
           f"{k['prefill']['steps'] + k['decode']['steps']} steps with a prompt chunk "
           f"({100 * k['prefill']['token_share']:.0f}% of its tokens, p50 {ms(k['prefill'])}), "
           f"decode-only steps p50 {ms(k['decode'])}" for r, k in zip(runs, kinds, strict=True)]
  return "Where the tokens came from: " + "; ".join(parts) + "."


def _why_slower(results: dict) -> str:
  """The known cause of a crosspool latency loss on a CPU host (the devices it emulates), with
  the step's control cost from the results where they hold it."""
  cpus = results.get("host_cpus")
  devices = results["device"]["count"]
  cost = ""
  hosts = {r["name"]: r["wall_clock"].get("host") for r in results["runs"]}
  ours = hosts.get("crosspool")
  if ours and ours.get("steps"):
    cost = (f" (here {ours['dispatches_per_step']:.0f} programs and "
            f"{ours['transfers_per_step']:.0f} transferred arrays per crosspool step"
            + "".join(f", {h['dispatches_per_step']:.1f} and {h['transfers_per_step']:.1f} "
                      f"per {n} step" for n, h in hosts.items()
                      if h and h.get("steps") and n in ("static", "shared"))
            + ")")
  return ("The known cause on this machine: a crosspool step runs several programs per layer "
          "and micro-batch (the attention side at home, the expert call on a weights device, "
          "the transfers between them) where a colocated step is one executable per model"
          + cost + "; the host thread and the programs of the " + f"{devices} devices share "
          + (f"{cpus} CPU cores" if cpus else "the CPU's cores")
          + " (XLA:CPU runs a program of under ~1,000 flops inline in the host thread), so "
          "nothing overlaps. The paper's latency advantage comes "
          "from KV locality and pipelining on real accelerators, and from holding bursts "
          "without preemption (configs/experiments/paper_tbt.py).")


def _crosspool_run(runs: list[dict]) -> dict | None:
  """The crosspool run of `runs`: the one named "crosspool", else the first with kv_policy
  crosspool (None: none)."""
  pooled = [r for r in runs if r["engine"]["kv_policy"] == "crosspool"]
  return next((r for r in pooled if r["name"] == "crosspool"), pooled[0] if pooled else None)


def summary_sentences(results: dict) -> list[str]:
  """What the results show, generated from them (no typed number).

  Per sweep point, the crosspool run (the one named "crosspool", else the first with
  kv_policy crosspool) against the colocated runs (policies without a weights pool: static,
  shared): what it won and lost on memory (usable KV pages, rejections, longest context
  served; its expert hit rate) and on latency (TBT and TTFT p50, with ratios); then, if it lost
  on latency on a CPU, the known cause. A claim is made only where the numbers show it. Empty
  without such a pair of runs.
  """
  field = results["config"]["sweep"]["field"]
  points: dict = {}
  for run in results["runs"]:
    points.setdefault(run["sweep_value"], []).append(run)
  out, slower = [], False
  clock = "simulated" if is_simulated(results) else "wall clock"
  for point, runs in points.items():
    at = f"At {field}={point}: " if point is not None else ""
    refused = [r for r in runs if r.get("refused")]
    if refused:
      out.append(at + " ".join(f"{r['name']} was refused ({r['refused']})." for r in refused))
    runs = [r for r in runs if not r.get("refused")]
    ours = _crosspool_run(runs)
    others = [r for r in runs if not get_policy(r["engine"]["kv_policy"]).pools_experts]
    if ours is None or not others:
      continue
    latency, lost = _latency_sentence(ours, others, clock)
    out += [at + _memory_sentence(ours, others), latency, _steps_sentence(ours, others)]
    slower |= lost
  if slower and results.get("device", {}).get("platform") == "cpu":
    out.append(_why_slower(results))
  return [s for s in out if s]


def meets_slo(run: dict, slo: dict) -> bool:
  """A run serves its fleet within the SLO: not refused, no request rejected, and its P99 TBT
  and P99 TTFT within slo.tbt_s and slo.ttft_s."""
  if run.get("refused") or run["counts"]["rejected"]:
    return False
  t = latencies(run)
  return (t["tbt_s"]["p99"] is not None and t["tbt_s"]["p99"] <= slo["tbt_s"]
          and t["ttft_s"]["p99"] is not None and t["ttft_s"]["p99"] <= slo["ttft_s"])


def _point(value) -> str:
  """A sweep point as written in sentences (numbers compact, anything else as is)."""
  return f"{value:g}" if isinstance(value, int | float) else str(value)


def slo_sentences(results: dict) -> list[str]:
  """For a sweep: at which of its points each run meets the SLO (`meets_slo`)."""
  field = results["config"]["sweep"]["field"]
  if not field:
    return []
  slo = results["config"]["slo"]
  met: dict[str, list] = {}
  for run in results["runs"]:
    met.setdefault(run["name"], [])
    if meets_slo(run, slo):
      met[run["name"]].append(run["sweep_value"])
  return [f"Meets the SLO (P99 TBT <= {1000 * slo['tbt_s']:g} ms, P99 TTFT <= "
          f"{1000 * slo['ttft_s']:g} ms, nothing rejected or refused), by {field}: "
          + "; ".join(f"{name} at {', '.join(map(_point, points)) if points else 'none'}"
                      for name, points in met.items()) + "."]


def run_memory_bytes(run: dict) -> int | None:
  """The accelerator memory a run is planned on: its KV devices' budgets and its weights
  devices' (their own `weights_device_bytes` if a run set it) summed; None without a budget
  plan. A refused run has its plan too."""
  plan = run.get("plan")
  if not plan:
    return None
  a = plan["accounting"]
  weights = a.get("weights_device_bytes") or a["device_bytes"]
  return a["kv_devices"] * a["device_bytes"] + a.get("weight_devices", 0) * weights


def _size(nbytes: float) -> str:
  """'224 GiB', '2.5 MiB'."""
  return f"{nbytes / 2**30:.4g} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.4g} MiB"


def _memory_text(run: dict) -> str:
  """'8 x 28 GiB = 224 GiB' (or '5 x 2.5 MiB + 3 x 3.5 MiB = 23 MiB'): a run's devices."""
  a = run["plan"]["accounting"]
  kv, w = a["kv_devices"], a.get("weight_devices", 0)
  weights = a.get("weights_device_bytes") or a["device_bytes"]
  devices = (f"{kv + w} x {_size(weights)}" if weights == a["device_bytes"] else
             f"{kv} x {_size(a['device_bytes'])} + {w} x {_size(weights)}")
  return f"{devices} = {_size(run_memory_bytes(run))}"


def memory_swept(results: dict) -> bool:
  """Whether some run is planned on different amounts of memory at different sweep points."""
  totals: dict[str, set] = {}
  for run in results["runs"]:
    totals.setdefault(run["name"], set()).add(run_memory_bytes(run))
  return any(len(t - {None}) > 1 for t in totals.values())


def smallest_memory_at_slo(results: dict) -> dict[str, dict | None]:
  """Per run name, its run of the least total memory (`run_memory_bytes`) that meets the SLO
  (`meets_slo`; a refused run does not), or None where none does; the names in the order of
  the runs. A run without a budget plan (no memory to count) never counts as meeting it."""
  slo = results["config"]["slo"]
  best: dict[str, dict | None] = {}
  for run in results["runs"]:
    best.setdefault(run["name"], None)
    if run_memory_bytes(run) is None or not meets_slo(run, slo):
      continue
    if best[run["name"]] is None or run_memory_bytes(run) < run_memory_bytes(best[run["name"]]):
      best[run["name"]] = run
  return best


def memory_at_slo_sentences(results: dict) -> list[str]:
  """For a sweep over the memory (`memory_swept`): each run's smallest total memory meeting
  the SLO (`smallest_memory_at_slo`; larger points where it fails again are named), and what
  the crosspool run needs against each colocated run that meets it somewhere."""
  if not memory_swept(results):
    return []
  best = smallest_memory_at_slo(results)
  slo = results["config"]["slo"]
  items = []
  for name, run in best.items():
    runs = [r for r in results["runs"] if r["name"] == name and run_memory_bytes(r)]
    if not runs:
      continue
    if run is None:
      items.append(f"{name} at none (up to {_size(max(map(run_memory_bytes, runs)))})")
      continue
    failed = sorted({run_memory_bytes(r) for r in runs if run_memory_bytes(r)
                     > run_memory_bytes(run) and not meets_slo(r, slo)})
    items.append(f"{name} at {_memory_text(run)}"
                 + (f" (not at the larger {', '.join(map(_size, failed))})" if failed else ""))
  out = ["Smallest total accelerator memory meeting the SLO (devices x memory per device): "
         + "; ".join(items) + "."]
  ours = _crosspool_run(results["runs"])
  others = {name: run for name, run in best.items() if run is not None
            and not get_policy(run["engine"]["kv_policy"]).pools_experts}
  if ours is None or not others:
    return out
  if best[ours["name"]] is None:
    return [*out, f"{ours['name']} meets it at no point swept; {_names(list(others))} "
                  f"{'does' if len(others) == 1 else 'do'}."]
  mine = run_memory_bytes(best[ours["name"]])
  by_text: dict[str, list[str]] = {}
  for name, run in others.items():
    saving = 1 - mine / run_memory_bytes(run)
    by_text.setdefault("as much as {}" if round(saving, 2) == 0 else
                       f"{abs(saving):.0%} {'less' if saving > 0 else 'more'} than {{}}",
                       []).append(name)
  return [*out, f"{ours['name']} needs "
          + _names([text.format(_names(names)) for text, names in by_text.items()]) + "."]


def _modelled_line(run: dict) -> str:
  """A simulated run's modelled steps and expert swap-ins."""
  if run.get("refused"):
    return f"- `{run_label(run)}`: refused"
  c, step = run["counts"], run["simulated"]["step_s"]
  line = (f"- `{run_label(run)}`: {step['steps']:,} steps, mean {1000 * step['mean']:.1f} ms, "
          f"longest {1000 * step['max']:.0f} ms; {run['simulated']['serve_wall_s']:.1f} s "
          "simulated")
  if c["expert_loads"] is not None:
    line += (f"; {c['expert_loads']:,} expert loads ({c['expert_bytes_swapped'] / 1e9:,.1f} GB "
             "over the host links)")
  return line


def _usable_pages(run: dict) -> str:
  """'1,640 usable KV pages (2 KV device(s) x 820, null pages excluded)'."""
  total, per_device = run["counts"]["kv_capacity_pages"], run["engine"]["pages_per_device"] - 1
  return (f"{total:,} usable KV pages ({total // per_device} KV device(s) x {per_device:,}, "
          "null pages excluded)")


def _plan_line(run: dict) -> str:
  if run.get("refused"):
    return f"- `{run['name']}`: refused: {run['refused']}"
  plan = run.get("plan")
  if not plan:
    return f"- `{run['name']}`: {_usable_pages(run)}, engine.pages_per_device as given"
  a = plan["accounting"]
  line = (f"- `{run['name']}`: {_usable_pages(run)} of {a['page_bytes']} B = "
          f"{_size(run['counts']['kv_capacity_pages'] * a['page_bytes'])} of KV")
  if a.get("expert_slots_per_device"):
    line += (f"; {a['weight_devices']} weights device(s)"
             + (f" of {_size(a['weights_device_bytes'])}"
                if a["weights_device_bytes"] != a["device_bytes"] else "")
             + f" x {a['expert_slots_per_device']} expert slots per shape class "
             f"({_resident_experts(run)} "
             "of the experts resident)")
  caps = sorted(set(plan["max_context"].values()))
  return line + f"; context cap {'/'.join(map(str, caps))} tokens"


def benchmarks_section(results: dict, *, source: str) -> str:
  """A BENCHMARKS.md section of one results file.

  What ran, the command, the table, each run's memory, whether the outputs agree, and what the
  results show (`summary_sentences`).
  """
  dev = results.get("device", {})
  budget = device_bytes(results["config"]["budget"])
  simulated = is_simulated(results)
  firsts = list({r["name"]: r for r in results["runs"][::-1]}.values())[::-1]
  if memory_swept(results):
    field = results["config"]["sweep"]["field"]
    memory = f"Memory per run at {field}={_point(firsts[0]['sweep_value'])} (the first point):"
  elif budget:
    memory = f"Memory per run (budget {_size(budget)} per device):"
  else:
    memory = "Memory per run:"
  lines = [
      f"## {results_title(results)}",
      "",
      results["description"] + ".",
      "",
      *([f"Simulated: {simulated_note(results)}.", ""] if simulated else []),
      f"Command: `{results['command']}`  ",
      f"Source: `{source}`, git {results.get('git_revision', '?')[:12]}"
      + (" (uncommitted changes)" if results.get("git_dirty") else "")
      + f", {dev.get('count', '?')} x {dev.get('device_kind', '?')}"
      + (" (simulated)" if simulated else "") + f", seed {results['seed']}, "
      f"arrivals: {results['config']['arrival_mode']}, {results.get('created', '')}.",
      "",
      comparison_table(results, markdown=True),
      "",
      memory,
      "",
      *map(_plan_line, firsts),
      "",
  ]
  if simulated:
    lines += ["Modelled steps per run:", "", *map(_modelled_line, results["runs"]), ""]
  lines += [*agreement_sentences(results), *slo_sentences(results),
            *memory_at_slo_sentences(results), ""]
  summary = summary_sentences(results)
  if summary:
    lines += [" ".join([*summary, f"More: {_more(results)}."]), ""]
  return "\n".join(lines)


def vs_hf_section(bench: dict, *, source: str) -> str:
  """A BENCHMARKS.md section of a `scripts/bench_vs_hf.py` JSON file."""
  h = bench["header"]
  flags = h["flags"]

  def frac(run: dict) -> str:
    f = run.get("roofline_fraction")
    return "-" if f is None else f"{f:.2f}"

  rows = ["| batch | HF tok/s | generate tok/s | engine tok/s | generate / HF | engine / HF "
          "| roofline tok/s | fraction of the roofline (HF, generate, engine) "
          "| greedy rows equal to HF (generate, engine) |",
          "|---|---|---|---|---|---|---|---|---|"]
  for r in bench["records"]:
    runs, agree = r["runs"], r["agreement"]
    roof = r.get("roofline", {}).get("tokens_per_s")
    rows.append(f"| {r['batch']} | {runs['hf']['tokens_per_s']:.0f} | "
                f"{runs['generate']['tokens_per_s']:.0f} | {runs['engine']['tokens_per_s']:.0f} "
                f"| {r['ratio_generate_vs_hf']:.2f} | {r['ratio_engine_vs_hf']:.2f} | "
                f"{'-' if roof is None else f'{roof:,.0f}'} | "
                f"{', '.join(frac(runs[n]) for n in ('hf', 'generate', 'engine'))} | "
                f"{agree['generate_vs_hf']:.0%}, {agree['engine_vs_hf']:.0%} |")
  model = h["model"]
  what = (f"the `{flags['preset']}` preset, a tiny random {model['family']}" if flags.get("preset")
          else f"one tiny {model['family']} checkpoint")
  shape = (f"vocab {model['vocab_size']}, D={model['d_model']}, {model['num_layers']} layers, "
           f"{model['num_heads']}/{model['num_kv_heads']} heads of {model['head_dim']}, "
           f"{model['num_experts']} experts top-{model['top_k']} of F={model['d_ff_expert']}")
  steps = flags.get("decode_steps_per_dispatch")
  command = ["python scripts/bench_vs_hf.py"]
  command += [f"--preset={flags['preset']}"] if flags.get("preset") else []
  command += [f"--batch_sizes={','.join(flags['batch_sizes'])}", f"--iters={flags['iters']}"]
  command += [f"--torch_threads={flags['torch_threads']}"] if flags.get("torch_threads") else []
  command += [f"--decode_steps_per_dispatch={steps}"] if steps else []
  command += [f"--out={flags['out']}"]
  peaks = bench["records"][0].get("roofline", {}).get("peaks", {}) if bench["records"] else {}
  peak_text = ("" if not peaks.get("flops_per_s") else
               f" The roofline: max(FLOPs / peak, bytes / bandwidth) per step from the config, "
               f"peaks {peaks.get('source', '?')} in the run "
               f"({peaks['flops_per_s'] / 1e9:.0f} GFLOP/s, "
               f"{peaks['bytes_per_s'] / 1e9:.0f} GB/s before the first batch size).")
  return "\n".join([
      "## Peer benchmark: HF transformers vs crosspool_jax",
      "",
      f"{what[0].upper() + what[1:]} ({shape}; {model['params']:,} parameters, {h['dtype']}) "
      f"decoded greedily, prompt {flags['prompt_len']} tokens, {flags['max_new_tokens']} new "
      f"tokens per row; median of {flags['iters']} interleaved rounds; torch "
      f"{h['torch_version']} with {h['torch_threads']} threads, jax {h['jax_version']}, "
      f"{h['cpu_cores']} CPU cores (load average {h['loadavg_start'][0]:.1f} at the start); the "
      f"engine decodes {steps or 1} step(s) per dispatch.{peak_text}",
      "",
      f"Command: `{' '.join(command)}`  ",
      f"Source: `{source}`, git {h['git_revision'][:12]}"
      + (" (uncommitted changes)" if h.get("git_dirty") else "") + f", {h['date']}.",
      "",
      *rows,
      "",
  ])


# |prediction error| targets of the simulator's validation (Vidur-style simulators: < 10 %)
VALIDATION_TARGETS = {"p50": 0.20, "p99": 0.35}


def validation_section(validation: dict, *, source: str) -> str:
  """A BENCHMARKS.md section of a `scripts/calibrate.py` JSON file: the calibrations fitted
  and, per validated experiment, measured against predicted TTFT / TBT percentiles."""
  fit = validation["fit"]
  lines = [
      f"### Simulator validation: calibrated on {fit['experiment']} (seed {fit['seed']}), "
      f"device {validation['device']}",
      "",
      f"From `{source}`, written by `{validation['command']}`. Each policy's cost model is",
      f"fitted to the measured steps of `{fit['command']}` (revision {fit['git_revision'][:8]},",
      f"{fit['host_cpus']} CPUs): seconds per step = host step + first runs of a program shape",
      "x first-run cost + programs x launch + transfers x latency + each stage's roofline",
      "seconds / its efficiency (crosspool_jax/sim/calibrate.py). Each validated experiment is",
      "then simulated with those terms and its measured and predicted latencies set side by",
      "side (ms; error = predicted / measured - 1).",
      "",
      "| policy | steps fitted | r2 | median step error | host step ms | first run ms "
      "| launch ms | efficiency attention / experts |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for name, c in validation["calibrations"].items():
    e = c["efficiency"]
    lines.append(f"| {name} | {c['steps']} | {c['fit']['r2']:.2f} | "
                 f"{100 * c['fit']['median_abs_rel_error']:.0f}% | {1e3 * c['host_step_s']:.2f} | "
                 f"{1e3 * c['first_run_s']:.1f} | {1e3 * c['dispatch_s']:.2f} | "
                 f"{e['attention']:.3f} / {e['experts']:.3f} |")
  for v in validation["validations"]:
    src, rows = v["source"], v["rows"]
    keys = [k for k in rows[0] if isinstance(rows[0][k], dict)] if rows else []
    lines += ["", f"Predicted: `{src['command']}` (seed {src['seed']}, revision "
                  f"{src['git_revision'][:8]}), measured / predicted (error):", "",
              "| policy | " + " | ".join(k.replace("_s_", " ") for k in keys) + " |",
              "|---|" + "---|" * len(keys)]
    over = 0
    for row in rows:
      cells = []
      for k in keys:
        cell = row[k]
        err = cell["error"]
        miss = err is not None and abs(err) > VALIDATION_TARGETS[k.rsplit("_", 1)[1]]
        over += miss
        text = "-" if err is None else f"{100 * err:+.0f}%"
        cells.append(f"{cell['measured_ms']:.1f} / {cell['predicted_ms']:.1f} "
                     f"({'**' + text + '**' if miss else text})")
      lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    lines += ["", f"Target |error| <= {100 * VALIDATION_TARGETS['p50']:.0f}% at p50, <= "
                  f"{100 * VALIDATION_TARGETS['p99']:.0f}% at p99: {over} of "
                  f"{len(rows) * len(keys)} cells miss it (bold)."]
  return "\n".join(lines) + "\n"


PREFETCHING_POLICIES = ("activation_aware",)


def policy_rows(random: dict, trained: dict) -> list[tuple[str, ...]]:
  """The weights-pool policies on a random fleet next to a trained one (two `weights_pool`
  results of `scripts/bench_pools.py --fleet`): per pool size and policy, the replay's hit rate
  and loads against Belady's MIN's on the same trace, and the share of the prefetched experts
  a layer read before their eviction. The first row is the header."""
  rows = [("resident", "policy", "random: hit", "MIN hit", "loads", "MIN loads",
           "prefetch used", "trained: hit", "MIN hit", "loads", "MIN loads", "prefetch used")]
  by = {(r["fraction"], r["policy"]): r for r in trained["replay"]}
  for r in random["replay"]:
    t = by.get((r["fraction"], r["policy"]))
    if "error" in r or t is None or "error" in t:
      continue
    rows.append((f"{r['fraction']:.0%}", r["policy"], *(cell for x in (r, t) for cell in (
        f"{x['hit_rate']:.3f}", f"{x['belady_hit_rate']:.3f}", str(x["loads"]),
        str(x["belady_loads"]),
        f"{x['prefetch_accuracy']:.2f}" if x["policy"] in PREFETCHING_POLICIES else "-"))))
  return rows


def _prediction_sentence(name: str, result: dict) -> str:
  p = result["prediction"]
  return (f"{name}: precision {p['precision']:.2f} (a random pick of as many experts: "
          f"{p['chance_precision']:.2f}), recall {p['recall']:.2f}, over {p['predictions']:,} "
          "predictions")


def policy_gap_sentences(result: dict) -> list[str]:
  """Per pool size, the best demand-fetching policy's hit rate against MIN's (a prefetching
  policy's hit rate is not bounded by MIN's: it can buy hits with extra loads)."""
  out = []
  for fraction in sorted({r["fraction"] for r in result["replay"]}):
    demand = [r for r in result["replay"] if r["fraction"] == fraction and "error" not in r
              and r["policy"] not in PREFETCHING_POLICIES and r["policy"] != "pin_all"]
    if not demand:
      continue
    best = max(demand, key=lambda r: r["hit_rate"])
    gap = 100 * (best["belady_hit_rate"] - best["hit_rate"])
    out.append(f"at {fraction:.0%} resident {best['policy']} {best['hit_rate']:.3f} against "
               f"MIN's {best['belady_hit_rate']:.3f} ({gap:.1f} points)")
  return out


def policy_section(bench: dict, *, source: str) -> str:
  """A BENCHMARKS.md section of a `scripts/bench_pools.py --fleet` JSON file."""
  h = bench["header"]
  flags = h["flags"]
  random, trained = bench["weights_pool"], bench["weights_pool_trained"]
  command = ["python scripts/bench_pools.py", f"--fleet={flags['fleet']}"]
  for name in ("families", "models_per_family", "requests", "prompt_len", "new_tokens",
               "batch", "zipf", "seed", "fractions", "policies", "live_policies", "sections",
               "out"):
    value = flags[name]
    command.append(f"--{name}=" + (",".join(value) if isinstance(value, list) else str(value)))
  rows = policy_rows(random, trained)
  table = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
  table += ["| " + " | ".join(r) + " |" for r in rows[1:]]
  return "\n".join([
      "## Weights-pool policies: random vs trained routing",
      "",
      "The expert-cache policies replayed on the routing trace of one workload "
      f"({flags['requests']} requests of {flags['prompt_len']} held-out prompt tokens and "
      f"{flags['new_tokens']} new tokens each, Zipf {flags['zipf']:g} over the models) served "
      f"by {len(random['fleet'])} seeded random models and by {len(trained['fleet'])} models "
      "of a trained fleet (`scripts/make_fleet.py`: bases and their fine-tunes, "
      f"{', '.join(flags['families'])}), {sum(trained['fleet'].values()):,} pooled experts in "
      "either fleet, at each share of them resident; Belady's MIN on the same trace bounds "
      "the hits of demand-fetching policies and the loads of every policy. A prefetching "
      "policy's hit rate counts prefetched experts, so compare its loads; \"prefetch used\" is "
      "the share of its prefetched experts "
      "a layer read before their eviction.",
      "",
      f"Command: `{' '.join(command)}`  ",
      f"Source: `{source}`, git {h['git_revision'][:12]}, {h['device_kind']}, {h['date']}.",
      "",
      *table,
      "",
      "The activation-aware predictor (the next MoE layer's router applied to this layer's "
      "hidden state), against the experts that layer then used: "
      + "; ".join(_prediction_sentence(n, r) for n, r in (("random", random),
                                                             ("trained", trained))) + ".",
      "",
      "Best demand-fetching policy against MIN on the trained fleet: "
      + "; ".join(policy_gap_sentences(trained)) + ". On the random fleet: "
      + "; ".join(policy_gap_sentences(random)) + ".",
      "",
  ])


def processes_title(results: list[dict]) -> str:
  """"demo across 2 processes (cpu)": the experiment, the most processes of `results`, the
  platform."""
  count = max(r.get("processes", {}).get("count", 1) for r in results)
  return (f"{results[0]['experiment']} across {count} processes "
          f"({results[0].get('device', {}).get('platform', '?')})")


def _per_step(x: float) -> str:
  return f"{x:,.1f}"


def _host_us(host: dict) -> str:
  """Host µs per generated token, wall (and the host thread's CPU, in results that have it)."""
  cpu = host.get("host_cpu_us_per_token")
  return f"{host['host_us_per_token']:,.0f}" + ("" if cpu is None else f" ({cpu:,.0f})")


def processes_section(files: list[tuple[dict, str]]) -> str:
  """A BENCHMARKS.md section of one experiment config run in one process and across several
  (`scripts/run_experiment.py` under `scripts/launch_local.py`): (results, source) pairs, the
  one-process results (no `processes` block) first. Per run, its latencies, throughput, host
  counters and transfers between processes per served step, and whether its tokens and counts
  are those of the one-process run. ValueError for files of different configs or seeds, or
  without exactly one one-process file."""
  results = [r for r, _ in files]
  single = [r for r in results if "processes" not in r]
  if len(single) != 1 or "processes" in results[0]:
    raise ValueError("give the one-process results file first, then the multi-process ones "
                     f"(got {len(single)} one-process file(s))")
  for r in results[1:]:
    for key in ("experiment", "variant", "seed"):
      if r[key] != results[0][key]:
        raise ValueError(f"the results differ in {key}: {results[0][key]!r} and {r[key]!r}")
  base = {run["name"]: run for run in results[0]["runs"] if "counts" in run}
  cols = ["processes", *COLUMNS[:7], "steps", "dispatches/step", "host µs/token (CPU)",
          "arrays/step between processes", "KB/step between processes", "outputs"]
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  agree = []
  for r in results:
    count = r.get("processes", {}).get("count", 1)
    for run in r["runs"]:
      if "counts" not in run:
        continue
      c, host = run["counts"], run["wall_clock"].get("host", {})
      cross = c.get("cross_process")
      ref = base.get(run["name"])
      if count == 1:
        same = "(the reference)"
      elif ref is None:
        same = "no one-process run"
      else:
        same = ("identical" if c["outputs_sha256"] == ref["counts"]["outputs_sha256"]
                else "DIFFERENT")
        differ = sorted(k for k in ref["counts"] if k != "cross_process"
                        and ref["counts"][k] != c.get(k))
        agree.append(f"`{run['name']}` across {count} processes: output tokens {same}; counts "
                     + ("identical (steps, preemptions, KV pages per step, expert hits, loads "
                        "and calls, compile counts)" if not differ
                        else f"DIFFERENT in {', '.join(differ)}") + ".")
      row = latency_row(run)
      lines.append("| " + " | ".join([
          str(count), *(row[k] for k in COLUMNS[:7]), str(c["steps"]),
          _per_step(host["dispatches_per_step"]) if host else "-",
          _host_us(host) if host else "-",
          _per_step(cross["arrays_per_step"]) if cross else "-",
          _per_step(cross["bytes_per_step"] / 1e3) if cross else "-", same]) + " |")
  out = [f"## {processes_title(results)}", "", results[0]["description"] + ".", ""]
  for (r, source) in files:
    dev, p = r.get("device", {}), r.get("processes")
    load = r.get("wall_clock", {}).get("load_average")
    where = ("1 process" if p is None else
             f"{p['count']} processes, KV devices {', '.join(p['devices']['kv'])} "
             f"({p['groups']['kv']}), weights devices {', '.join(p['devices']['weights'])} "
             f"({p['groups']['weights']}), {p['transport']} transport")
    out += [f"Command ({where}): `{r['command']}`  ",
            f"Source: `{source}`, git {r.get('git_revision', '?')[:12]}"
            + (" (uncommitted changes)" if r.get("git_dirty") else "")
            + f", {dev.get('count', '?')} x {dev.get('device_kind', '?')}, seed {r['seed']}, "
            f"arrivals: {r['config']['arrival_mode']}, {r.get('created', '')}"
            + ("" if load is None else f", load average {load['start'][0]:.1f} at the start, "
               f"{load['end'][0]:.1f} at the end") + ".", ""]
  out += [*lines, ""]
  out += ["Arrays and KB between processes: what every process sent to another while serving "
          "(each array is received once), per served step; host counters of process 0; "
          "latencies are process 0's wall clock.", ""]
  for r in results[1:]:
    for name, why in r["processes"]["not_served"].items():
      out.append(f"`{name}` not served across processes: {why}.")
  out += [*agree, ""]
  for r in results[1:]:
    for run in r["runs"]:
      cross = run.get("counts", {}).get("cross_process")
      if cross:
        steps = max(1, run["counts"]["steps"])
        out.append(f"`{run['name']}` across {r['processes']['count']} processes, per served "
                   "step: " + "; ".join(
                       f"process {i} sent {p['serving']['sent'] / steps:,.1f} arrays "
                       f"({p['serving']['sent_bytes'] / steps / 1e3:,.1f} KB) and received "
                       f"{p['serving']['received'] / steps:,.1f} "
                       f"({p['serving']['received_bytes'] / steps / 1e3:,.1f} KB)"
                       for i, p in enumerate(cross["per_process"]))
                   + f"; at start-up (compiling: warm-up steps) process 0 sent "
                   f"{cross['per_process'][0]['start_up']['sent']} arrays.")
  return "\n".join([*out, ""])


def section_title(section: str) -> str:
  """The title of a BENCHMARKS.md section (its "## " heading)."""
  return section.split("\n", 1)[0].removeprefix("## ")


def split_sections(text: str) -> tuple[str, list[str]]:
  """A BENCHMARKS.md as (the header before its first "## " heading, each section from its
  heading to the next)."""
  starts = [m.start() for m in re.finditer(r"^## ", text, flags=re.MULTILINE)]
  header = text[:starts[0]] if starts else text
  return header, [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)], strict=True)]


def replace_sections(text: str, sections: list[str], notes: dict[str, str], *,
                     before: str) -> str:
  """`text` (a BENCHMARKS.md) with each of `sections` in place of the section of the same
  title, or, if it has none, inserted before the section titled `before` (or at the end);
  every other section byte for byte as it was. The header's paragraph of update notes (lines
  `Section "TITLE" ...`, after the paragraph that says how the file was generated) gets
  `notes` ({title: line}), each in place of the line of the same title."""
  header, parts = split_sections(text)
  for section in sections:
    body = section if section.endswith("\n") else section + "\n"
    titles = [section_title(p) for p in parts]
    title = section_title(section)
    if title in titles:
      i = titles.index(title)
      parts[i] = body + ("\n" if i + 1 < len(parts) else "")
    elif before in titles:
      parts.insert(titles.index(before), body + "\n")
    else:
      if parts and not parts[-1].endswith("\n\n"):
        parts[-1] += "\n" if parts[-1].endswith("\n") else "\n\n"
      parts.append(body)
  paragraphs = header.split("\n\n")
  old = next((i for i, p in enumerate(paragraphs)
              if p and all(line.startswith('Section "') for line in p.split("\n"))), None)
  kept = [] if old is None else paragraphs[old].split("\n")
  kept = [line for line in kept if not any(line.startswith(f'Section "{t}" ') for t in notes)]
  updates = "\n".join([*kept, *notes.values()])
  if old is None:
    generated = next((i for i, p in enumerate(paragraphs) if p.startswith("Generated by")), 0)
    paragraphs.insert(generated + 1, updates)
  else:
    paragraphs[old] = updates
  return "\n\n".join(paragraphs) + "".join(parts)
