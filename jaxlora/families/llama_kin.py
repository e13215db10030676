"""Llama's weight table under other config conventions: SmolLM3 (no RoPE in every fourth layer, by default) and
Granite (multipliers on the embeddings, each sublayer's output, the attention scores and the logits)."""

from __future__ import annotations

from typing import Any

from jaxlora.config import ModelConfig
from jaxlora.errors import ConfigError
from jaxlora.families import llama
from jaxlora.families.common import (
    activation,
    hf_config_object,
    llama_style_sizes,
    rope_config,
    windows_by_layer_type,
)
from jaxlora.families.table import Family


def _llama_fields(hf, model_type: str) -> dict[str, Any]:
    attention_bias = bool(getattr(hf, "attention_bias", False))
    return dict(
        family=model_type,
        **llama_style_sizes(hf),
        rope=rope_config(hf),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=attention_bias,
        o_bias=attention_bias,
        mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        activation=activation(hf.hidden_act, model_type),
    )


def smollm3_config(raw: dict[str, Any]) -> ModelConfig:
    hf = hf_config_object(raw)
    layers = hf.num_hidden_layers
    uses_rope = list(hf.no_rope_layers)  # transformers' name for the per-layer flag: 1 = RoPE, 0 = none
    if len(uses_rope) != layers:
        raise ConfigError(f"no_rope_layers has {len(uses_rope)} entries for {layers} layers")
    window = hf.sliding_window if hf.use_sliding_window else None
    return ModelConfig(
        **_llama_fields(hf, "smollm3"),
        no_rope_layers=tuple(i for i, rope in enumerate(uses_rope) if not rope),
        layer_windows=windows_by_layer_type(hf.layer_types, window),
    )


def granite_config(raw: dict[str, Any]) -> ModelConfig:
    hf = hf_config_object(raw)
    return ModelConfig(
        **_llama_fields(hf, "granite"),
        embedding_multiplier=float(hf.embedding_multiplier),
        residual_multiplier=float(hf.residual_multiplier),
        attn_scale=float(hf.attention_multiplier),
        logits_divisor=float(hf.logits_scaling),
    )


SMOLLM3 = Family(model_types=("smollm3",), config_from_hf=smollm3_config, weights=llama.WEIGHTS, ignored=llama.IGNORED)
GRANITE = Family(model_types=("granite",), config_from_hf=granite_config, weights=llama.WEIGHTS, ignored=llama.IGNORED)
