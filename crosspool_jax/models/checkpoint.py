"""Saving and restoring our params with orbax, and loading any supported checkpoint directory.

An orbax checkpoint directory holds `model_config.json` (our ModelConfig plus the params'
dtype) and `params/` (orbax). Converting an HF checkpoint once and restoring the orbax copy
skips the safetensors parsing and layout transforms.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from crosspool_jax.models.config import ModelConfig, load_hf_config
from crosspool_jax.models.hf_import import load_hf_checkpoint
from crosspool_jax.models.model import abstract_params

_CONFIG_FILE = "model_config.json"


def save_params(path: str | os.PathLike, cfg: ModelConfig, params: dict, *,
                overwrite: bool = False) -> str:
  """Writes `params` and `cfg` to the orbax checkpoint directory `path` (made absolute)."""
  path = os.path.abspath(os.fspath(path))
  dtypes = {str(x.dtype) for x in jax.tree.leaves(params)}
  if len(dtypes) != 1:
    raise ValueError(f"params mix dtypes {sorted(dtypes)}; save_params expects one dtype")
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
  os.makedirs(path, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(path, "params"), params, force=overwrite)
  checkpointer.wait_until_finished()
  with open(os.path.join(path, _CONFIG_FILE), "w") as f:
    json.dump({"model": json.loads(cfg.to_json()), "dtype": dtypes.pop()}, f, indent=1)
  return path


def _read_meta(path: str) -> tuple[ModelConfig, str]:
  """(ModelConfig, params dtype name) from an orbax checkpoint's model_config.json."""
  config_path = os.path.join(path, _CONFIG_FILE)
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{path} is not an orbax checkpoint of ours (no {_CONFIG_FILE})")
  with open(config_path) as f:
    meta = json.load(f)
  return ModelConfig.from_json(json.dumps(meta["model"])), meta["dtype"]


def restore_params(path: str | os.PathLike) -> tuple[ModelConfig, dict]:
  """Restores (config, params) saved by `save_params`, into the saved dtype."""
  path = os.path.abspath(os.fspath(path))
  cfg, dtype = _read_meta(path)
  target = abstract_params(cfg, dtype=jnp.dtype(dtype))
  params = ocp.StandardCheckpointer().restore(os.path.join(path, "params"), target)
  return cfg, params


def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
  return os.path.exists(os.path.join(os.fspath(path), _CONFIG_FILE))


def read_model_config(path: str | os.PathLike) -> ModelConfig:
  """The ModelConfig of an HF or orbax checkpoint directory, without reading any weight."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint directory {path} does not exist")
  if is_orbax_checkpoint(path):
    return _read_meta(path)[0]
  return load_hf_config(path)


def load_checkpoint(path: str | os.PathLike, *, dtype=None) -> tuple[ModelConfig, dict]:
  """Loads an HF checkpoint directory or an orbax one of ours; casts to `dtype` if given."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint directory {path} does not exist")
  if is_orbax_checkpoint(path):
    cfg, params = restore_params(path)
    if dtype is not None:
      params = jax.tree.map(lambda x: x.astype(dtype), params)
    return cfg, params
  return load_hf_checkpoint(path, dtype=dtype or jnp.float32)
