"""Pure data: `ModelConfig` (everything the decoder needs to know about a model, frozen and hashable: a static jit
argument) and `LoraConfig`. Per-family adapters in `jaxlora.families` build a ModelConfig from an HF `config.json`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from jaxlora.errors import ConfigError

ROPE_KINDS = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
ATTENTION_IMPLS = ("auto", "xla", "chunked", "cudnn", "splash", "cpu")
MOE_IMPLS = ("auto", "dense", "gathered", "blocked", "ragged")  # see jaxlora.moe
ROUTERS = ("softmax", "sigmoid_grouped")  # see jaxlora.moe.route, route_grouped
# The largest sizes any config may claim, far above every released model (Llama 3.1 405B: 126 layers, hidden
# 16384, MLP 53248; Gemma 3: a vocabulary of 262144): a hostile or mistyped config fails here, before anything
# sized by it is built or allocated.
SIZE_LIMITS = {
    "vocab_size": 1 << 22,
    "hidden_size": 1 << 17,
    "intermediate_size": 1 << 19,
    "num_layers": 1 << 12,
    "num_heads": 1 << 12,
    "num_kv_heads": 1 << 12,
    "head_dim": 1 << 13,
    "max_position_embeddings": 1 << 26,
    "num_experts": 1 << 12,
}

# Param dtypes a checkpoint may be stored in or cast to (`jaxlora.checkpoint.DTYPES` maps them to numpy).
DTYPE_NAMES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding; `kind` is HF's `rope_type` (one of ROPE_KINDS), see `jaxlora.rope`.

    original_max_position_embeddings: the pretraining context that llama3, YaRN and LongRoPE scale from, and the
    length past which dynamic NTK starts scaling.
    """

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int = 0
    attention_factor: float = 1.0  # YaRN, LongRoPE: cos and sin are scaled by this
    beta_fast: float = 32.0  # YaRN
    beta_slow: float = 1.0  # YaRN
    truncate: bool = True  # YaRN: round the ramp's ends to whole dims
    short_factor: tuple[float, ...] = ()  # LongRoPE, per rotated pair, within the original context
    long_factor: tuple[float, ...] = ()  # LongRoPE, past it

    def __post_init__(self):
        if self.kind not in ROPE_KINDS:
            raise ConfigError(f"rope kind must be one of {', '.join(ROPE_KINDS)}, got {self.kind!r}")
        for name in ("theta", "factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ConfigError(f"rope {name} must be a positive finite number, got {value!r}")
        object.__setattr__(self, "short_factor", tuple(float(f) for f in self.short_factor))
        object.__setattr__(self, "long_factor", tuple(float(f) for f in self.long_factor))
        if self.kind in ("llama3", "yarn", "longrope", "dynamic") and self.original_max_position_embeddings <= 0:
            raise ConfigError(f"{self.kind} RoPE needs original_max_position_embeddings > 0")


@dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float = 1e-5
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # Per-layer attention window in tokens (None = full causal attention); length num_layers.
    layer_windows: tuple[int | None, ...] = ()
    # The switches below describe how a family's block differs from Llama's (the defaults).
    norm_kind: str = "rms"  # "rms" | "layer" (LayerNorm with bias)
    norm_weight_offset: float = 0.0  # Gemma's RMSNorm scales by (1 + w), in float32
    mlp_kind: str = "gated"  # "gated": down(act(gate(x)) * up(x)); "plain": down(act(up(x)))
    activation: str = "silu"  # "silu" | "gelu" (erf) | "gelu_tanh"
    rotary_dim: int | None = None  # rotate only the first rotary_dim of each head (None: all of it)
    rotary_style: str = "half"  # "half": rotate-half (Llama, NeoX); "interleaved": pairs (GPT-J, CodeGen)
    learned_positions: bool = False  # GPT-2: a learned position embedding instead of RoPE
    residual: str = "sequential"  # "sequential" | "parallel" (NeoX) | "parallel_shared_norm" (GPT-J, CodeGen)
    embed_scale: bool = False  # Gemma: embeddings times sqrt(hidden_size)
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on queries and keys before RoPE
    lm_head_bias: bool = False
    attn_scale: float | None = None  # scores times this (None: 1 / sqrt(head_dim))
    attn_softcap: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap)
    final_softcap: float | None = None  # Gemma 2: logits -> cap * tanh(logits / cap)
    sandwich_norm: bool = False  # Gemma 2/3: norms before and after each sublayer
    pre_norm: bool = True  # False: no norm before the sublayers (OLMo 2: sandwich_norm's "after" norms only)
    norm_scale_in_float32: bool = False  # OLMo 2: RMSNorm multiplies by its weight in float32, then casts
    qk_norm_span: str = "head"  # "head": q/k norms over head_dim (Qwen3, Gemma 3); "all": over all heads (OLMo 2)
    no_rope_layers: tuple[int, ...] = ()  # SmolLM3: layers whose attention has no RoPE
    embedding_multiplier: float | None = None  # Granite: embeddings times this
    residual_multiplier: float = 1.0  # Granite: each sublayer's output times this before it joins the residual
    logits_divisor: float = 1.0  # Granite's logits_scaling: logits divided by this
    rope_local: RopeConfig | None = None  # Gemma 3: the RoPE of the sliding-window layers
    num_experts: int = 0  # Mixtral: a mixture of this many gated MLPs per layer (0: one dense MLP)
    experts_per_token: int = 0
    expert_intermediate_size: int = 0  # each expert's MLP width (0: intermediate_size)
    # The picked experts' router probabilities renormalized to sum to 1 (Mixtral; Qwen-MoE's norm_topk_prob).
    normalize_expert_weights: bool = True
    shared_expert_size: int = 0  # Qwen2-MoE, DeepSeek-V3: a gated MLP of this width on every token
    shared_expert_gated: bool = True  # Qwen2-MoE: the shared expert's output times a sigmoid gate (DeepSeek: not)
    # How tokens pick experts: "softmax" (top-k of the softmax), or DeepSeek-V3's "sigmoid_grouped": sigmoid
    # scores plus a learned bias choose, among the groups_per_token best of expert_groups groups; the picked
    # experts' plain sigmoid scores weigh them (renormalized where normalize_expert_weights), times routed_scaling.
    router: str = "softmax"
    expert_groups: int = 1
    groups_per_token: int = 1
    routed_scaling: float = 1.0
    dense_layers: tuple[int, ...] = ()  # layers of a mixture model with a dense MLP (of intermediate_size)
    router_bias: bool = False  # gpt-oss: the router Linear has a bias
    expert_bias: bool = False  # gpt-oss: each expert's gate, up and down projections have biases
    # gpt-oss's expert activation: (clamp(up, +-limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit).
    swiglu_limit: float | None = None
    swiglu_alpha: float = 1.702
    # DeepSeek-V3's multi-head latent attention (MLA), when kv_lora_rank > 0: each token's keys and values come
    # from one latent of kv_lora_rank numbers (what the KV cache holds, with a rotated key part of rotary_dim
    # shared by all heads), its queries from one of q_lora_rank (0: straight from the hidden state). head_dim is
    # a query's / key's width (rotary_dim of it rotated, at its end), v_head_dim a value's.
    kv_lora_rank: int = 0
    q_lora_rank: int = 0
    v_head_dim: int = 0
    attention_sinks: bool = False  # gpt-oss: a learned logit per head joins each softmax (takes no value)
    # Phi-3 with LongRoPE: once a generated sequence reaches past the original context, transformers drops the KV
    # cache and runs the whole sequence again, so every key takes the long factors (generation does the same).
    reprefill_past_original_context: bool = False
    # How attention is computed (a runtime choice, not part of the model): see `jaxlora.attention`.
    attention_impl: str = "auto"
    # How a mixture's experts are computed (a runtime choice too): see `jaxlora.moe`.
    moe_impl: str = "auto"
    # Whether the decoder runs its layers as `lax.scan`s over stacked params (a runtime choice of the in-memory
    # layout; checkpoints always keep one group per layer): see `jaxlora.stacking`.
    scan_layers: bool = False

    def __post_init__(self):
        # Sizes first: everything after (and everything built from this config) is sized by them.
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "head_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name, limit in SIZE_LIMITS.items():
            if not isinstance(getattr(self, name), int) or getattr(self, name) > limit:
                raise ConfigError(f"{name} {getattr(self, name)!r} is past any real model's (at most {limit})")
        for name in ("kv_lora_rank", "q_lora_rank", "v_head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1 << 16:
                raise ConfigError(f"{name} must be an integer in 0..{1 << 16}, got {value!r}")
        if not self.layer_windows:
            object.__setattr__(self, "layer_windows", (None,) * self.num_layers)
        if len(self.layer_windows) != self.num_layers:
            raise ConfigError(f"layer_windows has {len(self.layer_windows)} entries for {self.num_layers} layers")
        self._check_choices()
        for rope in (self.rope, self.rope_local):
            if rope is not None and rope.kind == "longrope":
                sizes = (len(rope.short_factor), len(rope.long_factor))
                if sizes != (self.rope_dim // 2,) * 2:
                    raise ConfigError(
                        f"longrope factors have {sizes[0]} and {sizes[1]} entries; the rotary dims need "
                        f"{self.rope_dim // 2}"
                    )
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )

    def _check_choices(self) -> None:
        choices = {
            "norm_kind": ("rms", "layer"),
            "mlp_kind": ("gated", "plain"),
            "activation": ("silu", "gelu", "gelu_tanh"),
            "rotary_style": ("half", "interleaved"),
            "residual": ("sequential", "parallel", "parallel_shared_norm"),
            "qk_norm_span": ("head", "all"),
            "attention_impl": ATTENTION_IMPLS,
            "moe_impl": MOE_IMPLS,
            "router": ROUTERS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.rotary_dim is not None and not (0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            raise ConfigError(f"rotary_dim must be even and in (0, head_dim={self.head_dim}], got {self.rotary_dim}")
        if self.router == "sigmoid_grouped":
            groups = self.expert_groups
            if groups < 1 or self.num_experts % groups or self.num_experts // groups < 2:
                raise ConfigError(f"{self.num_experts} experts do not split into n_group={groups} groups of at least 2")
            if not 1 <= self.groups_per_token <= groups:
                raise ConfigError(f"topk_group must be in 1..n_group={groups}, got {self.groups_per_token}")
            if self.experts_per_token > self.groups_per_token * (self.num_experts // groups):
                raise ConfigError(
                    f"num_experts_per_tok={self.experts_per_token} is more than topk_group={self.groups_per_token} "
                    "groups hold"
                )
        if self.mla:
            if self.rotary_dim is None or self.rotary_dim >= self.head_dim:
                raise ConfigError("latent attention needs a rotary part smaller than head_dim (qk_rope_head_dim)")
            if any(w is not None for w in self.layer_windows) or self.qk_norm or self.attention_sinks:
                raise ConfigError("latent attention with sliding windows, q/k norms or sinks is not supported")

    @property
    def context_length(self) -> int | None:
        """The longest sequence the model's positions cover (None: no limit; dynamic NTK scales to any length)."""
        if self.rope.kind == "dynamic" and not self.learned_positions:
            return None
        return self.max_position_embeddings

    def with_attention(self, impl: str) -> ModelConfig:
        """This config with another attention implementation (see ATTENTION_IMPLS)."""
        return dataclasses.replace(self, attention_impl=impl)

    def with_moe(self, impl: str) -> ModelConfig:
        """This config with another mixture-of-experts implementation (see MOE_IMPLS)."""
        return dataclasses.replace(self, moe_impl=impl)

    def with_scan(self, scan: bool) -> ModelConfig:
        """This config with its layers scanned over stacked params (True) or unrolled (False)."""
        return dataclasses.replace(self, scan_layers=bool(scan))

    @property
    def rope_dim(self) -> int:
        return self.head_dim if self.rotary_dim is None else self.rotary_dim

    @property
    def mla(self) -> bool:
        """Whether attention is multi-head latent attention (DeepSeek-V3)."""
        return self.kv_lora_rank > 0

    @property
    def compressed_queries(self) -> bool:
        """Latent attention's queries through a latent of q_lora_rank (else one q_proj)."""
        return self.mla and self.q_lora_rank > 0

    @property
    def direct_queries(self) -> bool:
        return self.mla and self.q_lora_rank == 0

    @property
    def compressed_query_bias(self) -> bool:
        return self.compressed_queries and self.qkv_bias

    @property
    def value_dim(self) -> int:
        """A value head's width (head_dim but in latent attention)."""
        return self.v_head_dim or self.head_dim

    @property
    def moe(self) -> bool:
        return self.num_experts > 0

    def moe_layer(self, index: int) -> bool:
        """Whether layer `index` runs a mixture of experts (else a dense MLP)."""
        return self.moe and index not in self.dense_layers

    def dense_layer(self, index: int) -> bool:
        return not self.moe_layer(index)

    def shared_layer(self, index: int) -> bool:
        """Whether layer `index` has a shared expert beside its mixture."""
        return self.moe_layer(index) and self.shared_expert_size > 0

    def gated_shared_layer(self, index: int) -> bool:
        """Whether layer `index` has a shared expert with a sigmoid gate (Qwen2-MoE)."""
        return self.shared_layer(index) and self.shared_expert_gated

    @property
    def expert_size(self) -> int:
        return self.expert_intermediate_size or self.intermediate_size

    @property
    def gated_mlp(self) -> bool:
        return self.mlp_kind == "gated"

    def to_dict(self) -> dict[str, Any]:
        """The model's description as saved with a checkpoint (the runtime attention, MoE and layout choices are
        left out)."""
        data = dataclasses.asdict(self)
        del data["attention_impl"], data["moe_impl"], data["scan_layers"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown ModelConfig fields: {', '.join(unknown)}")
        data["rope"] = RopeConfig(**data.get("rope", {}))
        if data.get("rope_local") is not None:
            data["rope_local"] = RopeConfig(**data["rope_local"])
        data["layer_windows"] = tuple(data.get("layer_windows", ()))
        data["dense_layers"] = tuple(data.get("dense_layers", ()))
        data["no_rope_layers"] = tuple(data.get("no_rope_layers", ()))
        return cls(**data)

    @property
    def untied(self) -> bool:
        return not self.tie_word_embeddings


@dataclass(frozen=True)
class LoraConfig:
    """What a set of LoRA adapters is: rank, alpha, the HF module names it adapts, and PEFT's options."""

    rank: int
    alpha: float
    targets: tuple[str, ...]
    rslora: bool = False  # PEFT's use_rslora: scale alpha / sqrt(rank) instead of alpha / rank
    dropout: float = 0.0  # PEFT's lora_dropout: on the adapter's input, in training only

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)
