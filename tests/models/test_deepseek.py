"""DeepSeek-V2/V3 beyond the HF parity runs: hand-computed routing (V2's group-limited
selection, V3's biased selection), latent attention's absorbed form against its expanded one,
the training forward and the config fields refused by name. On the page pool:
tests/models/test_paged.py, test_stages.py, tests/engine/test_latent_engine.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crosspool_jax.capacity.references import REFERENCE_HF_CONFIGS
from crosspool_jax.models import layers
from crosspool_jax.models.config import (
    LATENT_FAMILIES,
    ModelConfig,
    UnsupportedConfigError,
    from_hf_config,
    tiny_config,
    to_hf_config,
)
from crosspool_jax.models.model import KVCache, forward, forward_train, init_params


def _chosen(ids_TK, weights_TK):
  """{expert: weight} of the one token routed."""
  return dict(zip(np.asarray(ids_TK)[0].tolist(), np.asarray(weights_TK)[0].tolist(),
                  strict=True))


def test_v2_group_limited_selection_by_hand():
  # 4 groups of 2 experts, probabilities (logits = their logs, so the softmax returns them):
  # group maxima 0.20, 0.22, 0.19, 0.17 -> the 2 best groups are 1 and 0, so the top-3 is
  # experts 2, 0, 3 (0.22, 0.20, 0.02). Plain greedy takes 2, 0, 4 (0.19); scoring groups by
  # their best two (V3's rule: 0.21, 0.24, 0.37, 0.18) would take 2, 4, 5.
  probs = np.array([0.20, 0.01, 0.22, 0.02, 0.19, 0.18, 0.17, 0.01], np.float32)
  logits_TE = jnp.log(jnp.asarray(probs))[None]
  cfg = tiny_config("deepseek_v2")
  assert (cfg.top_k, cfg.n_group, cfg.topk_group, cfg.routed_scaling_factor) == (3, 4, 2, 2.0)
  got = _chosen(*layers.route_logits(logits_TE, cfg))
  assert got.keys() == {2, 0, 3}
  np.testing.assert_allclose([got[2], got[0], got[3]], [0.44, 0.40, 0.04], rtol=1e-5)
  greedy = dataclasses.replace(cfg, topk_method="greedy", n_group=1, topk_group=1)
  assert _chosen(*layers.route_logits(logits_TE, greedy)).keys() == {2, 0, 4}


def test_v3_biased_selection_by_hand():
  # Sigmoid scores s and correction bias b (only expert 7's is not 0). Group scores, the sum of
  # each group's two best s + b: 1.0, 1.15, 1.0, 1.3 -> groups 3 and 1; the best two s + b
  # there: expert 7 (0.5 + 0.3) and expert 2 (0.6). Their weights are the unbiased scores
  # 0.5 and 0.6, normalised (/ 1.1) and scaled by 2.5. Without the groups the choice would be
  # experts 0 and 4 (0.9, 0.8).
  s = np.array([0.9, 0.1, 0.6, 0.55, 0.8, 0.2, 0.5, 0.5], np.float64)
  logits_TE = jnp.asarray(np.log(s / (1 - s)), jnp.float32)[None]
  bias_E = jnp.asarray([0, 0, 0, 0, 0, 0, 0, 0.3], jnp.float32)
  cfg = tiny_config("deepseek_v3")
  assert (cfg.top_k, cfg.n_group, cfg.topk_group, cfg.norm_topk_prob,
          cfg.routed_scaling_factor) == (2, 4, 2, True, 2.5)
  got = _chosen(*layers.route_logits(logits_TE, cfg, bias_E))
  assert got.keys() == {7, 2}
  np.testing.assert_allclose([got[7], got[2]], [2.5 * 0.5 / 1.1, 2.5 * 0.6 / 1.1], rtol=1e-6)
  # one group holding all: the bias alone decides (s + b: 0.9, 0.8, 0.8 -> 0, then 4 or 7)
  everything = dataclasses.replace(cfg, n_group=1, topk_group=1)
  assert 0 in _chosen(*layers.route_logits(logits_TE, everything, bias_E))


def _prompts(cfg, b=3, t=7, seed=0):
  rng = np.random.default_rng(seed)
  lengths = [t, 3, 5][:b]
  tokens = rng.integers(0, cfg.vocab_size, (b, t)).astype(np.int32)
  positions = np.full((b, t), -1, np.int32)
  for i, n in enumerate(lengths):
    positions[i, :n] = np.arange(n)
  return jnp.asarray(tokens), jnp.asarray(positions), np.array(lengths)


@pytest.mark.parametrize("family", LATENT_FAMILIES)
@pytest.mark.parametrize("q_lora_rank", [48, None])
def test_absorbed_form_equals_expanded_form(family, q_lora_rank):
  cfg = tiny_config(family, q_lora_rank=q_lora_rank)
  params = init_params(cfg, seed=3)
  tokens, positions, lengths = _prompts(cfg)
  b, t = tokens.shape
  outs = {}
  for absorbed in (False, True):
    cache = KVCache.zeros(cfg, b, t + 2)
    prefill, cache = forward(params, tokens, positions, cache, cfg=cfg, absorbed=absorbed)
    # one decode token per row after its prompt, in the same form
    step, _ = forward(params, tokens[:, :1], jnp.asarray(lengths)[:, None], cache, cfg=cfg,
                      absorbed=absorbed)
    outs[absorbed] = (np.asarray(prefill)[np.asarray(positions) >= 0], np.asarray(step))
  for expanded, absorbed in zip(outs[False], outs[True], strict=True):
    np.testing.assert_allclose(absorbed, expanded, atol=1e-5, rtol=0)
    assert np.abs(expanded).max() > 0.1


@pytest.mark.parametrize("family", LATENT_FAMILIES)
def test_cache_holds_one_latent_row_per_token(family):
  cfg = tiny_config(family)
  cache = KVCache.zeros(cfg, 2, 5)
  assert cache.v_LBKCH == ()
  assert [k.shape for k in cache.k_LBKCH] == [(2, 1, 5, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
                                              ] * cfg.num_layers


@pytest.mark.parametrize("family", LATENT_FAMILIES)
def test_training_forward_equals_reference_forward(family):
  cfg = tiny_config(family)
  params = init_params(cfg, seed=1)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 6)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(6, dtype=jnp.int32), (2, 6))
  ours, _ = forward(params, tokens, positions, KVCache.zeros(cfg, 2, 6), cfg=cfg)
  trained, router_logits = forward_train(params, tokens, cfg=cfg)
  np.testing.assert_allclose(np.asarray(trained), np.asarray(ours), atol=1e-5, rtol=0)
  assert router_logits.shape == (sum(cfg.moe_layers), 12, cfg.num_experts)


# DeepSeek-V2-Lite's public config.json (the fields a ModelConfig reads).
DEEPSEEK_V2_LITE = REFERENCE_HF_CONFIGS["deepseek-v2-lite"]


def test_yarn_of_deepseek_v2_lite_by_hand():
  cfg = from_hf_config(DEEPSEEK_V2_LITE)
  # the ramp's ends: 64 ln(4096 / (2 pi beta)) / (2 ln 10000) for beta 32 and 1: 10.47 and
  # 22.51, floored and ceiled; attention_factor = mscale(40, 0.707) / mscale(40, 0.707) = 1;
  # the softmax scale x mscale(40, 0.707)^2 = (0.1 x 0.707 x ln 40 + 1)^2
  assert cfg.rope_yarn == (40.0, 10.0, 23.0, 1.0)
  assert cfg.attn_mscale == pytest.approx((0.0707 * np.log(40) + 1) ** 2)
  assert cfg.attn_scale == pytest.approx(cfg.attn_mscale / np.sqrt(192))
  # the rope_parameters spelling of transformers 5 reads the same
  modern = {k: v for k, v in DEEPSEEK_V2_LITE.items() if k not in ("rope_scaling", "rope_theta")}
  modern["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0} | {
      k: v for k, v in DEEPSEEK_V2_LITE["rope_scaling"].items() if k != "type"}
  assert from_hf_config(modern) == cfg
  assert ModelConfig.from_json(cfg.to_json()) == cfg
  with pytest.raises(UnsupportedConfigError, match="with YaRN RoPE cannot be exported"):
    to_hf_config(cfg)


@pytest.mark.parametrize(("family", "change", "message"), [
    ("deepseek_v3", {"rope_parameters": {"rope_type": "linear", "factor": 4.0,
                                         "rope_theta": 1e4}}, "rope_type 'linear'"),
    ("deepseek_v2", {"rope_parameters": None, "rope_scaling": {"type": "yarn"}},
     "rope_scaling lacks 'factor'"),
    ("deepseek_v2", {"moe_layer_freq": 2}, "moe_layer_freq=2"),
    ("deepseek_v2", {"norm_topk_prob": True}, "norm_topk_prob"),
    ("deepseek_v2", {"topk_method": "noaux_tc"}, "topk_method 'noaux_tc'"),
    ("deepseek_v3", {"scoring_func": "softmax"}, "scoring_func 'softmax'"),
    ("deepseek_v3", {"num_key_value_heads": 2}, "num_key_value_heads=2"),
    ("deepseek_v2", {"mlp_bias": True}, "mlp_bias"),
])
def test_unsupported_deepseek_fields_are_named(family, change, message):
  hf = {k: v for k, v in (to_hf_config(tiny_config(family)) | change).items() if v is not None}
  with pytest.raises(UnsupportedConfigError, match=message):
    from_hf_config(hf)


def test_missing_latent_dims_are_named():
  hf = to_hf_config(tiny_config("deepseek_v3"))
  del hf["kv_lora_rank"]
  with pytest.raises(UnsupportedConfigError, match="kv_lora_rank"):
    from_hf_config(hf)


@pytest.mark.parametrize(("change", "message"), [
    ({"n_group": 3}, r"n_group \(3\) must divide num_experts \(8\)"),
    ({"topk_group": 5}, r"topk_group \(5\) must be in \[1, n_group = 4\]"),
    ({"top_k": 5}, r"top_k \(5\) exceeds the experts of topk_group groups \(2 x 2\)"),
    ({"head_dim": 32}, "num_kv_heads must be 1 and head_dim 40"),
    ({"qk_rope_head_dim": 7, "head_dim": 39}, "qk_rope_head_dim must be even"),
])
def test_invalid_latent_configs_rejected(change, message):
  with pytest.raises(ValueError, match=message):
    tiny_config("deepseek_v3", **change)


def test_round_trip_of_every_variant():
  for family in LATENT_FAMILIES:
    for overrides in ({}, {"q_lora_rank": None}, {"rope_interleave": False},
                      {"num_layers": 3, "moe_layers": (False, False, True)}):
      if family == "deepseek_v2" and "rope_interleave" in overrides:
        continue  # V2's RoPE is always interleaved
      cfg = tiny_config(family, **overrides)
      assert from_hf_config(to_hf_config(cfg)) == cfg
      assert ModelConfig.from_json(cfg.to_json()) == cfg
  with pytest.raises(UnsupportedConfigError, match="rope_interleave=False"):
    to_hf_config(tiny_config("deepseek_v2", rope_interleave=False))


def test_params_have_the_latent_shapes():
  cfg = tiny_config("deepseek_v3")
  attn = jax.tree.map(lambda x: x.shape, init_params(cfg)["layers"][1])
  assert attn["attn"] == {"w_q_a_DA": (64, 48), "q_a_norm_A": (48,), "w_q_b_ANH": (48, 4, 24),
                          "w_kv_a_DH": (64, 40), "kv_a_norm_A": (32,),
                          "w_kv_b_ANH": (32, 4, 28), "w_o_NHD": (4, 12, 64)}
  assert attn["ffn"]["router_bias_E"] == (8,) and "shared_gate_D1" not in attn["ffn"]
