"""Layer-wise generation with the routed experts read from the weights pool.

The host runs each forward step layer by layer over the reference's contiguous `KVCache` (as
`decode.generate`), composing the stages of `models/stages.py`. For a MoE layer: one jitted
call runs attention and `post_attention` up to the router — and, if the model has a later MoE
layer, that layer's router applied to the same hidden state (`stages.ffn_route`: the
activation-aware prediction). The host reads the chosen experts of the valid tokens, makes them
resident (`DeviceWeightsPool.access`: hits, or demand swap-ins), runs `stages.routed_experts` on
the weights device through the layer's slot table, and `stages.combine` back home. While the
experts run (async dispatch), the predicted experts of the next MoE layer are prefetched if the
policy prefetches. Every (step, layer) is appended to an optional routing trace
(`expert_trace.TraceEvent`). `generate` (the reference) and this path give the same tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from crosspool_jax.models import stages
from crosspool_jax.models.config import ModelConfig
from crosspool_jax.models.decode import prepare_prompts, truncate_at_stop
from crosspool_jax.models.model import KVCache, write_and_attend_layer
from crosspool_jax.models.sampling import SamplingParams, sample, stack_params
from crosspool_jax.pools.expert_trace import TraceEvent
from crosspool_jax.pools.weights_buffers import DeviceWeightsPool


@functools.partial(jax.jit, static_argnames=("cfg", "layer"), donate_argnames=("cache",))
def _attention_part(p, p_next, x_TD, positions_BT, cache: KVCache, *, cfg: ModelConfig,
                    layer: int):
  """Attention of `layer` and `post_attention`, plus the next MoE layer's router (MoE layer).

  Args:
    p: the layer's params (routed experts stripped).
    p_next: the params of the next MoE layer (its FFN norm and router are read), or None.
    x_TD: residual stream.
    positions_BT: int32 positions, -1 for padding.
    cache: contiguous cache (donated).

  Returns:
    dense layer: (x_TD, cache); MoE layer: (x_TD after attention, h_TD normed FFN input,
    ids_TK, weights_TK chosen experts, pred_TK predicted experts of the next MoE layer or None,
    cache).
  """
  q_TNH, k_TKH, v_TKH = stages.attention_inputs(p, x_TD, positions_BT.reshape(-1), cfg=cfg)
  o_TNH, cache = write_and_attend_layer(cache, layer, p, q_TNH, k_TKH, v_TKH, positions_BT,
                                        cfg=cfg)
  out = stages.post_attention(p, x_TD, [o_TNH], None, cfg=cfg, moe=cfg.moe_layers[layer])
  if not cfg.moe_layers[layer]:
    return out[0], cache
  pred_TK = None if p_next is None else stages.ffn_route(p_next, out[0], cfg=cfg)[1]
  return (*out, pred_TK, cache)


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
  b, t = tokens_BT.shape
  valid_host = positions_BT.reshape(-1) >= 0
  positions = jnp.asarray(positions_BT)
  x_TD, valid_T = stages.embed(params["embed_VD"], jnp.asarray(tokens_BT.reshape(-1)),
                               positions.reshape(-1))
  for i in range(cfg.num_layers):
    p = params["layers"][i]
    if not cfg.moe_layers[i]:
      x_TD, cache = _attention_part(p, None, x_TD, positions, cache, cfg=cfg, layer=i)
      continue
    j = _next_moe(cfg, i)
    p_next = None if j is None else params["layers"][j]
    x_TD, h_TD, ids_TK, weights_TK, pred_TK, cache = _attention_part(
        p, p_next, x_TD, positions, cache, cfg=cfg, layer=i)
    experts = np.unique(np.asarray(ids_TK)[valid_host])  # the host waits for the router here
    wpool.access(model_id, i, experts)
    table_E, buffers = wpool.layer_inputs(model_id, i)
    moved = jax.device_put((h_TD, ids_TK, weights_TK, valid_T), table_E.devices().pop())
    y_TD = stages.routed_experts(*moved, table_E, *buffers, impl=moe_impl)
    y_TD = jax.device_put(y_TD, x_TD.devices().pop())
    predicted = None
    if pred_TK is not None:
      predicted = np.unique(np.asarray(pred_TK)[valid_host])
      if prefetch:  # issued while this layer's experts are in flight
        wpool.prefetch(model_id, j, predicted,
                       protect=[(model_id, i, int(e)) for e in experts])
    x_TD = stages.combine(p["ffn"], x_TD, h_TD, y_TD, cfg=cfg)
    if trace is not None:
      trace.append(TraceEvent(step, model_id, i, tuple(int(e) for e in experts), j,
                              None if predicted is None else tuple(int(e) for e in predicted)))
  logits_BV = stages.head(params, x_TD, jnp.asarray(np.arange(b) * t + last_B), cfg=cfg)
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
