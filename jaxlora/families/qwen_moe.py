"""Qwen2-MoE and Qwen3-MoE: the Qwen2 / Qwen3 blocks with a mixture of experts in every `decoder_sparse_step`-th
layer (the others, and `mlp_only_layers`, keep a dense MLP). The router's softmax runs over all experts; the
picked probabilities are renormalized only with `norm_topk_prob`. Qwen2-MoE adds a shared expert on every token,
times a sigmoid gate."""

from __future__ import annotations

from typing import Any

from jaxlora.config import ModelConfig
from jaxlora.errors import ConfigError
from jaxlora.families.common import (
    activation,
    hf_config_object,
    llama_style_sizes,
    rope_config,
    windows_by_layer_type,
)
from jaxlora.families.llama import ATTENTION_BIASES, EMBED_AND_ATTENTION, FINAL_NORM_AND_HEAD
from jaxlora.families.mixtral import split_gate_up
from jaxlora.families.table import TRANSPOSE, Family, Split, WeightRule

_LAYER = "model.layers.{i}."
_MLP = _LAYER + "mlp."
_SHARED = _MLP + "shared_expert."

_COMMON = (
    EMBED_AND_ATTENTION
    + ATTENTION_BIASES
    + (
        WeightRule(_LAYER + "post_attention_layernorm.weight", "layers_{i}/mlp_norm/scale"),
        # Dense layers.
        WeightRule(_MLP + "gate_proj.weight", "layers_{i}/mlp/gate_proj/kernel", TRANSPOSE, when="dense_layer"),
        WeightRule(_MLP + "up_proj.weight", "layers_{i}/mlp/up_proj/kernel", TRANSPOSE, when="dense_layer"),
        WeightRule(_MLP + "down_proj.weight", "layers_{i}/mlp/down_proj/kernel", TRANSPOSE, when="dense_layer"),
        # Mixture layers: the router and the shared expert.
        WeightRule(_MLP + "gate.weight", "layers_{i}/moe/router/kernel", TRANSPOSE, when="moe_layer"),
        WeightRule(_SHARED + "gate_proj.weight", "layers_{i}/moe/shared/gate_proj/kernel", TRANSPOSE, "shared_layer"),
        WeightRule(_SHARED + "up_proj.weight", "layers_{i}/moe/shared/up_proj/kernel", TRANSPOSE, "shared_layer"),
        WeightRule(_SHARED + "down_proj.weight", "layers_{i}/moe/shared/down_proj/kernel", TRANSPOSE, "shared_layer"),
        WeightRule(_MLP + "shared_expert_gate.weight", "layers_{i}/moe/shared_gate/kernel", TRANSPOSE, "shared_layer"),
    )
    + FINAL_NORM_AND_HEAD
)

# The hub's layout (and what transformers' save_pretrained writes): one gate/up/down Linear per expert.
PER_EXPERT_WEIGHTS = _COMMON + (
    WeightRule(_MLP + "experts.{e}.gate_proj.weight", "layers_{i}/moe/gate", TRANSPOSE, when="moe_layer"),
    WeightRule(_MLP + "experts.{e}.up_proj.weight", "layers_{i}/moe/up", TRANSPOSE, when="moe_layer"),
    WeightRule(_MLP + "experts.{e}.down_proj.weight", "layers_{i}/moe/down", TRANSPOSE, when="moe_layer"),
)

# transformers 5's in-memory layout, fused: gate_up_proj [experts, 2 * mlp, hidden], down_proj [experts, hidden, mlp].
WEIGHTS = _COMMON + (
    WeightRule(_MLP + "experts.gate_up_proj", "layers_{i}/moe/gate", Split(split_gate_up, "gate"), "moe_layer"),
    WeightRule(_MLP + "experts.gate_up_proj", "layers_{i}/moe/up", Split(split_gate_up, "up"), "moe_layer"),
    WeightRule(_MLP + "experts.down_proj", "layers_{i}/moe/down", TRANSPOSE, when="moe_layer"),
)


def _dense_layers(hf) -> tuple[int, ...]:
    """The layers transformers builds with a dense MLP: `mlp_only_layers`, and those off the sparse step."""
    step = hf.decoder_sparse_step
    if not isinstance(step, int) or step < 1:
        raise ConfigError(f"decoder_sparse_step must be a positive integer, got {step!r}")
    only = set(hf.mlp_only_layers or ())
    return tuple(i for i in range(hf.num_hidden_layers) if i in only or (i + 1) % step)


def _layer_windows(hf, model_type: str) -> tuple[int | None, ...]:
    layers = hf.num_hidden_layers
    if model_type == "qwen3_moe":  # one window for every layer, when use_sliding_window
        return (hf.sliding_window or None,) * layers
    return windows_by_layer_type(hf.layer_types or ["full_attention"] * layers, hf.sliding_window)


def config_from_hf(raw: dict[str, Any]) -> ModelConfig:
    model_type = raw["model_type"]
    hf = hf_config_object(raw)
    qwen2 = model_type == "qwen2_moe"
    attention_bias = bool(getattr(hf, "attention_bias", False))
    return ModelConfig(
        family=model_type,
        **llama_style_sizes(hf),
        rope=rope_config(hf),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        # Qwen2-MoE biases q/k/v by qkv_bias (never o); Qwen3-MoE all four by attention_bias.
        qkv_bias=bool(hf.qkv_bias) if qwen2 else attention_bias,
        o_bias=not qwen2 and attention_bias,
        layer_windows=_layer_windows(hf, model_type),
        activation=activation(hf.hidden_act, model_type),
        qk_norm=not qwen2,
        num_experts=hf.num_experts,
        experts_per_token=hf.num_experts_per_tok,
        expert_intermediate_size=hf.moe_intermediate_size,
        normalize_expert_weights=bool(hf.norm_topk_prob),
        shared_expert_size=hf.shared_expert_intermediate_size if qwen2 else 0,
        dense_layers=_dense_layers(hf),
    )


FAMILY = Family(
    model_types=("qwen2_moe", "qwen3_moe"),
    config_from_hf=config_from_hf,
    weights=WEIGHTS,
    alternative_weights=PER_EXPERT_WEIGHTS,
)
