"""report.py and plots.py on hand-made results: every sentence states what the numbers show."""

from __future__ import annotations

import copy

import pytest

from crosspool_jax.experiments import plots, report


def _p(p50):
  return {"p50": p50, "p90": p50, "p99": p50}


def _run(name, policy, *, pages, rejected, longest, tbt, ttft, hit=None, sweep=None,
         devices=4):
  return {
      "name": name, "sweep_value": sweep, "plan": None,
      "engine": {"kv_policy": policy, "pages_per_device": pages // devices + 1},
      "counts": {"requests": 60, "finished": 60 - rejected, "rejected": rejected,
                 "preemptions": 0, "kv_capacity_pages": pages, "kv_page_bytes": 2048,
                 "kv_peak_utilization": 0.5, "longest_context_served": longest,
                 "expert_hit_rate": hit, "backend_compiles_after_start": 0,
                 "kv_used_pages_per_step": [0, pages // 2, 0]},
      "wall_clock": {"ttft_s": _p(ttft), "tbt_s": _p(tbt), "output_tokens_per_s": 100.0,
                     "goodput_requests_per_s": 1.0, "ttft_samples_s": [ttft],
                     "tbt_samples_s": [tbt], "kv_pool_timeline_t_s": [0.0, 0.1, 0.2]},
  }


def _results(runs, *, platform="cpu", field="", agree=None):
  return {
      "experiment": "demo", "variant": "cpu", "description": "a demo", "command": "python x",
      "seed": 0, "created": "now", "host_cpus": 2,
      "device": {"platform": platform, "device_kind": platform, "count": 4},
      "config": {"sweep": {"field": field}, "budget": {"device_bytes": 0},
                 "arrival_mode": "logical"},
      "traces": {"": {"arrivals": [["a", 0.0], ["b", 0.5], ["a", 1.0]],
                      "meta": {"bursts": [{"models": ["b"], "start_s": 0.4,
                                           "duration_s": 0.2, "factor": 4.0}]}}},
      "runs": runs,
      "outputs_agree": agree or {"": {"compared": 56, "same": 56, "all_same": True}},
  }


def demo_results(**kw):
  """The demo's shape: crosspool holds more KV and rejects nothing but is slower."""
  return _results([
      _run("static", "static", pages=932, rejected=4, longest=169, tbt=0.012, ttft=0.081),
      _run("shared", "shared", pages=932, rejected=4, longest=169, tbt=0.009, ttft=0.067),
      _run("crosspool", "crosspool", pages=1640, rejected=0, longest=1793, tbt=0.049,
           ttft=0.582, hit=0.98, devices=2),
  ], **kw)


def test_summary_states_what_crosspool_won_with_ratios_from_the_results():
  memory, latency, why = report.summary_sentences(demo_results())
  assert memory.startswith("The crosspool run won on memory: ")
  assert f"1,640 usable KV pages against 932 for static and shared ({1640 / 932:.1f}x as many)" \
      in memory
  assert "0 of 60 requests rejected against 4 for static and shared" in memory
  assert "contexts up to 1,793 tokens served against 169 for static and shared" in memory
  assert "98% of its expert accesses hit the weights pool" in memory
  assert latency.startswith("It lost on latency (wall clock): ")
  assert (f"TBT p50 49 ms against 12 ms for static and 9 ms for shared "
          f"({0.049 / 0.012:.1f}-{0.049 / 0.009:.1f}x theirs)") in latency
  assert "TTFT p50 582 ms against 81 ms for static and 67 ms for shared" in latency
  assert "TBT p99 49 ms against 12 ms for static and 9 ms for shared" in latency  # the tail
  assert why.startswith("The known cause on this machine: ")
  assert "the host thread and the programs of the 4 devices share 2 CPU cores" in why


def _kinds(prefill_steps, prefill_ms, share, decode_steps, decode_ms):
  def kind(steps, ms, tokens_share):
    return {"steps": steps, "step_s": _p(ms / 1000), "tokens": 0, "token_share": tokens_share}
  return {"prefill": kind(prefill_steps, prefill_ms, share),
          "decode": kind(decode_steps, decode_ms, 1 - share)}


def test_where_the_tokens_came_from_is_stated_per_run_when_recorded():
  r = demo_results()
  assert "Where the tokens came from" not in " ".join(report.summary_sentences(r))
  for run, kinds in zip(r["runs"], (_kinds(60, 9.0, 0.3, 100, 6.0), _kinds(61, 9.5, 0.38, 101,
                                    5.4), _kinds(168, 15.0, 0.81, 55, 4.3)), strict=True):
    run["wall_clock"]["steps_by_kind"] = kinds
  sentences = report.summary_sentences(r)
  assert len(sentences) == 4 and sentences[3].startswith("The known cause")  # after latency
  assert sentences[2] == (
      "Where the tokens came from: crosspool 168 of 223 steps with a prompt chunk (81% of its "
      "tokens, p50 15.0 ms), decode-only steps p50 4.3 ms; static 60 of 160 steps with a "
      "prompt chunk (30% of its tokens, p50 9.0 ms), decode-only steps p50 6.0 ms; shared 61 "
      "of 162 steps with a prompt chunk (38% of its tokens, p50 9.5 ms), decode-only steps "
      "p50 5.4 ms.")


def test_no_latency_loss_claimed_when_there_is_none():
  r = demo_results()
  r["runs"][2]["wall_clock"] |= {"tbt_s": _p(0.005), "ttft_s": _p(0.040)}
  sentences = report.summary_sentences(r)
  text = " ".join(sentences)
  assert "lost on latency" not in text and "known cause" not in text
  assert sentences[1].startswith("It won on latency (wall clock): TBT p50 5 ms")
  r["runs"][2]["wall_clock"]["tbt_s"] = _p(0.010)  # between shared's 9 and static's 12 ms
  text = " ".join(report.summary_sentences(r))
  assert "Its latency was mixed: TBT p50 10 ms" in text and "known cause" not in text
  assert "It won on latency (wall clock): TTFT p50 40 ms" in text


def test_the_cpu_cause_is_stated_only_on_a_cpu():
  text = " ".join(report.summary_sentences(demo_results(platform="gpu")))
  assert "It lost on latency" in text and "known cause" not in text


def test_memory_verdict_follows_the_numbers():
  r = demo_results()
  r["runs"][2]["counts"] |= {"kv_capacity_pages": 500, "rejected": 6, "longest_context_served": 100}
  memory = report.summary_sentences(r)[0]
  assert memory.startswith("The crosspool run lost on memory: 500 usable KV pages against 932")
  assert "won" not in memory
  r["runs"][2]["counts"]["rejected"] = 0  # fewer rejections, less memory: mixed
  assert report.summary_sentences(r)[0].startswith("On memory, the crosspool run had 500 usable")


def test_no_summary_without_a_crosspool_run_and_a_baseline():
  r = demo_results()
  assert report.summary_sentences(r | {"runs": r["runs"][:2]}) == []
  assert report.summary_sentences(r | {"runs": r["runs"][2:]}) == []


def test_a_sweep_is_summarised_per_point():
  runs = []
  for rate in (2.0, 4.0):
    for run in demo_results()["runs"]:
      runs.append(run | {"sweep_value": rate})
  runs[5]["counts"] = runs[5]["counts"] | {"rejected": 1}
  sentences = report.summary_sentences(_results(runs, field="workload.total_rate"))
  assert sentences[0].startswith("At workload.total_rate=2.0: The crosspool run won on memory")
  assert "0 of 60 requests rejected" in sentences[0]
  assert sentences[2].startswith("At workload.total_rate=4.0: The crosspool run won on memory")
  assert "1 of 60 requests rejected against 4 for static and shared" in sentences[2]
  assert sum(s.startswith("The known cause") for s in sentences) == 1


@pytest.mark.parametrize("agree, field, want", [
    ({"": {"compared": 56, "same": 56, "all_same": True}}, "",
     ["Same output tokens under every policy: yes, for all 56 requests that every policy "
      "finished."]),
    ({"": {"compared": 5, "same": 4, "all_same": False}}, "",
     ["Same output tokens under every policy: NO, only for 4 of the 5 requests that every "
      "policy finished."]),
    ({"2.0": {"compared": 0, "same": 0, "all_same": True},
      "4.0": {"compared": 3, "same": 3, "all_same": True}}, "workload.total_rate",
     ["Same output tokens under every policy at workload.total_rate=2.0: nothing to compare (no "
      "request was finished by every policy).",
      "Same output tokens under every policy at workload.total_rate=4.0: yes, for all 3 requests "
      "that every policy finished."]),
])
def test_agreement_sentences(agree, field, want):
  assert report.agreement_sentences(_results([], field=field, agree=agree)) == want


def test_terminal_table_is_followed_by_agreement_and_summary_markdown_is_the_table():
  r = demo_results()
  text = report.comparison_table(r)
  rows = [line.split()[0] for line in text.splitlines()[2:5]]
  assert rows == ["static", "shared", "crosspool"]  # the order of the runs
  flat = " ".join(text.split())
  assert report.agreement_sentences(r)[0] in text
  for sentence in report.summary_sentences(r):
    assert sentence in flat
  assert "BENCHMARKS.md" in flat and "WORKSPACE.md" in flat
  md = report.comparison_table(r, markdown=True)
  assert md.splitlines()[0].startswith("| run |") and "known cause" not in md
  assert "| crosspool | 60/0 |" in md and "| 1640 |" in md


def test_benchmarks_memory_lines_count_usable_pages_per_device():
  r = demo_results()
  r["runs"][2]["plan"] = {"max_context": {"a": 2048}, "accounting": {
      "page_bytes": 2048, "device_bytes": 5 * 2**19, "kv_devices": 2,
      "expert_slots_per_device": 53,
      "weight_devices": 2, "weights_device_bytes": 5 * 2**19,
      "resident_expert_fraction": {"class": 0.83}}}
  r["config"]["budget"]["device_bytes"] = 5 * 2**19
  text = report.benchmarks_section(r, source="results.json")
  assert ("- `crosspool`: 1,640 usable KV pages (2 KV device(s) x 820, null pages excluded) of "
          "2048 B = 3.203 MiB of KV; 2 weights device(s) x 53 expert slots "
          "per shape class (83% of the experts resident)") in text
  assert "- `shared`: 932 usable KV pages (4 KV device(s) x 233, null pages excluded)" in text
  assert "Same output tokens under every policy: yes, for all 56 requests" in text
  assert " ".join(report.summary_sentences(r)) in text
  assert "WORKSPACE.md" in text


def test_bin_width_is_round_and_near_the_bin_count():
  assert plots._bin_width(10.0) == 0.5  # 10 / 40 = 0.25 -> 0.5
  assert plots._bin_width(4.0) == 0.1
  assert plots._bin_width(0.29) == 0.01  # 0.29 / 40 = 0.00725 -> 0.01
  assert plots._bin_width(80.0) == 2.0


def test_bursts_of_generated_and_replayed_traces():
  burst = {"models": ["b"], "start_s": 1.0, "duration_s": 2.0, "factor": 4.0}
  assert plots._bursts({"workload": {}, "bursts": [burst]}) == [burst]
  assert plots._bursts({"replayed_from": "t.jsonl", "meta": {"bursts": [burst]}}) == [burst]
  assert plots._bursts({"replayed_from": "t.jsonl", "meta": None}) == []


def test_plots_are_written_for_a_plain_and_a_swept_experiment(tmp_path):
  r = demo_results()
  names = [p.rsplit("/", 1)[-1] for p in plots.write_plots(r, str(tmp_path))]
  assert names == ["latency_cdf.png", "memory.png", "activity.png"]
  swept = copy.deepcopy(r)
  swept["config"]["sweep"] |= {"field": "workload.total_rate"}
  swept["traces"] = {"2.0": r["traces"][""], "4.0": r["traces"][""]}
  swept["runs"] = [run | {"sweep_value": v} for v in (2.0, 4.0) for run in r["runs"]]
  out = tmp_path / "swept"
  out.mkdir()
  assert len(plots.write_plots(swept, str(out))) == 4
  for name in [*names, "sweep.png"]:
    assert (out / name).stat().st_size > 1000


def _vs_hf_bench(preset):
  record = {"batch": 8, "roofline": {"tokens_per_s": 4000.0,
                                     "peaks": {"source": "measured", "flops_per_s": 2e11,
                                               "bytes_per_s": 3e10}},
            "runs": {"hf": {"tokens_per_s": 500.0, "roofline_fraction": 0.125},
                     "generate": {"tokens_per_s": 2000.0, "roofline_fraction": 0.5},
                     "engine": {"tokens_per_s": 1600.0, "roofline_fraction": 0.4}},
            "ratio_generate_vs_hf": 4.0, "ratio_engine_vs_hf": 3.2,
            "agreement": {"generate_vs_hf": 1.0, "engine_vs_hf": 1.0}}
  return {"header": {
      "flags": {"preset": preset, "batch_sizes": ["8"], "iters": 5, "torch_threads": 2,
                "decode_steps_per_dispatch": 8, "out": "o.json", "prompt_len": 32,
                "max_new_tokens": 64},
      "model": {"family": "qwen3_moe", "vocab_size": 2048, "d_model": 256, "num_layers": 4,
                "num_heads": 8, "num_kv_heads": 2, "head_dim": 32, "num_experts": 16,
                "top_k": 4, "d_ff_expert": 128, "params": 8014336},
      "dtype": "float32", "torch_version": "2", "torch_threads": 2, "jax_version": "0",
      "cpu_cores": 2, "loadavg_start": [1.0], "git_revision": "a" * 40, "date": "d"},
      "records": [record]}


@pytest.mark.parametrize("preset", ["qwen3_moe_small", None])
def test_vs_hf_section_repeats_the_command_and_the_roofline(preset):
  text = report.vs_hf_section(_vs_hf_bench(preset), source="o.json")
  command = ("`python scripts/bench_vs_hf.py" + (f" --preset={preset}" if preset else "")
             + " --batch_sizes=8 --iters=5 --torch_threads=2 --decode_steps_per_dispatch=8"
             " --out=o.json`")
  assert command in text
  assert "| 8 | 500 | 2000 | 1600 | 4.00 | 3.20 | 4,000 | 0.12, 0.50, 0.40 | 100%, 100% |" in text
  assert "200 GFLOP/s, 30 GB/s" in text and "8 step(s) per dispatch" in text


def test_slo_sentence_names_the_points_met_numbers_or_not():
  def run(name, point, tbt_p99, rejected=0):
    return {"name": name, "sweep_value": point, "counts": {"rejected": rejected},
            "wall_clock": {"tbt_s": {"p99": tbt_p99}, "ttft_s": {"p99": 0.5}}}

  slo = {"tbt_s": 0.1, "ttft_s": 1.0}
  results = {"config": {"sweep": {"field": "engine.expert_policy"}, "slo": slo},
             "runs": [run("a", "lru", 0.05), run("a", "lfu", 0.2), run("b", "lru", 0.05, 1)]}
  assert report.slo_sentences(results) == [
      "Meets the SLO (P99 TBT <= 100 ms, P99 TTFT <= 1000 ms, nothing rejected or refused), "
      "by engine.expert_policy: a at lru; b at none."]
  results["config"]["sweep"]["field"] = "workload.total_rate"
  for r, point in zip(results["runs"], (2.0, 4.0, 2.0), strict=True):
    r["sweep_value"] = point
  assert report.slo_sentences(results)[0].endswith("workload.total_rate: a at 2; b at none.")


def _budgeted(name, policy, gib, *, tbt_p99=0.05, refused=False, kv=8, weights=0,
              weights_gib=None, clock="wall_clock"):
  """A run planned on `kv` + `weights` devices of `gib` GiB (weights devices: `weights_gib`)."""
  accounting = {"device_bytes": gib * 2**30, "kv_devices": kv, "weight_devices": weights}
  if weights:
    accounting["weights_device_bytes"] = (weights_gib or gib) * 2**30
  run = {"name": name, "sweep_value": gib, "engine": {"kv_policy": policy},
         "plan": {"accounting": accounting}}
  if refused:
    return run | {"refused": "budget: does not fit"}
  return run | {"counts": {"rejected": 0},
                clock: {"tbt_s": {"p99": tbt_p99}, "ttft_s": {"p99": 0.5}}}


def _memory_sweep(runs):
  return {"config": {"sweep": {"field": "budget.device_gib"},
                     "slo": {"tbt_s": 0.1, "ttft_s": 1.0}}, "runs": runs}


@pytest.mark.parametrize("clock", ["wall_clock", "simulated"])
def test_the_smallest_memory_meeting_the_slo_is_the_smallest_passing_budget(clock):
  """By hand: static is refused at 20 GiB and too slow at 30, meets from 40; shared never
  meets (its P99 TBT is over 100 ms everywhere); crosspool meets at 20 and 40 but not at 30,
  and its passing point of least memory is 20 GiB, the first in the list, not the largest."""
  runs = []
  for gib, static_tbt, crosspool_tbt in ((40, 0.05, 0.05), (20, None, 0.08), (30, 0.2, 0.3)):
    runs += [_budgeted("static", "static", gib, tbt_p99=static_tbt, refused=static_tbt is None,
                       clock=clock),
             _budgeted("shared", "shared", gib, tbt_p99=0.2, clock=clock),
             _budgeted("crosspool", "crosspool", gib, tbt_p99=crosspool_tbt, kv=2, weights=6,
                       clock=clock)]
  results = _memory_sweep(runs)
  best = report.smallest_memory_at_slo(results)
  assert list(best) == ["static", "shared", "crosspool"]
  assert best["static"]["sweep_value"] == 40 and best["shared"] is None
  assert best["crosspool"]["sweep_value"] == 20
  assert report.run_memory_bytes(best["crosspool"]) == 8 * 20 * 2**30
  assert report.memory_at_slo_sentences(results) == [
      "Smallest total accelerator memory meeting the SLO (devices x memory per device): static "
      "at 8 x 40 GiB = 320 GiB; shared at none (up to 320 GiB); crosspool at 8 x 20 GiB = "
      "160 GiB (not at the larger 240 GiB).",
      "crosspool needs 50% less than static."]
  for run in runs:
    if run["name"] == "crosspool":
      run[clock]["tbt_s"]["p99"] = 0.5
  assert report.memory_at_slo_sentences(results)[1] == (
      "crosspool meets it at no point swept; static does.")


def test_memory_sentences_need_a_memory_sweep_and_name_unequal_devices():
  fixed = [_budgeted("static", "static", 80) | {"sweep_value": rate} for rate in (1.0, 2.0)]
  assert not report.memory_swept(_memory_sweep(fixed))
  assert report.memory_at_slo_sentences(_memory_sweep(fixed)) == []
  unbudgeted = [run | {"plan": None} for run in fixed]
  assert report.smallest_memory_at_slo(_memory_sweep(unbudgeted)) == {"static": None}
  runs = [_budgeted("static", "static", 2, kv=8), _budgeted("static", "static", 4, kv=8),
          _budgeted("crosspool", "crosspool", 2, kv=5, weights=3, weights_gib=3),
          _budgeted("crosspool", "crosspool", 4, kv=5, weights=3, weights_gib=3)]
  first, second = report.memory_at_slo_sentences(_memory_sweep(runs))
  assert "static at 8 x 2 GiB = 16 GiB; crosspool at 5 x 2 GiB + 3 x 3 GiB = 19 GiB." in first
  assert second == "crosspool needs 19% more than static."


def test_policy_gap_is_the_best_demand_fetching_policy_against_min():
  def rec(fraction, policy, hit, min_hit):
    return {"fraction": fraction, "policy": policy, "hit_rate": hit, "belady_hit_rate": min_hit}

  result = {"replay": [
      rec(0.25, "lru", 0.80, 0.90), rec(0.25, "lfu", 0.85, 0.90),
      rec(0.25, "activation_aware", 0.95, 0.90),  # prefetching: not bounded by MIN, left out
      rec(1.0, "lru", 1.0, 1.0), rec(1.0, "pin_all", 1.0, 1.0),
      {"fraction": 0.5, "policy": "lru", "error": "does not fit"}]}
  assert report.policy_gap_sentences(result) == [
      "at 25% resident lfu 0.850 against MIN's 0.900 (5.0 points)",
      "at 100% resident lru 1.000 against MIN's 1.000 (0.0 points)"]


def _across(results, count=2, *, sha="abc", steps=10):
  """`results` as if served across `count` processes: the block and each run's transfers."""
  out = copy.deepcopy(results)
  out["processes"] = {"count": count, "transport": "pull",
                      "groups": {"kv": "0:0", "weights": "1:0"},
                      "devices": {"kv": ["cpu:0"], "weights": ["cpu:2048"]},
                      "not_served": {"static": "colocated"}}
  for run in out["runs"]:
    run["counts"] |= {"outputs_sha256": sha, "steps": steps}
    stats = {"sent": 40, "received": 10, "sent_bytes": 4000, "received_bytes": 1000}
    mirror = {"sent": 10, "received": 40, "sent_bytes": 1000, "received_bytes": 4000}
    run["counts"]["cross_process"] = {
        "per_process": [{"start_up": stats, "serving": stats},
                        {"start_up": mirror, "serving": mirror}],
        "arrays_per_step": 50 / steps, "bytes_per_step": 5000 / steps}
  return out


def test_processes_section_compares_each_run_with_the_one_process_run():
  one = _results([_run("crosspool", "crosspool", pages=100, rejected=0, longest=10, tbt=0.01,
                       ttft=0.1, hit=1.0)])
  one["runs"][0]["counts"] |= {"outputs_sha256": "abc", "steps": 10}
  same, other = _across(one), _across(one, sha="xyz", steps=11)
  text = report.processes_section([(one, "a.json"), (same, "b.json")])
  assert text.startswith("## demo across 2 processes (cpu)\n")
  rows = [line for line in text.split("\n") if line.startswith("| 2 |")]
  assert len(rows) == 1 and rows[0].endswith("| 5.0 | 0.5 | identical |")  # 50 arrays / 10
  assert "| 1 | crosspool |" in text and "(the reference)" in text
  assert "output tokens identical; counts identical" in text
  assert "`static` not served across processes: colocated." in text
  assert "process 0 sent 4.0 arrays (0.4 KB) and received 1.0 (0.1 KB)" in text
  text = report.processes_section([(one, "a.json"), (other, "c.json")])
  assert "| DIFFERENT |" in text and "DIFFERENT in outputs_sha256, steps" in text
  with pytest.raises(ValueError, match="one-process results file first"):
    report.processes_section([(same, "b.json"), (one, "a.json")])
  with pytest.raises(ValueError, match="differ in seed"):
    report.processes_section([(one, "a.json"), (same | {"seed": 1}, "b.json")])


def test_replace_sections_leaves_every_other_section_as_it_was():
  header = "# Benchmarks\n\nGenerated by `make`.\n\nColumns: ...\n\n"
  a = "## a (cpu)\n\ntable a\n\n"
  sim = "## Simulated experiments\n\n### s\n\ntable s\n"
  text = header + a + sim
  new = "## a across 2 processes (cpu)\n\nfirst\n"
  once = report.replace_sections(text, [new], {"a across 2 processes (cpu)": 'Section "a '
                                                "across 2 processes (cpu)\" by `one`."},
                                 before="Simulated experiments")
  assert once == (header.replace("\n\nColumns", '\n\nSection "a across 2 processes (cpu)" by '
                                 "`one`.\n\nColumns") + a + new + "\n" + sim)
  again = report.replace_sections(
      once, [new.replace("first", "second")],
      {"a across 2 processes (cpu)": 'Section "a across 2 processes (cpu)" by `two`.'},
      before="Simulated experiments")
  assert again == once.replace("first", "second").replace("`one`", "`two`")
  # a new section without the `before` one goes last; a section given replaces its namesake
  b = report.replace_sections(header + a, ["## b\n\nb\n"], {"b": 'Section "b" by `x`.'},
                              before="Simulated experiments")
  assert b.endswith(a + "## b\n\nb\n") and 'Section "b" by `x`.' in b
  assert report.replace_sections(b, ["## a (cpu)\n\nnew a\n"], {}, before="x").startswith(
      b[:b.index("## a")] + "## a (cpu)\n\nnew a\n\n## b")
