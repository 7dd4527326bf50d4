"""Weights pool on device: pooled generation == `generate` with a fraction of experts resident,
donated in-place slot updates (deleted inputs, no pool copy in the HLO, flat RSS), trace replay
== live decisions, swap timing accounting, bad input on the device side."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crosspool_jax.engine.weights_generate import generate_pooled
from crosspool_jax.models.config import tiny_config
from crosspool_jax.models.decode import generate
from crosspool_jax.models.model import init_params
from crosspool_jax.pools.expert_trace import belady_stats, replay
from crosspool_jax.pools.weights_buffers import DeviceWeightsPool, write_slots
from crosspool_jax.pools.weights_pool import ExpertModelSpec, WeightsPool

PROMPTS = [[5, 6, 7, 8, 9], [300, 11, 12]]
NEW = 5


@pytest.fixture(scope="module")
def fleet():
  """Three tiny models of one expert shape class (D=64, F=32, f32) and their reference tokens.

  mixtral and qwen3_moe tiny configs share (d_model, d_ff_expert); a second mixtral seed is a
  "fine-tune"; qwen2_moe brings a dense layer and a shared expert (both stay in params).
  """
  models = {
      "mix0": (tiny_config("mixtral"), 0),
      "mix1": (tiny_config("mixtral"), 1),
      "qwen3": (tiny_config("qwen3_moe"), 2),
      "qwen2": (tiny_config("qwen2_moe"), 3),
  }
  out = {}
  for name, (cfg, seed) in models.items():
    params = init_params(cfg, seed=seed)
    out[name] = (cfg, params, generate(params, cfg, PROMPTS, max_new_tokens=NEW))
  return out


def _register(fleet, policy, slots):
  wpool = DeviceWeightsPool(WeightsPool(device_bytes=1 << 30, policy=policy))
  for i, (name, (cfg, params, _)) in enumerate(fleet.items()):
    wpool.register(name, cfg, params, slots_per_device=slots if i == 0 else None)
  return wpool


@pytest.mark.parametrize("policy", ["lru", "lfu", "activation_aware"])
def test_quarter_resident_generation_matches_generate(fleet, policy):
  total = sum(cfg.num_experts * sum(cfg.moe_layers) for cfg, _, _ in fleet.values())
  slots = total // 4  # 64 experts, 16 slots: 25 % resident
  wpool = _register(fleet, policy, slots)
  assert len(wpool.pool.classes) == 1
  trace = []
  for rnd in range(2):  # models take turns, so every step swaps
    for name, (_, _, want) in fleet.items():
      got = generate_pooled(wpool, name, PROMPTS, max_new_tokens=NEW, trace=trace,
                            step_offset=100 * rnd)
      assert got == want, (name, policy)
  stats = wpool.pool.stats
  wpool.pool.check_invariants()
  assert stats.misses > 0 and stats.evictions > 0 and stats.accesses == len(
      [1 for ev in trace for _ in ev.experts])
  assert stats.bytes_swapped == stats.loads * 3 * 64 * 32 * 4
  # The same trace through a fresh host pool makes the same decisions.
  host = WeightsPool(device_bytes=1 << 30, policy=policy)
  fresh = WeightsPool(device_bytes=1 << 30, policy=policy)
  for i, (name, (cfg, _, _)) in enumerate(fleet.items()):
    for p in (host, fresh):
      p.register_model(ExpertModelSpec.from_config(name, cfg), slots_per_device=slots
                       if i == 0 else None)
  again = replay(trace, host)
  for field in ("accesses", "hits", "misses", "prefetch_loads", "prefetch_hits", "evictions",
                "bytes_swapped"):
    assert getattr(again, field) == getattr(stats, field), field
  assert stats.hits <= belady_stats(trace, fresh)["hits"] or policy == "activation_aware"
  # Swap timing: every swap ran and was accounted; demand-only policies hide nothing.
  assert stats.swap_calls > 0 and stats.swap_s_exposed > 0
  if policy == "activation_aware":
    assert stats.prefetch_loads > 0 and stats.prefetch_hits > 0
  else:
    assert stats.swap_s_hidden == 0 and stats.prefetch_loads == 0


def test_pin_all_generation_and_a_layer_too_big_for_the_budget(fleet):
  cfg, params, want = fleet["mix0"]
  wpool = DeviceWeightsPool(WeightsPool(device_bytes=1 << 30, policy="pin_all"))
  wpool.register("mix0", cfg, params, slots_per_device=16)
  assert generate_pooled(wpool, "mix0", PROMPTS, max_new_tokens=NEW) == want
  assert wpool.pool.stats.misses == 0 and wpool.pool.stats.hit_rate == 1.0
  # Registering twice: refused, store and pool unchanged.
  with pytest.raises(ValueError, match="already registered"):
    wpool.register("mix0", cfg, params)
  assert list(wpool.models) == ["mix0"] and len(wpool.pool.resident_keys()) == 16
  # A model of another shape with no room for a new class: refused, nothing stored.
  other = tiny_config("mixtral", d_ff_expert=48)
  small = DeviceWeightsPool(WeightsPool(device_bytes=8 * 3 * 64 * 32 * 4))
  small.register("mix0", cfg, params, slots_per_device=8)
  with pytest.raises(ValueError, match="no room for a new one"):
    small.register("wide", other, init_params(other, seed=5), slots_per_device=8)
  assert list(small.models) == ["mix0"] and len(small.pool.classes) == 1
  with pytest.raises(KeyError):
    small.store.gather([("wide", 0, 0)])


def _pool_buffers(s=64, d=128, f=256):
  return [jnp.zeros((s, d, f)), jnp.zeros((s, d, f)), jnp.zeros((s, f, d))]


def _update_args(n, d=128, f=256, s=64, seed=0):
  rng = np.random.default_rng(seed)
  slots = rng.choice(s, n, replace=False).astype(np.int32)
  return (jnp.asarray(slots), jnp.asarray(rng.standard_normal((n, d, f), np.float32)),
          jnp.asarray(rng.standard_normal((n, d, f), np.float32)),
          jnp.asarray(rng.standard_normal((n, f, d), np.float32)))


def test_slot_update_is_in_place_with_no_copy_of_the_pool():
  bufs = _pool_buffers()
  args = _update_args(4)
  hlo = write_slots.lower(*bufs, *args).compile().as_text()
  copies = [line for line in hlo.splitlines() if re.search(r"\bcopy\(", line)]
  for line in copies:
    assert "f32[64,128,256]" not in line and "f32[64,256,128]" not in line, line
  assert "input_output_alias" in hlo
  pointers = [b.unsafe_buffer_pointer() for b in bufs]
  *new, done = write_slots(*bufs, *args)
  assert all(b.is_deleted() for b in bufs)
  assert [b.unsafe_buffer_pointer() for b in new] == pointers  # same memory, updated
  slots = np.asarray(args[0])
  np.testing.assert_array_equal(np.asarray(new[0])[slots], np.asarray(args[1]))
  np.testing.assert_array_equal(np.asarray(new[2])[slots], np.asarray(args[3]))
  np.testing.assert_array_equal(np.asarray(done), slots)
  untouched = np.setdiff1d(np.arange(64), slots)
  assert not np.asarray(new[1])[untouched].any()


def _rss_bytes():
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) * 1024
  raise AssertionError("no VmRSS")


def test_rss_stays_flat_over_many_updates():
  bufs = _pool_buffers()  # 3 x 8 MiB
  updates = [_update_args(4, seed=i) for i in range(4)]
  for args in updates:  # warm up (compile, allocator)
    *bufs, _ = write_slots(*bufs, *args)
  jax.block_until_ready(bufs)
  start = _rss_bytes()
  for i in range(300):
    *bufs, _ = write_slots(*bufs, *updates[i % 4])
  jax.block_until_ready(bufs)
  grown = _rss_bytes() - start
  assert grown < 4 << 20, f"RSS grew {grown / 2**20:.1f} MiB over 300 updates"


def test_pool_update_through_the_device_pool_keeps_unwritten_slots_nan(fleet):
  cfg, params, _ = fleet["mix0"]
  wpool = DeviceWeightsPool(WeightsPool(device_bytes=1 << 30, policy="lru"))
  wpool.register("mix0", cfg, params, slots_per_device=12)
  old = wpool.buffers(0, 0)
  wpool.access("mix0", 1, [2, 5, 7])
  assert all(b.is_deleted() for b in old)
  table, (gate, up, down) = wpool.layer_inputs("mix0", 1)
  table = np.asarray(table)
  ffn = params["layers"][1]["ffn"]
  for e in (2, 5, 7):
    np.testing.assert_array_equal(np.asarray(gate)[table[e]], np.asarray(ffn["w_gate_EDF"][e]))
    np.testing.assert_array_equal(np.asarray(down)[table[e]], np.asarray(ffn["w_down_EFD"][e]))
  free = np.setdiff1d(np.arange(12), table[[2, 5, 7]])
  assert np.isnan(np.asarray(up)[free]).all()
