"""The training objective against HF transformers: its forward, its loss with the router's
load-balancing term, and the coefficients its configs default to."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from crosspool_jax.models.config import tiny_config
from crosspool_jax.models.hf_import import load_hf_checkpoint
from crosspool_jax.models.model import KVCache, forward, forward_train, init_params
from crosspool_jax.train.objective import AUX_LOSS_COEF, expert_load, load_entropy, loss_fn
from tests.conftest import FAMILIES

pytestmark = pytest.mark.hf


def _tokens(b, t, seed=0):
  return np.random.default_rng(seed).integers(3, 259, (b, t)).astype(np.int32)


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe"])
def test_forward_train_equals_reference_forward(family):
  cfg = tiny_config(family)
  params = init_params(cfg, seed=3)
  tokens = _tokens(2, 12)
  positions = np.broadcast_to(np.arange(12, dtype=np.int32), (2, 12))
  ours, router_logits = forward_train(params, jnp.asarray(tokens), cfg=cfg)
  ref, _ = forward(params, jnp.asarray(tokens), jnp.asarray(positions),
                   KVCache.zeros(cfg, 2, 12), cfg=cfg)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=1e-5, rtol=0)
  assert router_logits.shape == (sum(cfg.moe_layers), 24, cfg.num_experts)


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_equals_transformers_loss_with_router_aux(family, tiny_checkpoint):
  path = tiny_checkpoint(family)
  cfg, params = load_hf_checkpoint(path)
  tokens = _tokens(3, 10, seed=1)
  model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                labels=torch.tensor(tokens, dtype=torch.long), output_router_logits=True)
  # HF shifts the labels: position t predicts token t + 1, the last position predicts nothing.
  targets = np.roll(tokens, -1, axis=1)
  mask = np.ones_like(tokens)
  mask[:, -1] = 0
  loss, parts = loss_fn(params, jnp.asarray(tokens), jnp.asarray(targets), jnp.asarray(mask),
                        cfg=cfg, aux_coef=AUX_LOSS_COEF[family])
  assert float(parts["aux"]) == pytest.approx(float(out.aux_loss), rel=1e-5)
  assert float(loss) == pytest.approx(float(out.loss), rel=1e-5)
  assert float(out.loss) != pytest.approx(float(parts["ce"]), rel=1e-7)  # the aux term counts


@pytest.mark.parametrize("family", FAMILIES)
def test_aux_loss_coefficients_are_the_hf_defaults(family):
  assert transformers.AutoConfig.for_model(family).router_aux_loss_coef == AUX_LOSS_COEF[family]


def test_expert_load_and_entropy_by_hand():
  cfg = tiny_config("mixtral", num_experts=4, top_k=1)
  # Layer 0 sends every token to expert 2, layer 1 spreads them over all four.
  logits = np.full((2, 4, 4), -5.0, np.float32)
  logits[0, :, 2] = 5.0
  logits[1, np.arange(4), np.arange(4)] = 5.0
  load = np.asarray(expert_load(jnp.asarray(logits), cfg))
  np.testing.assert_array_equal(load, [[0, 0, 1, 0], [0.25] * 4])
  assert float(load_entropy(jnp.asarray(load))) == pytest.approx(0.5)
