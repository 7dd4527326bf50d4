r"""Times the kernel implementations (reference / pallas / interpret) over a sweep of shapes.

Writes JSON (a header with the jax version, device, git revision and flags, and one record per
(kernel, shape, impl)) to --out, prints a compact table to stdout and progress to stderr. An
(impl, shape) that fails (say a kernel that cannot compile for the shape) is recorded with an
"error" and the sweep goes on.

  # CPU sanity: the jnp reference vs the Pallas interpreter on the tiny sweep (under a minute):
  python scripts/bench_kernels.py --sweep=small --dtype=float32 --iters=3 --warmup=1 \
      --out=workdir/bench/cpu_small.json
  # GPU / TPU: the reference vs the compiled Pallas kernel on the full sweep:
  python scripts/bench_kernels.py --sweep=full --dtype=bfloat16 --iters=20 --warmup=3 \
      --out=workdir/bench/full_bf16.json

Roofline (`crosspool_jax.roofline`): each record's fraction of the device's peak FLOP/s and
bandwidth, and of its roofline, max(FLOPs / peak FLOP/s, bytes / peak bandwidth) over the
measured time. The peaks: vendor datasheets on GPU/TPU (dense bf16 whatever --dtype is); on CPU
an f32 matmul and a memory stream measured at the start of the run; --peak_tflops /
--peak_gbps override either.

Adding a kernel: write a builder `(shape, impl, dtype) -> Case(fn, args, flops, bytes)` and a
sweep (name -> list of shape dicts), and add one `KernelBench` entry to `KERNELS`.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from crosspool_jax import roofline
from crosspool_jax.cli import run_script, start_script
from crosspool_jax.provenance import git_dirty, git_revision
from pallas_kernels._impl import IMPLS
from pallas_kernels.expert_dispatch import expert_dispatch
from pallas_kernels.kv_write import write_kv
from pallas_kernels.ragged_paged_attention import ragged_paged_attention

_ACCELERATORS = ("gpu", "tpu")
# What the peaks of each source are (recorded in the header).
PEAK_BASIS = {
    "datasheet": "dense bf16 TFLOP/s and HBM GB/s (vendor datasheets) whatever the dtype",
    "measured": "f32 matmul FLOP/s and memory read bandwidth measured at the start of the run "
                "(the fastest of a few calls)",
}

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the flags; called only when the script runs as a program."""
  flags.DEFINE_list("kernels", ["expert_dispatch", "ragged_paged_attention", "kv_write"],
                    "Kernels to time (keys of KERNELS).")
  flags.DEFINE_list("impls", None, "Implementations to time, from "
                    f"{','.join(IMPLS)}. Default: reference,pallas on GPU/TPU, "
                    "reference,interpret elsewhere.")
  flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Activation and weight dtype.")
  flags.DEFINE_enum("sweep", None, ["small", "full"], "Shape sweep: small (CPU sanity) "
                    "or full (accelerators). Default: full on GPU/TPU, small elsewhere.")
  flags.DEFINE_integer("iters", 20, "Timed calls per (shape, impl).", lower_bound=1)
  flags.DEFINE_integer("warmup", 3, "Untimed calls after compiling.", lower_bound=0)
  flags.DEFINE_string("out", None, "JSON output path (directories are created); unset: "
                      "table only.")
  flags.DEFINE_float("peak_tflops", None, "Peak TFLOP/s of the device; overrides the "
                     "datasheet (GPU/TPU) or measured (CPU) figure.")
  flags.DEFINE_float("peak_gbps", None, "Peak memory GB/s of the device; overrides the "
                     "datasheet (GPU/TPU) or measured (CPU) figure.")


class Case(NamedTuple):
  """One (kernel, shape, impl) ready to time.

  Attributes:
    fn: the function to time; the runner jits it (bind static options with functools.partial).
    args: its array arguments.
    flops: useful floating-point operations of one call.
    bytes: bytes one call must move at least (weights read + activations in and out).
    info: extra facts of the inputs worth recording (e.g. experts touched by the routing).
    carry_first: the first argument is a donated buffer updated in place (the KV pool): each
      call donates it and the next call gets the returned buffer, as in serving.
  """

  fn: Callable[..., Any]
  args: tuple
  flops: int
  bytes: int
  info: Mapping[str, Any] | None = None
  carry_first: bool = False


@dataclasses.dataclass(frozen=True)
class KernelBench:
  """A kernel of the benchmark: its case builder and its shape sweeps.

  Attributes:
    build: (shape dict, impl, dtype) -> Case.
    sweeps: sweep name ("small", "full") -> shape dicts.
  """

  build: Callable[[Mapping[str, int], str, Any], Case]
  sweeps: Mapping[str, Sequence[Mapping[str, int]]]


# ---------------------------------------------------------------------------------------------
# expert_dispatch: T tokens, K choices, D model dim, F expert hidden dim, E experts of the layer
# living in S > E pool slots through a scattered slot table (the other slots hold NaN).


# One pool at a time, dropped before the next is made (the sweeps keep (D, F, E, S) outermost).
_POOL_CACHE: dict[tuple, tuple] = {}


def _expert_pools(D: int, F: int, E: int, S: int, dtype_name: str, seed: int):
  """(slot_table_E, w_gate_SDF, w_up_SDF, w_down_SFD); slots outside the table are NaN."""
  key = (D, F, E, S, dtype_name, seed)
  if key not in _POOL_CACHE:
    _POOL_CACHE.clear()
    _POOL_CACHE[key] = _make_expert_pools(*key)
  return _POOL_CACHE[key]


def _make_expert_pools(D: int, F: int, E: int, S: int, dtype_name: str, seed: int):
  dtype = jnp.dtype(dtype_name)
  slot_table_E = np.random.default_rng(seed).choice(S, size=E, replace=False).astype(np.int32)
  used_S = np.zeros((S,), bool)
  used_S[slot_table_E] = True

  @functools.partial(jax.jit, static_argnums=(1, 2))
  def pool(key, shape, scale):
    w = jax.random.normal(key, shape, dtype) * jnp.asarray(scale, dtype)
    return jnp.where(used_S[:, None, None], w, jnp.asarray(jnp.nan, dtype))

  k_gate, k_up, k_down = jax.random.split(jax.random.key(seed), 3)
  return (jnp.asarray(slot_table_E), pool(k_gate, (S, D, F), D ** -0.5),
          pool(k_up, (S, D, F), D ** -0.5), pool(k_down, (S, F, D), F ** -0.5))


def expert_dispatch_case(shape: Mapping[str, int], impl: str, dtype) -> Case:
  """Random tokens routed to K distinct experts each (uniformly), pool as `_expert_pools`.

  Inputs are seeded by the shape, so every run and impl sees the same routing.
  """
  seed = 0
  T, D, F, E, S, K = (shape[n] for n in ("T", "D", "F", "E", "S", "K"))
  if not K <= E < S:
    raise ValueError(f"need K <= E < S, got {shape}")
  dtype = jnp.dtype(dtype)
  slot_table_E, w_gate_SDF, w_up_SDF, w_down_SFD = _expert_pools(D, F, E, S, dtype.name, seed)
  rng = np.random.default_rng([seed, T, E, K])
  topk_ids_TK = np.argsort(rng.random((T, E)), axis=1)[:, :K].astype(np.int32)
  logits_TK = rng.standard_normal((T, K))
  topk_weights_TK = np.exp(logits_TK) / np.exp(logits_TK).sum(axis=1, keepdims=True)
  x_TD = jnp.asarray(rng.standard_normal((T, D)), dtype)
  touched = len(np.unique(topk_ids_TK))
  # gate, up and down: three [*, D] x [D, F]-sized matmuls per (token, choice).
  flops = 2 * T * K * D * F * 3
  # Weights of the distinct experts read once, x in and y out; router ids / weights left out.
  nbytes = (touched * 3 * D * F + 2 * T * D) * dtype.itemsize
  args = (x_TD, jnp.asarray(topk_ids_TK), jnp.asarray(topk_weights_TK, dtype), slot_table_E,
          w_gate_SDF, w_up_SDF, w_down_SFD)
  return Case(functools.partial(expert_dispatch, impl=impl), args, flops, nbytes,
              {"experts_touched": touched})


def _ed(T, D, F, E, K):
  return {"T": T, "D": D, "F": F, "E": E, "S": 2 * E, "K": K}


EXPERT_DISPATCH_SWEEPS = {
    # The Pallas interpreter takes ~0.4 s (T=16, K=2) to ~3 s (T=128, K=8) a call on 2 CPU
    # cores, so (T=128, K=8) is left out.
    "small": [_ed(T, 1024, 512, 8, K) for T, K in ((16, 2), (16, 8), (128, 2))],
    # (4096, 14336) is Mixtral-8x7B-sized: E=8 only (E=64 there is a 45 GB bf16 pool).
    "full": [_ed(T, D, F, E, K)
             for D, F, Es in ((1024, 512, (8, 64)), (4096, 1408, (8, 64)), (4096, 14336, (8,)))
             for E in Es for T in (16, 128, 512, 2048) for K in (2, 8)],
}


# ---------------------------------------------------------------------------------------------
# ragged_paged_attention: S sequences, `prefill` of them with a chunk of q query tokens at the
# end of their ctx-token context, the others decoding one token; N query heads, K kv heads,
# head dim H, Tp tokens per page; pages scattered through a pool whose other pages hold NaN.


def _kv_pool_case(S: int, ctx: int, K: int, H: int, Tp: int, dtype, seed: int):
  """(pool_PE, page_table_SP, pages per sequence) with scattered pages, the rest NaN."""
  rng = np.random.default_rng(seed)
  per_seq = -(-ctx // Tp)
  num_pages = 1 + S * per_seq + 8
  table_SP = (1 + rng.permutation(num_pages - 1)[:S * per_seq]).reshape(S, per_seq)
  pool_PE = np.full((num_pages, 2 * Tp * K * H), np.nan, np.float32)
  pool_PE[table_SP.ravel()] = rng.standard_normal((S * per_seq, 2 * Tp * K * H))
  return jnp.asarray(pool_PE, dtype), jnp.asarray(table_SP, jnp.int32)


def ragged_paged_attention_case(shape: Mapping[str, int], impl: str, dtype) -> Case:
  """A mixed prefill / decode batch (see the section comment); inputs seeded by the shape."""
  S, prefill, q, ctx, N, K, H, Tp = (shape[n] for n in
                                     ("S", "prefill", "q", "ctx", "N", "K", "H", "Tp"))
  if not (prefill <= S and q <= ctx and N % K == 0):
    raise ValueError(f"need prefill <= S, q <= ctx, N % K == 0, got {shape}")
  dtype = jnp.dtype(dtype)
  pool_PE, table_SP = _kv_pool_case(S, ctx, K, H, Tp, dtype, seed=S * 7 + ctx)
  q_lens = np.array([q] * prefill + [1] * (S - prefill))
  cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
  q_TNH = jnp.asarray(np.random.default_rng(1).standard_normal((int(cu[-1]), N, H)), dtype)
  # Query i of a chunk of length n sees ctx - n + i + 1 keys: QK^T and PV, 2 flops a MAC.
  keys_seen = sum(int(n * (ctx - n) + n * (n + 1) // 2) for n in q_lens)
  flops = 4 * keys_seen * N * H
  nbytes = (S * ctx * 2 * K * H + 2 * int(cu[-1]) * N * H) * dtype.itemsize
  args = (q_TNH, pool_PE, table_SP, jnp.asarray(cu), jnp.full((S,), ctx, jnp.int32),
          jnp.asarray([S], jnp.int32))
  return Case(functools.partial(ragged_paged_attention, kv_heads=K, impl=impl), args, flops,
              nbytes, {"query_tokens": int(cu[-1])})


def _rpa(S, prefill, q, ctx, N, K, H=128, Tp=16):
  return {"S": S, "prefill": prefill, "q": q, "ctx": ctx, "N": N, "K": K, "H": H, "Tp": Tp}


RPA_SWEEPS = {
    "small": [_rpa(4, 0, 1, 128, 8, 2, H=64), _rpa(2, 1, 32, 64, 8, 2, H=64)],
    "full": [_rpa(S, 0, 1, ctx, N, K) for S in (8, 32, 128) for ctx in (1024, 4096)
             for N, K in ((32, 8), (16, 2))]
            + [_rpa(8, 2, 512, 2048, N, K) for N, K in ((32, 8), (16, 2))],
}


# ---------------------------------------------------------------------------------------------
# kv_write: T new tokens' K and V (K kv heads, head dim H) written into scattered slots of a
# P-page pool of Tp-token pages, the pool donated and carried from call to call.


def kv_write_case(shape: Mapping[str, int], impl: str, dtype) -> Case:
  T, K, H, Tp, P = (shape[n] for n in ("T", "K", "H", "Tp", "P"))
  if T > (P - 1) * Tp:
    raise ValueError(f"need T <= (P - 1) * Tp slots outside the null page, got {shape}")
  dtype = jnp.dtype(dtype)
  rng = np.random.default_rng(T + P)
  slots = (Tp + rng.permutation((P - 1) * Tp)[:T]).astype(np.int32)
  k_TKH = jnp.asarray(rng.standard_normal((T, K, H)), dtype)
  v_TKH = jnp.asarray(rng.standard_normal((T, K, H)), dtype)
  pool_PE = jnp.zeros((P, 2 * Tp * K * H), dtype)
  nbytes = 2 * (2 * T * K * H) * dtype.itemsize  # K and V read, then written
  return Case(functools.partial(write_kv, impl=impl), (pool_PE, k_TKH, v_TKH, jnp.asarray(slots)),
              0, nbytes, carry_first=True)


def _kvw(T, K, H=128, Tp=16, P=4096):
  return {"T": T, "K": K, "H": H, "Tp": Tp, "P": P}


KV_WRITE_SWEEPS = {
    "small": [_kvw(16, 2, H=64, P=256), _kvw(128, 2, H=64, P=256)],
    "full": [_kvw(T, K) for T in (8, 128, 2048) for K in (2, 8)],
}

KERNELS: dict[str, KernelBench] = {
    "expert_dispatch": KernelBench(expert_dispatch_case, EXPERT_DISPATCH_SWEEPS),
    "ragged_paged_attention": KernelBench(ragged_paged_attention_case, RPA_SWEEPS),
    "kv_write": KernelBench(kv_write_case, KV_WRITE_SWEEPS),
}


# ---------------------------------------------------------------------------------------------
# Timing and reporting


def time_case(case: Case, iters: int, warmup: int) -> dict[str, Any]:
  """Compiles once, warms up, then times `iters` calls each followed by block_until_ready."""
  start = time.perf_counter()
  donate = (0,) if case.carry_first else ()
  compiled = jax.jit(case.fn, donate_argnums=donate).lower(*case.args).compile()
  compile_s = time.perf_counter() - start
  args = list(case.args)

  def call():
    out = jax.block_until_ready(compiled(*args))
    if case.carry_first:
      args[0] = out
    return out

  finite = all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(call())
               if jnp.issubdtype(leaf.dtype, jnp.inexact))
  for _ in range(warmup):
    call()
  times_s = []
  for _ in range(iters):
    start = time.perf_counter()
    call()
    times_s.append(time.perf_counter() - start)
  return {"median_s": float(np.median(times_s)), "p90_s": float(np.percentile(times_s, 90)),
          "compile_s": compile_s, "finite": finite}


def _shape_str(shape: Mapping[str, int]) -> str:
  return " ".join(f"{k}={v}" for k, v in shape.items())


def run_benchmarks(kernels: Sequence[str], impls: Sequence[str], dtype, sweep: str, *,
                   iters: int, warmup: int, peaks: roofline.Peaks,
                   registry: Mapping[str, KernelBench] = KERNELS,
                   log=sys.stderr) -> list[dict[str, Any]]:
  """Times every (kernel, shape, impl); returns one record each (see the module docstring).

  `peaks` gives the fractions of peak and of the roofline (None where a peak is unknown).
  """
  dtype = jnp.dtype(dtype)
  todo = [(k, s, i) for k in kernels for s in registry[k].sweeps[sweep] for i in impls]
  records = []
  for n, (kernel, shape, impl) in enumerate(todo, 1):
    record: dict[str, Any] = {
        "kernel": kernel, "impl": impl, "dtype": dtype.name, "shape": dict(shape),
        "flops": None, "bytes": None, "info": None, "median_ms": None, "p90_ms": None,
        "tflops": None, "gbps": None, "frac_peak_flops": None, "frac_peak_bw": None,
        "roofline_ms": None, "frac_roofline": None, "compile_s": None, "finite": None,
        "iters": iters}
    try:
      case = registry[kernel].build(shape, impl, dtype)
      record.update(flops=int(case.flops), bytes=int(case.bytes),
                    info=dict(case.info) if case.info else None)
      timing = time_case(case, iters, warmup)
      del case
      median_s = timing["median_s"]
      flops_s, bytes_s = record["flops"] / median_s, record["bytes"] / median_s
      roofline_s = roofline.Cost(record["flops"], record["bytes"]).time_s(peaks)
      record.update(
          median_ms=median_s * 1e3, p90_ms=timing["p90_s"] * 1e3, tflops=flops_s / 1e12,
          gbps=bytes_s / 1e9,
          frac_peak_flops=flops_s / peaks.flops_per_s if peaks.flops_per_s else None,
          frac_peak_bw=bytes_s / peaks.bytes_per_s if peaks.bytes_per_s else None,
          roofline_ms=None if roofline_s is None else roofline_s * 1e3,
          frac_roofline=None if roofline_s is None else roofline_s / median_s,
          compile_s=timing["compile_s"], finite=timing["finite"])
      msg = f"{record['median_ms']:.3f} ms"
    except Exception as e:  # one failing (impl, shape) must not stop the sweep
      record["error"] = f"{type(e).__name__}: {e}"[:2000]
      msg = "ERROR " + record["error"].splitlines()[0][:200]
    records.append(record)
    print(f"[{n}/{len(todo)}] {kernel} {impl} {dtype.name} {_shape_str(shape)}: {msg}",
          file=log, flush=True)
  return records


def format_table(records: Sequence[Mapping[str, Any]]) -> str:
  """A compact fixed-width table of the records (for stdout; the JSON is the result)."""

  def num(v, fmt):
    return "-" if v is None else format(v, fmt)

  rows = [("kernel", "impl", "dtype", "shape", "med ms", "p90 ms", "TFLOP/s", "GB/s",
           "%pk F", "%pk BW", "roof ms", "%roof", "note")]
  fracs = ("frac_peak_flops", "frac_peak_bw", "frac_roofline")
  for r in records:
    note = r["error"].splitlines()[0][:60] if "error" in r else (
        "" if r["finite"] else "non-finite output")
    pct = [None if r[k] is None else 100 * r[k] for k in fracs]
    rows.append((r["kernel"], r["impl"], r["dtype"], _shape_str(r["shape"]),
                 num(r["median_ms"], ".3f"), num(r["p90_ms"], ".3f"), num(r["tflops"], ".3g"),
                 num(r["gbps"], ".3g"), num(pct[0], ".1f"), num(pct[1], ".1f"),
                 num(r["roofline_ms"], ".3f"), num(pct[2], ".1f"), note))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                   for row in rows)


def main(argv: Sequence[str]) -> None:
  start_script(argv)
  backend = jax.default_backend()
  on_accelerator = backend in _ACCELERATORS
  kernels = FLAGS.kernels
  impls = FLAGS.impls or (["reference", "pallas"] if on_accelerator
                          else ["reference", "interpret"])
  sweep = FLAGS.sweep or ("full" if on_accelerator else "small")
  for k in kernels:
    if k not in KERNELS:
      raise app.UsageError(f"--kernels: unknown kernel {k!r}; known: {', '.join(KERNELS)}")
  for i in impls:
    if i not in IMPLS:
      raise app.UsageError(f"--impls: unknown impl {i!r}; known: {', '.join(IMPLS)}")
  device_kind = jax.devices()[0].device_kind
  peaks = roofline.device_peaks(device_kind, backend, peak_tflops=FLAGS.peak_tflops,
                                peak_gbps=FLAGS.peak_gbps)
  header = {
      "jax_version": jax.__version__,
      "backend": backend,
      "device_kind": device_kind,
      "device_count": jax.device_count(),
      "git_revision": git_revision(),
      "git_dirty": git_dirty(),
      "flags": {name: FLAGS[name].value for name in (
          "kernels", "impls", "dtype", "sweep", "iters", "warmup", "out", "peak_tflops",
          "peak_gbps")},
      "resolved": {"impls": impls, "sweep": sweep},
      "peak_tflops": None if peaks.flops_per_s is None else peaks.flops_per_s / 1e12,
      "peak_gbps": None if peaks.bytes_per_s is None else peaks.bytes_per_s / 1e9,
      "peak_source": peaks.source,
      "peak_measurement": peaks.measurement,
      "peak_basis": PEAK_BASIS.get(peaks.source.split("+")[0], "given by the flags"),
      "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
  }
  print(f"{backend} ({device_kind} x{jax.device_count()}): {', '.join(kernels)} "
        f"{sweep} sweep, impls {','.join(impls)}, {FLAGS.dtype}; peaks ({peaks.source}) "
        f"{header['peak_tflops']} TFLOP/s, {header['peak_gbps']} GB/s", file=sys.stderr)
  records = run_benchmarks(kernels, impls, FLAGS.dtype, sweep, iters=FLAGS.iters,
                           warmup=FLAGS.warmup, peaks=peaks)
  if FLAGS.out:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w") as f:
      json.dump({"header": header, "records": records}, f, indent=1)
    print(f"wrote {len(records)} records to {FLAGS.out}", file=sys.stderr)
  print(format_table(records))


if __name__ == "__main__":
  define_flags()
  run_script(main)
