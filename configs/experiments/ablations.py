r"""Ablations of CrossPool: what each of its parts is worth, on the demo's fleet and trace.

  python scripts/run_experiment.py --config=configs/experiments/ablations.py:cpu
  python scripts/run_experiment.py --config=configs/experiments/ablations.py:full \
      --config.fleet.m0.checkpoint=DIR0 ... --config.fleet.m7.checkpoint=DIR7

Runs (same trace, same per-device budget unless said):
  crosspool              the full policy (2 micro-batches, LRU expert swapping)
  no_pipeline            one micro-batch: the two pools wait on each other every layer
  no_fusion              one expert-dispatch call per micro-batch (no sharing of a call by
                         the micro-batches, or models, of one shape class)
  no_swapping            pin_all: every expert resident; its weights devices get the bytes
                         all experts need (3.5 MiB instead of 2.5 on cpu; the KV devices keep
                         the common budget): the memory that swapping saves
  no_consolidation       `crosspool_partitioned`: the weights pool partitioned per model (each
                         model's own expert slots, never another's, no expert call shared by
                         two models); a partition holds at least one layer's experts per
                         weights device, 16 slots per model here, so its weights devices get
                         3 MiB on cpu (2.5 MiB holds 13 per model): the memory consolidation
                         saves
  no_weights_pool        `shared`: no weights pool at all, each model's whole weights on its
                         device (KV still pooled per device)
"""

from __future__ import annotations

import ml_collections

from crosspool_jax.experiments import config_lib as cl


def _demo():
  import importlib.util
  import os

  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")
  spec = importlib.util.spec_from_file_location("demo_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str | None = None):
  variant = arg or "cpu"
  if variant not in ("cpu", "full"):
    raise ValueError(f"variant must be 'cpu' or 'full', got {arg!r}")
  c = _demo().get_config("cpu")
  c.name, c.variant = "ablations", variant
  c.description = ("CrossPool without its pipeline, without fused expert calls, without expert "
                   "swapping, without consolidation of the weights pool, without a weights "
                   "pool")
  if variant == "full":
    cl.full_scale(c)
  crosspool = c.policies.crosspool.to_dict()
  # cpu: 3.5 MiB weights devices hold all 128 experts, 3 MiB the smallest per-model
  # partitions; full: 8 Qwen1.5-MoE fit on 3 x 80 GiB already, consolidated or not (see
  # scripts/capacity.py), so neither costs extra memory there.
  cpu = variant == "cpu"
  no_swap = dict(weights_device_bytes=7 * 2**19) if cpu else {}
  partitioned = dict(weights_device_bytes=6 * 2**19) if cpu else {}
  c.policies = ml_collections.ConfigDict(dict(
      crosspool=crosspool,
      no_pipeline=crosspool | dict(micro_batches=1),
      no_fusion=crosspool | dict(fuse_experts=False),
      no_swapping=crosspool | dict(expert_policy="pin_all", **no_swap),
      no_consolidation=crosspool | dict(kv_policy="crosspool_partitioned", **partitioned),
      no_weights_pool=c.policies.shared.to_dict(),
  ))
  return c
