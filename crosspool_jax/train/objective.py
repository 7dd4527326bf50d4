"""The training objective: next-token cross-entropy plus the router's load-balancing loss.

The auxiliary loss is HF transformers' `load_balancing_loss_func` (the same function in the
mixtral, qwen2_moe, qwen3_moe and olmoe modelling files): over the router logits of every MoE
layer together, `num_experts * sum_e f_e * P_e`, with f_e the fraction of top-k assignments
that went to expert e and P_e its mean router probability; the total is
`cross_entropy + router_aux_loss_coef * aux`, as their `ForCausalLM` computes it with
`output_router_logits=True`, with each family's default coefficient (`AUX_LOSS_COEF`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from crosspool_jax.models import layers
from crosspool_jax.models.config import ModelConfig
from crosspool_jax.models.model import forward_train

# `router_aux_loss_coef` of each family's HF config class (transformers 5).
AUX_LOSS_COEF = {"mixtral": 0.001, "qwen2_moe": 0.001, "qwen3_moe": 0.001, "olmoe": 0.01}


def expert_ids(router_logits_LTE: jax.Array, cfg: ModelConfig) -> jax.Array:
  """The experts each token chose in each MoE layer, int32 [L, T, top_k] (the router's top-k)."""
  return jax.vmap(lambda logits_TE: layers.route_logits(logits_TE, cfg)[0])(router_logits_LTE)


def expert_load(router_logits_LTE: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Fraction of each MoE layer's top-k assignments that went to each expert, f32 [L, E]."""
  ids_LTK = expert_ids(router_logits_LTE, cfg)
  counts_LE = jax.nn.one_hot(ids_LTK, cfg.num_experts, dtype=jnp.float32).sum((1, 2))
  return counts_LE / (ids_LTK.shape[1] * ids_LTK.shape[2])


def load_entropy(load_LE: jax.Array) -> jax.Array:
  """Mean over layers of each layer's load entropy over log(E): 1 = uniform, 0 = one expert."""
  safe_LE = jnp.where(load_LE > 0, load_LE, 1.0)
  entropy_L = -jnp.sum(load_LE * jnp.log(safe_LE), axis=-1)
  return jnp.mean(entropy_L) / jnp.log(load_LE.shape[-1])


def load_balancing_loss(router_logits_LTE: jax.Array, cfg: ModelConfig) -> jax.Array:
  """HF's `load_balancing_loss_func` over every MoE layer's router logits (no padding mask)."""
  probs_LTE = jax.nn.softmax(router_logits_LTE, axis=-1)
  assigned_E = expert_load(router_logits_LTE, cfg).mean(0) * cfg.top_k
  return cfg.num_experts * jnp.sum(assigned_E * probs_LTE.mean((0, 1)))


def loss_fn(params: dict, tokens_BT: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array, *,
            cfg: ModelConfig, aux_coef: float) -> tuple[jax.Array, dict]:
  """The training loss and its parts.

  Args:
    params: pure param dict.
    tokens_BT: int32 inputs, each row a sequence from position 0.
    targets_BT: int32 next token of each input.
    mask_BT: 1 where a target counts in the cross-entropy (its mean), 0 elsewhere.
    cfg: model config.
    aux_coef: weight of the load-balancing loss.

  Returns:
    (loss, {"ce", "aux", "load_LE": `expert_load` of the batch}).
  """
  logits_BTV, router_logits_LTE = forward_train(params, tokens_BT, cfg=cfg)
  logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
  nll_BT = -jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
  mask_BT = mask_BT.astype(jnp.float32)
  ce = jnp.sum(nll_BT * mask_BT) / jnp.maximum(jnp.sum(mask_BT), 1.0)
  aux = load_balancing_loss(router_logits_LTE, cfg)
  return ce + aux_coef * aux, {"ce": ce, "aux": aux,
                               "load_LE": expert_load(router_logits_LTE, cfg)}
