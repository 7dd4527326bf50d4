"""KV capacity under each memory policy: hand-computed tiny cases, ordering, bad input.

Tiny mixtral (float32): 189760 params = 759040 B, of which routed experts 98304 params (16
experts of 24576 B) and the rest 91456 params = 365824 B. With 512 B pages (128 elements) and
2 KV heads x head_dim 16, a page holds 2 tokens of one layer; L = 2 layers.
"""

import math

import pytest

from crosspool_jax.capacity import format_table, format_totals, measure_capacity, reference_config
from crosspool_jax.engine.policies.sizes import kv_bytes_per_token, param_bytes, param_counts
from crosspool_jax.models.config import MODEL_FAMILIES, tiny_config

MIX = tiny_config("mixtral")
W_TOTAL, W_NON_EXPERT, EXPERT = 759040, 365824, 24576
PAGE = 512
LITE = reference_config("deepseek-v2-lite")


def _run(n_models, *, num_devices, device_bytes, max_batch=2, **kw):
  return measure_capacity([MIX] * n_models, num_devices=num_devices, device_bytes=device_bytes,
                          page_bytes=PAGE, dtype="float32", max_batch=max_batch, **kw)


def _all_agree(res):
  for org in res["organisations"].values():
    for rec in org["models"].values():
      assert rec["closed_form_agrees"], rec


@pytest.mark.parametrize(("family", "overrides"), [
    *((f, {}) for f in MODEL_FAMILIES), ("deepseek_v2", {"q_lora_rank": None})])
def test_param_counts_match_the_model(family, overrides):
  from crosspool_jax.models.model import abstract_params

  cfg = tiny_config(family, **overrides)
  leaves = __import__("jax").tree_util.tree_leaves(abstract_params(cfg))
  assert param_counts(cfg)["total"] == sum(math.prod(x.shape) for x in leaves)


def test_param_bytes_of_public_configs():
  assert round(param_counts(reference_config("mixtral-8x7b"))["total"] / 1e9, 1) == 46.7
  assert round(param_counts(reference_config("qwen1.5-moe-a2.7b"))["total"] / 1e9, 1) == 14.3
  # the model card: 15.7B parameters
  assert round(param_counts(LITE)["total"] / 1e9, 1) == 15.7
  b = param_bytes(MIX, "float32")
  assert (b["total"], b["non_expert"], b["routed_experts"]) == (W_TOTAL, W_NON_EXPERT, 16 * EXPERT)


def test_kv_bytes_per_token_by_hand():
  # K and V of 2 heads of 16 over 2 layers, f32
  assert kv_bytes_per_token(MIX, "float32") == 2 * 2 * 2 * 16 * 4
  # DeepSeek-V2-Lite caches one latent row per token and layer: kv_lora_rank 512 + the rotary
  # key 64, over 27 layers, bf16
  assert kv_bytes_per_token(LITE, "bfloat16") == 27 * (512 + 64) * 2


def test_deepseek_v2_lite_kv_capacity_by_hand():
  # One latent row per token and layer: (512 + 64) x 2 B = 1,152 B, 31,104 B over 27 layers.
  cfg = LITE
  row_bytes = (512 + 64) * 2
  assert kv_bytes_per_token(cfg, "bfloat16") == 27 * row_bytes == 31104
  # A page of 16 rows (18,432 B; its 16 heads' expanded keys of 192 and values of 128 would take
  # 10,240 B a token and layer); one device: the bf16 weights, the null page, and 2,700 pages =
  # 100 per layer.
  page = 16 * row_bytes
  weights = param_bytes(cfg, "bfloat16")["total"]
  res = measure_capacity({"lite": cfg}, num_devices=1, device_bytes=weights + 2701 * page,
                         page_bytes=page, dtype="bfloat16", max_batch=1,
                         organisations=("static", "shared"))
  _all_agree(res)
  for org in res["organisations"].values():
    rec = org["models"]["lite"]
    assert (org["kv_pages"], rec["page_tokens"], rec["tp"]) == (2700, 16, 1)
    assert rec["longest_context_raw"] == rec["kv_tokens_reachable"] == 100 * 16
    assert org["kv_bytes"] == 1600 * kv_bytes_per_token(cfg, "bfloat16")


def test_two_models_two_devices_by_hand():
  # Each device: one model's weights + 101 pages (100 usable, the null page aside).
  res = _run(2, num_devices=2, device_bytes=W_TOTAL + 101 * PAGE)
  _all_agree(res)
  static, shared, cross = (res["organisations"][o] for o in ("static", "shared", "crosspool"))
  assert static["kv_pages"] == shared["kv_pages"] == 200
  # static: 100 pages / (2 layers x 2 requests) = 25 pages = 50 tokens per request.
  s = static["models"]["m0-mixtral"]
  assert (s["longest_context"], s["longest_context_cap"], s["longest_context_raw"]) == (50, 50, 100)
  assert s["kv_tokens_reachable"] == 100 and static["fleet_fill_tokens"] == 200
  # shared: the device's 100 pages for one request = 50 pages per layer = 100 tokens.
  h = shared["models"]["m0-mixtral"]
  assert (h["longest_context"], h["longest_context_raw"], h["kv_tokens_reachable"]) == (100,) * 3
  # crosspool: 32 experts fit one device (W=1); device 1 holds both models' other params:
  # (810752 - 2 x 365824) // 512 = 154 pages per device, 153 usable -> 76 per layer, 152 tokens.
  assert cross["weights_pool"]["devices"] == [0] and cross["weights_pool"]["resident_fraction"] == 1
  assert cross["kv_pages"] == 153
  c = cross["models"]["m0-mixtral"]
  assert (c["longest_context"], c["longest_context_raw"], c["kv_tokens_reachable"]) == (152,) * 3
  assert cross["fleet_fill_tokens"] == 152
  for m in ("m0-mixtral", "m1-mixtral"):  # the ordering this fleet has by construction
    assert (cross["models"][m]["longest_context"] >= shared["models"][m]["longest_context"]
            >= static["models"][m]["longest_context"])


def test_models_outnumber_devices_pack_and_split():
  # 3 models on 2 devices: device 0 holds two (200 pages, 199 usable), device 1 one.
  res = _run(3, num_devices=2, device_bytes=2 * W_TOTAL + 200 * PAGE,
             organisations=("static", "shared"))
  _all_agree(res)
  static, shared = res["organisations"]["static"], res["organisations"]["shared"]
  assert [p["models"] for p in static["placement"]] == [["m0-mixtral", "m2-mixtral"],
                                                        ["m1-mixtral"]]
  assert static["placement"][0]["kv_pages"] == 199
  s = static["models"]["m2-mixtral"]  # share 99 pages: 24 per request (x2 layers x2) -> 48 tok
  assert (s["longest_context"], s["longest_context_raw"], s["kv_tokens_reachable"]) == (48, 98, 96)
  h = shared["models"]["m2-mixtral"]  # the device's whole pool: 199 // 2 = 99 pages = 198 tokens
  assert (h["longest_context"], h["kv_tokens_reachable"]) == (198, 198)
  assert shared["fleet_fill"]["m0-mixtral"] + shared["fleet_fill"]["m2-mixtral"] <= 198


def test_context_cap_and_tensor_parallel_kv_replication():
  # One model must spread over 4 devices (tp=4): 1 KV head per rank while it has 2, so the KV
  # is replicated twice: 100 group pages / 2 layers x 4 tokens = 200 tokens, not 400.
  res = _run(1, num_devices=4, device_bytes=W_TOTAL // 4 + 101 * PAGE,
             organisations=("shared",))
  _all_agree(res)
  rec = res["organisations"]["shared"]["models"]["m0-mixtral"]
  assert rec["tp"] == 4 and rec["page_tokens"] == 4 and rec["longest_context_raw"] == 200
  capped = measure_capacity({"short": tiny_config("mixtral", max_position=64)}, num_devices=1,
                            device_bytes=W_TOTAL + 101 * PAGE, page_bytes=PAGE, dtype="float32",
                            max_batch=2, organisations=("shared",))
  _all_agree(capped)
  rec = capped["organisations"]["shared"]["models"]["short"]
  assert (rec["longest_context"], rec["longest_context_raw"]) == (64, 100)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v2"])
def test_tensor_parallel_degree_by_hand(family):
  """4 models on 4 devices, each device a model's weights and 101 pages (100 usable), 2
  layers. Tiny mixtral, 2 KV heads of 16: a 512 B page holds 2 tokens a layer on one device,
  4 on a rank of t = 2 or 4 (1 head per rank: at t = 4 each head is on 2 ranks). Tiny
  DeepSeek-V2, one latent row of 32 + 8: a 640 B page holds 4 rows on every rank, whatever t.
  A group of t devices holds 100 / 2 x (its page's tokens) tokens; D / t groups."""
  cfg = tiny_config(family)
  page = {"mixtral": 512, "deepseek_v2": 640}[family]
  weights = param_bytes(cfg, "float32")["total"]
  assert weights % 4 == 0  # a t-th of the weights on each rank, exactly
  tokens_per_page = {"mixtral": {1: 2, 2: 4, 4: 4}, "deepseek_v2": {1: 4, 2: 4, 4: 4}}[family]
  crosspool = set()
  for t in (1, 2, 4):
    res = measure_capacity([cfg] * 4, num_devices=4, device_bytes=weights + 101 * page,
                           page_bytes=page, dtype="float32", max_batch=2, tensor_parallel=t,
                           organisations=("shared", "crosspool"))
    _all_agree(res)
    shared = res["organisations"]["shared"]
    group_tokens = 100 // 2 * tokens_per_page[t]
    assert [p["devices"] for p in shared["placement"]] == [
        list(range(g, g + t)) for g in range(0, 4, t)]
    for rec in shared["models"].values():
      assert (rec["tp"], rec["page_tokens"]) == (t, tokens_per_page[t])
      assert rec["longest_context_raw"] == rec["kv_tokens_reachable"] == group_tokens
    assert shared["fleet_fill_tokens"] == 4 // t * group_tokens
    assert shared["kv_bytes"] == 4 * 100 * page  # every rank's buffer, at every t
    crosspool.add(res["organisations"]["crosspool"]["fleet_fill_tokens"])
  # GQA: K = 2 heads keep the fleet's tokens up to t = 2, half at t = 4 (min(1, K / t)); the
  # latent row: 1 / t. CrossPool's KV pool is not sharded by heads: the same at every t.
  assert len(crosspool) == 1


def test_tensor_parallel_degree_refused_by_name():
  with pytest.raises(ValueError, match="tensor_parallel=2 does not divide the 3 devices"):
    _run(3, num_devices=3, device_bytes=10 * W_TOTAL, tensor_parallel=2)
  with pytest.raises(ValueError, match="tensor_parallel=8 cannot shard a mixtral model of 4 "
                                       "query heads and 2 KV heads"):
    _run(8, num_devices=8, device_bytes=10 * W_TOTAL, tensor_parallel=8)
  with pytest.raises(ValueError, match="tensor_parallel=3 cannot shard a qwen3_moe model"):
    measure_capacity([tiny_config("qwen3_moe", num_heads=6, num_kv_heads=2)], num_devices=6,
                     device_bytes=10 * W_TOTAL, page_bytes=PAGE, dtype="float32",
                     max_batch=1, tensor_parallel=3)
  small = _run(2, num_devices=2, device_bytes=W_TOTAL // 4, tensor_parallel=2,
               organisations=("shared",))["organisations"]["shared"]["not_fit"]
  assert small["m0-mixtral"].endswith("(tensor_parallel=2: a device here is a group of 2, each "
                                       "holding 1/2 of the weights)")
  with pytest.raises(ValueError, match="tensor_parallel must be >= 1"):
    _run(1, num_devices=1, device_bytes=10 * W_TOTAL, tensor_parallel=0)


def test_crosspool_partial_residency_is_measured():
  # W=1 of 2 devices holding 29 expert slots of the 32: 29 pinned, 3 left to swap.
  res = _run(2, num_devices=2, device_bytes=2 * W_NON_EXPERT + 3 * PAGE,
             organisations=("crosspool",), crosspool_weight_devices=1)
  wp = res["organisations"]["crosspool"]["weights_pool"]
  assert wp["slots_per_device"] == 29 and wp["classes"] == 1
  assert wp["resident_experts"] == wp["resident_experts_closed_form"] == 29
  assert wp["resident_fraction"] == pytest.approx(29 / 32)
  assert res["organisations"]["crosspool"]["kv_pages"] == 2


def test_partitioned_weights_pool_gives_each_model_its_own_slots():
  # The budget above without consolidation: one class per model, so a slot costs 2 x 24576 B
  # per device and 733184 B hold 14 per model (28 experts resident, not 29 in one shared pool).
  res = _run(2, num_devices=2, device_bytes=2 * W_NON_EXPERT + 3 * PAGE,
             organisations=("crosspool", "crosspool_partitioned"), crosspool_weight_devices=1)
  _all_agree(res)
  shared, own = (res["organisations"][o]["weights_pool"]
                 for o in ("crosspool", "crosspool_partitioned"))
  assert (shared["classes"], shared["slots_per_device"], shared["resident_experts"]) == (1, 29, 29)
  assert (own["classes"], own["slots_per_device"], own["resident_experts"]) == (2, 14, 28)
  assert own["resident_experts_closed_form"] == 28


def test_budget_too_small_is_reported_not_raised():
  res = _run(2, num_devices=2, device_bytes=100_000)
  for org, out in res["organisations"].items():
    assert set(out["not_fit"]) == {"m0-mixtral", "m1-mixtral"}, org
    assert out["models"] == {} and out["fleet_fill_tokens"] == 0
  assert "do not fit" in res["organisations"]["static"]["not_fit"]["m0-mixtral"]
  assert res["organisations"]["crosspool"]["not_fit"]["m0-mixtral"].startswith(
      f"weights {W_NON_EXPERT} B do not fit on one device")  # its non-expert weights
  # a page that no model's heads divide: a reason, not a crash
  odd = measure_capacity([MIX], num_devices=2, device_bytes=10 * W_TOTAL, page_bytes=100,
                         dtype="float32", max_batch=1)
  assert all("multiple" in o["not_fit"]["m0-mixtral"] for o in odd["organisations"].values())
  with pytest.raises(ValueError, match="crosspool_weight_devices"):
    _run(1, num_devices=2, device_bytes=10 * W_TOTAL, crosspool_weight_devices=2)
  with pytest.raises(ValueError, match="page_bytes"):
    measure_capacity([MIX], num_devices=1, device_bytes=W_TOTAL, page_bytes=0, dtype="float32",
                     max_batch=1)


def test_format_table():
  res = _run(2, num_devices=2, device_bytes=W_TOTAL + 101 * PAGE)
  table = format_table(res)
  assert "crosspool" in table and "m1-mixtral" in table and "NO" not in table
  assert "does not fit" in format_table(_run(1, num_devices=2, device_bytes=100_000))
  sweep = [_run(2, num_devices=2, device_bytes=W_TOTAL + 101 * PAGE, tensor_parallel=t,
                organisations=("shared",)) for t in (1, 2)]
  rows = [line.split() for line in format_totals(sweep).splitlines()[2:]]
  assert rows == [[str(t), "shared", "0.0", str(r["organisations"]["shared"]["fleet_fill_tokens"]),
                   str(r["organisations"]["shared"]["models"]["m0-mixtral"]["longest_context_raw"])]
                  for t, r in zip((1, 2), sweep, strict=True)]
