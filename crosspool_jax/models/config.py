"""Model configuration: one dataclass for every supported MoE family, read from HF config.json.

Each family differs only in a few switches (q/k norm, biases, router normalisation, shared
expert, dense layers). `from_hf_config` maps a family's `config.json` onto those switches and
rejects what the model does not implement, naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Literal

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")

QKNorm = Literal["none", "per_head", "full"]


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
    num_kv_heads: K, key/value heads (N % K == 0; GQA).
    head_dim: H.
    d_ff_expert: F of each routed expert.
    num_experts: E routed experts per MoE layer.
    top_k: experts per token.
    norm_topk_prob: renormalise the top-k softmax weights to sum to 1.
    d_ff_dense: F of the dense MLP of layers that are not MoE (0 if none).
    moe_layers: for each layer, True if its FFN is the MoE block, False if a dense MLP.
    d_ff_shared: F of the shared expert (0 = none); it is gated by sigmoid(x @ w_gate_D1).
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
    if isinstance(d.get("eos_token_id"), list):
      d["eos_token_id"] = tuple(d["eos_token_id"])
    return cls(**d)


def _rope_theta(hf: dict[str, Any], default: float) -> float:
  """RoPE base from either the transformers-5 `rope_parameters` or the older top-level keys."""
  params = hf.get("rope_parameters") or hf.get("rope_scaling")
  if params:
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
      raise UnsupportedConfigError(
          f"rope_type {rope_type!r} (rope scaling) is not supported; only 'default' RoPE is")
    if "rope_theta" in params:
      return float(params["rope_theta"])
  return float(hf.get("rope_theta", default))


def _require(hf: dict[str, Any], key: str) -> Any:
  if key not in hf:
    raise UnsupportedConfigError(f"config.json lacks required field {key!r} "
                                 f"for model_type {hf.get('model_type')!r}")
  return hf[key]


def _num_experts(hf: dict[str, Any]) -> int:
  """Routed experts per layer; transformers 5 may save either spelling."""
  for key in ("num_local_experts", "num_experts"):
    if hf.get(key):
      return int(hf[key])
  raise UnsupportedConfigError(f"config.json lacks 'num_local_experts'/'num_experts' "
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
  if family not in FAMILIES:
    raise UnsupportedConfigError(
        f"model_type {family!r} is not supported; supported families: {', '.join(FAMILIES)}")
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
           "qwen3_moe": ("per_head", None)}
  if cfg.family not in fixed:
    raise UnsupportedConfigError(f"family {cfg.family!r} is not one of {FAMILIES}")
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
  hf |= dict(num_experts=cfg.num_experts, moe_intermediate_size=cfg.d_ff_expert,
             intermediate_size=cfg.d_ff_dense or cfg.d_ff_expert,
             norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=1,
             mlp_only_layers=[i for i, moe in enumerate(cfg.moe_layers) if not moe],
             use_sliding_window=cfg.sliding_window is not None,
             sliding_window=cfg.sliding_window)
  if cfg.family == "qwen2_moe":
    hf |= dict(shared_expert_intermediate_size=cfg.d_ff_shared, qkv_bias=cfg.qkv_bias)
  return hf


def tiny_config(family: str, **overrides: Any) -> ModelConfig:
  """A tiny config of `family` (2-3 layers, 8 experts, top-2, GQA) for tests and demos.

  Qwen2-MoE gets a shared expert and a dense middle layer, so every switch is exercised.
  """
  if family not in FAMILIES:
    raise UnsupportedConfigError(f"family {family!r} is not one of {FAMILIES}")
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
  base |= overrides
  if "num_layers" in overrides and "moe_layers" not in overrides:
    base["moe_layers"] = (True,) * base["num_layers"]
  return ModelConfig(**base)
