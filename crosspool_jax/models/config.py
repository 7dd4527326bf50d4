"""Model configuration: one dataclass for every supported MoE family, read from HF config.json.

Each family differs only in a few switches (q/k norm, biases, router normalisation, shared
expert, dense layers; DeepSeek's multi-head latent attention and group-limited routing).
`from_hf_config` maps a family's `config.json` onto those switches and rejects what the model
does not implement, naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Literal, get_args

# Families with grouped-query attention (K and V per head): every path, training and the
# scripts' tiny fleets included.
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
# Families with multi-head latent attention: a page of the KV pool holds one latent row per
# token (`ModelConfig.kv_stores` 1), not per-head K and V.
LATENT_FAMILIES = ("deepseek_v2", "deepseek_v3")
MODEL_FAMILIES = FAMILIES + LATENT_FAMILIES

QKNorm = Literal["none", "per_head", "full"]
# greedy: softmax, top-k; group_limited_greedy (DeepSeek-V2): softmax, top-k inside the
# `topk_group` groups with the highest max score; noaux_tc (DeepSeek-V3): sigmoid, top-k by
# score + correction bias inside the groups with the highest sum of their top-2 biased scores,
# weighted by the unbiased scores.
TopkMethod = Literal["greedy", "group_limited_greedy", "noaux_tc"]
TOPK_METHODS = get_args(TopkMethod)
# The RMSNorms of DeepSeek's latent projections (q_a_layernorm, kv_a_layernorm) are built
# without the config's rms_norm_eps: HF uses their default epsilon.
LATENT_NORM_EPS = 1e-6


class UnsupportedConfigError(ValueError):
  """The checkpoint's config asks for something this implementation does not do."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of one MoE decoder-only transformer.

  Attributes:
    family: HF `model_type` the config came from.
    vocab_size: V.
    d_model: D, the residual width (`hidden_size`).
    num_layers: L.
    num_heads: N, query heads.
    num_kv_heads: K, key/value heads (N % K == 0; GQA). 1 with latent attention: the cache's
      one "KV head" is each token's latent row.
    head_dim: H. With latent attention, the width of the cached latent row:
      kv_lora_rank + qk_rope_head_dim.
    d_ff_expert: F of each routed expert.
    num_experts: E routed experts per MoE layer.
    top_k: experts per token.
    norm_topk_prob: renormalise the top-k weights to sum to 1.
    d_ff_dense: F of the dense MLP of layers that are not MoE (0 if none).
    moe_layers: for each layer, True if its FFN is the MoE block, False if a dense MLP.
    d_ff_shared: F of the shared expert (0 = none); with `shared_gate` it is gated by
      sigmoid(x @ w_gate_D1) (Qwen2-MoE), else added as is (DeepSeek's n_shared_experts x
      moe_intermediate_size).
    shared_gate: the shared expert has a sigmoid gate.
    qk_norm: "none", "per_head" (RMSNorm over H, Qwen3) or "full" (over N*H / K*H, OLMoE).
    qkv_bias: q/k/v projections have biases (Qwen2-MoE).
    clip_qkv: clamp q, k, v to [-clip_qkv, clip_qkv] after projection (OLMoE), or None.
    rope_theta: RoPE base.
    rms_eps: RMSNorm epsilon.
    tie_embeddings: the LM head is the transposed embedding.
    max_position: `max_position_embeddings`, the longest context the checkpoint claims.
    sliding_window: attention window (tokens) or None. Only contexts that fit in the window
      are served (then windowed and full attention agree); longer ones raise.
    bos_token_id, eos_token_id: from the config, informational.
    kv_lora_rank: multi-head latent attention (DeepSeek) if > 0: the width of the compressed
      latent c_kv cached per token (with the shared rotary key of qk_rope_head_dim); 0 = GQA.
    q_lora_rank: latent attention's query: None = one projection, else a low-rank
      projection of this width, RMSNorm, then the heads.
    qk_nope_head_dim, qk_rope_head_dim: the parts of a latent-attention query/key head without
      and with rotary embedding (the rotary key is one head shared by all query heads).
    v_head_dim: latent attention's value head dim.
    rope_interleave: rotary embedding on interleaved pairs (x0, x1), (x2, x3), ... (DeepSeek)
      instead of the two halves.
    topk_method: the router (`TopkMethod`).
    n_group, topk_group: the experts' groups and how many of them a token may pick from
      (group-limited methods).
    routed_scaling_factor: multiplies the routed experts' weights (after normalisation).
    rope_yarn: YaRN rotary scaling (latent attention only) as (factor, low, high,
      attention_factor): each frequency blends theta's and theta's / factor by a linear ramp
      over the frequency index from low to high, and cos and sin are multiplied by
      attention_factor; None = plain RoPE.
    attn_mscale: multiplies the softmax scale (YaRN's mscale(factor, mscale_all_dim)^2).
  """

  family: str
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  d_ff_expert: int
  num_experts: int
  top_k: int
  norm_topk_prob: bool
  d_ff_dense: int
  moe_layers: tuple[bool, ...]
  d_ff_shared: int = 0
  qk_norm: QKNorm = "none"
  qkv_bias: bool = False
  clip_qkv: float | None = None
  rope_theta: float = 10000.0
  rms_eps: float = 1e-6
  tie_embeddings: bool = False
  max_position: int = 4096
  sliding_window: int | None = None
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  shared_gate: bool = True
  kv_lora_rank: int = 0
  q_lora_rank: int | None = None
  qk_nope_head_dim: int = 0
  qk_rope_head_dim: int = 0
  v_head_dim: int = 0
  rope_interleave: bool = False
  topk_method: TopkMethod = "greedy"
  n_group: int = 1
  topk_group: int = 1
  routed_scaling_factor: float = 1.0
  rope_yarn: tuple[float, float, float, float] | None = None
  attn_mscale: float = 1.0

  def __post_init__(self):
    positive = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                "d_ff_expert", "num_experts", "top_k", "max_position")
    for name in positive:
      if getattr(self, name) <= 0:
        raise ValueError(f"ModelConfig.{name} must be > 0, got {getattr(self, name)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                       f"({self.num_kv_heads})")
    if self.top_k > self.num_experts:
      raise ValueError(f"top_k ({self.top_k}) exceeds num_experts ({self.num_experts})")
    if len(self.moe_layers) != self.num_layers:
      raise ValueError(f"moe_layers has {len(self.moe_layers)} entries, num_layers is "
                       f"{self.num_layers}")
    if not all(self.moe_layers) and self.d_ff_dense <= 0:
      raise ValueError("dense layers need d_ff_dense > 0")
    if self.qk_norm not in ("none", "per_head", "full"):
      raise ValueError(f"qk_norm must be 'none', 'per_head' or 'full', got {self.qk_norm!r}")
    if self.mla:
      self._check_latent_attention()
    elif self.q_lora_rank is not None or self.rope_yarn is not None or self.attn_mscale != 1.0:
      raise ValueError("q_lora_rank, rope_yarn and attn_mscale need latent attention "
                       "(kv_lora_rank > 0)")
    self._check_routing()

  def _check_latent_attention(self):
    for name in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
      if getattr(self, name) <= 0:
        raise ValueError(f"latent attention needs ModelConfig.{name} > 0, got "
                         f"{getattr(self, name)}")
    if self.qk_rope_head_dim % 2:
      raise ValueError(f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
    if self.q_lora_rank is not None and self.q_lora_rank <= 0:
      raise ValueError(f"q_lora_rank must be None or > 0, got {self.q_lora_rank}")
    row = self.kv_lora_rank + self.qk_rope_head_dim
    if self.num_kv_heads != 1 or self.head_dim != row:
      raise ValueError(f"latent attention caches one row of kv_lora_rank + qk_rope_head_dim = "
                       f"{row} per token: num_kv_heads must be 1 and head_dim {row}, got "
                       f"{self.num_kv_heads} and {self.head_dim}")
    if self.qk_norm != "none" or self.qkv_bias or self.clip_qkv is not None:
      raise ValueError("latent attention has no q/k norm, qkv bias or clip_qkv")

  def _check_routing(self):
    if self.topk_method not in TOPK_METHODS:
      raise ValueError(f"topk_method must be one of {TOPK_METHODS}, got {self.topk_method!r}")
    if self.routed_scaling_factor <= 0:
      raise ValueError(f"routed_scaling_factor must be > 0, got {self.routed_scaling_factor}")
    if self.topk_method == "greedy":
      if (self.n_group, self.topk_group) != (1, 1):
        raise ValueError("greedy routing has no expert groups: n_group and topk_group must be 1")
      return
    if self.n_group <= 0 or self.num_experts % self.n_group:
      raise ValueError(f"n_group ({self.n_group}) must divide num_experts ({self.num_experts})")
    if not 0 < self.topk_group <= self.n_group:
      raise ValueError(f"topk_group ({self.topk_group}) must be in [1, n_group = "
                       f"{self.n_group}]")
    per_group = self.num_experts // self.n_group
    if self.top_k > self.topk_group * per_group:
      raise ValueError(f"top_k ({self.top_k}) exceeds the experts of topk_group groups "
                       f"({self.topk_group} x {per_group})")
    if self.topk_method == "noaux_tc" and per_group < 2:
      raise ValueError(f"noaux_tc scores a group by its top-2 experts: num_experts / n_group "
                       f"must be >= 2, got {per_group}")

  @property
  def mla(self) -> bool:
    """Multi-head latent attention (the DeepSeek families): a latent row cached per token."""
    return self.kv_lora_rank > 0

  @property
  def kv_stores(self) -> int:
    """Arrays a layer caches per KV head and token: K and V (2), or latent attention's one
    row (1: the latent c_kv and the rope key, `head_dim` wide, no V)."""
    return 1 if self.mla else 2

  @property
  def qk_head_dim(self) -> int:
    """Head dim of the queries and keys attention multiplies."""
    return self.qk_nope_head_dim + self.qk_rope_head_dim if self.mla else self.head_dim

  @property
  def attn_scale(self) -> float:
    """The softmax scale of the attention scores: 1 / sqrt(qk_head_dim) (times YaRN's
    `attn_mscale`)."""
    return self.qk_head_dim ** -0.5 * self.attn_mscale

  @property
  def max_context(self) -> int:
    """Longest context served: the checkpoint's limit, or its window if smaller."""
    if self.sliding_window is None:
      return self.max_position
    return min(self.max_position, self.sliding_window)

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> ModelConfig:
    d = json.loads(text)
    d["moe_layers"] = tuple(d["moe_layers"])
    for key in ("eos_token_id", "rope_yarn"):
      if isinstance(d.get(key), list):
        d[key] = tuple(d[key])
    return cls(**d)


def attention_matrices(cfg: ModelConfig) -> int:
  """Weights of one layer's attention projections (no norms, no biases): q, k, v and o; or
  latent attention's query (one projection, or q LoRA's down and up), the latent row's
  projection (kv_lora_rank + qk_rope_head_dim), the up-projection to each head's non-rotary
  key and value (kv_lora_rank x N x (qk_nope + v_head_dim): W_UK and W_UV) and o."""
  d, n = cfg.d_model, cfg.num_heads
  if not cfg.mla:
    return 2 * d * n * cfg.head_dim + 2 * d * cfg.num_kv_heads * cfg.head_dim
  q = (d * n * cfg.qk_head_dim if cfg.q_lora_rank is None
       else cfg.q_lora_rank * (d + n * cfg.qk_head_dim))
  return (q + d * cfg.head_dim + cfg.kv_lora_rank * n * (cfg.qk_nope_head_dim + cfg.v_head_dim)
          + n * cfg.v_head_dim * d)


def _rope_theta(hf: dict[str, Any], default: float) -> float:
  """RoPE base from either the transformers-5 `rope_parameters` or the older top-level keys."""
  params = hf.get("rope_parameters") or hf.get("rope_scaling")
  if params:
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
      raise UnsupportedConfigError(
          f"rope_type {rope_type!r} (rope scaling, config.json's rope_parameters / "
          f"rope_scaling) is not supported; only 'default' RoPE is")
    if "rope_theta" in params:
      return float(params["rope_theta"])
  return float(hf.get("rope_theta", default))


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _deepseek_rope(hf: dict[str, Any], dim: int):
  """(rope_theta, rope_yarn, attn_mscale) of a DeepSeek config: plain RoPE, or YaRN as HF
  transformers computes it for a rotary dim of `dim` (`ModelConfig.rope_yarn`)."""
  params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type != "yarn":
    return _rope_theta(hf, 10000.0), None, 1.0
  theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
  if params.get("partial_rotary_factor", 1.0) != 1.0:
    raise UnsupportedConfigError("rope_parameters.partial_rotary_factor != 1 is not supported")
  if params.get("factor") is None:
    raise UnsupportedConfigError("YaRN rope_parameters / rope_scaling lacks 'factor'")
  factor = float(params["factor"])
  original = int(hf.get("original_max_position_embeddings")
                 or params.get("original_max_position_embeddings")
                 or hf.get("max_position_embeddings", 4096))
  mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
  attention_factor = params.get("attention_factor")
  if attention_factor is None:
    attention_factor = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
                        if mscale and mscale_all_dim else _yarn_mscale(factor))

  def correction_dim(rotations: float) -> float:
    return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

  low = correction_dim(params.get("beta_fast") or 32)
  high = correction_dim(params.get("beta_slow") or 1)
  if params.get("truncate", True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  attn_mscale = _yarn_mscale(factor, mscale_all_dim) ** 2 if mscale_all_dim else 1.0
  return theta, (factor, float(low), float(high), float(attention_factor)), attn_mscale


def _require(hf: dict[str, Any], key: str) -> Any:
  if key not in hf:
    raise UnsupportedConfigError(f"config.json lacks required field {key!r} "
                                 f"for model_type {hf.get('model_type')!r}")
  return hf[key]


def _num_experts(hf: dict[str, Any]) -> int:
  """Routed experts per layer; transformers 5 may save either spelling."""
  for key in ("num_local_experts", "num_experts", "n_routed_experts"):
    if hf.get(key):
      return int(hf[key])
  raise UnsupportedConfigError(f"config.json lacks 'num_local_experts'/'num_experts'/"
                               f"'n_routed_experts' "
                               f"for model_type {hf.get('model_type')!r}")


def _qwen_moe_layers(hf: dict[str, Any], num_layers: int) -> tuple[bool, ...]:
  step = int(hf.get("decoder_sparse_step", 1))
  dense = set(hf.get("mlp_only_layers") or [])
  return tuple((i not in dense) and (i + 1) % step == 0 for i in range(num_layers))


def from_hf_config(hf: dict[str, Any]) -> ModelConfig:
  """Builds a ModelConfig from a parsed HF `config.json`.

  Raises:
    UnsupportedConfigError: unknown `model_type`, or an option this model does not implement.
  """
  family = hf.get("model_type")
  if family not in MODEL_FAMILIES:
    raise UnsupportedConfigError(f"model_type {family!r} is not supported; supported families: "
                                 f"{', '.join(MODEL_FAMILIES)}")
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise UnsupportedConfigError(f"hidden_act {act!r} is not supported; experts are SwiGLU (silu)")
  num_layers = int(_require(hf, "num_hidden_layers"))
  d_model = int(_require(hf, "hidden_size"))
  num_heads = int(_require(hf, "num_attention_heads"))
  head_dim = hf.get("head_dim") or d_model // num_heads
  common = dict(
      family=family,
      vocab_size=int(_require(hf, "vocab_size")),
      d_model=d_model,
      num_layers=num_layers,
      num_heads=num_heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
      head_dim=int(head_dim),
      top_k=int(_require(hf, "num_experts_per_tok")),
      rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      max_position=int(hf.get("max_position_embeddings", 4096)),
      bos_token_id=hf.get("bos_token_id"),
      eos_token_id=(tuple(hf["eos_token_id"]) if isinstance(hf.get("eos_token_id"), list)
                    else hf.get("eos_token_id")),
  )
  if hf.get("attention_bias"):
    raise UnsupportedConfigError("attention_bias=true (biases on q/k/v/o) is not supported")
  if family in LATENT_FAMILIES:
    return _deepseek_config(hf, common)

  if family == "mixtral":
    d_ff = int(_require(hf, "intermediate_size"))
    return ModelConfig(
        **common, d_ff_expert=d_ff, num_experts=_num_experts(hf),
        norm_topk_prob=True, d_ff_dense=0, moe_layers=(True,) * num_layers,
        rope_theta=_rope_theta(hf, 1e6), sliding_window=hf.get("sliding_window"))

  if family == "olmoe":
    return ModelConfig(
        **common, d_ff_expert=int(_require(hf, "intermediate_size")),
        num_experts=_num_experts(hf),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)), d_ff_dense=0,
        moe_layers=(True,) * num_layers, qk_norm="full", clip_qkv=hf.get("clip_qkv"),
        rope_theta=_rope_theta(hf, 10000.0))

  # qwen2_moe / qwen3_moe: dense layers may be interleaved.
  sliding = None
  if family == "qwen2_moe":
    if hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or []):
      sliding = int(hf["sliding_window"])
  elif hf.get("sliding_window") is not None:
    sliding = int(hf["sliding_window"])
  shared = int(hf.get("shared_expert_intermediate_size") or 0) if family == "qwen2_moe" else 0
  moe_layers = _qwen_moe_layers(hf, num_layers)
  return ModelConfig(
      **common, d_ff_expert=int(_require(hf, "moe_intermediate_size")),
      num_experts=_num_experts(hf),
      norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
      d_ff_dense=0 if all(moe_layers) else int(_require(hf, "intermediate_size")),
      moe_layers=moe_layers,
      d_ff_shared=shared,
      qk_norm="per_head" if family == "qwen3_moe" else "none",
      qkv_bias=bool(hf.get("qkv_bias", True)) if family == "qwen2_moe" else False,
      rope_theta=_rope_theta(hf, 10000.0 if family == "qwen2_moe" else 1e6),
      sliding_window=sliding)


# HF's class defaults where the two DeepSeek configs differ (a config.json that transformers
# wrote has every field; a hand-written one may not).
_DEEPSEEK_DEFAULTS = {
    "deepseek_v2": dict(first_k_dense_replace=0, n_shared_experts=2, routed_scaling_factor=1.0,
                        norm_topk_prob=False, topk_method="greedy", n_group=None,
                        topk_group=None),
    "deepseek_v3": dict(first_k_dense_replace=3, n_shared_experts=1, routed_scaling_factor=2.5,
                        norm_topk_prob=True, topk_method="noaux_tc", n_group=8, topk_group=4),
}


def _deepseek_config(hf: dict[str, Any], common: dict[str, Any]) -> ModelConfig:
  """DeepSeek-V2 / V3: latent attention, shared experts, first_k_dense_replace dense layers,
  group-limited routing; every detail as HF transformers' modeling code computes it."""
  family = hf["model_type"]

  def get(key: str) -> Any:
    return hf[key] if hf.get(key) is not None else _DEEPSEEK_DEFAULTS[family][key]

  if int(hf.get("moe_layer_freq", 1)) != 1:
    raise UnsupportedConfigError(
        f"moe_layer_freq={hf['moe_layer_freq']} is not supported: HF transformers makes every "
        f"layer from first_k_dense_replace on a MoE layer (moe_layer_freq 1)")
  if hf.get("mlp_bias"):
    raise UnsupportedConfigError("mlp_bias=true (biases on the MLPs) is not supported")
  heads = common["num_heads"]
  if int(hf.get("num_key_value_heads") or heads) != heads:
    raise UnsupportedConfigError(
        f"num_key_value_heads={hf['num_key_value_heads']} differs from num_attention_heads="
        f"{heads}: latent attention expands every query head's own key and value")
  method = get("topk_method")
  scoring = hf.get("scoring_func", "softmax" if family == "deepseek_v2" else "sigmoid")
  allowed = ({"greedy": "softmax", "group_limited_greedy": "softmax"}
             if family == "deepseek_v2" else {"noaux_tc": "sigmoid"})
  if allowed.get(method) != scoring:
    raise UnsupportedConfigError(
        f"topk_method {method!r} with scoring_func {scoring!r} is not supported for "
        f"{family}; supported: {allowed}")
  norm_topk = bool(get("norm_topk_prob"))
  if family == "deepseek_v2" and norm_topk:
    raise UnsupportedConfigError(
        "norm_topk_prob=true is not supported for deepseek_v2: HF transformers' DeepSeek-V2 "
        "router never renormalises (the original code does), so the two disagree")
  num_layers = common["num_layers"]
  first_dense = int(get("first_k_dense_replace"))
  moe_layers = tuple(i >= first_dense for i in range(num_layers))
  d_ff = int(_require(hf, "moe_intermediate_size"))
  grouped = method != "greedy"
  kv_lora_rank = int(_require(hf, "kv_lora_rank"))
  rope_dim = int(_require(hf, "qk_rope_head_dim"))
  q_lora_rank = hf.get("q_lora_rank", 1536)
  rope_theta, rope_yarn, attn_mscale = _deepseek_rope(hf, rope_dim)
  return ModelConfig(
      **common | dict(num_kv_heads=1, head_dim=kv_lora_rank + rope_dim),
      d_ff_expert=d_ff, num_experts=_num_experts(hf), norm_topk_prob=norm_topk,
      d_ff_dense=0 if all(moe_layers) else int(_require(hf, "intermediate_size")),
      moe_layers=moe_layers, d_ff_shared=int(get("n_shared_experts") or 0) * d_ff,
      shared_gate=False, rope_theta=rope_theta, rope_yarn=rope_yarn, attn_mscale=attn_mscale,
      kv_lora_rank=kv_lora_rank,
      q_lora_rank=None if q_lora_rank is None else int(q_lora_rank),
      qk_nope_head_dim=int(_require(hf, "qk_nope_head_dim")), qk_rope_head_dim=rope_dim,
      v_head_dim=int(_require(hf, "v_head_dim")),
      rope_interleave=family == "deepseek_v2" or bool(hf.get("rope_interleave", True)),
      topk_method=method, n_group=int(get("n_group")) if grouped else 1,
      topk_group=int(get("topk_group")) if grouped else 1,
      routed_scaling_factor=float(get("routed_scaling_factor")))


def load_hf_config(checkpoint_dir: str | os.PathLike) -> ModelConfig:
  """Reads `config.json` of an HF checkpoint directory."""
  path = os.path.join(checkpoint_dir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no config.json in checkpoint directory {checkpoint_dir}")
  with open(path) as f:
    try:
      hf = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON: {e}") from e
  return from_hf_config(hf)


def to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
  """The HF `config.json` fields of `cfg` (inverse of `from_hf_config`).

  Raises:
    UnsupportedConfigError: `cfg` combines switches its family cannot express.
  """
  fixed = {"mixtral": ("none", True), "olmoe": ("full", None), "qwen2_moe": ("none", None),
           "qwen3_moe": ("per_head", None), "deepseek_v2": ("none", False),
           "deepseek_v3": ("none", None)}
  if cfg.family not in fixed:
    raise UnsupportedConfigError(f"family {cfg.family!r} is not one of {MODEL_FAMILIES}")
  if cfg.mla != (cfg.family in LATENT_FAMILIES):
    raise UnsupportedConfigError(f"{cfg.family} cannot express kv_lora_rank={cfg.kv_lora_rank}")
  if cfg.family not in LATENT_FAMILIES and (
      cfg.topk_method != "greedy" or cfg.routed_scaling_factor != 1.0 or not cfg.shared_gate
      or cfg.rope_interleave):
    raise UnsupportedConfigError(f"{cfg.family} has no group-limited routing, routed scaling, "
                                 f"ungated shared expert or interleaved RoPE")
  qk_norm, norm_topk = fixed[cfg.family]
  if cfg.qk_norm != qk_norm or (norm_topk is not None and cfg.norm_topk_prob != norm_topk):
    raise UnsupportedConfigError(f"{cfg.family} cannot express qk_norm={cfg.qk_norm!r}, "
                                 f"norm_topk_prob={cfg.norm_topk_prob}")
  if cfg.family in ("mixtral", "olmoe") and not all(cfg.moe_layers):
    raise UnsupportedConfigError(f"{cfg.family} has no dense layers")
  hf: dict[str, Any] = dict(
      model_type=cfg.family, vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
      num_experts_per_tok=cfg.top_k, rms_norm_eps=cfg.rms_eps,
      tie_word_embeddings=cfg.tie_embeddings, max_position_embeddings=cfg.max_position,
      rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
      hidden_act="silu", bos_token_id=cfg.bos_token_id,
      eos_token_id=(list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple)
                    else cfg.eos_token_id))
  if cfg.family == "mixtral":
    return hf | dict(num_local_experts=cfg.num_experts, intermediate_size=cfg.d_ff_expert,
                     sliding_window=cfg.sliding_window)
  if cfg.family == "olmoe":
    return hf | dict(num_experts=cfg.num_experts, intermediate_size=cfg.d_ff_expert,
                     norm_topk_prob=cfg.norm_topk_prob, clip_qkv=cfg.clip_qkv)
  if cfg.family in LATENT_FAMILIES:
    return _deepseek_hf_config(cfg, hf)
  hf |= dict(num_experts=cfg.num_experts, moe_intermediate_size=cfg.d_ff_expert,
             intermediate_size=cfg.d_ff_dense or cfg.d_ff_expert,
             norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=1,
             mlp_only_layers=[i for i, moe in enumerate(cfg.moe_layers) if not moe],
             use_sliding_window=cfg.sliding_window is not None,
             sliding_window=cfg.sliding_window)
  if cfg.family == "qwen2_moe":
    hf |= dict(shared_expert_intermediate_size=cfg.d_ff_shared, qkv_bias=cfg.qkv_bias)
  return hf


def _deepseek_hf_config(cfg: ModelConfig, hf: dict[str, Any]) -> dict[str, Any]:
  """The DeepSeek fields of `to_hf_config`."""
  first_dense = cfg.moe_layers.index(True) if any(cfg.moe_layers) else cfg.num_layers
  if cfg.moe_layers != tuple(i >= first_dense for i in range(cfg.num_layers)):
    raise UnsupportedConfigError(f"{cfg.family} has dense layers only before its MoE layers "
                                 f"(first_k_dense_replace), got moe_layers={cfg.moe_layers}")
  if cfg.shared_gate or cfg.d_ff_shared % cfg.d_ff_expert:
    raise UnsupportedConfigError(f"{cfg.family}'s shared experts are ungated and "
                                 f"n_shared_experts x moe_intermediate_size wide")
  methods = (("greedy", "group_limited_greedy") if cfg.family == "deepseek_v2"
             else ("noaux_tc",))
  if cfg.topk_method not in methods or (cfg.family == "deepseek_v2"
                                        and not cfg.rope_interleave):
    raise UnsupportedConfigError(f"{cfg.family} cannot express topk_method="
                                 f"{cfg.topk_method!r}, rope_interleave={cfg.rope_interleave}")
  if cfg.rope_yarn is not None or cfg.attn_mscale != 1.0:
    raise UnsupportedConfigError(f"{cfg.family} with YaRN RoPE cannot be exported: the config "
                                 f"keeps YaRN's derived values, not its rope_parameters")
  del hf["head_dim"]
  hf |= dict(
      num_key_value_heads=cfg.num_heads, n_routed_experts=cfg.num_experts,
      moe_intermediate_size=cfg.d_ff_expert, intermediate_size=cfg.d_ff_dense or cfg.d_ff_expert,
      first_k_dense_replace=first_dense, moe_layer_freq=1,
      n_shared_experts=cfg.d_ff_shared // cfg.d_ff_expert, kv_lora_rank=cfg.kv_lora_rank,
      q_lora_rank=cfg.q_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
      qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
      norm_topk_prob=cfg.norm_topk_prob, routed_scaling_factor=cfg.routed_scaling_factor,
      topk_method=cfg.topk_method, n_group=cfg.n_group, topk_group=cfg.topk_group)
  if cfg.family == "deepseek_v3":
    hf |= dict(rope_interleave=cfg.rope_interleave, scoring_func="sigmoid")
  return hf


def tiny_config(family: str, **overrides: Any) -> ModelConfig:
  """A tiny config of `family` (2-3 layers, 8 experts, top-2, GQA) for tests and demos.

  Qwen2-MoE gets a shared expert and a dense middle layer, so every switch is exercised. The
  DeepSeek families get latent attention with q LoRA (`q_lora_rank=None` turns it off), v and
  qk head dims that differ, a dense first layer, two shared experts and group-limited routing
  (4 groups of 2 experts, 2 groups per token; V2 top-3, where its max-score groups can differ
  from plain top-k, V3 top-2) with a routed scaling factor.
  """
  if family not in MODEL_FAMILIES:
    raise UnsupportedConfigError(f"family {family!r} is not one of {MODEL_FAMILIES}")
  base = dict(family=family, vocab_size=512, d_model=64, num_layers=2, num_heads=4,
              num_kv_heads=2, head_dim=16, d_ff_expert=32, num_experts=8, top_k=2,
              norm_topk_prob=family in ("mixtral", "qwen3_moe"), d_ff_dense=0,
              moe_layers=(True, True), max_position=1024, bos_token_id=1, eos_token_id=2,
              rope_theta=10000.0, rms_eps=1e-6)
  if family == "qwen2_moe":
    base |= dict(num_layers=3, moe_layers=(True, False, True), d_ff_dense=96, d_ff_shared=48,
                 qkv_bias=True)
  elif family == "qwen3_moe":
    base |= dict(qk_norm="per_head", head_dim=32, num_heads=4, num_kv_heads=1)
  elif family == "olmoe":
    base |= dict(qk_norm="full", num_kv_heads=4)
  elif family in LATENT_FAMILIES:
    base |= dict(moe_layers=(False, True), d_ff_dense=96, d_ff_shared=64, shared_gate=False,
                 num_kv_heads=1, head_dim=32 + 8, kv_lora_rank=32, q_lora_rank=48,
                 qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, rope_interleave=True,
                 n_group=4, topk_group=2, norm_topk_prob=family == "deepseek_v3")
    base |= (dict(topk_method="group_limited_greedy", routed_scaling_factor=2.0, top_k=3)
             if family == "deepseek_v2" else
             dict(topk_method="noaux_tc", routed_scaling_factor=2.5))
  base |= overrides
  if "num_layers" in overrides and "moe_layers" not in overrides:
    base["moe_layers"] = (True,) * base["num_layers"]
  return ModelConfig(**base)
