"""The Llama block and its close kin: Llama 2/3, SmolLM2, Mistral, Qwen2, Qwen3 (q/k norm), Gemma ((1 + w) norms,
scaled embeddings, GeGLU). Pre-norm RMSNorm, rotate-half RoPE, GQA, gated MLP."""

from __future__ import annotations

from typing import Any

from jaxlora.config import ModelConfig
from jaxlora.families.common import (
    activation,
    hf_config_object,
    llama_style_sizes,
    rope_config,
    windows_by_layer_type,
)
from jaxlora.families.table import TRANSPOSE, Family, WeightRule

_LAYER = "model.layers.{i}."

# Rows the Llama-style families share (Gemma 2/3 and Mixtral build their tables from these).
EMBED_AND_ATTENTION = (
    WeightRule("model.embed_tokens.weight", "embed/embedding"),
    WeightRule(_LAYER + "input_layernorm.weight", "layers_{i}/attn_norm/scale"),
    WeightRule(_LAYER + "self_attn.q_proj.weight", "layers_{i}/attn/q_proj/kernel", TRANSPOSE),
    WeightRule(_LAYER + "self_attn.k_proj.weight", "layers_{i}/attn/k_proj/kernel", TRANSPOSE),
    WeightRule(_LAYER + "self_attn.v_proj.weight", "layers_{i}/attn/v_proj/kernel", TRANSPOSE),
    WeightRule(_LAYER + "self_attn.o_proj.weight", "layers_{i}/attn/o_proj/kernel", TRANSPOSE),
    WeightRule(_LAYER + "self_attn.q_norm.weight", "layers_{i}/attn/q_norm/scale", when="qk_norm"),
    WeightRule(_LAYER + "self_attn.k_norm.weight", "layers_{i}/attn/k_norm/scale", when="qk_norm"),
)
GATED_MLP = (
    WeightRule(_LAYER + "mlp.gate_proj.weight", "layers_{i}/mlp/gate_proj/kernel", TRANSPOSE),
    WeightRule(_LAYER + "mlp.up_proj.weight", "layers_{i}/mlp/up_proj/kernel", TRANSPOSE),
    WeightRule(_LAYER + "mlp.down_proj.weight", "layers_{i}/mlp/down_proj/kernel", TRANSPOSE),
)
FINAL_NORM_AND_HEAD = (
    WeightRule("model.norm.weight", "final_norm/scale"),
    WeightRule("lm_head.weight", "lm_head/kernel", TRANSPOSE, when="untied"),
)

ATTENTION_BIASES = (
    WeightRule(_LAYER + "self_attn.q_proj.bias", "layers_{i}/attn/q_proj/bias", when="qkv_bias"),
    WeightRule(_LAYER + "self_attn.k_proj.bias", "layers_{i}/attn/k_proj/bias", when="qkv_bias"),
    WeightRule(_LAYER + "self_attn.v_proj.bias", "layers_{i}/attn/v_proj/bias", when="qkv_bias"),
    WeightRule(_LAYER + "self_attn.o_proj.bias", "layers_{i}/attn/o_proj/bias", when="o_bias"),
)

WEIGHTS = (
    EMBED_AND_ATTENTION
    + ATTENTION_BIASES
    + (
        WeightRule(_LAYER + "post_attention_layernorm.weight", "layers_{i}/mlp_norm/scale"),
        WeightRule(_LAYER + "mlp.gate_proj.bias", "layers_{i}/mlp/gate_proj/bias", when="mlp_bias"),
        WeightRule(_LAYER + "mlp.up_proj.bias", "layers_{i}/mlp/up_proj/bias", when="mlp_bias"),
        WeightRule(_LAYER + "mlp.down_proj.bias", "layers_{i}/mlp/down_proj/bias", when="mlp_bias"),
    )
    + GATED_MLP
    + FINAL_NORM_AND_HEAD
)

# Older checkpoints saved the rotary buffer; it is recomputed from the config.
IGNORED = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)


def _layer_windows(hf, model_type: str, num_layers: int) -> tuple[int | None, ...]:
    window = getattr(hf, "sliding_window", None)
    if model_type == "mistral":
        return (window,) * num_layers
    layer_types = getattr(hf, "layer_types", None)
    if layer_types is None:
        return (None,) * num_layers
    return windows_by_layer_type(layer_types, window)


def config_from_hf(raw: dict[str, Any]) -> ModelConfig:
    model_type = raw["model_type"]
    hf = hf_config_object(raw)
    gemma = model_type == "gemma"
    act_name = getattr(hf, "hidden_activation", None) if gemma else None
    act = activation(act_name or getattr(hf, "hidden_act", "silu"), model_type)
    attention_bias = bool(getattr(hf, "attention_bias", False))
    return ModelConfig(
        family=model_type,
        **llama_style_sizes(hf),
        rope=rope_config(hf),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        # Qwen2 always biases q/k/v (never o); elsewhere attention_bias covers all four projections.
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=model_type != "qwen2" and attention_bias,
        mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        layer_windows=_layer_windows(hf, model_type, hf.num_hidden_layers),
        activation=act,
        qk_norm=model_type == "qwen3",
        norm_weight_offset=1.0 if gemma else 0.0,
        embed_scale=gemma,
    )


FAMILY = Family(
    model_types=("llama", "mistral", "qwen2", "qwen3", "gemma"),
    config_from_hf=config_from_hf,
    weights=WEIGHTS,
    ignored=IGNORED,
)
