r"""Probes ONE program per CrossPool decode step (SPMD over the KV and weights devices) against
today's per-stage dispatch, on a toy L-layer MoE model. A feasibility probe, not an executor.

The toy step: two micro-batches of T decode tokens (one new token per sequence), micro-batch m
homed on KV device m (0, 1) and served by weights device 2 + m (2, 3). A layer is the project's
stages: on the KV device `stages.attention_inputs`, `stages.write_and_attend_contiguous` (a
contiguous [L, B, K, C, H] cache instead of the paged pool: the paged gather is a separate
question, see below) and `stages.post_attention` (merge, residual, FFN norm, router); on the
weights device `stages.routed_experts` through a slot table into [Z, D, F] slot buffers (the
weights pool's layout; the Z - L*E spare slots hold NaN, so reading an unmapped slot shows); back
on the KV device the residual add (`stages.combine` without a shared expert: x + y). The step
starts with `stages.embed` and ends with `layers.lm_head` and a greedy argmax (the next tokens).
The toy has no shared expert, no dense layers and one model.

Variants (--variants):
  per_stage   today's pattern: per layer and micro-batch a jitted attention-side program on the
              KV device, `jax.device_put` of (h, ids, weights) to the weights device, a jitted
              expert program there, `jax.device_put` of y back; embed and head are programs too.
  colocated   the whole step (both micro-batches) as one program on device 0: the floor of a
              step without any cross-device traffic, and what a colocated step is today.
  spmd_scan   ONE jitted program per step: `jax.shard_map` over a 1-d mesh of the 4 devices,
              the role from `lax.axis_index` (devices 0-1 KV, 2-3 weights) choosing a `lax.cond`
              branch, hidden states moved by `lax.ppermute` (KV device i -> weights device i + 2
              and back), the layers in `lax.scan`.
  spmd_loop   as spmd_scan with the layers unrolled by a Python loop.
  spmd_where  as spmd_scan with `jnp.where` instead of `lax.cond`: every device computes both
              roles and keeps its own (shows what a cond saves).
  spmd_multi  --multi_steps decode steps in one program (`lax.fori_loop` around spmd_scan's
              step, the sampled tokens fed back, positions + 1): what multi-step decode over
              devices would buy. Timed per step.

The cost of SPMD: a shard_map program has ONE shape per argument on every device. So every device
holds buffers of the union shape: the KV devices hold [Z, D, F] expert slot buffers (zeros here)
and the weights devices a KV cache (zeros) and the attention parameters (replicated). The JSON's
`bytes_per_device` counts it. The alternative is a common byte budget per device (one flat buffer
each role views as its own arrays), which is what a real executor would need, since the KV and
weights pools are sized independently.

Before timing, the script asserts that every variant gives the per-stage outputs (next tokens
equal; hidden states and caches allclose; spmd_multi against --multi_steps per-stage steps).
Timing: --rounds rounds, each timing every variant for --iters / --rounds steps in turn (so load
drift hits all variants alike), each step followed by `block_until_ready`; the medians are over
all timed steps. Host dispatches per step: jitted program calls; transfers: `jax.device_put`
calls and the arrays they move; "issue us": the host's time to issue a step, before the wait.
The SPMD skeleton (the same conds and ppermutes without the math) is timed too: what the
cross-device structure alone costs a step on this backend. It also lowers spmd_scan for other
platforms from this machine (`jit(...).trace(...).lower(lowering_platforms=(p,))`,
--lower_platforms) with the expert dispatch's default impl and with the Pallas kernels
(--lower_moe_impls), and records whether it lowered and how many collective permutes the
module has.

Names: shape suffixes as in the project (WORKSPACE.md, "Shape suffixes"), new-code letters C
(contiguous cache positions), Z (expert slots), J (top-k choices), and A for the devices of the
mesh (a stacked per-device argument, e.g. `k_ALBKCH`); M is the micro-batches here.

  # 4 host CPU devices (the script asks for 4 if XLA_FLAGS does not say), defaults L=4, T=8,
  # D=256, E=16, K=4, F=128; a few minutes on two busy cores:
  XLA_FLAGS=--xla_force_host_platform_device_count=4 python scripts/probe_spmd_step.py \
      --iters=200 --out=workdir/probe/spmd_cpu.json
  # tiny and quick (the test's shapes), no timing:
  python scripts/probe_spmd_step.py --tiny --iters=0 --lower_platforms=
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from crosspool_jax import roofline
from crosspool_jax.cli import run_script, start_script
from crosspool_jax.models import layers, stages
from crosspool_jax.models.config import ModelConfig
from crosspool_jax.provenance import git_dirty, git_revision

FLAGS = flags.FLAGS

AXIS = "a"  # the mesh axis: the 4 devices
NUM_KV = 2  # devices 0..1 hold the KV caches; devices 2..3 the expert slot buffers
MICRO_BATCHES = NUM_KV  # micro-batch m: KV device m, weights device NUM_KV + m
TO_WEIGHTS = tuple((m, NUM_KV + m) for m in range(MICRO_BATCHES))
TO_KV = tuple((NUM_KV + m, m) for m in range(MICRO_BATCHES))
VARIANTS = ("per_stage", "colocated", "spmd_scan", "spmd_loop", "spmd_where", "spmd_multi")


def define_flags() -> None:
  """Defines the flags; called only when the script runs as a program."""
  flags.DEFINE_integer("layers", 4, "L, layers (all MoE).", lower_bound=1)
  flags.DEFINE_integer("tokens", 8, "T, decode tokens (sequences) per micro-batch; two "
                       "micro-batches, one per KV device.", lower_bound=1)
  flags.DEFINE_integer("d_model", 256, "D.", lower_bound=1)
  flags.DEFINE_integer("experts", 16, "E, routed experts per layer.", lower_bound=1)
  flags.DEFINE_integer("top_k", 4, "K, experts per token.", lower_bound=1)
  flags.DEFINE_integer("ffn", 128, "F, expert hidden width.", lower_bound=1)
  flags.DEFINE_integer("heads", 4, "Query heads.", lower_bound=1)
  flags.DEFINE_integer("kv_heads", 2, "KV heads.", lower_bound=1)
  flags.DEFINE_integer("head_dim", 64, "Head dim (even).", lower_bound=2)
  flags.DEFINE_integer("context", 64, "C, positions of the contiguous cache.", lower_bound=2)
  flags.DEFINE_integer("vocab", 512, "V.", lower_bound=2)
  flags.DEFINE_bool("tiny", False, "Use the test's tiny shapes (overrides the shape flags).")
  flags.DEFINE_list("variants", list(VARIANTS), f"Variants, of {','.join(VARIANTS)} "
                    "(per_stage, the reference, is always run).")
  flags.DEFINE_integer("multi_steps", 8, "Decode steps in one spmd_multi program.",
                       lower_bound=1)
  flags.DEFINE_integer("iters", 200, "Timed steps per variant (0: check and lower only).",
                       lower_bound=0)
  flags.DEFINE_integer("warmup", 10, "Untimed steps per variant after compiling.",
                       lower_bound=0)
  flags.DEFINE_integer("rounds", 4, "Interleaved timing rounds.", lower_bound=1)
  flags.DEFINE_integer("seed", 0, "Parameter and input seed.")
  flags.DEFINE_list("lower_platforms", ["cuda", "tpu"], "Platforms to lower spmd_scan for "
                    "(empty: none).")
  flags.DEFINE_list("lower_moe_impls", ["default", "pallas"], "Expert dispatch impls to lower "
                    "with: default (resolved on this machine: the jnp reference on CPU), "
                    "pallas (the kernels, picked per lowering platform).")
  flags.DEFINE_string("out", None, "JSON output path (directories are created); unset: "
                      "table only.")


@dataclasses.dataclass(frozen=True)
class Shapes:
  """The toy model and step."""

  layers: int = 4
  tokens: int = 8
  d_model: int = 256
  experts: int = 16
  top_k: int = 4
  ffn: int = 128
  heads: int = 4
  kv_heads: int = 2
  head_dim: int = 64
  context: int = 64
  vocab: int = 512

  @property
  def slots(self) -> int:
    """Z: slots of a weights device's buffers, the model's L*E experts and E spare ones."""
    return (self.layers + 1) * self.experts

  def config(self) -> ModelConfig:
    return ModelConfig(
        family="mixtral", vocab_size=self.vocab, d_model=self.d_model, num_layers=self.layers,
        num_heads=self.heads, num_kv_heads=self.kv_heads, head_dim=self.head_dim,
        d_ff_expert=self.ffn, num_experts=self.experts, top_k=self.top_k, norm_topk_prob=True,
        d_ff_dense=0, moe_layers=(True,) * self.layers, max_position=self.context)


TINY = Shapes(layers=2, tokens=4, d_model=32, experts=4, top_k=2, ffn=16, heads=2, kv_heads=1,
              head_dim=16, context=16, vocab=64)


class Problem(NamedTuple):
  """Host (numpy) parameters and inputs of the toy step."""

  top: dict  # embed_VD, final_norm_D, lm_head_DV
  layers: list  # per layer: attn_norm_D, ffn_norm_D, attn {w_q_DNH, ...}, ffn {w_router_DE}
  tables_MLE: np.ndarray  # each weights device's slot table (layer, expert) -> slot
  w_gate_MZDF: np.ndarray  # each weights device's slot buffers (spare slots NaN)
  w_up_MZDF: np.ndarray
  w_down_MZFD: np.ndarray
  tokens_MT: np.ndarray
  positions_MT: np.ndarray  # room for `steps` more tokens after them


def make_problem(s: Shapes, seed: int, steps: int = 1) -> Problem:
  """Random parameters (scaled to keep activations O(1)) and a decode batch per micro-batch."""
  if s.context <= steps:
    raise ValueError(f"context {s.context} must exceed the decode steps {steps}")
  rng = np.random.default_rng(seed)
  D, N, K, H, E, F, L = (s.d_model, s.heads, s.kv_heads, s.head_dim, s.experts, s.ffn,
                         s.layers)

  def normal(*shape, fan_in):
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)

  top = {"embed_VD": normal(s.vocab, D, fan_in=1), "final_norm_D": np.ones(D, np.float32),
         "lm_head_DV": normal(D, s.vocab, fan_in=D)}
  per_layer = [{"attn_norm_D": np.ones(D, np.float32), "ffn_norm_D": np.ones(D, np.float32),
                "attn": {"w_q_DNH": normal(D, N, H, fan_in=D), "w_k_DKH": normal(D, K, H, fan_in=D),
                         "w_v_DKH": normal(D, K, H, fan_in=D),
                         "w_o_NHD": normal(N, H, D, fan_in=N * H)},
                "ffn": {"w_router_DE": normal(D, E, fan_in=D)}} for _ in range(L)]
  gate_LEDF, up_LEDF = normal(L, E, D, F, fan_in=D), normal(L, E, D, F, fan_in=D)
  down_LEFD = normal(L, E, F, D, fan_in=F)
  tables, buffers = [], []
  for _ in range(MICRO_BATCHES):  # each weights device its own slot order
    table_LE = rng.permutation(s.slots)[:L * E].reshape(L, E).astype(np.int32)
    bufs = [np.full((s.slots, *w.shape[2:]), np.nan, np.float32)
            for w in (gate_LEDF, up_LEDF, down_LEFD)]
    for buf, w in zip(bufs, (gate_LEDF, up_LEDF, down_LEFD), strict=True):
      buf[table_LE.ravel()] = w.reshape(L * E, *w.shape[2:])
    tables.append(table_LE)
    buffers.append(bufs)
  gate, up, down = (np.stack([b[i] for b in buffers]) for i in range(3))
  tokens_MT = rng.integers(0, s.vocab, (MICRO_BATCHES, s.tokens)).astype(np.int32)
  positions_MT = rng.integers(0, s.context - steps, (MICRO_BATCHES, s.tokens)).astype(np.int32)
  return Problem(top, per_layer, np.stack(tables), gate, up, down, tokens_MT, positions_MT)


def zero_cache(s: Shapes) -> np.ndarray:
  """One KV device's K (or V) cache [L, B, K, C, H], B = the micro-batch's T sequences."""
  return np.zeros((s.layers, s.tokens, s.kv_heads, s.context, s.head_dim), np.float32)


# ---------------------------------------------------------------------------------------------
# The step's pieces, shared by every variant.


def kv_layer(p, x_TD, y_TD, k_LBKCH, v_LBKCH, positions_T, layer, *, cfg: ModelConfig):
  """The attention side of a layer: the previous layer's residual add of its experts' output
  `y_TD` (`stages.combine` without a shared expert), attention over the micro-batch's cache
  (one new token per sequence), merge/residual/FFN norm/router.

  Returns (x_TD, h_TD, ids_TJ, weights_TJ, k_LBKCH, v_LBKCH).
  """
  x_TD = x_TD + y_TD
  q_TNH, k_TKH, v_TKH = stages.attention_inputs(p, x_TD, positions_T, cfg=cfg)
  o_TNH, k_BKCH, v_BKCH = stages.write_and_attend_contiguous(
      k_LBKCH[layer], v_LBKCH[layer], q_TNH, k_TKH, v_TKH, positions_T[:, None])
  k_LBKCH, v_LBKCH = k_LBKCH.at[layer].set(k_BKCH), v_LBKCH.at[layer].set(v_BKCH)
  x_TD, h_TD, ids_TJ, weights_TJ = stages.post_attention(p, x_TD, [o_TNH], None, cfg=cfg,
                                                         moe=True)
  return x_TD, h_TD, ids_TJ, weights_TJ, k_LBKCH, v_LBKCH


def expert_layer(h_TD, ids_TJ, weights_TJ, valid_T, table_LE, layer, w_gate_ZDF, w_up_ZDF,
                 w_down_ZFD, *, impl: str | None = None):
  """The layer's routed experts on a weights device, through its slot table."""
  return stages.routed_experts(h_TD, ids_TJ, weights_TJ, valid_T, table_LE[layer], w_gate_ZDF,
                               w_up_ZDF, w_down_ZFD, impl=impl)


def head(top, x_TD, y_TD, *, cfg: ModelConfig):
  """The last layer's residual add, the LM head and a greedy pick: (next_T int32, x_TD)."""
  x_TD = x_TD + y_TD
  return jnp.argmax(layers.lm_head(top, x_TD, cfg), axis=-1).astype(jnp.int32), x_TD


def stack_layers(per_layer: list) -> Any:
  """The layers' params stacked on a leading L axis (for `lax.scan`)."""
  return jax.tree.map(lambda *a: np.stack(a), *per_layer)


class StepOut(NamedTuple):
  """A step's results per micro-batch (host numpy), for the comparison."""

  next_MT: np.ndarray
  x_MTD: np.ndarray
  k_MLBKCH: np.ndarray
  v_MLBKCH: np.ndarray


# ---------------------------------------------------------------------------------------------
# (a) per-stage: today's host-driven pattern.


class PerStage:
  """Per layer and micro-batch: an attention-side program on its KV device, a device_put to
  its weights device, an expert program there, a device_put back (the executor's order: every
  micro-batch's attention of a layer, then their experts). Counts programs and transfers."""

  def __init__(self, prob: Problem, s: Shapes, devices: Sequence[jax.Device]):
    cfg = s.config()
    self.s = s
    self.kv_devs = list(devices[:NUM_KV])
    self.w_devs = list(devices[NUM_KV:NUM_KV + MICRO_BATCHES])
    self._embed = stages.embed
    self._kv = jax.jit(functools.partial(kv_layer, cfg=cfg), donate_argnums=(3, 4))
    self._experts = jax.jit(expert_layer)
    self._head = jax.jit(functools.partial(head, cfg=cfg))
    put = jax.device_put
    self.top = [put(prob.top, d) for d in self.kv_devs]
    self.layers = [put(prob.layers, d) for d in self.kv_devs]
    self.layer_kv = [[put(np.int32(i), d) for i in range(s.layers)] for d in self.kv_devs]
    self.layer_w = [[put(np.int32(i), d) for i in range(s.layers)] for d in self.w_devs]
    self.zeros = [put(np.zeros((s.tokens, s.d_model), np.float32), d) for d in self.kv_devs]
    self.tables = [put(prob.tables_MLE[m], d) for m, d in enumerate(self.w_devs)]
    self.buffers = [put((prob.w_gate_MZDF[m], prob.w_up_MZDF[m], prob.w_down_MZFD[m]), d)
                    for m, d in enumerate(self.w_devs)]
    self.k = [put(zero_cache(s), d) for d in self.kv_devs]
    self.v = [put(zero_cache(s), d) for d in self.kv_devs]
    self.inputs = self.place_inputs(prob.tokens_MT, prob.positions_MT)
    self.programs = self.transfer_calls = self.arrays_moved = 0

  def place_inputs(self, tokens_MT, positions_MT):
    return [jax.device_put((tokens_MT[m], positions_MT[m]), d)
            for m, d in enumerate(self.kv_devs)]

  def _put(self, tree, device):
    self.transfer_calls += 1
    self.arrays_moved += len(jax.tree.leaves(tree))
    return jax.device_put(tree, device)

  def step(self, inputs=None):
    """One decode step; returns [(next_T, x_TD)] per micro-batch (device arrays)."""
    inputs = self.inputs if inputs is None else inputs
    ms = range(MICRO_BATCHES)
    x, valid, y, valid_w = [None] * MICRO_BATCHES, [None] * MICRO_BATCHES, list(self.zeros), {}
    for m in ms:
      x[m], valid[m] = self._embed(self.top[m]["embed_VD"], *inputs[m])
      self.programs += 1
    for layer in range(self.s.layers):
      moe = [None] * MICRO_BATCHES
      for m in ms:  # attention of the layer for every micro-batch ...
        x[m], h, ids, w, self.k[m], self.v[m] = self._kv(
            self.layers[m][layer], x[m], y[m], self.k[m], self.v[m], inputs[m][1],
            self.layer_kv[m][layer])
        moe[m] = (h, ids, w)
        self.programs += 1
      for m in ms:  # ... then their experts; valid_T travels once per step
        sent = self._put((*moe[m], *(() if m in valid_w else (valid[m],))), self.w_devs[m])
        valid_w.setdefault(m, sent[3] if len(sent) == 4 else None)
        y_w = self._experts(*sent[:3], valid_w[m], self.tables[m], self.layer_w[m][layer],
                            *self.buffers[m])
        self.programs += 1
        y[m] = self._put(y_w, self.kv_devs[m])
    out = []
    for m in ms:
      out.append(self._head(self.top[m], x[m], y[m]))
      self.programs += 1
    return out

  def result(self, out) -> StepOut:
    next_MT, x_MTD = (np.stack([np.asarray(o[i]) for o in out]) for i in range(2))
    return StepOut(next_MT, x_MTD, np.stack([np.asarray(a) for a in self.k]),
                   np.stack([np.asarray(a) for a in self.v]))

  def arrays(self) -> list:
    return [self.top, self.layers, self.layer_kv, self.layer_w, self.zeros, self.tables,
            self.buffers, self.k, self.v, self.inputs]


# ---------------------------------------------------------------------------------------------
# colocated: the whole step as one program on one device.


def colocated_step(top, layers_L, tables_M, w_gate_M, w_up_M, w_down_M, tokens_MT, positions_MT,
                   k_M, v_M, *, cfg: ModelConfig):
  """Both micro-batches, every layer (`lax.scan`), on whichever device holds the arguments.

  The per-micro-batch slot tables, slot buffers and caches are tuples of separate arrays, not
  stacked ones: a stacked buffer's row sliced inside the scan is a copy of the whole buffer
  per layer (a first version did that, and ran 4x slower than per_stage).
  Returns (next_MT, x_MTD, k_M, v_M).
  """
  outs = []
  for m in range(MICRO_BATCHES):
    x_TD, valid_T = stages.embed(top["embed_VD"], tokens_MT[m], positions_MT[m])

    def layer_fn(carry, xs, m=m, valid_T=valid_T):
      x_TD, y_TD, k_LBKCH, v_LBKCH = carry
      layer, p = xs
      x_TD, h_TD, ids_TJ, weights_TJ, k_LBKCH, v_LBKCH = kv_layer(
          p, x_TD, y_TD, k_LBKCH, v_LBKCH, positions_MT[m], layer, cfg=cfg)
      y_TD = expert_layer(h_TD, ids_TJ, weights_TJ, valid_T, tables_M[m], layer, w_gate_M[m],
                          w_up_M[m], w_down_M[m])
      return (x_TD, y_TD, k_LBKCH, v_LBKCH), None

    init = (x_TD, jnp.zeros_like(x_TD), k_M[m], v_M[m])
    (x_TD, y_TD, k_LBKCH, v_LBKCH), _ = lax.scan(
        layer_fn, init, (jnp.arange(cfg.num_layers, dtype=jnp.int32), layers_L))
    outs.append((*head(top, x_TD, y_TD, cfg=cfg), k_LBKCH, v_LBKCH))
  next_M, x_M, k_M, v_M = zip(*outs, strict=True)
  return jnp.stack(next_M), jnp.stack(x_M), k_M, v_M


class Colocated:
  """`colocated_step` jitted on device 0 (caches donated)."""

  def __init__(self, prob: Problem, s: Shapes, devices: Sequence[jax.Device]):
    self.fn = jax.jit(functools.partial(colocated_step, cfg=s.config()), donate_argnums=(8, 9))
    ms = range(MICRO_BATCHES)
    self.args = list(jax.device_put(
        (prob.top, stack_layers(prob.layers), tuple(prob.tables_MLE),
         *(tuple(w[m] for m in ms) for w in (prob.w_gate_MZDF, prob.w_up_MZDF,
                                             prob.w_down_MZFD)),
         prob.tokens_MT, prob.positions_MT, tuple(zero_cache(s) for _ in ms),
         tuple(zero_cache(s) for _ in ms)), devices[0]))
    self.programs = 0

  def step(self):
    next_MT, x_MTD, self.args[8], self.args[9] = self.fn(*self.args)
    self.programs += 1
    return next_MT, x_MTD

  def result(self, out) -> StepOut:
    return StepOut(*(np.asarray(a) for a in out),
                   *(np.stack([np.asarray(c) for c in self.args[i]]) for i in (8, 9)))


# ---------------------------------------------------------------------------------------------
# (b), (c): one SPMD program over the 4 devices.


def spmd_step_fn(s: Shapes, mesh: Mesh, *, layer_mode: str = "scan", branch: str = "cond",
                 steps: int = 1, moe_impl: str | None = None,
                 check_vma: bool = False) -> Callable:
  """The shard_map'd step over the mesh's 4 devices (not jitted).

  Arguments (A = the 4 devices; a per-device argument is stacked on A, sharded over the mesh,
  rows of the other role zeros): top, layers_L (replicated: on every device), tables_ALE,
  w_gate_AZDF, w_up_AZDF, w_down_AZFD, tokens_AT, positions_AT, k_ALBKCH, v_ALBKCH.
  Returns (next_AT, x_ATD, k_ALBKCH, v_ALBKCH); only the KV devices' rows of next and x mean
  anything. `steps` > 1: that many decode steps in a `lax.fori_loop` (tokens fed back,
  positions + 1), the last step's next tokens and hidden states returned.

  Args:
    layer_mode: "scan" (`lax.scan` over the layers) or "loop" (a Python loop, unrolled).
    branch: "cond" (`lax.cond` on the role) or "where" (both roles computed, `jnp.where`).
    moe_impl: the expert dispatch impl (None: the backend's default).
    check_vma: shard_map's check that values varying over the mesh are typed so. Off by
      default: with it on, the expert dispatch's jnp reference does not trace (its
      `fori_loop`'s initial carry is not typed varying, its body's output is).
  """
  if layer_mode not in ("scan", "loop") or branch not in ("cond", "where"):
    raise ValueError(f"bad layer_mode {layer_mode!r} or branch {branch!r}")
  cfg = s.config()
  T, D, J = s.tokens, s.d_model, s.top_k

  def by_role(is_kv, on_kv: Callable, on_weights: Callable):
    if branch == "cond":
      return lax.cond(is_kv, on_kv, on_weights)
    a, b = on_kv(), on_weights()
    return jax.tree.map(lambda u, w: jnp.where(is_kv, u, w), a, b)

  def body(top, layers_L, tables_ALE, w_gate_AZDF, w_up_AZDF, w_down_AZFD, tokens_AT,
           positions_AT, k_ALBKCH, v_ALBKCH):
    table_LE, w_gate_ZDF, w_up_ZDF, w_down_ZFD = (a[0] for a in (tables_ALE, w_gate_AZDF,
                                                                w_up_AZDF, w_down_AZFD))
    is_kv = lax.axis_index(AXIS) < NUM_KV
    # An idle role's outputs, typed as varying over the mesh like the other role's (shard_map's
    # check: a cond's branches and a scan's carry must agree on it).
    zeros_TD, zeros_T, idle_moe = jax.tree.map(
        lambda a: lax.pcast(a, AXIS, to="varying"),
        (jnp.zeros((T, D), jnp.float32), jnp.zeros((T,), jnp.int32),
         (jnp.zeros((T, D), jnp.float32), jnp.zeros((T, J), jnp.int32),
          jnp.zeros((T, J), jnp.float32))))

    def one_step(tokens_T, positions_T, k_LBKCH, v_LBKCH):
      # Cheap on every device (the weights devices' rows are dummies); valid_T to the weights.
      x_TD, valid_T = stages.embed(top["embed_VD"], tokens_T, positions_T)
      valid_w_T = lax.ppermute(valid_T, AXIS, TO_WEIGHTS)

      def layer_fn(carry, layer, p):
        x_TD, y_TD, k_LBKCH, v_LBKCH = carry
        x_TD, h_TD, ids_TJ, weights_TJ, k_LBKCH, v_LBKCH = by_role(
            is_kv, lambda: kv_layer(p, x_TD, y_TD, k_LBKCH, v_LBKCH, positions_T, layer,
                                    cfg=cfg),
            lambda: (x_TD, *idle_moe, k_LBKCH, v_LBKCH))
        h_TD, ids_TJ, weights_TJ = lax.ppermute((h_TD, ids_TJ, weights_TJ), AXIS, TO_WEIGHTS)
        y_TD = by_role(is_kv, lambda: zeros_TD, lambda: expert_layer(
            h_TD, ids_TJ, weights_TJ, valid_w_T, table_LE, layer, w_gate_ZDF, w_up_ZDF,
            w_down_ZFD, impl=moe_impl))
        y_TD = lax.ppermute(y_TD, AXIS, TO_KV)
        return x_TD, y_TD, k_LBKCH, v_LBKCH

      carry = (x_TD, zeros_TD, k_LBKCH, v_LBKCH)
      if layer_mode == "scan":
        carry, _ = lax.scan(lambda c, xs: (layer_fn(c, *xs), None), carry,
                            (jnp.arange(s.layers, dtype=jnp.int32), layers_L))
      else:
        for i in range(s.layers):
          carry = layer_fn(carry, jnp.int32(i), jax.tree.map(lambda a, i=i: a[i], layers_L))
      x_TD, y_TD, k_LBKCH, v_LBKCH = carry
      next_T, x_TD = by_role(is_kv, lambda: head(top, x_TD, y_TD, cfg=cfg),
                             lambda: (zeros_T, x_TD))
      return next_T, x_TD, k_LBKCH, v_LBKCH

    tokens_T, positions_T, k_LBKCH, v_LBKCH = (a[0] for a in (tokens_AT, positions_AT,
                                                              k_ALBKCH, v_ALBKCH))
    if steps == 1:
      next_T, x_TD, k_LBKCH, v_LBKCH = one_step(tokens_T, positions_T, k_LBKCH, v_LBKCH)
    else:
      def step_fn(_, c):
        tokens_T, positions_T, _, k_LBKCH, v_LBKCH = c
        next_T, x_TD, k_LBKCH, v_LBKCH = one_step(tokens_T, positions_T, k_LBKCH, v_LBKCH)
        return next_T, positions_T + 1, x_TD, k_LBKCH, v_LBKCH

      next_T, _, x_TD, k_LBKCH, v_LBKCH = lax.fori_loop(
          0, steps, step_fn, (tokens_T, positions_T, zeros_TD, k_LBKCH, v_LBKCH))
    return tuple(a[None] for a in (next_T, x_TD, k_LBKCH, v_LBKCH))

  shard = P(AXIS)
  return jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), *(shard,) * 8),
                       out_specs=(shard,) * 4, check_vma=check_vma)


def spmd_args(prob: Problem, s: Shapes) -> tuple:
  """Host arguments of `spmd_step_fn`: per-device rows of the union shape, the other role's
  rows zeros (identity slot tables on the KV devices)."""
  A = NUM_KV + MICRO_BATCHES

  def per_device(kv_rows, w_rows, filler):
    rows = [filler] * A
    for m in range(MICRO_BATCHES):
      if kv_rows is not None:
        rows[m] = kv_rows[m]
      if w_rows is not None:
        rows[NUM_KV + m] = w_rows[m]
    return np.stack(rows)

  identity_LE = np.arange(s.layers * s.experts, dtype=np.int32).reshape(s.layers, s.experts)
  cache = zero_cache(s)
  return (prob.top, stack_layers(prob.layers),
          per_device(None, prob.tables_MLE, identity_LE),
          *(per_device(None, w, np.zeros_like(w[0])) for w in (
              prob.w_gate_MZDF, prob.w_up_MZDF, prob.w_down_MZFD)),
          per_device(prob.tokens_MT, None, np.zeros_like(prob.tokens_MT[0])),
          per_device(prob.positions_MT, None, np.zeros_like(prob.positions_MT[0])),
          per_device(None, None, cache), per_device(None, None, cache))


class Spmd:
  """An `spmd_step_fn` jitted over the mesh (caches donated); one program per call."""

  def __init__(self, prob: Problem, s: Shapes, mesh: Mesh, **kw):
    self.steps = kw.get("steps", 1)
    self.fn = jax.jit(spmd_step_fn(s, mesh, **kw), donate_argnums=(8, 9))
    host = spmd_args(prob, s)
    shardings = ((jax.sharding.NamedSharding(mesh, P()),) * 2
                 + (jax.sharding.NamedSharding(mesh, P(AXIS)),) * 8)
    self.args = [jax.device_put(a, sh) for a, sh in zip(host, shardings, strict=True)]
    self.programs = 0

  def step(self):
    next_AT, x_ATD, self.args[8], self.args[9] = self.fn(*self.args)
    self.programs += 1
    return next_AT, x_ATD

  def result(self, out) -> StepOut:
    rows = slice(0, MICRO_BATCHES)  # the KV devices' rows
    return StepOut(*(np.asarray(a)[rows] for a in (*out, self.args[8], self.args[9])))


# ---------------------------------------------------------------------------------------------
# Checking, timing, lowering.


def check_same(name: str, got: StepOut, want: StepOut, *, rtol=1e-4, atol=1e-4) -> dict:
  """Asserts `got` matches the per-stage `want`; returns the largest differences."""
  np.testing.assert_array_equal(got.next_MT, want.next_MT, err_msg=f"{name}: next tokens")
  diffs = {}
  for field in ("x_MTD", "k_MLBKCH", "v_MLBKCH"):
    a, b = getattr(got, field), getattr(want, field)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=f"{name}: {field}")
    diffs[field] = float(np.max(np.abs(a - b)))
  return diffs


def per_stage_steps(prob: Problem, s: Shapes, devices, steps: int) -> StepOut:
  """`steps` per-stage decode steps, the sampled tokens fed back, positions + 1."""
  ref = PerStage(prob, s, devices)
  tokens_MT, positions_MT = prob.tokens_MT, prob.positions_MT
  for i in range(steps):
    out = ref.step(ref.place_inputs(tokens_MT, positions_MT + i))
    tokens_MT = np.stack([np.asarray(o[0]) for o in out])
  return ref.result(out)


def build(name: str, prob: Problem, s: Shapes, devices, mesh: Mesh, multi_steps: int):
  """A fresh variant (its own buffers: the caches are donated from step to step)."""
  if name == "per_stage":
    return PerStage(prob, s, devices)
  if name == "colocated":
    return Colocated(prob, s, devices)
  kw = {"spmd_scan": {}, "spmd_loop": {"layer_mode": "loop"}, "spmd_where": {"branch": "where"},
        "spmd_multi": {"steps": multi_steps}}
  if name not in kw:
    raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
  return Spmd(prob, s, mesh, **kw[name])


def compare(s: Shapes, variants: Sequence[str], *, seed: int = 0, multi_steps: int = 3,
            devices=None) -> dict[str, dict]:
  """Runs one step of every variant (spmd_multi: `multi_steps`) from the same state and asserts
  each matches per_stage. Returns {variant: {"max_abs_diff": ..., "compile_s": ...}}."""
  devices = list(devices or jax.devices())
  if len(devices) < NUM_KV + MICRO_BATCHES:
    raise ValueError(f"need {NUM_KV + MICRO_BATCHES} devices, have {len(devices)}")
  devices = devices[:NUM_KV + MICRO_BATCHES]
  mesh = Mesh(np.array(devices), (AXIS,))
  prob = make_problem(s, seed, steps=multi_steps)
  want = {1: per_stage_steps(prob, s, devices, 1)}
  report = {}
  for name in variants:
    steps = multi_steps if name == "spmd_multi" else 1
    if steps not in want:
      want[steps] = per_stage_steps(prob, s, devices, steps)
    start = time.perf_counter()
    v = build(name, prob, s, devices, mesh, multi_steps)
    got = v.result(jax.block_until_ready(v.step()))
    report[name] = {"max_abs_diff": check_same(name, got, want[steps]),
                    "first_call_s": time.perf_counter() - start}
  return report


def time_variants(s: Shapes, variants: Sequence[str], *, seed: int, iters: int, warmup: int,
                  rounds: int, multi_steps: int, devices) -> dict[str, dict]:
  """Per-step wall times (µs) of each variant, interleaved over `rounds`."""
  mesh = Mesh(np.array(devices), (AXIS,))
  prob = make_problem(s, seed, steps=multi_steps)
  built, times, enqueue = {}, {}, {}
  for name in variants:
    v = build(name, prob, s, devices, mesh, multi_steps)
    start = time.perf_counter()
    jax.block_until_ready(v.step())
    compile_s = time.perf_counter() - start
    for _ in range(warmup):
      jax.block_until_ready(v.step())
    built[name], times[name], enqueue[name] = (v, compile_s), [], []
  per_round = max(1, -(-iters // rounds))
  for _ in range(rounds):
    for name, (v, _) in built.items():
      for _ in range(per_round):
        start = time.perf_counter()
        out = v.step()
        enqueued = time.perf_counter()
        jax.block_until_ready(out)
        times[name].append(time.perf_counter() - start)
        enqueue[name].append(enqueued - start)
  records = {}
  for name, (v, compile_s) in built.items():
    steps = getattr(v, "steps", 1)
    us = np.asarray(times[name]) * 1e6 / steps
    calls = 1 + warmup + len(times[name])
    rec = {"compile_and_first_step_s": compile_s, "timed_calls": len(us),
           "median_us_per_step": float(np.median(us)),
           "p10_us_per_step": float(np.percentile(us, 10)),
           "p90_us_per_step": float(np.percentile(us, 90)),
           # The host's time to issue the step (its programs and transfers), before the wait.
           "median_host_issue_us_per_step": float(np.median(enqueue[name]) * 1e6 / steps),
           "programs_per_step": v.programs / calls / steps}
    if isinstance(v, PerStage):
      rec["transfer_calls_per_step"] = v.transfer_calls / calls
      rec["arrays_moved_per_step"] = v.arrays_moved / calls
      rec["bytes_per_device"] = bytes_per_device(v.arrays(), devices)
    else:
      rec["transfer_calls_per_step"] = rec["arrays_moved_per_step"] = 0.0
      if isinstance(v, Spmd):  # ppermutes in the program: (h, ids, w), y per layer, valid
        rec["in_program_ppermute_arrays_per_step"] = MICRO_BATCHES * (4 * s.layers + 1)
      rec["bytes_per_device"] = bytes_per_device(v.args, devices)
    records[name] = rec
  return records


def spmd_skeleton_us(s: Shapes, devices, *, iters: int, warmup: int) -> dict[str, float]:
  """The SPMD step without its math: one program over the mesh with the same role conds (empty
  branches) and the same ppermutes (valid_T, then per layer (h, ids, weights) to the weights
  devices and y back), layers in `lax.scan`. Its median is what the cross-device structure
  alone costs a step on this backend; the same for one device alone (no collectives)."""
  T, D, J = s.tokens, s.d_model, s.top_k
  mesh = Mesh(np.array(devices), (AXIS,))

  def body(x_ATD):
    is_kv = lax.axis_index(AXIS) < NUM_KV
    x_TD = x_ATD[0]
    valid_T = lax.ppermute(x_TD[:, 0] > 0, AXIS, TO_WEIGHTS)

    def layer_fn(x_TD, _):
      h_TD = lax.cond(is_kv, lambda: x_TD + 1, lambda: x_TD)
      moe = (h_TD, jnp.zeros((T, J), jnp.int32) + h_TD[:, :1].astype(jnp.int32),
             h_TD[:, :J])
      h_TD, ids_TJ, w_TJ = lax.ppermute(moe, AXIS, TO_WEIGHTS)
      y_TD = lax.cond(is_kv, lambda: h_TD, lambda: h_TD * 0.5 + (ids_TJ.sum() + w_TJ.sum()))
      return x_TD + lax.ppermute(y_TD, AXIS, TO_KV), None

    x_TD, _ = lax.scan(layer_fn, x_TD, None, length=s.layers)
    return jnp.where(valid_T[:, None], x_TD, -x_TD)[None]

  spmd = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS),
                               check_vma=False))
  x_ATD = jax.device_put(np.ones((len(devices), T, D), np.float32),
                         jax.sharding.NamedSharding(mesh, P(AXIS)))
  alone = jax.jit(lambda x_TD: lax.scan(lambda x, _: (x * 0.5 + 1, None), x_TD, None,
                                        length=2 * s.layers)[0])
  x_TD = jax.device_put(np.ones((T, D), np.float32), devices[0])
  out = {}
  for name, fn, arg in (("spmd_skeleton", spmd, x_ATD), ("one_device_skeleton", alone, x_TD)):
    for _ in range(warmup):  # best_and_median warms up once more
      jax.block_until_ready(fn(arg))
    _, median_s = roofline.best_and_median(fn, arg, iters)
    out[f"{name}_median_us"] = median_s * 1e6
  return out


def bytes_per_device(tree, devices) -> dict[str, int]:
  """Bytes of the arrays of `tree` resident on each device (the shards on it)."""
  total = {str(d.id): 0 for d in devices}
  for a in jax.tree.leaves(tree):
    for shard in a.addressable_shards:
      total[str(shard.device.id)] += shard.data.nbytes
  return total


def lower_for(s: Shapes, platforms: Sequence[str], impls: Sequence[str], devices,
              seed: int) -> list[dict]:
  """Lowers spmd_scan for each platform and expert impl from this machine; records the outcome."""
  mesh = Mesh(np.array(devices), (AXIS,))
  args = spmd_args(make_problem(s, seed), s)
  shardings = ((jax.sharding.NamedSharding(mesh, P()),) * 2
               + (jax.sharding.NamedSharding(mesh, P(AXIS)),) * 8)
  abstract = [jax.tree.map(lambda a, sh=sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                           a) for a, sh in zip(args, shardings, strict=True)]
  out = []
  for impl in impls:
    fn = jax.jit(spmd_step_fn(s, mesh, moe_impl=None if impl == "default" else impl))
    for platform in platforms:
      rec = {"platform": platform, "moe_impl": impl}
      try:
        text = fn.trace(*abstract).lower(lowering_platforms=(platform,)).as_text()
        rec.update(ok=True, collective_permutes=text.count("collective_permute"),
                   conditionals=text.count("stablehlo.case") + text.count("stablehlo.if"),
                   triton_calls=text.count("triton"),
                   tpu_custom_calls=text.count("tpu_custom_call"), hlo_chars=len(text))
      except Exception as e:  # any failure to lower is the finding, recorded
        rec.update(ok=False, error=f"{type(e).__name__}: {' '.join(str(e).split())[:500]}")
      out.append(rec)
  return out


def loadavg() -> str | None:
  try:
    with open("/proc/loadavg") as f:
      return f.read().strip()
  except OSError:
    return None


def format_table(records: dict[str, dict]) -> str:
  base = records.get("per_stage", {}).get("median_us_per_step")
  lines = [f"{'variant':<11} {'programs':>8} {'puts':>5} {'arrays':>6} {'first s':>7} "
           f"{'issue us':>8} {'p10 us':>8} {'median us':>9} {'p90 us':>8} "
           f"{'vs per_stage':>12}"]
  for name, r in records.items():
    speedup = f"{base / r['median_us_per_step']:.2f}x" if base else "-"
    lines.append(f"{name:<11} {r['programs_per_step']:>8.3g} "
                 f"{r['transfer_calls_per_step']:>5.3g} {r['arrays_moved_per_step']:>6.3g} "
                 f"{r['compile_and_first_step_s']:>7.2f} "
                 f"{r['median_host_issue_us_per_step']:>8.0f} {r['p10_us_per_step']:>8.0f} "
                 f"{r['median_us_per_step']:>9.0f} {r['p90_us_per_step']:>8.0f} {speedup:>12}")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  start_script(argv)
  unknown = [v for v in FLAGS.variants if v not in VARIANTS]
  if unknown:
    raise app.UsageError(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
  if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    jax.config.update("jax_num_cpu_devices", NUM_KV + MICRO_BATCHES)
  devices = jax.devices()[:NUM_KV + MICRO_BATCHES]
  if len(devices) < NUM_KV + MICRO_BATCHES:
    raise app.UsageError(f"need {NUM_KV + MICRO_BATCHES} devices, have {len(devices)}")
  s = TINY if FLAGS.tiny else Shapes(
      layers=FLAGS.layers, tokens=FLAGS.tokens, d_model=FLAGS.d_model, experts=FLAGS.experts,
      top_k=FLAGS.top_k, ffn=FLAGS.ffn, heads=FLAGS.heads, kv_heads=FLAGS.kv_heads,
      head_dim=FLAGS.head_dim, context=FLAGS.context, vocab=FLAGS.vocab)
  variants = ["per_stage"] + [v for v in FLAGS.variants if v != "per_stage"]
  header = {"jax_version": jax.__version__, "backend": jax.default_backend(),
            "device_kind": devices[0].device_kind, "device_count": jax.device_count(),
            "git_revision": git_revision(), "git_dirty": git_dirty(),
            "shapes": dataclasses.asdict(s), "slots": s.slots,
            "flags": {n: FLAGS[n].value for n in ("variants", "multi_steps", "iters", "warmup",
                                                  "rounds", "seed", "tiny")},
            "xla_flags": os.environ.get("XLA_FLAGS"), "loadavg_start": loadavg(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
  print(f"{header['backend']} x{header['device_count']}, jax {jax.__version__}, {s}; "
        f"load {header['loadavg_start']}", file=sys.stderr)
  checks = compare(s, variants, seed=FLAGS.seed, multi_steps=FLAGS.multi_steps,
                   devices=devices)
  print("outputs match per_stage: " + ", ".join(
      f"{n} (max |diff| x {c['max_abs_diff']['x_MTD']:.1e})" for n, c in checks.items()),
      file=sys.stderr)
  records = {}
  if FLAGS.iters:
    records = time_variants(s, variants, seed=FLAGS.seed, iters=FLAGS.iters,
                            warmup=FLAGS.warmup, rounds=FLAGS.rounds,
                            multi_steps=FLAGS.multi_steps, devices=devices)
  skeleton = (spmd_skeleton_us(s, devices, iters=FLAGS.iters, warmup=FLAGS.warmup)
              if FLAGS.iters else {})
  lowered = lower_for(s, [p for p in FLAGS.lower_platforms if p], FLAGS.lower_moe_impls,
                      devices, FLAGS.seed)
  header["loadavg_end"] = loadavg()
  if FLAGS.out:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w") as f:
      json.dump({"header": header, "checks": checks, "records": records,
                 "skeleton": skeleton, "lowering": lowered}, f, indent=1)
    print(f"wrote {FLAGS.out}", file=sys.stderr)
  if records:
    print(format_table(records))
  if skeleton:
    print(", ".join(f"{k} {v:.0f}" for k, v in skeleton.items()))
  for r in lowered:
    print(f"lower spmd_scan for {r['platform']} (experts {r['moe_impl']}): " + (
        f"ok, {r['collective_permutes']} collective_permute, {r['triton_calls']} triton, "
        f"{r['tpu_custom_calls']} tpu_custom_call" if r["ok"] else r["error"]))
  print(f"load {header['loadavg_start']} -> {header['loadavg_end']}")


if __name__ == "__main__":
  define_flags()
  run_script(main)
