"""Reference generation on a contiguous KV cache: the correctness baseline of the project.

Prefill runs the right-padded prompts in one forward pass; decoding runs inside one jitted
`lax.fori_loop` (no per-token host dispatch). Every later executor (paged, pooled,
disaggregated) is compared with `generate` token for token.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from crosspool_jax.models.config import ModelConfig
from crosspool_jax.models.model import KVCache, forward
from crosspool_jax.models.sampling import SamplingParams, sample, stack_params


@functools.partial(jax.jit, static_argnames=("cfg", "num_steps", "moe_impl"),
                   donate_argnames=("cache",))
def _decode_loop(params, cache, first_B, lengths_B, sampling, *, cfg: ModelConfig,
                 num_steps: int, moe_impl: str | None):
  """Feeds back `num_steps` tokens; returns (generated ids [B, num_steps + 1], cache)."""
  b = first_B.shape[0]
  out_BT = jnp.zeros((b, num_steps + 1), jnp.int32).at[:, 0].set(first_B)

  def step(i, carry):
    cache, out_BT = carry
    positions_B = lengths_B + i
    logits_B1V, cache = forward(params, out_BT[:, i, None], positions_B[:, None], cache,
                                cfg=cfg, moe_impl=moe_impl)
    nxt_B = sample(logits_B1V[:, 0], positions_B + 1, **sampling)
    return cache, out_BT.at[:, i + 1].set(nxt_B)

  return jax.lax.fori_loop(0, num_steps, step, (cache, out_BT))[::-1]


def prepare_prompts(cfg: ModelConfig, prompts: Sequence[Sequence[int]], *,
                    max_new_tokens: int,
                    sampling: SamplingParams | Sequence[SamplingParams] | None = None):
  """Validates a generation call and right-pads its prompts.

  Returns:
    (sampling list, one per prompt; tokens_BT int32; positions_BT int32 with -1 on padding;
    lengths_B int32).

  Raises:
    ValueError: naming the offending prompt or argument.
  """
  if not prompts:
    raise ValueError("prompts is empty")
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
  for i, prompt in enumerate(prompts):
    if len(prompt) == 0:
      raise ValueError(f"prompts[{i}] is empty")
    bad = [t for t in prompt if not 0 <= int(t) < cfg.vocab_size]
    if bad:
      raise ValueError(f"prompts[{i}] has token ids outside [0, {cfg.vocab_size}): {bad[:5]}")
    if len(prompt) + max_new_tokens > cfg.max_context:
      raise ValueError(f"prompts[{i}] ({len(prompt)} tokens) + max_new_tokens "
                       f"({max_new_tokens}) exceeds the model's max context {cfg.max_context}")
  if sampling is None:
    sampling = SamplingParams()
  if isinstance(sampling, SamplingParams):
    sampling = [sampling] * len(prompts)
  if len(sampling) != len(prompts):
    raise ValueError(f"got {len(sampling)} SamplingParams for {len(prompts)} prompts")
  b = len(prompts)
  lengths_B = np.array([len(p) for p in prompts], np.int32)
  tokens_BT = np.zeros((b, int(lengths_B.max())), np.int32)
  positions_BT = np.full(tokens_BT.shape, -1, np.int32)
  for i, prompt in enumerate(prompts):
    tokens_BT[i, : len(prompt)] = prompt
    positions_BT[i, : len(prompt)] = np.arange(len(prompt))
  return list(sampling), tokens_BT, positions_BT, lengths_B


def truncate_at_stop(rows: Sequence[Sequence[int]], stop_ids: Sequence[int]) -> list[list[int]]:
  """Cuts each row after its first stop token (kept)."""
  stops = {int(s) for s in stop_ids}
  return [list(row[: next((j + 1 for j, tok in enumerate(row) if tok in stops), len(row))])
          for row in rows]


def generate(params: dict, cfg: ModelConfig, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int,
             sampling: SamplingParams | Sequence[SamplingParams] | None = None,
             stop_ids: Sequence[int] = (), cache_dtype=None,
             moe_impl: str | None = None) -> list[list[int]]:
  """Generates up to `max_new_tokens` tokens for each prompt.

  Args:
    params: model params.
    cfg: model config.
    prompts: token ids of each prompt (non-empty, ids in [0, vocab_size)).
    max_new_tokens: tokens to generate per prompt (>= 1).
    sampling: one SamplingParams for all prompts, or one per prompt (default: greedy).
    stop_ids: a generated token in this set ends its sequence (the token is kept).
    cache_dtype: KV cache dtype (default: the embedding's dtype).
    moe_impl: expert dispatch implementation.

  Returns:
    The generated ids of each prompt (prompt not included).
  """
  sampling, tokens_BT, positions_BT, lengths_B = prepare_prompts(
      cfg, prompts, max_new_tokens=max_new_tokens, sampling=sampling)
  b, t = tokens_BT.shape
  dtype = cache_dtype or params["embed_VD"].dtype
  cache = KVCache.zeros(cfg, b, t + max_new_tokens, dtype)
  sampling_arrays = {k: jnp.asarray(v) for k, v in stack_params(sampling).items()}

  last_BV, cache = forward(params, jnp.asarray(tokens_BT), jnp.asarray(positions_BT), cache,
                           jnp.asarray(lengths_B - 1), cfg=cfg, moe_impl=moe_impl)
  first_B = sample(last_BV, jnp.asarray(lengths_B), **sampling_arrays)
  out_BT, _ = _decode_loop(params, cache, first_B, jnp.asarray(lengths_B), sampling_arrays,
                           cfg=cfg, num_steps=max_new_tokens - 1, moe_impl=moe_impl)
  return truncate_at_stop(np.asarray(out_BT).tolist(), stop_ids)
