"""Gemma 2 and Gemma 3 (text): Gemma's block with norms before and after each sublayer, alternating sliding-window
and global layers, query_pre_attn_scalar; Gemma 2 soft-caps attention scores and final logits, Gemma 3 normalizes
q/k and gives its sliding layers their own RoPE."""

from __future__ import annotations

from typing import Any

from jaxlora.config import ModelConfig
from jaxlora.errors import ConfigError
from jaxlora.families.common import (
    activation,
    hf_config_object,
    llama_style_sizes,
    rope_config,
    rope_parameters,
    windows_by_layer_type,
)
from jaxlora.families.llama import EMBED_AND_ATTENTION, FINAL_NORM_AND_HEAD, GATED_MLP
from jaxlora.families.table import Family, WeightRule

_LAYER = "model.layers.{i}."

WEIGHTS = (
    EMBED_AND_ATTENTION
    + (
        # Here post_attention_layernorm normalizes the attention output; the MLP's input norm is pre_feedforward.
        WeightRule(_LAYER + "post_attention_layernorm.weight", "layers_{i}/post_attn_norm/scale"),
        WeightRule(_LAYER + "pre_feedforward_layernorm.weight", "layers_{i}/mlp_norm/scale"),
        WeightRule(_LAYER + "post_feedforward_layernorm.weight", "layers_{i}/post_mlp_norm/scale"),
    )
    + GATED_MLP
    + FINAL_NORM_AND_HEAD
)


def _ropes(hf, model_type: str):
    params, max_len = rope_parameters(hf), hf.max_position_embeddings
    if "full_attention" in params:  # transformers 5: one RoPE per layer type
        return rope_config(params["full_attention"], max_len), rope_config(params.get("sliding_attention"), max_len)
    if model_type == "gemma3_text":  # transformers 4: the local layers' theta on its own
        local = {"rope_theta": getattr(hf, "rope_local_base_freq", 10000.0)}
        return rope_config(params, max_len), rope_config(local, max_len)
    return rope_config(params, max_len), None


def config_from_hf(raw: dict[str, Any]) -> ModelConfig:
    model_type = raw["model_type"]
    hf = hf_config_object(raw)
    if getattr(hf, "attention_bias", False):
        raise ConfigError(f"{model_type} with attention_bias is not supported")
    rope, rope_local = _ropes(hf, model_type)
    window = hf.sliding_window
    return ModelConfig(
        family=model_type,
        **llama_style_sizes(hf),
        rope=rope,
        rope_local=rope_local,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
        layer_windows=windows_by_layer_type(hf.layer_types, window),
        activation=activation(hf.hidden_activation, model_type),
        norm_weight_offset=1.0,
        embed_scale=True,
        sandwich_norm=True,
        qk_norm=model_type == "gemma3_text",
        attn_scale=float(hf.query_pre_attn_scalar) ** -0.5,
        attn_softcap=getattr(hf, "attn_logit_softcapping", None),
        final_softcap=getattr(hf, "final_logit_softcapping", None),
    )


FAMILY = Family(model_types=("gemma2", "gemma3_text"), config_from_hf=config_from_hf, weights=WEIGHTS)
