"""The stages against each other: one layer's attention over pages spread on two KV devices
(`write_and_attend_paged` per device, partials merged by LSE in `post_attention`) equals the
reference's contiguous store (`write_and_attend_contiguous`; latent attention: pages of latent
rows in the absorbed form against `write_and_attend_latent`'s expanded form). The page buffers
start NaN-filled, so a read of a page (or slot) the sequence does not own shows up."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crosspool_jax.models import stages
from crosspool_jax.models.config import tiny_config
from crosspool_jax.models.model import KVCache, init_params, write_and_attend_layer
from crosspool_jax.models.paged import PagedBatch
from crosspool_jax.pools.kv_buffers import allocate_kv_buffers
from crosspool_jax.pools.kv_pool import KVModelSpec, KVPool

CFG = tiny_config("mixtral")  # K*H = 32: 8 tokens per 512-element page
# A latent row of 56 + 8: 8 tokens per page too.
LATENT = tiny_config("deepseek_v2", kv_lora_rank=56, head_dim=56 + 8)
CHUNKS = (24, 16)  # a chunked prefill: the second chunk reads the first's K/V on both devices


def _spread_pool(cfg):
  """One 40-token request whose layer-0 pages lie on both KV devices (5 usable pages each)."""
  assert len(jax.devices()) >= 2, "tests/conftest.py asks for several CPU devices"
  pool = KVPool(page_elems=512, pages_per_device=6, num_devices=2)
  pool.register_model(KVModelSpec("m", cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
                                  max_context=48, max_batch=1, stores=cfg.kv_stores))
  pool.add_request("m", "r")
  pool.grow("r", CHUNKS[0])  # 3 pages per layer from device 0 (the most free) ...
  pool.grow("r", sum(CHUNKS))  # ... then from device 1, spilling back to device 0
  tables = pool.tables("m", ["r"])
  assert set(np.unique(tables[0][tables[0] > 0] // pool.pages_per_device)) == {0, 1}
  return pool, tables


def _paged_batch(pool, tables, start, n, device):
  positions = np.arange(start, start + n, dtype=np.int32)
  slots = pool.slot_mapping(tables, np.zeros(n, np.int64), positions, pool.page_tokens("m"),
                            device=device)
  return PagedBatch(tokens_T=np.zeros(n, np.int32), positions_T=positions,
                    cu_q_lens_S1=np.asarray([0, n], np.int32),
                    kv_lens_S=np.asarray([start + n], np.int32),
                    num_seqs_1=np.asarray([1], np.int32),
                    page_tables_LSP=pool.local_tables(tables, device), slot_mapping_LT=slots)


@pytest.mark.parametrize("cfg", [CFG, LATENT], ids=["kv", "latent"])
@pytest.mark.parametrize("impl", ["reference", "interpret"])
def test_attention_spread_over_two_kv_devices_equals_the_contiguous_store(impl, cfg):
  layer = cfg.moe_layers.index(True)
  p = init_params(cfg, seed=0)["layers"][layer]
  pool, tables = _spread_pool(cfg)
  devices = jax.devices()[:2]
  buffers = allocate_kv_buffers(pool, devices, dtype=jnp.float32, fill=float("nan"))
  cache = KVCache.zeros(cfg, 1, 48)
  rng = np.random.default_rng(0)
  start = 0
  for n in CHUNKS:
    x_TD = jnp.asarray(rng.standard_normal((n, cfg.d_model), np.float32))
    positions_T = jnp.arange(start, start + n, dtype=jnp.int32)
    q, k, v = stages.attention_inputs(p, x_TD, positions_T, cfg=cfg, absorbed=cfg.mla)
    outs, lses = [], []
    for d, dev in enumerate(devices):
      batch = jax.device_put(_paged_batch(pool, tables, start, n, d), dev)
      o, lse, buffers[d] = stages.write_and_attend_paged(
          buffers[d], *jax.device_put((q, k, v), dev), batch, layer, cfg=cfg, impl=impl)
      outs.append(jax.device_put(o, devices[0]))
      lses.append(jax.device_put(lse, devices[0]))
    spread = stages.post_attention(p, x_TD, outs, lses, cfg=cfg, moe=True, absorbed=cfg.mla)
    # The reference's store; latent attention in its prefill form (per-head keys expanded).
    q, k, v = stages.attention_inputs(p, x_TD, positions_T, cfg=cfg)
    o, cache = write_and_attend_layer(cache, layer, p, q, k, v, positions_T[None], cfg=cfg,
                                      absorbed=False)
    want = stages.post_attention(p, x_TD, [o], None, cfg=cfg, moe=True)
    for got, ref in zip(spread[:3], want[:3], strict=True):  # x, h, and the routing ids
      np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
    start += n
  assert all(np.isfinite(np.asarray(lse)).all() for lse in lses)  # the last chunk saw both


def test_the_absorbed_form_is_named_where_it_does_not_apply():
  x_TD, positions_T = jnp.zeros((3, CFG.d_model)), jnp.arange(3, dtype=jnp.int32)
  p = init_params(CFG, seed=0)["layers"][0]
  with pytest.raises(ValueError, match="absorbed=True is latent attention's form; a mixtral"):
    stages.attention_inputs(p, x_TD, positions_T, cfg=CFG, absorbed=True)
  pool, tables = _spread_pool(LATENT)
  p = init_params(LATENT, seed=0)["layers"][0]
  q, k, v = stages.attention_inputs(p, x_TD, positions_T, cfg=LATENT)  # not absorbed
  buffer = jnp.zeros((pool.pages_per_device, pool.page_elems))
  with pytest.raises(ValueError, match=r"takes the absorbed query \[T, N, 64\] and no v"):
    stages.write_and_attend_paged(buffer, q, k, v, _paged_batch(pool, tables, 0, 3, 0), 0,
                                  cfg=LATENT)
