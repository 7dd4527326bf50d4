"""Layer-wise generation with the routed experts read from the weights pool.

The host runs each forward step layer by layer. For a MoE layer: one jitted call does the
attention (contiguous `KVCache`, as `decode.generate`), the FFN norm and the router — and, if
the model has a later MoE layer, that layer's router applied to the same hidden state (the
activation-aware prediction). The host reads the chosen experts of the valid tokens, makes them
resident (`DeviceWeightsPool.access`: hits, or demand swap-ins), and dispatches the MoE block
reading the pool buffers through the layer's slot table (`layers.moe_block(...,
slot_table_E=..., expert_weights=...)`). While that runs (async dispatch), the predicted experts
of the next MoE layer are prefetched if the policy prefetches. Dense layers, shared experts,
attention, embeddings and routers use the model's own (pinned) params.

Every (step, layer) is appended to an optional routing trace (`expert_trace.TraceEvent`).
`generate` (the reference) and this path give the same greedy tokens whatever is resident.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from crosspool_jax.models import layers
from crosspool_jax.models.config import ModelConfig
from crosspool_jax.models.decode import prepare_prompts, truncate_at_stop
from crosspool_jax.models.model import KVCache, write_cache
from crosspool_jax.models.sampling import SamplingParams, sample, stack_params
from crosspool_jax.pools.expert_trace import TraceEvent
from crosspool_jax.pools.weights_buffers import DeviceWeightsPool


@functools.partial(jax.jit, static_argnames=("cfg", "layer"), donate_argnames=("cache",))
def _attention_part(p, next_p, x_BTD, positions_BT, cache: KVCache, *, cfg: ModelConfig,
                    layer: int):
  """Attention of `layer` (+ the dense FFN if it is not MoE; else norm, router, prediction).

  Args:
    p: the layer's params (routed experts stripped).
    next_p: {"ffn_norm_D", "w_router_DE"} of the next MoE layer, or None.
    x_BTD: residual stream.
    positions_BT: int32 positions, -1 for padding.
    cache: contiguous cache (donated).

  Returns:
    dense layer: (x_BTD, cache); MoE layer: (x_BTD after attention, h_TD normed FFN input,
    ids_TK chosen experts, pred_TK predicted experts of the next MoE layer or None, cache).
  """
  b, t, d = x_BTD.shape
  h_BTD = layers.rms_norm(x_BTD, p["attn_norm_D"], cfg.rms_eps)
  q_BTNH, k_BTKH, v_BTKH = layers.attention_qkv(p["attn"], h_BTD, positions_BT, cfg)
  k_LBSKH = write_cache(cache.k_LBSKH, layer, k_BTKH, positions_BT)
  v_LBSKH = write_cache(cache.v_LBSKH, layer, v_BTKH, positions_BT)
  o_BTNH = layers.attend_contiguous(q_BTNH, k_LBSKH[layer], v_LBSKH[layer], positions_BT)
  x_BTD = x_BTD + layers.attention_out(p["attn"], o_BTNH)
  cache = KVCache(k_LBSKH, v_LBSKH)
  h_TD = layers.rms_norm(x_BTD, p["ffn_norm_D"], cfg.rms_eps).reshape(b * t, d)
  if not cfg.moe_layers[layer]:
    return x_BTD + layers.ffn_block(p["ffn"], h_TD, cfg, layer).reshape(b, t, d), cache
  ids_TK, _ = layers.route(p["ffn"]["w_router_DE"], h_TD, cfg)
  pred_TK = None
  if next_p is not None:
    hn_TD = layers.rms_norm(x_BTD, next_p["ffn_norm_D"], cfg.rms_eps).reshape(b * t, d)
    pred_TK, _ = layers.route(next_p["w_router_DE"], hn_TD, cfg)
  return x_BTD, h_TD, ids_TK, pred_TK, cache


@functools.partial(jax.jit, static_argnames=("cfg", "impl"))
def _moe_part(p_ffn, h_TD, valid_T, slot_table_E, w_gate_SDF, w_up_SDF, w_down_SFD, *,
              cfg: ModelConfig, impl: str | None):
  """The MoE block of one layer reading its experts from the pool buffers: y [T, D]."""
  return layers.moe_block(p_ffn, h_TD, cfg, slot_table_E=slot_table_E,
                          expert_weights=(w_gate_SDF, w_up_SDF, w_down_SFD), valid_T=valid_T,
                          impl=impl)


@jax.jit
def _embed(embed_VD, tokens_BT):
  return embed_VD[tokens_BT]


@functools.partial(jax.jit, static_argnames=("cfg",))
def _add_and_head(params, x_BTD, y_TD, last_B, *, cfg: ModelConfig):
  x_BTD = x_BTD + y_TD.reshape(x_BTD.shape) if y_TD is not None else x_BTD
  return layers.lm_head(params, x_BTD[jnp.arange(x_BTD.shape[0]), last_B], cfg)


@jax.jit
def _add(x_BTD, y_TD):
  return x_BTD + y_TD.reshape(x_BTD.shape)


def _next_moe(cfg: ModelConfig, layer: int) -> int | None:
  return next((j for j in range(layer + 1, cfg.num_layers) if cfg.moe_layers[j]), None)


def forward_step(wpool: DeviceWeightsPool, model_id: str, tokens_BT: np.ndarray,
                 positions_BT: np.ndarray, last_B: np.ndarray, cache: KVCache, *,
                 step: int = 0, prefetch: bool | None = None,
                 trace: list[TraceEvent] | None = None, moe_impl: str | None = None):
  """One forward step (prefill or decode) of a pooled model, layer by layer.

  Args:
    wpool: the device weights pool the model is registered with.
    model_id: the model.
    tokens_BT: int32 token ids (host).
    positions_BT: int32 positions (host); -1 marks padding.
    last_B: int32 index in T of each row's token whose logits are wanted.
    cache: the model's contiguous cache (donated, returned updated).
    step: step index written to the trace.
    prefetch: prefetch predicted experts of the next MoE layer (default: if the policy does).
    trace: list to append this step's `TraceEvent`s to.
    moe_impl: expert dispatch implementation.

  Returns:
    (logits_BV f32 of the `last_B` tokens, cache).
  """
  cfg, params = wpool.models[model_id]
  if prefetch is None:
    prefetch = wpool.pool.policy.prefetches
  valid_T = positions_BT.reshape(-1) >= 0
  valid_dev = jnp.asarray(valid_T)
  x_BTD = _embed(params["embed_VD"], jnp.asarray(tokens_BT))
  positions = jnp.asarray(positions_BT)
  y_TD = None
  for i in range(cfg.num_layers):
    if y_TD is not None:
      x_BTD, y_TD = _add(x_BTD, y_TD), None
    p = params["layers"][i]
    j = _next_moe(cfg, i) if cfg.moe_layers[i] else None
    next_p = None if j is None else {"ffn_norm_D": params["layers"][j]["ffn_norm_D"],
                                     "w_router_DE": params["layers"][j]["ffn"]["w_router_DE"]}
    if not cfg.moe_layers[i]:
      x_BTD, cache = _attention_part(p, None, x_BTD, positions, cache, cfg=cfg, layer=i)
      continue
    x_BTD, h_TD, ids_TK, pred_TK, cache = _attention_part(p, next_p, x_BTD, positions, cache,
                                                          cfg=cfg, layer=i)
    experts = np.unique(np.asarray(ids_TK)[valid_T])  # the host waits for the router here
    wpool.access(model_id, i, experts)
    table_E, buffers = wpool.layer_inputs(model_id, i)
    dev = table_E.devices().pop()
    p_ffn, h_dev, v_dev = jax.device_put((p["ffn"], h_TD, valid_dev), dev)
    y_TD = _moe_part(p_ffn, h_dev, v_dev, table_E, *buffers, cfg=cfg, impl=moe_impl)
    y_TD = jax.device_put(y_TD, x_BTD.devices().pop())
    predicted = None
    if pred_TK is not None:
      predicted = np.unique(np.asarray(pred_TK)[valid_T])
      if prefetch:  # issued while this layer's MoE is in flight
        wpool.prefetch(model_id, j, predicted,
                       protect=[(model_id, i, int(e)) for e in experts])
    if trace is not None:
      trace.append(TraceEvent(step, model_id, i, tuple(int(e) for e in experts), j,
                              None if predicted is None else tuple(int(e) for e in predicted)))
  logits_BV = _add_and_head(params, x_BTD, y_TD, jnp.asarray(last_B), cfg=cfg)
  wpool.finish_step()
  return logits_BV, cache


def generate_pooled(wpool: DeviceWeightsPool, model_id: str, prompts: Sequence[Sequence[int]],
                    *, max_new_tokens: int,
                    sampling: SamplingParams | Sequence[SamplingParams] | None = None,
                    stop_ids: Sequence[int] = (), prefetch: bool | None = None,
                    trace: list[TraceEvent] | None = None, step_offset: int = 0,
                    moe_impl: str | None = None) -> list[list[int]]:
  """`decode.generate` for a model whose experts live in the weights pool.

  Args:
    wpool: device weights pool with `model_id` registered (`DeviceWeightsPool.register`).
    model_id: the model.
    prompts: token ids of each prompt (non-empty, in [0, vocab_size)).
    max_new_tokens: tokens to generate per prompt (>= 1).
    sampling: one SamplingParams for all prompts or one per prompt (default greedy).
    stop_ids: a generated token in this set ends its sequence (the token is kept).
    prefetch: prefetch next-layer predictions (default: if the pool's policy prefetches).
    trace: list to append the routing trace to.
    step_offset: step number of the first forward step in the trace.
    moe_impl: expert dispatch implementation.

  Returns:
    The generated ids of each prompt (prompt not included).
  """
  if model_id not in wpool.models:
    raise KeyError(f"unknown model {model_id!r}; registered: {sorted(wpool.models)}")
  cfg, params = wpool.models[model_id]
  sampling, tokens_BT, positions_BT, lengths_B = prepare_prompts(
      cfg, prompts, max_new_tokens=max_new_tokens, sampling=sampling)
  b, t = tokens_BT.shape
  cache = KVCache.zeros(cfg, b, t + max_new_tokens, params["embed_VD"].dtype)
  sampling_arrays = {k: jnp.asarray(v) for k, v in stack_params(sampling).items()}
  out = np.zeros((b, max_new_tokens), np.int32)
  last_B = lengths_B - 1
  for n in range(max_new_tokens):
    logits_BV, cache = forward_step(wpool, model_id, tokens_BT, positions_BT, last_B, cache,
                                    step=step_offset + n, prefetch=prefetch, trace=trace,
                                    moe_impl=moe_impl)
    next_positions_B = lengths_B + n
    out[:, n] = np.asarray(sample(logits_BV, jnp.asarray(next_positions_B), **sampling_arrays))
    tokens_BT, positions_BT = out[:, n, None].copy(), next_positions_B[:, None].copy()
    last_B = np.zeros(b, np.int32)
  return truncate_at_stop(out.tolist(), stop_ids)
