"""KV pool buffers are updated in place: donated inputs die, no pool copy in HLO, RSS flat."""

import re

import jax
import jax.numpy as jnp
import numpy as np

from crosspool_jax.models.config import tiny_config
from crosspool_jax.models.model import init_params
from crosspool_jax.models.paged import PagedBatch, forward_paged
from crosspool_jax.models.stages import write_and_attend_paged
from crosspool_jax.pools.kv_buffers import allocate_kv_buffers, buffer_bytes
from crosspool_jax.pools.kv_pool import KVModelSpec, KVPool

CFG = tiny_config("mixtral")  # K*H = 32: 8 tokens per 512-element page
PAGES = 1031  # a distinctive dimension to find the pool in HLO text


def _setup(pages=PAGES):
  pool = KVPool(page_elems=512, pages_per_device=pages)
  pool.register_model(KVModelSpec("m", CFG.num_layers, CFG.num_kv_heads, CFG.head_dim,
                                  max_context=64, max_batch=2))
  pool.add_request("m", "r")
  pool.grow("r", 5)
  (buf,) = allocate_kv_buffers(pool, jax.devices()[:1], dtype=jnp.float32)
  tables = pool.tables("m", ["r"])
  positions = np.array([0, 1, 2, 3, 4, -1, -1, -1])
  slots = pool.slot_mapping(tables, np.zeros(8, np.int64), positions, 8, device=0)
  batch = PagedBatch(
      tokens_T=jnp.arange(8, dtype=jnp.int32), positions_T=jnp.asarray(positions, jnp.int32),
      cu_q_lens_S1=jnp.asarray([0, 5], jnp.int32), kv_lens_S=jnp.asarray([5], jnp.int32),
      num_seqs_1=jnp.asarray([1], jnp.int32), page_tables_LSP=jnp.asarray(tables),
      slot_mapping_LT=jnp.asarray(slots))
  return buf, batch


def _pool_copies(hlo: str, pages: int) -> list[str]:
  return [line for line in hlo.splitlines()
          if re.search(r"\bcopy(-start)?\(", line) and f"[{pages},512]" in line]


def test_model_step_updates_the_pool_in_place():
  params = init_params(CFG)
  buf, batch = _setup()
  pointer = buf.unsafe_buffer_pointer()
  logits, new = forward_paged(params, buf, batch, cfg=CFG, attn_impl="reference",
                              moe_impl="reference")
  assert buf.is_deleted()
  assert new.unsafe_buffer_pointer() == pointer
  assert np.isfinite(np.asarray(logits)).all()
  hlo = forward_paged.lower(params, new, batch, cfg=CFG, attn_impl="reference",
                            moe_impl="reference").compile().as_text()
  assert f"f32[{PAGES},512]" in hlo
  assert _pool_copies(hlo, PAGES) == []


def test_write_and_attend_paged_has_no_pool_copy_for_any_impl():
  q = jnp.zeros((8, CFG.num_heads, CFG.head_dim))
  k = jnp.zeros((8, CFG.num_kv_heads, CFG.head_dim))
  buf, batch = _setup()
  for impl in ("reference", "interpret"):
    hlo = write_and_attend_paged.lower(buf, q, k, k, batch, 0, cfg=CFG, impl=impl
                                       ).compile().as_text()
    assert _pool_copies(hlo, PAGES) == [], impl


def _rss_bytes() -> int:
  with open("/proc/self/status") as f:
    return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) * 1024


def test_rss_does_not_grow_with_updates():
  params = init_params(CFG)
  pages = 16384  # 32 MiB pool: a copy per step or a leak would show
  buf, batch = _setup(pages)
  pool = KVPool(page_elems=512, pages_per_device=pages)
  size = buffer_bytes(pool, jnp.float32)
  for _ in range(3):  # warm up: compile, allocator steady state
    _, buf = forward_paged(params, buf, batch, cfg=CFG, attn_impl="reference",
                           moe_impl="reference")
  buf.block_until_ready()
  before = _rss_bytes()
  for _ in range(40):
    _, buf = forward_paged(params, buf, batch, cfg=CFG, attn_impl="reference",
                           moe_impl="reference")
  buf.block_until_ready()
  growth = _rss_bytes() - before
  assert growth < size // 4, f"RSS grew {growth / 2**20:.1f} MiB over 40 updates"


def test_copy_detector_sees_a_pool_copy():
  """Positive control: reading the old pool after updating it forces XLA to copy it."""

  def update_then_read_old(pool, i):
    new = pool.at[i].set(1.0)
    return new, pool[i + 1] + new[i]

  f = jax.jit(update_then_read_old, donate_argnums=0)
  hlo = f.lower(jnp.zeros((PAGES, 512)), 2).compile().as_text()
  assert _pool_copies(hlo, PAGES)
