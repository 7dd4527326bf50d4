r"""Peer benchmark: one tiny MoE checkpoint decoded by HF transformers and by crosspool_jax.

The same HF-format checkpoint (made by scripts/make_tiny_checkpoint.py unless --checkpoint is
given: --family with --override fields, or a named --preset, see PRESETS) and the same
prompts (seeded random ids, all --prompt_len long) are decoded greedily, --max_new_tokens per
row with eos disabled (every row generates exactly that many), at each of --batch_sizes, by
  hf        transformers `model.generate` (torch CPU, f32, --torch_threads threads, OpenMP
            threads waiting passively: see --omp_wait_policy);
  generate  `crosspool_jax.models.decode.generate` (contiguous KV cache, one jitted decode loop);
  engine    the serving `Engine` with kv_policy="shared" (paged kernels, continuous batching):
            `batch` requests submitted, run to completion; max_batch = batch and token buckets
            (batch, batch * prompt_len), so the prefill is one step; the decode runs
            --decode_steps_per_dispatch steps per dispatch (multi-step decode: one jitted
            loop, one host read per dispatch; 1 = a step per dispatch); its compilation
            happens in `start()`.
Per batch size: set-up (the engine's start-up compile), --warmup untimed calls of each runner
(the first compiles `generate`; its time is reported as first_call_s), then --iters rounds,
each timing the three runners one after the other (interleaved, so load from other processes
hits them alike). Reported: median / p90 wall seconds, output tokens/s = batch * new tokens /
median, the ratios crosspool / HF tokens/s, and greedy agreement: the fraction of rows whose
tokens equal HF's (expected 1.0 in f32 on tiny models; recorded, not asserted).

Roofline (`crosspool_jax.roofline`): per batch size, before its timed rounds, the machine's
peaks (measured on CPU: f32 matmul FLOP/s and memory read bandwidth; datasheet on GPU/TPU; or
--peak_tflops / --peak_gbps), and the run's roofline time from the model config (one prefill
step and new_tokens - 1 decode steps, each max(FLOPs / peak, bytes / bandwidth); weights read
once per step, routed experts as touched, K/V read). Each runner's roofline fraction is that
time over its median time; the roofline's tokens/s is batch * new tokens / that time.

Writes JSON (a header with the config, jax / torch / transformers versions, git revision,
device kind, torch threads, load average; one record per batch size) to --out, prints a table
to stdout and progress to stderr. Needs the `hf` extra (torch, transformers).

  python scripts/bench_vs_hf.py --batch_sizes=1,8,32 --out=workdir/bench/vs_hf.json
  python scripts/bench_vs_hf.py --preset=qwen3_moe_small --batch_sizes=1,8,32 --iters=5 \
      --torch_threads=2 --out=workdir/bench/vs_hf_qwen3_moe_small.json
"""

from __future__ import annotations

import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from crosspool_jax import roofline
from crosspool_jax.cli import run_script, start_script
from crosspool_jax.engine.engine import Engine, EngineConfig
from crosspool_jax.models.checkpoint import load_checkpoint
from crosspool_jax.models.config import FAMILIES, ModelConfig
from crosspool_jax.models.decode import generate
from crosspool_jax.provenance import git_dirty, git_revision

RUNNERS = ("hf", "generate", "engine")
PAGE_TOKENS = 16  # tokens per KV page of the engine
# Named tiny random checkpoints: preset -> (family, make_tiny_checkpoint.py overrides).
PRESETS: dict[str, tuple[str, tuple[str, ...]]] = {
    # Shaped like a small real MoE (Qwen3-MoE layout: q/k norm, GQA, 16 experts top-4, routed
    # experts ~80 % of the parameters), ~8 M parameters (32 MB in f32).
    "qwen3_moe_small": ("qwen3_moe", (
        "vocab_size=2048", "d_model=256", "num_layers=4", "num_heads=8", "num_kv_heads=2",
        "head_dim=32", "num_experts=16", "top_k=4", "d_ff_expert=128")),
}

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the flags; called only when the script runs as a program."""
  flags.DEFINE_enum("family", "mixtral", FAMILIES, "Family of the tiny random checkpoint "
                    "made when --checkpoint and --preset are unset.")
  flags.DEFINE_enum("preset", None, list(PRESETS), "A named tiny random checkpoint (family "
                    "and overrides, see PRESETS); --override fields apply on top.")
  flags.DEFINE_string("checkpoint", None, "HF checkpoint directory (config.json + "
                      "safetensors); unset: a tiny random one of --family.")
  flags.DEFINE_multi_string("override", [], "ModelConfig field=value passed to "
                            "make_tiny_checkpoint.py (only without --checkpoint).")
  flags.DEFINE_integer("prompt_len", 32, "Prompt tokens of every row.", lower_bound=1)
  flags.DEFINE_integer("max_new_tokens", 64, "Tokens generated per row (eos off).",
                       lower_bound=1)
  flags.DEFINE_list("batch_sizes", ["1", "8", "32"], "Batch sizes (rows).")
  flags.DEFINE_integer("iters", 10, "Timed rounds per batch size.", lower_bound=1)
  flags.DEFINE_integer("warmup", 2, "Untimed calls per runner first (the first one "
                       "compiles `generate`).", lower_bound=1)
  flags.DEFINE_integer("torch_threads", None, "torch intra-op threads; unset: "
                       "all cores of this process, as JAX's CPU backend uses.",
                       lower_bound=1)
  flags.DEFINE_enum(
      "omp_wait_policy", "passive", ["passive", "active", "env"],
      "OMP_WAIT_POLICY of torch's OpenMP threads, set before torch is imported; env: leave the "
      "environment as it is. Passive by default: on a CPU shared with other processes libgomp's "
      "spin-waiting barriers made HF generate 10-100x slower (measured), an artefact of the "
      "machine, not of HF.")
  flags.DEFINE_integer("seed", 0, "Seed of the prompts.")
  flags.DEFINE_integer("decode_steps_per_dispatch", 8, "The engine's decode steps per "
                       "dispatch (EngineConfig.decode_steps_per_dispatch; 1: one step per "
                       "dispatch, as a serving step without multi-step decode).", lower_bound=1)
  flags.DEFINE_string("out", None, "JSON output path (directories are created); unset: "
                      "table only.")
  flags.DEFINE_float("peak_tflops", None, "Peak TFLOP/s of the roofline; overrides the "
                     "measured (CPU) or datasheet (GPU/TPU) figure.")
  flags.DEFINE_float("peak_gbps", None, "Peak memory GB/s of the roofline; overrides the "
                     "measured (CPU) or datasheet (GPU/TPU) figure.")


def progress(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def make_checkpoint(family: str, out_dir: str, overrides: Sequence[str]) -> str:
  """Writes a tiny random `family` checkpoint to `out_dir` with make_tiny_checkpoint.py."""
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "make_tiny_checkpoint.py")
  proc = subprocess.run([sys.executable, script, f"--family={family}", f"--out={out_dir}",
                         *(f"--override={o}" for o in overrides)],
                        capture_output=True, text=True, timeout=600)
  if proc.returncode != 0:
    raise RuntimeError(f"make_tiny_checkpoint.py failed:\n{proc.stderr[-3000:]}")
  return out_dir


def make_prompts(cfg: ModelConfig, batch: int, prompt_len: int, seed: int) -> list[list[int]]:
  """`batch` rows of `prompt_len` seeded random ids, avoiding the ids below 3 (pad/bos/eos)."""
  rng = np.random.default_rng([seed, batch, prompt_len])
  return rng.integers(3, cfg.vocab_size, size=(batch, prompt_len)).tolist()


def hf_runner(model, prompts: list[list[int]], new_tokens: int) -> Callable[[], list[list[int]]]:
  import torch

  ids = torch.tensor(prompts, dtype=torch.long)
  mask = torch.ones_like(ids)

  def run():
    with torch.inference_mode():
      out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           eos_token_id=None, pad_token_id=0)
    return out[:, ids.shape[1]:].tolist()

  return run


def generate_runner(params: dict, cfg: ModelConfig, prompts: list[list[int]],
                    new_tokens: int) -> Callable[[], list[list[int]]]:
  return lambda: generate(params, cfg, prompts, max_new_tokens=new_tokens)


def start_engine(params: dict, cfg: ModelConfig, batch: int, prompt_len: int,
                 new_tokens: int, decode_steps_per_dispatch: int = 1) -> Engine:
  """A "shared" engine sized so the batch's prefill is one step, decoding
  `decode_steps_per_dispatch` steps per dispatch."""
  context = prompt_len + new_tokens
  pages = batch * math.ceil(context / PAGE_TOKENS) * cfg.num_layers
  config = EngineConfig(
      kv_policy="shared", page_elems=2 * cfg.num_kv_heads * cfg.head_dim * PAGE_TOKENS,
      pages_per_device=pages + 1 + 8,  # + the null page + slack
      kv_dtype="float32", token_budget=batch * prompt_len,
      token_buckets=tuple(sorted({batch, batch * prompt_len})), max_batch=batch,
      decode_steps_per_dispatch=decode_steps_per_dispatch)
  engine = Engine(config, log=progress)
  engine.register_model("m", cfg=cfg, params=params, max_batch=batch, max_context=context)
  engine.start()
  return engine


def engine_runner(engine: Engine, prompts: list[list[int]],
                  new_tokens: int) -> Callable[[], list[list[int]]]:
  def run():
    ids = [engine.submit(model_id="m", prompt_ids=p, max_new_tokens=new_tokens)
           for p in prompts]
    for _ in engine.run():
      pass
    return [engine.output(i) for i in ids]

  return run


def agreement(rows: list[list[int]], reference: list[list[int]]) -> float:
  """Fraction of rows equal to the reference's row."""
  return sum(a == b for a, b in zip(rows, reference, strict=True)) / len(reference)


def roofline_record(cfg: ModelConfig, peaks: roofline.Peaks, *, batch: int, prompt_len: int,
                    new_tokens: int) -> dict[str, Any]:
  """The run's FLOPs, bytes and roofline time at `peaks` (f32 weights and KV)."""
  costs = roofline.generation_costs(cfg, batch=batch, prompt_len=prompt_len,
                                    new_tokens=new_tokens, weight_bytes=4, kv_bytes=4)
  time_s = roofline.roofline_s(costs, peaks)

  def steps(cs):  # the mean step of `cs`
    n = max(len(cs), 1)
    t = roofline.roofline_s(cs, peaks)
    return {"steps": len(cs), "flops": roofline.total(cs).flops / n,
            "bytes": roofline.total(cs).bytes / n, "time_s": None if t is None else t / n}

  run = roofline.total(costs)
  return {
      "peaks": peaks.to_json(), "flops": run.flops, "bytes": run.bytes, "time_s": time_s,
      "tokens_per_s": batch * new_tokens / time_s if time_s else None,
      "prefill_step": steps(costs[:1]), "decode_step": steps(costs[1:]),
      "experts_touched_per_decode_step": roofline.expected_experts_touched(
          cfg.num_experts, cfg.top_k, batch),
  }


def bench_batch(hf_model, params: dict, cfg: ModelConfig, batch: int, *, prompt_len: int,
                new_tokens: int, iters: int, warmup: int, seed: int,
                decode_steps_per_dispatch: int,
                peaks_fn: Callable[[], roofline.Peaks]) -> dict[str, Any]:
  """Times the three runners at one batch size; returns the batch's record.

  `peaks_fn` gives the roofline's peaks; it is called after the warm-up, before the timed
  rounds (on CPU it measures the machine as it is loaded then).
  """
  prompts = make_prompts(cfg, batch, prompt_len, seed)
  runs: dict[str, dict[str, Any]] = {name: {} for name in RUNNERS}
  start = time.perf_counter()
  engine = start_engine(params, cfg, batch, prompt_len, new_tokens, decode_steps_per_dispatch)
  runs["engine"]["startup_compile_s"] = time.perf_counter() - start
  runs["engine"]["executables"] = engine.compile_count_at_start
  runners = {"hf": hf_runner(hf_model, prompts, new_tokens),
             "generate": generate_runner(params, cfg, prompts, new_tokens),
             "engine": engine_runner(engine, prompts, new_tokens)}
  outputs: dict[str, list] = {name: [] for name in RUNNERS}
  for name, run in runners.items():
    for w in range(warmup):
      start = time.perf_counter()
      outputs[name].append(run())
      if w == 0:
        runs[name]["first_call_s"] = time.perf_counter() - start
  progress(f"batch {batch}: warmed up (first calls: " + ", ".join(
      f"{n} {runs[n]['first_call_s']:.2f}s" for n in RUNNERS) + ")")
  peaks = peaks_fn()
  times: dict[str, list[float]] = {name: [] for name in RUNNERS}
  steps_before = engine.steps
  compiles_before = engine.metrics()["backend_compiles_since_start"]
  for i in range(iters):
    for name, run in runners.items():
      start = time.perf_counter()
      outputs[name].append(run())
      times[name].append(time.perf_counter() - start)
    progress(f"batch {batch}: round {i + 1}/{iters}: " + ", ".join(
        f"{n} {times[n][-1]:.3f}s" for n in RUNNERS))
  runs["engine"]["steps_per_run"] = (engine.steps - steps_before) / iters
  # XLA compilations in the process (any runner) during the timed rounds: 0 means none timed.
  jax_compiles = engine.metrics()["backend_compiles_since_start"] - compiles_before
  for name in RUNNERS:
    median_s = float(np.median(times[name]))
    runs[name].update(
        median_s=median_s, p90_s=float(np.percentile(times[name], 90)),
        tokens_per_s=batch * new_tokens / median_s, times_s=times[name],
        # every call of a runner gave the same tokens (warm-up and timed)
        deterministic=all(o == outputs[name][0] for o in outputs[name]))
    lengths = {len(row) for o in outputs[name] for row in o}
    runs[name]["all_rows_full_length"] = lengths == {new_tokens}
  runs["generate"]["compile_s"] = runs["generate"]["first_call_s"] - runs["generate"]["median_s"]
  roof = roofline_record(cfg, peaks, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens)
  for name in RUNNERS:
    runs[name]["roofline_fraction"] = (roof["time_s"] / runs[name]["median_s"]
                                       if roof["time_s"] else None)
  hf_tokens = outputs["hf"][0]
  return {
      "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "runs": runs,
      "roofline": roof, "loadavg": list(os.getloadavg()),
      "jax_compiles_in_timed_rounds": jax_compiles,
      "ratio_generate_vs_hf": runs["generate"]["tokens_per_s"] / runs["hf"]["tokens_per_s"],
      "ratio_engine_vs_hf": runs["engine"]["tokens_per_s"] / runs["hf"]["tokens_per_s"],
      "agreement": {"generate_vs_hf": agreement(outputs["generate"][0], hf_tokens),
                    "engine_vs_hf": agreement(outputs["engine"][0], hf_tokens),
                    "engine_vs_generate": agreement(outputs["engine"][0],
                                                    outputs["generate"][0])},
  }


def format_table(records: Sequence[dict[str, Any]]) -> str:
  """Fixed-width table of the records (the JSON is the result)."""
  def frac(v):
    return "-" if v is None else f"{v:.3f}"

  rows = [("batch", "HF tok/s", "generate tok/s", "engine tok/s", "gen/HF", "eng/HF",
           "roof tok/s", "HF roof", "gen roof", "eng roof", "agree gen", "agree eng",
           "gen compile s", "eng compile s")]
  for r in records:
    runs, roof_tps = r["runs"], r["roofline"]["tokens_per_s"]
    rows.append((str(r["batch"]), *(f"{runs[n]['tokens_per_s']:.1f}" for n in RUNNERS),
                 f"{r['ratio_generate_vs_hf']:.2f}", f"{r['ratio_engine_vs_hf']:.2f}",
                 "-" if roof_tps is None else f"{roof_tps:.0f}",
                 *(frac(runs[n]["roofline_fraction"]) for n in RUNNERS),
                 f"{r['agreement']['generate_vs_hf']:.3f}",
                 f"{r['agreement']['engine_vs_hf']:.3f}",
                 f"{runs['generate']['compile_s']:.1f}",
                 f"{runs['engine']['startup_compile_s']:.1f}"))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True))
                   for row in rows)


def main(argv: Sequence[str]) -> None:
  start_script(argv)
  try:
    batch_sizes = [int(b) for b in FLAGS.batch_sizes]
  except ValueError as e:
    raise app.UsageError(f"--batch_sizes must be comma-separated integers: {e}") from e
  if not batch_sizes or min(batch_sizes) < 1:
    raise app.UsageError(f"--batch_sizes must be positive, got {batch_sizes}")
  if FLAGS.override and FLAGS.checkpoint:
    raise app.UsageError("--override only applies without --checkpoint")
  if FLAGS.preset and (FLAGS.checkpoint or FLAGS["family"].present):
    raise app.UsageError("--preset names a family and a shape: give it without --checkpoint "
                         "and --family")
  if FLAGS.omp_wait_policy != "env":
    if "torch" in sys.modules:
      progress("warning: torch was imported before main(); --omp_wait_policy has no effect")
    os.environ["OMP_WAIT_POLICY"] = FLAGS.omp_wait_policy.upper()
  import torch
  import transformers

  transformers.logging.set_verbosity_error()
  transformers.logging.disable_progress_bar()
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  torch.set_num_threads(FLAGS.torch_threads or cores)
  with tempfile.TemporaryDirectory() as tmp:  # kept until the end: params may map its files
    if FLAGS.checkpoint:
      path = FLAGS.checkpoint
    else:
      family, overrides = PRESETS[FLAGS.preset] if FLAGS.preset else (FLAGS.family, ())
      progress(f"making a tiny random {family} checkpoint"
               + (f" (preset {FLAGS.preset})" if FLAGS.preset else ""))
      path = make_checkpoint(family, tmp, [*overrides, *FLAGS.override])
    run_all(path, batch_sizes, cores)


def run_all(path: str, batch_sizes: Sequence[int], cores: int) -> None:
  """Loads the checkpoint into both frameworks, benchmarks every batch size, writes results."""
  import torch
  import transformers

  cfg, params = load_checkpoint(path, dtype=jnp.float32)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  hf_model.generation_config.eos_token_id = None  # every row generates max_new_tokens
  if FLAGS.prompt_len + FLAGS.max_new_tokens > cfg.max_context:
    raise app.UsageError(f"--prompt_len + --max_new_tokens exceeds the model's max context "
                         f"{cfg.max_context}")
  header = {
      "jax_version": jax.__version__,
      "torch_version": torch.__version__,
      "transformers_version": transformers.__version__,
      "backend": jax.default_backend(),
      "device_kind": jax.devices()[0].device_kind,
      "cpu_cores": cores,
      "torch_threads": torch.get_num_threads(),
      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
      "git_revision": git_revision(),
      "git_dirty": git_dirty(),
      "flags": {name: FLAGS[name].value for name in (
          "family", "preset", "checkpoint", "override", "prompt_len", "max_new_tokens",
          "batch_sizes", "iters", "warmup", "torch_threads", "omp_wait_policy", "seed", "out",
          "peak_tflops", "peak_gbps", "decode_steps_per_dispatch")},
      "model": {"family": cfg.family, "vocab_size": cfg.vocab_size, "d_model": cfg.d_model,
                "num_layers": cfg.num_layers, "num_heads": cfg.num_heads,
                "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
                "num_experts": cfg.num_experts, "top_k": cfg.top_k,
                "d_ff_expert": cfg.d_ff_expert,
                "params": int(sum(x.size for x in jax.tree.leaves(params)))},
      "dtype": "float32",
      "engine": {"kv_policy": "shared", "page_tokens": PAGE_TOKENS,
                 "max_batch": "= batch", "token_buckets": "(batch, batch * prompt_len)",
                 "decode_steps_per_dispatch": FLAGS.decode_steps_per_dispatch},
      "loadavg_start": list(os.getloadavg()),
      "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
  }
  progress(f"{cfg.family} ({header['model']['params']} params), prompt {FLAGS.prompt_len}, "
           f"{FLAGS.max_new_tokens} new tokens, batches {batch_sizes}, torch threads "
           f"{header['torch_threads']}, engine decode steps per dispatch "
           f"{FLAGS.decode_steps_per_dispatch}")
  device = jax.devices()[0]

  def peaks_fn():
    peaks = roofline.device_peaks(device.device_kind, jax.default_backend(),
                                  peak_tflops=FLAGS.peak_tflops, peak_gbps=FLAGS.peak_gbps)
    progress(f"roofline peaks ({peaks.source}): "
             + ", ".join("-" if v is None else f"{v / 1e9:.1f} {unit}" for v, unit in
                         ((peaks.flops_per_s, "GFLOP/s"), (peaks.bytes_per_s, "GB/s"))))
    return peaks

  records = []
  for batch in batch_sizes:
    records.append(bench_batch(hf_model, params, cfg, batch, prompt_len=FLAGS.prompt_len,
                               new_tokens=FLAGS.max_new_tokens, iters=FLAGS.iters,
                               warmup=FLAGS.warmup, seed=FLAGS.seed,
                               decode_steps_per_dispatch=FLAGS.decode_steps_per_dispatch,
                               peaks_fn=peaks_fn))
  header["loadavg_end"] = list(os.getloadavg())
  if FLAGS.out:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w") as f:
      json.dump({"header": header, "records": records}, f, indent=1)
    progress(f"wrote {len(records)} records to {FLAGS.out}")
  print(format_table(records))


if __name__ == "__main__":
  define_flags()
  run_script(main)
