"""HF import errors name what is wrong; orbax round trips are bit-exact and keep dtypes; an
exported HF checkpoint reads back bit-exact and holds what transformers writes."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch as safetensors_torch
import torch

from crosspool_jax.models.checkpoint import load_checkpoint, restore_params, save_params
from crosspool_jax.models.config import LATENT_FAMILIES, UnsupportedConfigError, tiny_config
from crosspool_jax.models.hf_import import (
  CheckpointError,
  load_hf_checkpoint,
  save_hf_checkpoint,
)
from crosspool_jax.models.model import init_params
from tests.conftest import FAMILIES

EXPERT = "model.layers.0.mlp.experts.3.up_proj.weight"
Q_PROJ = "model.layers.2.self_attn.q_proj.weight"


@pytest.fixture
def qwen_copy(tiny_checkpoint, tmp_path):
  """A writable copy of the tiny qwen2_moe checkpoint (shared expert, biases, dense layer)."""
  dst = tmp_path / "ckpt"
  shutil.copytree(tiny_checkpoint("qwen2_moe"), dst)
  return dst


def _edit_tensors(path, edit):
  file = os.path.join(path, "model.safetensors")
  tensors = safetensors_torch.load_file(file)
  edit(tensors)
  safetensors_torch.save_file(tensors, file, metadata={"format": "pt"})


def test_missing_tensor_is_named(qwen_copy):
  _edit_tensors(qwen_copy, lambda t: t.pop(EXPERT))
  with pytest.raises(CheckpointError, match=f"missing tensor '{EXPERT}'"):
    load_hf_checkpoint(qwen_copy)


def test_unexpected_tensor_is_named(qwen_copy):
  _edit_tensors(qwen_copy, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.ones(2)}))
  with pytest.raises(CheckpointError, match="unexpected tensor.*model.layers.0.mlp.extra.weight"):
    load_hf_checkpoint(qwen_copy)


def test_wrong_shape_is_named(qwen_copy):
  _edit_tensors(qwen_copy, lambda t: t.update({Q_PROJ: torch.zeros(3, 5)}))
  with pytest.raises(CheckpointError, match=rf"'{Q_PROJ}' has shape \(3, 5\), expected"):
    load_hf_checkpoint(qwen_copy)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_tensor_is_named(qwen_copy, bad):
  def poison(t):
    t[EXPERT][1, 2] = bad
  _edit_tensors(qwen_copy, poison)
  with pytest.raises(CheckpointError, match=f"'{EXPERT}' contains NaN or Inf"):
    load_hf_checkpoint(qwen_copy)


def test_truncated_file_names_the_tensor(qwen_copy):
  file = qwen_copy / "model.safetensors"
  size = file.stat().st_size
  with open(file, "r+b") as f:
    f.truncate(size - 100)
  with pytest.raises(CheckpointError, match=r"truncated file: tensor '.*' ends at byte"):
    load_hf_checkpoint(qwen_copy)


def test_corrupt_header(qwen_copy):
  file = qwen_copy / "model.safetensors"
  data = bytearray(file.read_bytes())
  data[8:16] = b"\xff" * 8
  file.write_bytes(bytes(data))
  with pytest.raises(CheckpointError, match="corrupt safetensors header"):
    load_hf_checkpoint(qwen_copy)


def test_missing_shard_is_named(tiny_checkpoint, tmp_path):
  dst = tmp_path / "sharded"
  shutil.copytree(tiny_checkpoint("qwen3_moe", num_shards=3), dst)
  shard = sorted(f for f in os.listdir(dst) if f.endswith(".safetensors"))[1]
  os.remove(dst / shard)
  with pytest.raises(CheckpointError, match=f"shard {shard} listed in"):
    load_hf_checkpoint(dst)


def test_unsupported_model_type(qwen_copy):
  cfg = json.loads((qwen_copy / "config.json").read_text())
  (qwen_copy / "config.json").write_text(json.dumps(cfg | {"model_type": "llama"}))
  with pytest.raises(UnsupportedConfigError, match="model_type 'llama'"):
    load_hf_checkpoint(qwen_copy)


def test_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_checkpoint(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="no config.json"):
    load_checkpoint(tmp_path)


def test_no_weights(qwen_copy):
  os.remove(qwen_copy / "model.safetensors")
  with pytest.raises(CheckpointError, match=r"no \*.safetensors files"):
    load_hf_checkpoint(qwen_copy)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_orbax_round_trip_is_bit_exact(tiny_checkpoint, tmp_path, dtype):
  cfg, params = load_hf_checkpoint(tiny_checkpoint("qwen2_moe"), dtype=dtype)
  save_params(tmp_path / "orbax", cfg, params)
  cfg2, restored = restore_params(tmp_path / "orbax")
  assert cfg2 == cfg
  assert jax.tree.structure(restored) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored), strict=True):
    assert b.dtype == dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # load_checkpoint recognises the orbax directory.
  _, via_load = load_checkpoint(tmp_path / "orbax")
  assert jax.tree.leaves(via_load)[0].dtype == dtype


def test_orbax_refuses_to_overwrite(tiny_checkpoint, tmp_path):
  cfg, params = load_hf_checkpoint(tiny_checkpoint("mixtral"))
  save_params(tmp_path / "o", cfg, params)
  with pytest.raises(FileExistsError, match="overwrite=True"):
    save_params(tmp_path / "o", cfg, params)
  save_params(tmp_path / "o", cfg, params, overwrite=True)


@pytest.mark.parametrize("family", FAMILIES + LATENT_FAMILIES)
def test_hf_export_round_trip_is_bit_exact(family, tmp_path):
  cfg = tiny_config(family)
  params = init_params(cfg, seed=2)
  save_hf_checkpoint(tmp_path, cfg, params)
  cfg_back, params_back = load_hf_checkpoint(tmp_path)
  assert cfg_back == cfg
  jax.tree.map(np.testing.assert_array_equal, params, params_back)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_hf_export_writes_the_tensors_transformers_writes(family, tiny_checkpoint, tmp_path):
  src = tiny_checkpoint(family)
  cfg, params = load_hf_checkpoint(src)
  save_hf_checkpoint(tmp_path, cfg, params)
  theirs = safetensors_torch.load_file(os.path.join(src, "model.safetensors"))
  ours = safetensors_torch.load_file(tmp_path / "model.safetensors")
  assert set(ours) == set(theirs)
  for key, tensor in theirs.items():
    assert torch.equal(ours[key], tensor), key


def test_hf_export_names_a_misshapen_param(tmp_path):
  cfg = tiny_config("mixtral")
  params = init_params(cfg)
  params["layers"][1]["attn"]["w_q_DNH"] = params["layers"][1]["attn"]["w_q_DNH"][:, :2]
  with pytest.raises(CheckpointError, match=r"param 1/attn/w_q_DNH has shape \(64, 2, 16\)"):
    save_hf_checkpoint(tmp_path, cfg, params)
