"""Import of HF checkpoints (config.json + *.safetensors) into our param dict, and export.

The safetensors files are read directly (header + memory map) with numpy and `ml_dtypes`
for bf16/fp8, so neither torch nor transformers is needed, bf16 checkpoints load, and a
truncated file is caught from its header before any tensor is used. transformers 5 keeps
experts fused in memory but saves them per expert (`...experts.{j}.w1` for Mixtral,
`...experts.{j}.gate_proj` for Qwen/OLMoE); that is the layout read here, and the one
`save_hf_checkpoint` writes (the same name mapping, `_entries`, read in both directions).
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections.abc import Iterator

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors.numpy

from crosspool_jax.models.config import LATENT_FAMILIES, ModelConfig, load_hf_config, to_hf_config

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}
# Buffers some exporters write that are not parameters.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
  """A checkpoint file or tensor is missing, malformed or does not fit the model."""


@dataclasses.dataclass(frozen=True)
class _TensorInfo:
  path: str
  dtype: str
  shape: tuple[int, ...]
  begin: int  # absolute byte offset in the file
  end: int


def read_safetensors_header(path: str) -> dict[str, _TensorInfo]:
  """Parses one .safetensors header and checks every tensor lies inside the file."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise CheckpointError(f"{path}: truncated file ({size} bytes, no header)")
    (n,) = struct.unpack("<Q", head)
    if 8 + n > size:
      raise CheckpointError(f"{path}: truncated file (header of {n} bytes, file {size} bytes)")
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from e
  infos = {}
  for name, meta in header.items():
    if name == "__metadata__":
      continue
    dtype, shape = meta["dtype"], tuple(meta["shape"])
    if dtype not in _DTYPES:
      raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
    begin, end = (8 + n + o for o in meta["data_offsets"])
    expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[dtype]).itemsize
    if end - begin != expected:
      raise CheckpointError(f"{path}: tensor {name!r} spans {end - begin} bytes, its shape "
                            f"{shape} and dtype {dtype} need {expected}")
    if end > size:
      raise CheckpointError(f"{path}: truncated file: tensor {name!r} ends at byte {end}, "
                            f"the file has {size}")
    infos[name] = _TensorInfo(path, dtype, shape, begin, end)
  return infos


class SafetensorsReader:
  """All tensors of a checkpoint directory (one file, or shards listed in an index)."""

  def __init__(self, checkpoint_dir: str):
    self.dir = checkpoint_dir
    index = os.path.join(checkpoint_dir, "model.safetensors.index.json")
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      files = sorted(set(weight_map.values()))
    else:
      files = sorted(f for f in os.listdir(checkpoint_dir) if f.endswith(".safetensors"))
      weight_map = None
    if not files:
      raise CheckpointError(f"no *.safetensors files in {checkpoint_dir}")
    self.tensors: dict[str, _TensorInfo] = {}
    for name in files:
      path = os.path.join(checkpoint_dir, name)
      if not os.path.exists(path):
        raise CheckpointError(f"shard {name} listed in model.safetensors.index.json is missing "
                              f"from {checkpoint_dir}")
      for key, info in read_safetensors_header(path).items():
        if key in self.tensors:
          raise CheckpointError(f"tensor {key!r} appears in two files: "
                                f"{self.tensors[key].path} and {path}")
        self.tensors[key] = info
    if weight_map is not None:
      for key, name in weight_map.items():
        if key not in self.tensors:
          raise CheckpointError(f"tensor {key!r} is in the index ({name}) but not in the file")

  def keys(self) -> set[str]:
    return set(self.tensors)

  def get(self, key: str) -> np.ndarray:
    if key not in self.tensors:
      raise CheckpointError(f"missing tensor {key!r} in {self.dir}")
    info = self.tensors[key]
    dtype = _DTYPES[info.dtype]
    count = int(np.prod(info.shape, dtype=np.int64))
    if count == 0:
      return np.zeros(info.shape, dtype)
    return np.memmap(info.path, dtype=dtype, mode="r", offset=info.begin,
                     shape=(count,)).reshape(info.shape)


# --- name mapping ------------------------------------------------------------------------

# (our param path, HF key(s), layout, the HF tensors' shape, our shape). Layouts, each read in
# both directions (`_to_ours` on import, `_to_hf` on export):
#   "same": one tensor, reshaped; "t": one tensor, transposed then reshaped (HF's Linear
#   weights are [out, in]); "stack_t": one tensor per expert, each transposed, stacked on E.
_Entry = tuple[tuple, tuple[str, ...], str, tuple[int, ...], tuple[int, ...]]


def _entries(cfg: ModelConfig) -> Iterator[_Entry]:
  d, n, k, h, v = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size
  yield ("embed_VD",), ("model.embed_tokens.weight",), "same", (v, d), (v, d)
  yield ("final_norm_D",), ("model.norm.weight",), "same", (d,), (d,)
  if not cfg.tie_embeddings:
    yield ("lm_head_DV",), ("lm_head.weight",), "t", (v, d), (d, v)
  moe_prefix = "block_sparse_moe" if cfg.family == "mixtral" else "mlp"
  names = ("w1", "w3", "w2") if cfg.family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
  for i in range(cfg.num_layers):
    pre = f"model.layers.{i}."
    at = pre + "self_attn."
    yield (i, "attn_norm_D"), (pre + "input_layernorm.weight",), "same", (d,), (d,)
    yield (i, "ffn_norm_D"), (pre + "post_attention_layernorm.weight",), "same", (d,), (d,)
    if cfg.mla:
      yield from _latent_attention_entries(cfg, i, at)
    else:
      yield (i, "attn", "w_q_DNH"), (at + "q_proj.weight",), "t", (n * h, d), (d, n, h)
      yield (i, "attn", "w_k_DKH"), (at + "k_proj.weight",), "t", (k * h, d), (d, k, h)
      yield (i, "attn", "w_v_DKH"), (at + "v_proj.weight",), "t", (k * h, d), (d, k, h)
      yield (i, "attn", "w_o_NHD"), (at + "o_proj.weight",), "t", (d, n * h), (n, h, d)
    if cfg.qkv_bias:
      yield (i, "attn", "b_q_NH"), (at + "q_proj.bias",), "same", (n * h,), (n, h)
      yield (i, "attn", "b_k_KH"), (at + "k_proj.bias",), "same", (k * h,), (k, h)
      yield (i, "attn", "b_v_KH"), (at + "v_proj.bias",), "same", (k * h,), (k, h)
    if cfg.qk_norm != "none":
      qn, kn = (h, h) if cfg.qk_norm == "per_head" else (n * h, k * h)
      yield (i, "attn", "q_norm"), (at + "q_norm.weight",), "same", (qn,), (qn,)
      yield (i, "attn", "k_norm"), (at + "k_norm.weight",), "same", (kn,), (kn,)
    if not cfg.moe_layers[i]:
      fd = cfg.d_ff_dense
      mlp = pre + "mlp."
      yield (i, "ffn", "w_gate_DF"), (mlp + "gate_proj.weight",), "t", (fd, d), (d, fd)
      yield (i, "ffn", "w_up_DF"), (mlp + "up_proj.weight",), "t", (fd, d), (d, fd)
      yield (i, "ffn", "w_down_FD"), (mlp + "down_proj.weight",), "t", (d, fd), (fd, d)
      continue
    moe = f"{pre}{moe_prefix}."
    f, e = cfg.d_ff_expert, cfg.num_experts
    yield (i, "ffn", "w_router_DE"), (moe + "gate.weight",), "t", (e, d), (d, e)
    if cfg.topk_method == "noaux_tc":
      yield (i, "ffn", "router_bias_E"), (moe + "gate.e_score_correction_bias",), "same", (e,), (
          e,)
    for ours, theirs, shape in (("w_gate_EDF", names[0], (f, d)), ("w_up_EDF", names[1], (f, d)),
                                ("w_down_EFD", names[2], (d, f))):
      keys = tuple(f"{moe}experts.{j}.{theirs}.weight" for j in range(e))
      yield (i, "ffn", ours), keys, "stack_t", shape, (e, *shape[::-1])
    if cfg.d_ff_shared:
      fs = cfg.d_ff_shared
      sh = moe + ("shared_experts." if cfg.family in LATENT_FAMILIES else "shared_expert.")
      yield (i, "ffn", "shared_w_gate_DF"), (sh + "gate_proj.weight",), "t", (fs, d), (d, fs)
      yield (i, "ffn", "shared_w_up_DF"), (sh + "up_proj.weight",), "t", (fs, d), (d, fs)
      yield (i, "ffn", "shared_w_down_FD"), (sh + "down_proj.weight",), "t", (d, fs), (fs, d)
      if cfg.shared_gate:
        yield (i, "ffn", "shared_gate_D1"), (moe + "shared_expert_gate.weight",), "t", (1, d), (
            d, 1)


def _latent_attention_entries(cfg: ModelConfig, i: int, at: str) -> Iterator[_Entry]:
  """The latent-attention params of layer `i` (DeepSeek's names, prefix `at`)."""
  d, n, a, row = cfg.d_model, cfg.num_heads, cfg.kv_lora_rank, cfg.head_dim
  qk, kv_b, v = cfg.qk_head_dim, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.v_head_dim
  if cfg.q_lora_rank is None:
    yield (i, "attn", "w_q_DNH"), (at + "q_proj.weight",), "t", (n * qk, d), (d, n, qk)
  else:
    r = cfg.q_lora_rank
    yield (i, "attn", "w_q_a_DA"), (at + "q_a_proj.weight",), "t", (r, d), (d, r)
    yield (i, "attn", "q_a_norm_A"), (at + "q_a_layernorm.weight",), "same", (r,), (r,)
    yield (i, "attn", "w_q_b_ANH"), (at + "q_b_proj.weight",), "t", (n * qk, r), (r, n, qk)
  yield (i, "attn", "w_kv_a_DH"), (at + "kv_a_proj_with_mqa.weight",), "t", (row, d), (d, row)
  yield (i, "attn", "kv_a_norm_A"), (at + "kv_a_layernorm.weight",), "same", (a,), (a,)
  yield (i, "attn", "w_kv_b_ANH"), (at + "kv_b_proj.weight",), "t", (n * kv_b, a), (a, n, kv_b)
  yield (i, "attn", "w_o_NHD"), (at + "o_proj.weight",), "t", (d, n * v), (n, v, d)


def _to_ours(layout: str, arrays: list[np.ndarray], ours: tuple[int, ...]) -> np.ndarray:
  """One param of ours from its HF tensor(s) (`_entries`' layouts)."""
  if layout == "stack_t":
    return np.stack([a.T for a in arrays])
  (a,) = arrays
  return np.ascontiguousarray((a.T if layout == "t" else a).reshape(ours))


def _to_hf(layout: str, x: np.ndarray, theirs: tuple[int, ...]) -> list[np.ndarray]:
  """The HF tensor(s) of one param of ours: the inverse of `_to_ours`."""
  if layout == "stack_t":
    return [np.ascontiguousarray(x_j.T) for x_j in x]
  if layout == "t":
    return [np.ascontiguousarray(x.reshape(theirs[::-1]).T)]
  return [np.ascontiguousarray(x.reshape(theirs))]


def _get(tree: dict, path: tuple):
  node = tree["layers"] if isinstance(path[0], int) else tree
  for key in path:
    node = node[key]
  return node


def _set(tree: dict, path: tuple, value) -> None:
  node = tree
  if isinstance(path[0], int):
    node = node.setdefault("layers", {})
  for key in path[:-1]:
    node = node.setdefault(key, {})
  node[path[-1]] = value


def load_hf_checkpoint(checkpoint_dir: str, *, dtype=jnp.float32,
                       check_finite: bool = True) -> tuple[ModelConfig, dict]:
  """Loads an HF MoE checkpoint directory into (config, param dict).

  Args:
    checkpoint_dir: directory with `config.json` and `model.safetensors` or shards with
      `model.safetensors.index.json`.
    dtype: dtype of the returned params (e.g. jnp.float32, jnp.bfloat16).
    check_finite: reject tensors holding NaN or Inf.

  Raises:
    UnsupportedConfigError: the config asks for something not implemented.
    CheckpointError: missing or unexpected tensor, wrong shape, NaN/Inf, truncated or corrupt
      file; the message names the tensor (and file).
  """
  checkpoint_dir = os.fspath(checkpoint_dir)
  cfg = load_hf_config(checkpoint_dir)
  reader = SafetensorsReader(checkpoint_dir)
  params: dict = {}
  used: set[str] = set()
  for path, keys, layout, shape, ours in _entries(cfg):
    arrays = []
    for key in keys:
      a = reader.get(key)
      if a.shape != shape:
        raise CheckpointError(f"tensor {key!r} has shape {a.shape}, expected {shape} "
                              f"for this config")
      is_float = not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_)
      if check_finite and is_float and not np.isfinite(a.astype(np.float32)).all():
        raise CheckpointError(f"tensor {key!r} contains NaN or Inf")
      arrays.append(a)
      used.add(key)
    _set(params, path, jnp.asarray(_to_ours(layout, arrays, ours), dtype=dtype))
  # DeepSeek-V3 checkpoints carry their multi-token-prediction layer after the last one (HF
  # ignores it too).
  mtp = f"model.layers.{cfg.num_layers}." if cfg.family == "deepseek_v3" else None
  unexpected = sorted(k for k in reader.keys() - used
                      if not k.endswith(_IGNORED_SUFFIXES)
                      and not (cfg.tie_embeddings and k == "lm_head.weight")
                      and not (mtp and k.startswith(mtp)))
  if unexpected:
    more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
    raise CheckpointError(f"unexpected tensor(s) in {checkpoint_dir} that this "
                          f"{cfg.family} config does not use: {unexpected[:5]}{more}")
  return cfg, params


def save_hf_checkpoint(checkpoint_dir: str | os.PathLike, cfg: ModelConfig, params: dict, *,
                       dtype=np.float32) -> str:
  """Writes (cfg, params) as an HF checkpoint directory: `config.json` and `model.safetensors`
  in the per-expert layout `load_hf_checkpoint` reads (and transformers loads); returns it.

  Args:
    checkpoint_dir: output directory (created; existing files of these names are replaced).
    cfg: the model's config (`to_hf_config` must express it).
    params: pure param dict of `cfg`.
    dtype: dtype of the saved tensors (float32 or ml_dtypes.bfloat16).
  """
  checkpoint_dir = os.fspath(checkpoint_dir)
  hf = to_hf_config(cfg) | {"dtype": "bfloat16" if np.dtype(dtype) == ml_dtypes.bfloat16
                            else np.dtype(dtype).name, "pad_token_id": 0}
  tensors = {}
  for path, keys, layout, shape, ours in _entries(cfg):
    x = np.asarray(_get(params, path), dtype=np.float32)
    if x.shape != ours:
      raise CheckpointError(f"param {'/'.join(map(str, path))} has shape {x.shape}, expected "
                            f"{ours} for this config")
    for key, tensor in zip(keys, _to_hf(layout, x, shape), strict=True):
      tensors[key] = tensor.astype(dtype)
  os.makedirs(checkpoint_dir, exist_ok=True)
  safetensors.numpy.save_file(tensors, os.path.join(checkpoint_dir, "model.safetensors"),
                              metadata={"format": "pt"})
  with open(os.path.join(checkpoint_dir, "config.json"), "w") as f:
    json.dump(hf, f, indent=1)
  return checkpoint_dir
