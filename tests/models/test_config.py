"""Family configs: HF config.json mapping, its inverse, and unsupported options."""

import pytest

from crosspool_jax.models.config import (
    FAMILIES,
    ModelConfig,
    UnsupportedConfigError,
    from_hf_config,
    tiny_config,
    to_hf_config,
)


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_config_round_trip(family):
  cfg = tiny_config(family)
  assert from_hf_config(to_hf_config(cfg)) == cfg
  assert ModelConfig.from_json(cfg.to_json()) == cfg


def test_qwen_dense_layer_rule_matches_hf():
  # HF: layer i is sparse iff i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0.
  hf = to_hf_config(tiny_config("qwen2_moe", num_layers=6, moe_layers=(True,) * 6))
  hf |= {"decoder_sparse_step": 2, "mlp_only_layers": [3]}
  assert from_hf_config(hf).moe_layers == (False, True, False, False, False, True)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, "model_type 'llama' is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"attention_bias": True}, "attention_bias"),
])
def test_unsupported_options_are_named(change, message):
  hf = to_hf_config(tiny_config("qwen3_moe")) | change
  with pytest.raises(UnsupportedConfigError, match=message):
    from_hf_config(hf)


def test_missing_field_is_named():
  hf = to_hf_config(tiny_config("mixtral"))
  del hf["num_experts_per_tok"]
  with pytest.raises(UnsupportedConfigError, match="num_experts_per_tok"):
    from_hf_config(hf)


def test_sliding_window_limits_max_context():
  hf = to_hf_config(tiny_config("mixtral")) | {"sliding_window": 64}
  cfg = from_hf_config(hf)
  assert cfg.sliding_window == 64 and cfg.max_context == 64


def test_invalid_shapes_rejected():
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    tiny_config("mixtral", num_heads=6, num_kv_heads=4)
  with pytest.raises(ValueError, match="top_k"):
    tiny_config("mixtral", top_k=9)
