"""gpt-oss: a Llama-style block with attention sinks (a learned logit per head in every softmax), alternating
sliding-window and full layers, biased q/k/v/o, YaRN RoPE, and a mixture of experts with a biased router and
biased experts whose activation is a clamped SwiGLU ((clamp(up) + 1) * g * sigmoid(1.702 g)). Norms multiply by
their weight in float32. Checkpoints store the experts as MXFP4 blocks (`convert.readers.MXFP4Experts`
dequantizes them) or, as transformers saves them, in float with gate and up interleaved column by column."""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxlora.config import ModelConfig
from jaxlora.errors import ConfigError
from jaxlora.families.common import (
    activation,
    hf_config_object,
    llama_style_sizes,
    rope_config,
    windows_by_layer_type,
)
from jaxlora.families.llama import ATTENTION_BIASES, FINAL_NORM_AND_HEAD
from jaxlora.families.table import TRANSPOSE, Family, Split, WeightRule

_LAYER = "model.layers.{i}."
_ATTN = _LAYER + "self_attn."
_EXPERTS = _LAYER + "mlp.experts."


def split_interleaved(w: np.ndarray, config: ModelConfig) -> dict[str, np.ndarray]:
    """gate_up_proj [experts, hidden, 2 * mlp] (or its bias [experts, 2 * mlp]): gate in the even columns, up in
    the odd ones."""
    return {"gate": w[..., 0::2], "up": w[..., 1::2]}


WEIGHTS = (
    (
        WeightRule("model.embed_tokens.weight", "embed/embedding"),
        WeightRule(_LAYER + "input_layernorm.weight", "layers_{i}/attn_norm/scale"),
        WeightRule(_LAYER + "post_attention_layernorm.weight", "layers_{i}/mlp_norm/scale"),
        WeightRule(_ATTN + "sinks", "layers_{i}/attn/sinks"),
    )
    + tuple(
        WeightRule(_ATTN + name + ".weight", f"layers_{{i}}/attn/{name}/kernel", TRANSPOSE)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj")
    )
    + ATTENTION_BIASES
    + (
        WeightRule(_LAYER + "mlp.router.weight", "layers_{i}/moe/router/kernel", TRANSPOSE),
        WeightRule(_LAYER + "mlp.router.bias", "layers_{i}/moe/router/bias"),
        # Stored [experts, in, out] already: no transpose.
        WeightRule(_EXPERTS + "gate_up_proj", "layers_{i}/moe/gate", Split(split_interleaved, "gate")),
        WeightRule(_EXPERTS + "gate_up_proj", "layers_{i}/moe/up", Split(split_interleaved, "up")),
        WeightRule(_EXPERTS + "gate_up_proj_bias", "layers_{i}/moe/gate_bias", Split(split_interleaved, "gate")),
        WeightRule(_EXPERTS + "gate_up_proj_bias", "layers_{i}/moe/up_bias", Split(split_interleaved, "up")),
        WeightRule(_EXPERTS + "down_proj", "layers_{i}/moe/down"),
        WeightRule(_EXPERTS + "down_proj_bias", "layers_{i}/moe/down_bias"),
    )
    + FINAL_NORM_AND_HEAD
)


def config_from_hf(raw: dict[str, Any]) -> ModelConfig:
    hf = hf_config_object(raw)
    if not getattr(hf, "attention_bias", True):
        raise ConfigError("gpt_oss without attention_bias is not supported")
    return ModelConfig(
        family="gpt_oss",
        **llama_style_sizes(hf),
        rope=rope_config(hf),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=True,
        o_bias=True,
        layer_windows=windows_by_layer_type(hf.layer_types, hf.sliding_window),
        activation=activation(hf.hidden_act, "gpt_oss"),
        norm_scale_in_float32=True,
        attention_sinks=True,
        num_experts=hf.num_local_experts,
        experts_per_token=hf.num_experts_per_tok,
        router_bias=True,
        expert_bias=True,
        swiglu_limit=float(hf.swiglu_limit),
        swiglu_alpha=float(hf.swiglu_alpha),
    )


FAMILY = Family(model_types=("gpt_oss",), config_from_hf=config_from_hf, weights=WEIGHTS)
