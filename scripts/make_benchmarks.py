r"""Writes BENCHMARKS.md from results files: never typed by hand.

  python scripts/make_benchmarks.py --results=workdir/demo_cpu/results.json \
      --results=workdir/longest_context_cpu/results.json \
      --vs_hf=workdir/bench/vs_hf.json --out=BENCHMARKS.md

Each `scripts/run_experiment.py` results.json becomes a section with what ran, the exact
command that produced it, the git revision, the device and the comparison table; a
`scripts/bench_vs_hf.py` JSON file becomes the peer-benchmark table, a `scripts/bench_pools.py
--fleet` JSON file the weights-pool policy table (random vs trained routing). Simulated results
(`--config.mode=sim`, committed under benchmarks/sim/ by `--summary_out`) given with
`--sim_results` come last, under "## Simulated experiments" (`simulated_part`), after the
simulator's validation against measured runs (`--validation`, a `scripts/calibrate.py` JSON
file, committed there too); a test regenerates that part from the committed files and
compares it with BENCHMARKS.md.

`--multiprocess=FILE` (repeated: the one-process results first, then those of the same config
across processes, `scripts/run_experiment.py` under `scripts/launch_local.py`) gives the
section "<experiment> across N processes (<platform>)". `--update` replaces in the existing
--out only the sections built from the inputs given (or adds them before the simulated part),
every other section byte for byte as it was, and notes in the header which command replaced
which section (each section's own Command and Source lines name its inputs). The simulated
part is one section: an `--update` of it must give every file of its subsections again
(`check_simulated_update` refuses one that would drop any):

  python scripts/make_benchmarks.py --update \
      --multiprocess=workdir/demo_cpu_1proc/results.json \
      --multiprocess=workdir/demo_cpu_2proc/results.json
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from collections.abc import Sequence

from absl import app, flags

from crosspool_jax.cli import run_script, start_script
from crosspool_jax.experiments.report import (
    benchmarks_section,
    is_simulated,
    policy_section,
    processes_section,
    replace_sections,
    section_title,
    split_sections,
    validation_section,
    vs_hf_section,
)

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the flags; called only when the script runs as a program."""
  flags.DEFINE_multi_string("results", [], "results.json files, in the order wanted.")
  flags.DEFINE_string("vs_hf", None, "A scripts/bench_vs_hf.py JSON file (optional).")
  flags.DEFINE_string("pools", None, "A scripts/bench_pools.py --fleet JSON file (optional): "
                      "the weights-pool policies on random and trained routing.")
  flags.DEFINE_multi_string("sim_results", [], "Simulated results files (--config.mode=sim), "
                            "in the order wanted: the last part of the file.")
  flags.DEFINE_multi_string("validation", [], "scripts/calibrate.py JSON files: the "
                            "simulator's predictions against measured runs (simulated part).")
  flags.DEFINE_multi_string("multiprocess", [], "results.json files of one config: in one "
                            "process first, then across processes (one section).")
  flags.DEFINE_bool("update", False, "Replace in --out only the sections of the inputs given "
                    "(added if absent), keeping every other section as it is.")
  flags.DEFINE_string("out", "BENCHMARKS.md", "Markdown file to write.")


SIMULATED_HEADING = "## Simulated experiments"


def _load_json(flag: str, path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise app.UsageError(f"--{flag}={path}: {e}") from e


def _load(flag: str, path: str) -> dict:
  results = _load_json(flag, path)
  if "runs" not in results:
    raise app.UsageError(f"--{flag}={path} is not a scripts/run_experiment.py results file")
  return results


def simulated_part(paths: Sequence[str], validations: Sequence[str] = ()) -> str:
  """The simulated sections of BENCHMARKS.md, under one heading: the validations (calibrate
  JSON files), then the results files (paths as given: relative to the repository root in the
  committed file)."""
  sections = []
  for path in validations:
    validation = _load_json("validation", path)
    if validation.get("kind") != "sim_validation":
      raise app.UsageError(f"--validation={path} is not a scripts/calibrate.py JSON file")
    sections.append(validation_section(validation, source=path))
  for path in paths:
    results = _load("sim_results", path)
    if not is_simulated(results):
      raise app.UsageError(f"--sim_results={path} is a measured results file: give it with "
                           "--results")
    sections.append(benchmarks_section(results, source=path).replace("\n## ", "\n### ")
                    .replace("## ", "### ", 1))
  return "\n".join([
      SIMULATED_HEADING,
      "",
      "Not measurements: each experiment config served in simulated time by",
      "`scripts/run_experiment.py --config.mode=sim` (crosspool_jax/sim: the real scheduler,",
      "pools and expert policies, a roofline cost model of the named device), from the results",
      "committed under benchmarks/sim/ (traces regenerate from the seed). What is modelled and",
      "what is not: WORKSPACE.md, \"The simulator\" and \"Simulated experiments\".",
      "",
      *sections,
  ])


def check_simulated_update(text: str, part: str) -> None:
  """Refuses an `--update` whose simulated part would drop subsections `text` has: the part is
  one section, replaced whole, so each of its subsections' files must be given again.

  Raises:
    app.UsageError: naming the subsections that would be lost.
  """
  def titles(section: str) -> list[str]:
    return re.findall(r"^### (.+)$", section, flags=re.MULTILINE)

  old = [p for p in split_sections(text)[1] if section_title(p) == section_title(part)]
  lost = [t for p in old for t in titles(p) if t not in titles(part)]
  if lost:
    raise app.UsageError(
        f"--update replaces the part {SIMULATED_HEADING[3:]!r} whole, and these of its "
        f"subsections would be lost: {lost}; give their files too (--sim_results=..., "
        "--validation=...: the command in the file's header names them)")


def main(argv: Sequence[str]) -> None:
  start_script(argv)
  if not (FLAGS.results or FLAGS.vs_hf or FLAGS.pools or FLAGS.sim_results
          or FLAGS.validation or FLAGS.multiprocess):
    raise app.UsageError("give at least one --results=FILE (or --vs_hf=FILE, --pools=FILE, "
                         "--sim_results=FILE, --validation=FILE, --multiprocess=FILE)")
  sections = []
  for path in FLAGS.results:
    results = _load("results", path)
    sections.append(benchmarks_section(results, source=os.path.relpath(path)))
  if FLAGS.multiprocess:
    files = [(_load("multiprocess", path), os.path.relpath(path)) for path in FLAGS.multiprocess]
    try:
      sections.append(processes_section(files))
    except ValueError as e:
      raise app.UsageError(f"--multiprocess: {e}") from e
  if FLAGS.vs_hf:
    try:
      with open(FLAGS.vs_hf) as f:
        bench = json.load(f)
      sections.append(vs_hf_section(bench, source=os.path.relpath(FLAGS.vs_hf)))
    except (OSError, json.JSONDecodeError, KeyError) as e:
      raise app.UsageError(f"--vs_hf={FLAGS.vs_hf}: {e!r}") from e
  if FLAGS.pools:
    bench = _load_json("pools", FLAGS.pools)
    if "weights_pool_trained" not in bench:
      raise app.UsageError(f"--pools={FLAGS.pools} is not a scripts/bench_pools.py --fleet "
                           "JSON file (it has no weights_pool_trained)")
    sections.append(policy_section(bench, source=os.path.relpath(FLAGS.pools)))
  if FLAGS.sim_results or FLAGS.validation:
    sections.append(simulated_part(FLAGS.sim_results, FLAGS.validation))
  command = shlex.join(["python", "scripts/make_benchmarks.py", *sys.argv[1:]])
  if FLAGS.update:
    try:
      with open(FLAGS.out) as f:
        text = f.read()
    except OSError as e:
      raise app.UsageError(f"--update: {e}") from e
    if FLAGS.sim_results or FLAGS.validation:
      check_simulated_update(text, sections[-1])
    notes = {section_title(s): f'Section "{section_title(s)}" replaced in place by `{command}`.'
             for s in sections}
    with open(FLAGS.out, "w") as f:
      f.write(replace_sections(text, sections, notes, before=SIMULATED_HEADING[3:]))
    print(f"updated {FLAGS.out} ({len(sections)} sections: {', '.join(notes)})")
    return
  header = [
      "# Benchmarks",
      "",
      "Generated by `" + command
      + "` from the results files named in each section; do not edit by hand. Latencies are",
      "wall-clock on the machine named there; counts (rejections, preemptions, KV pages,",
      "longest context, expert hits) repeat exactly for a seed when arrivals follow the",
      "logical clock.",
      "",
      "Columns: requests finished / rejected (with the reason in results.json); preemptions;",
      "time to first token and time between tokens (wall clock, ms); output tokens per second;",
      "goodput = finished requests per second within config.slo (TTFT and the p90 of the",
      "request's gaps); usable KV pages = pages that can hold tokens, over all KV devices",
      "(each device's null page excluded); KV peak = most pages holding tokens at once, of the",
      "usable pages; longest ctx = longest prompt + output finished; expert hit",
      "= weights-pool hit rate (crosspool); XLA compilations after start-up.",
      "",
  ] + ([f"The part \"{SIMULATED_HEADING[3:]}\" at the end is simulated, not measured: its",
        "latencies are modelled seconds.", ""] if FLAGS.sim_results else [])
  with open(FLAGS.out, "w") as f:
    f.write("\n".join(header + sections))
  print(f"wrote {FLAGS.out} ({len(sections)} sections)")


if __name__ == "__main__":
  define_flags()
  run_script(main)
