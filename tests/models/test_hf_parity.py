"""Every family vs HF transformers on a tiny random f32 checkpoint, and on trained ones (a few
optax steps on the stdlib corpus, exported by `save_hf_checkpoint`): logits and greedy tokens.
The DeepSeek families run three times: their tiny default (q LoRA, interleaved RoPE), a variant
(a plain q projection; V3 also the rotate-half RoPE layout) and with YaRN RoPE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from crosspool_jax.models.config import LATENT_FAMILIES
from crosspool_jax.models.decode import generate
from crosspool_jax.models.hf_import import load_hf_checkpoint
from crosspool_jax.models.model import KVCache, forward
from crosspool_jax.models.tokenizer import load_tokenizer
from tests.conftest import FAMILIES

pytestmark = pytest.mark.hf

LOGITS_ATOL = 1e-4
# (family, kind): every family's random checkpoint (written by transformers) and, for the
# logits, trained checkpoints (written by us) of the families with the most switches (dense
# layers and a shared expert; full q/k norm and clip). Greedy decoding of a model trained
# for seconds emits spaces (the most frequent byte), so greedy parity runs on random ones.
RANDOM = [*((f, "random") for f in FAMILIES + LATENT_FAMILIES),
          *((f, kind) for f in LATENT_FAMILIES for kind in ("variant", "yarn"))]
CHECKPOINTS = [*RANDOM, ("qwen2_moe", "trained"), ("olmoe", "trained")]
VARIANTS = {"deepseek_v2": {"q_lora_rank": None},
            "deepseek_v3": {"q_lora_rank": None, "rope_interleave": False}}
# YaRN over the tiny models' rotary dim 8: factor 4 from 256 to their 1024 positions, the ramp
# over frequencies 0-2, cos/sin x 1.025 (mscale 1 over mscale_all_dim 0.8), softmax scale
# x 1.23 (mscale_all_dim's mscale squared).
YARN = {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                            "original_max_position_embeddings": 256, "mscale": 1.0,
                            "mscale_all_dim": 0.8, "beta_fast": 32, "beta_slow": 1}}
PROMPTS = ([5, 17, 300, 42, 7, 99, 256, 3, 11], [12, 400, 8], [61, 62, 63, 64, 65, 66])
# A trained byte-level model continues text (random ids would make it emit spaces).
TEXT_PROMPTS = ("def __init__(self, ", "Return the", "import os\n")


def _hf_model(path):
  return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _left_padded(prompts):
  width = max(map(len, prompts))
  ids = np.zeros((len(prompts), width), np.int64)
  mask = np.zeros((len(prompts), width), np.int64)
  for i, p in enumerate(prompts):
    ids[i, width - len(p):] = p
    mask[i, width - len(p):] = 1
  return torch.tensor(ids), torch.tensor(mask)


def _checkpoint(request, family, kind):
  """(checkpoint directory, prompts) of a random, random variant or trained checkpoint of
  `family`."""
  overrides = {"random": {}, "variant": VARIANTS.get(family), "yarn": {"hf_fields": YARN}}
  if kind in overrides:
    return request.getfixturevalue("tiny_checkpoint")(family, **overrides[kind]), PROMPTS
  path = request.getfixturevalue("trained_checkpoint")(family)
  return path, tuple(load_tokenizer(path).encode(t).ids for t in TEXT_PROMPTS)


@pytest.mark.parametrize(("family", "kind"), CHECKPOINTS)
def test_logits_match_transformers_on_ragged_batch(family, kind, request):
  path, prompts = _checkpoint(request, family, kind)
  cfg, params = load_hf_checkpoint(path)
  ids, mask = _left_padded(prompts)
  position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
  with torch.no_grad():
    hf_logits = _hf_model(path)(input_ids=ids, attention_mask=mask,
                                position_ids=position_ids).logits.numpy()

  width = max(map(len, prompts))
  tokens = np.zeros((len(prompts), width), np.int32)
  positions = np.full((len(prompts), width), -1, np.int32)
  for i, p in enumerate(prompts):  # ours right-pads
    tokens[i, : len(p)] = p
    positions[i, : len(p)] = np.arange(len(p))
  cache = KVCache.zeros(cfg, len(prompts), width)
  logits, _ = forward(params, jnp.asarray(tokens), jnp.asarray(positions), cache, cfg=cfg)
  logits = np.asarray(logits)
  for i, p in enumerate(prompts):
    ours, theirs = logits[i, : len(p)], hf_logits[i, width - len(p):]
    np.testing.assert_allclose(ours, theirs, atol=LOGITS_ATOL, rtol=0,
                               err_msg=f"{family} prompt {i}")
  # The logits must be informative, not all ~0 (a vacuous match).
  assert np.abs(hf_logits).max() > 0.1


@pytest.mark.parametrize(("family", "kind"), RANDOM)
def test_greedy_generation_matches_transformers(family, kind, request):
  path, prompts = _checkpoint(request, family, kind)
  cfg, params = load_hf_checkpoint(path)
  new_tokens = 24
  ids, mask = _left_padded(prompts)
  with torch.no_grad():
    out = _hf_model(path).generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                   max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                   pad_token_id=0, eos_token_id=None)
  theirs = out[:, ids.shape[1]:].tolist()
  ours = generate(params, cfg, list(prompts), max_new_tokens=new_tokens)
  assert ours == theirs
  assert any(len(set(t)) > 3 for t in ours)  # not a degenerate constant sequence


def test_sharded_checkpoint_loads_like_single_file(tiny_checkpoint):
  _, single = load_hf_checkpoint(tiny_checkpoint("qwen3_moe"))
  sharded_dir = tiny_checkpoint("qwen3_moe", num_shards=3)
  assert sum(f.endswith(".safetensors") for f in __import__("os").listdir(sharded_dir)) > 1
  _, sharded = load_hf_checkpoint(sharded_dir)
  jax.tree.map(np.testing.assert_array_equal, single, sharded)


def test_bf16_load_and_generation(tiny_checkpoint):
  path = tiny_checkpoint("mixtral")
  cfg, p32 = load_hf_checkpoint(path)
  _, p16 = load_hf_checkpoint(path, dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p16))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a.astype(jnp.bfloat16)),
                                                          np.asarray(b)), p32, p16)
  prompt = PROMPTS[0]
  tokens = jnp.asarray([prompt], jnp.int32)
  positions = jnp.arange(len(prompt), dtype=jnp.int32)[None]
  ours, _ = forward(p16, tokens, positions, KVCache.zeros(cfg, 1, 16, jnp.bfloat16), cfg=cfg)
  assert ours.dtype == jnp.float32
  hf16 = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
  with torch.no_grad():
    theirs = hf16(torch.tensor([prompt])).logits.float().numpy()
  # bf16 rounding may flip a near-tied top-k routing choice at a few positions (differently
  # here and in torch), so the bound is on the typical position, not the worst one.
  per_position = np.abs(np.asarray(ours) - theirs).max(-1)[0]
  assert np.median(per_position) < 0.03, per_position
  out = generate(p16, cfg, [prompt], max_new_tokens=8)
  assert len(out[0]) == 8
