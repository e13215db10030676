"""OLMo 2: the Llama block with its norms moved after each sublayer (no norm before them), RMSNorm over the whole
q and k projections (all heads at once), and norms that multiply by their weight in float32 before casting."""

from __future__ import annotations

from typing import Any

from jaxlora.config import ModelConfig
from jaxlora.families.common import activation, hf_config_object, llama_style_sizes, rope_config
from jaxlora.families.llama import ATTENTION_BIASES, FINAL_NORM_AND_HEAD, GATED_MLP
from jaxlora.families.table import TRANSPOSE, Family, WeightRule

_LAYER = "model.layers.{i}."
_ATTN = _LAYER + "self_attn."

WEIGHTS = (
    (
        WeightRule("model.embed_tokens.weight", "embed/embedding"),
        WeightRule(_ATTN + "q_proj.weight", "layers_{i}/attn/q_proj/kernel", TRANSPOSE),
        WeightRule(_ATTN + "k_proj.weight", "layers_{i}/attn/k_proj/kernel", TRANSPOSE),
        WeightRule(_ATTN + "v_proj.weight", "layers_{i}/attn/v_proj/kernel", TRANSPOSE),
        WeightRule(_ATTN + "o_proj.weight", "layers_{i}/attn/o_proj/kernel", TRANSPOSE),
        WeightRule(_ATTN + "q_norm.weight", "layers_{i}/attn/q_norm/scale"),
        WeightRule(_ATTN + "k_norm.weight", "layers_{i}/attn/k_norm/scale"),
        # Here post_attention_layernorm normalizes the attention output, post_feedforward_layernorm the MLP's.
        WeightRule(_LAYER + "post_attention_layernorm.weight", "layers_{i}/post_attn_norm/scale"),
        WeightRule(_LAYER + "post_feedforward_layernorm.weight", "layers_{i}/post_mlp_norm/scale"),
    )
    + ATTENTION_BIASES
    + GATED_MLP
    + FINAL_NORM_AND_HEAD
)


def config_from_hf(raw: dict[str, Any]) -> ModelConfig:
    hf = hf_config_object(raw)
    attention_bias = bool(getattr(hf, "attention_bias", False))
    return ModelConfig(
        family="olmo2",
        **llama_style_sizes(hf),
        rope=rope_config(hf),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=attention_bias,
        o_bias=attention_bias,
        activation=activation(hf.hidden_act, "olmo2"),
        sandwich_norm=True,
        pre_norm=False,
        norm_scale_in_float32=True,
        qk_norm=True,
        qk_norm_span="all",
    )


FAMILY = Family(model_types=("olmo2",), config_from_hf=config_from_hf, weights=WEIGHTS)
