"""Training a tiny MoE with optax: AdamW, warmup + cosine schedule, gradient clipping, the
router's load-balancing loss (`objective.py`), orbax checkpoints with exact resume.

Exactness: the batch of step s is drawn from `np.random.default_rng([seed, s])`, so it depends
on the seed and the step only; a checkpoint holds the params, the optimizer state, the step and
the history so far. Training N steps in one go and training k, restoring, and training N - k
give the same params and the same loss curve, bit for bit (on one machine and backend).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from crosspool_jax.models.config import ModelConfig
from crosspool_jax.train import objective
from crosspool_jax.train.corpus import Corpus, sample_windows

TRAINABLE = ("all", "experts")
_EXPERT_PARAMS = ("w_gate_EDF", "w_up_EDF", "w_down_EFD")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One training run.

  Attributes:
    steps: optimizer steps.
    batch_size: sequences per step.
    seq_len: tokens per sequence (each window of the corpus is seq_len + 1 tokens).
    learning_rate: peak learning rate (AdamW).
    warmup_steps: linear warmup from 0 to the peak, then cosine decay to
      `final_lr_ratio * learning_rate` at `steps`.
    final_lr_ratio: the schedule's last learning rate over its peak.
    weight_decay: AdamW's decoupled weight decay, on matrices only (not norms, biases).
    clip_norm: gradients are clipped to this global norm.
    b1, b2: Adam's moment decays.
    aux_loss_coef: weight of the load-balancing loss; None = the family's HF default.
    trainable: "all" (full fine-tune) or "experts" (routed experts only, the rest frozen).
    domains: the corpus domains the batches draw from (uniformly per sequence).
    seed: batches (`np.random.default_rng([seed, step])`) and held-out windows.
    eval_every: held-out evaluation every this many steps (and at 0 and at the end).
    eval_batches: held-out batches per domain per evaluation (fixed windows).
    log_every: a progress line every this many steps.
    checkpoint_every: an orbax checkpoint every this many steps (and at the end); 0 = none.
  """

  steps: int
  batch_size: int
  seq_len: int
  learning_rate: float
  warmup_steps: int
  final_lr_ratio: float = 0.1
  weight_decay: float = 0.1
  clip_norm: float = 1.0
  b1: float = 0.9
  b2: float = 0.95
  aux_loss_coef: float | None = None
  trainable: str = "all"
  domains: tuple[str, ...] = ("code", "docstrings", "comments")
  seed: int = 0
  eval_every: int = 100
  eval_batches: int = 4
  log_every: int = 10
  checkpoint_every: int = 0

  def __post_init__(self):
    positive = ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "log_every")
    for name in positive:
      if getattr(self, name) <= 0:
        raise ValueError(f"train.{name} must be > 0, got {getattr(self, name)}")
    if not 0 <= self.warmup_steps < self.steps:
      raise ValueError(f"train.warmup_steps must be in [0, steps={self.steps}), got "
                       f"{self.warmup_steps}")
    if self.learning_rate <= 0 or self.clip_norm <= 0:
      raise ValueError(f"train.learning_rate and train.clip_norm must be > 0, got "
                       f"{self.learning_rate} and {self.clip_norm}")
    if not 0 <= self.final_lr_ratio <= 1:
      raise ValueError(f"train.final_lr_ratio must be in [0, 1], got {self.final_lr_ratio}")
    if self.trainable not in TRAINABLE:
      raise ValueError(f"train.trainable must be one of {TRAINABLE}, got {self.trainable!r}")
    if self.checkpoint_every < 0:
      raise ValueError(f"train.checkpoint_every must be >= 0, got {self.checkpoint_every}")
    if not self.domains:
      raise ValueError("train.domains must name at least one corpus domain")


def train_config(block, **overrides) -> TrainConfig:
  """TrainConfig from a config block (an ml_collections ConfigDict or a dict) of its fields,
  with `overrides` on top."""
  fields = {f.name for f in dataclasses.fields(TrainConfig)}
  values = dict(block) | overrides
  unknown = sorted(set(values) - fields)
  if unknown:
    raise ValueError(f"unknown train config field(s) {unknown}; known: {sorted(fields)}")
  if "domains" in values:
    values["domains"] = tuple(values["domains"])
  return TrainConfig(**values)


def schedule(tc: TrainConfig) -> optax.Schedule:
  """Linear warmup to `learning_rate`, cosine decay to `final_lr_ratio` of it at `steps`."""
  return optax.warmup_cosine_decay_schedule(
      0.0, tc.learning_rate, tc.warmup_steps, tc.steps,
      end_value=tc.learning_rate * tc.final_lr_ratio)


def _decay_mask(params: dict) -> dict:
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def _trainable_labels(params: dict) -> dict:
  """"train" for the routed experts, "freeze" for everything else (`trainable="experts"`)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "train" if path[-1].key in _EXPERT_PARAMS else "freeze", params)


def optimizer(tc: TrainConfig) -> optax.GradientTransformation:
  """The run's optax transformation at unit learning rate: gradient clipping, then AdamW
  (`optax.adamw(1.0)`), only on the routed experts if `tc.trainable == "experts"`.

  `train_step` scales its update by the step's learning rate (`schedule(tc)(step)`, passed
  as an array), which is AdamW at that rate; so runs that differ only in their schedule (a
  fleet's base and fine-tunes) share one transformation object and one compiled step.
  """
  return _optimizer(tc.weight_decay, tc.clip_norm, tc.b1, tc.b2, tc.trainable)


@functools.cache
def _optimizer(weight_decay, clip_norm, b1, b2, trainable) -> optax.GradientTransformation:
  adamw = optax.chain(optax.clip_by_global_norm(clip_norm),
                      optax.adamw(1.0, b1=b1, b2=b2, weight_decay=weight_decay,
                                  mask=_decay_mask))
  if trainable == "all":
    return adamw
  return optax.multi_transform({"train": adamw, "freeze": optax.set_to_zero()},
                               _trainable_labels)


def aux_coef(tc: TrainConfig, cfg: ModelConfig) -> float:
  return objective.AUX_LOSS_COEF[cfg.family] if tc.aux_loss_coef is None else tc.aux_loss_coef


@functools.partial(jax.jit, static_argnames=("cfg", "tx", "aux_coef"), donate_argnames=("state",))
def train_step(state: dict, windows_BT: jax.Array, lr: jax.Array, *, cfg: ModelConfig,
               tx: optax.GradientTransformation, aux_coef: float) -> tuple[dict, dict]:
  """One optimizer step on a batch of windows [B, T + 1] at learning rate `lr` (f32 scalar;
  `tx` is at unit rate, `optimizer`); returns (state, metrics)."""
  tokens_BT, targets_BT = windows_BT[:, :-1], windows_BT[:, 1:]
  grad_fn = jax.value_and_grad(objective.loss_fn, has_aux=True)
  (loss, parts), grads = grad_fn(state["params"], tokens_BT, targets_BT,
                                 jnp.ones_like(tokens_BT), cfg=cfg, aux_coef=aux_coef)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], jax.tree.map(lambda u: lr * u, updates))
  metrics = {"loss": loss, "ce": parts["ce"], "aux": parts["aux"],
             "load_entropy": objective.load_entropy(parts["load_LE"])}
  return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics


@functools.partial(jax.jit, static_argnames=("cfg",))
def eval_loss(params: dict, windows_BT: jax.Array, *, cfg: ModelConfig) -> jax.Array:
  """Mean next-token cross-entropy (nats) of a batch of windows [B, T + 1]."""
  tokens_BT = windows_BT[:, :-1]
  _, parts = objective.loss_fn(params, tokens_BT, windows_BT[:, 1:], jnp.ones_like(tokens_BT),
                               cfg=cfg, aux_coef=0.0)
  return parts["ce"]


def heldout_windows(corpus: Corpus, tc: TrainConfig) -> dict[str, np.ndarray]:
  """The fixed held-out windows of each domain the run evaluates on (seeded by `tc.seed`)."""
  out = {}
  for i, domain in enumerate(tc.domains):
    rng = np.random.default_rng([tc.seed, 1 << 30, i])
    out[domain] = sample_windows(corpus.heldout, (domain,), batch=tc.batch_size * tc.eval_batches,
                                 length=tc.seq_len, rng=rng)
  return out


def evaluate(params: dict, cfg: ModelConfig, windows: dict[str, np.ndarray],
             batch_size: int) -> dict[str, float]:
  """Held-out cross-entropy (nats per token) of each domain's windows."""
  out = {}
  for domain, w in windows.items():
    losses = [eval_loss(params, jnp.asarray(w[i:i + batch_size]), cfg=cfg)
              for i in range(0, len(w), batch_size)]
    out[domain] = float(np.mean(jax.device_get(losses)))
  return out


def _checkpoint_manager(workdir: str) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options)


@dataclasses.dataclass
class TrainResult:
  """What `train` returns: final params, the history (per-step metrics, evaluations), whether
  it resumed from a checkpoint and at which step, and its wall time (this process only)."""

  params: dict
  history: dict
  resumed_from: int | None
  wall_s: float


def _empty_history() -> dict:
  return {"loss": [], "ce": [], "aux": [], "load_entropy": [], "eval": []}


def train(cfg: ModelConfig, params: dict, corpus: Corpus, tc: TrainConfig, *,
          workdir: str | None = None, stop_at: int | None = None,
          log: Callable[[str], None] = print) -> TrainResult:
  """Trains `params` of `cfg` on `corpus` for `tc.steps` steps (or until `stop_at`).

  Args:
    cfg: model config.
    params: the initial params (a base model's for a fine-tune); not modified.
    corpus: the token streams (`build_corpus`).
    tc: the run's config.
    workdir: where orbax checkpoints go (`workdir/checkpoints`); if it holds one, training
      resumes from the latest. None: no checkpoints.
    stop_at: stop after this step (a checkpoint is written there), as if interrupted.
    log: receives the progress lines.

  Returns:
    TrainResult; history["loss"][s] is step s's training loss, history["eval"] the held-out
    cross-entropy per domain at steps 0, eval_every, ..., steps.
  """
  missing = [d for d in tc.domains if d not in corpus.train]
  if missing:
    raise ValueError(f"train.domains {missing} are not in the corpus ({sorted(corpus.train)})")
  if not any(cfg.moe_layers):
    raise ValueError(f"{cfg.family} config has no MoE layer to train a router of")
  tx, lr_at = optimizer(tc), schedule(tc)
  coef = aux_coef(tc, cfg)
  params = jax.tree.map(jnp.array, params)  # a copy: the state is donated
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
  history, resumed_from = _empty_history(), None
  manager = None
  if workdir is not None and tc.checkpoint_every:
    manager = _checkpoint_manager(workdir)
    latest = manager.latest_step()
    if latest is not None:
      restored = manager.restore(latest, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(
              jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)),
          history=ocp.args.JsonRestore()))
      state, history, resumed_from = restored["state"], restored["history"], latest
      log(f"resumed from the checkpoint of step {latest} in {workdir}")
  windows = heldout_windows(corpus, tc)
  last = tc.steps if stop_at is None else min(stop_at, tc.steps)
  start = time.perf_counter()
  first = int(state["step"])
  if first == 0:
    history["eval"].append({"step": 0, **evaluate(state["params"], cfg, windows,
                                                   tc.batch_size)})
    log(_eval_line(history["eval"][-1]))
  window_s, window_tokens = 0.0, 0  # training time and tokens since the last progress line
  for step in range(first, last):
    step_start = time.perf_counter()
    batch = sample_windows(corpus.train, tc.domains, batch=tc.batch_size, length=tc.seq_len,
                           rng=np.random.default_rng([tc.seed, step]))
    lr = np.float32(lr_at(step))
    state, metrics = train_step(state, jnp.asarray(batch), lr, cfg=cfg, tx=tx, aux_coef=coef)
    metrics = jax.device_get(metrics)
    window_s += time.perf_counter() - step_start
    for key in ("loss", "ce", "aux", "load_entropy"):
      history[key].append(float(metrics[key]))
    window_tokens += batch.shape[0] * tc.seq_len
    done = step + 1
    if done % tc.log_every == 0 or done == last:
      log(f"step {done}/{tc.steps}  loss {metrics['loss']:.4f}  ce {metrics['ce']:.4f}  "
          f"aux {metrics['aux']:.4f}  tokens/s {window_tokens / window_s:,.0f}  "
          f"expert-load entropy {metrics['load_entropy']:.3f}  "
          f"lr {lr:.2e}")
      window_s, window_tokens = 0.0, 0
    if done % tc.eval_every == 0 or done == tc.steps:
      history["eval"].append({"step": done, **evaluate(state["params"], cfg, windows,
                                                        tc.batch_size)})
      log(_eval_line(history["eval"][-1]))
    if manager is not None and (done % tc.checkpoint_every == 0 or done == last):
      manager.save(done, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                 history=ocp.args.JsonSave(history)),
                   force=True)
  if manager is not None:
    manager.wait_until_finished()
    manager.close()
  return TrainResult(params=state["params"], history=history, resumed_from=resumed_from,
                     wall_s=time.perf_counter() - start)


def _eval_line(record: dict) -> str:
  losses = "  ".join(f"{d} {v:.4f}" for d, v in record.items() if d != "step")
  return (f"step {record['step']}  held-out ce (nats/token): {losses}  "
          f"[log(256) = {math.log(256):.4f}]")


def plot_history(history: dict, path: str, *, title: str) -> str:
  """Writes the loss curves (training loss per step, held-out cross-entropy per domain at each
  evaluation, log(256) for reference) as a PNG; returns its path."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4))
  ax.plot(np.arange(1, len(history["loss"]) + 1), history["loss"], lw=0.8, label="train loss")
  steps = [r["step"] for r in history["eval"]]
  for domain in (d for d in history["eval"][0] if d != "step"):
    ax.plot(steps, [r[domain] for r in history["eval"]], "o-", ms=3,
            label=f"held-out ce: {domain}")
  ax.axhline(math.log(256), color="grey", ls=":", label="log(256)")
  ax.set_xlabel("step")
  ax.set_ylabel("nats / token")
  ax.set_title(title)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
