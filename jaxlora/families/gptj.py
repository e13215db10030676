"""GPT-J: one LayerNorm feeding attention and MLP in parallel, partial interleaved RoPE, biased head."""

from __future__ import annotations

from typing import Any

from jaxlora.config import ModelConfig, RopeConfig
from jaxlora.errors import ConfigError
from jaxlora.families.common import activation, gpt2_style_sizes, hf_config_object
from jaxlora.families.table import TRANSPOSE, Family, WeightRule

_LAYER = "transformer.h.{i}."

# The layout GPT-J and CodeGen share; CodeGen swaps the q/k/v rules for its fused qkv_proj.
SHARED = (
    WeightRule("transformer.wte.weight", "embed/embedding"),
    WeightRule(_LAYER + "ln_1.weight", "layers_{i}/attn_norm/scale"),
    WeightRule(_LAYER + "ln_1.bias", "layers_{i}/attn_norm/bias"),
    WeightRule(_LAYER + "attn.out_proj.weight", "layers_{i}/attn/o_proj/kernel", TRANSPOSE),
    WeightRule(_LAYER + "mlp.fc_in.weight", "layers_{i}/mlp/up_proj/kernel", TRANSPOSE),
    WeightRule(_LAYER + "mlp.fc_in.bias", "layers_{i}/mlp/up_proj/bias"),
    WeightRule(_LAYER + "mlp.fc_out.weight", "layers_{i}/mlp/down_proj/kernel", TRANSPOSE),
    WeightRule(_LAYER + "mlp.fc_out.bias", "layers_{i}/mlp/down_proj/bias"),
    WeightRule("transformer.ln_f.weight", "final_norm/scale"),
    WeightRule("transformer.ln_f.bias", "final_norm/bias"),
    WeightRule("lm_head.weight", "lm_head/kernel", TRANSPOSE),
    WeightRule("lm_head.bias", "lm_head/bias"),
)

WEIGHTS = SHARED + (
    WeightRule(_LAYER + "attn.q_proj.weight", "layers_{i}/attn/q_proj/kernel", TRANSPOSE),
    WeightRule(_LAYER + "attn.k_proj.weight", "layers_{i}/attn/k_proj/kernel", TRANSPOSE),
    WeightRule(_LAYER + "attn.v_proj.weight", "layers_{i}/attn/v_proj/kernel", TRANSPOSE),
)

# Old checkpoints saved the causal-mask buffers.
IGNORED = (r"transformer\.h\.\d+\.attn\.(bias|masked_bias)",)


def parallel_block_config(raw: dict[str, Any]) -> ModelConfig:
    """GPT-J and CodeGen: the same config fields and block."""
    model_type = raw["model_type"]
    hf = hf_config_object(raw)
    if getattr(hf, "rotary_dim", None) is None:
        raise ConfigError(f"{model_type} without rotary_dim is not supported (set rotary_dim in config.json)")
    if getattr(hf, "tie_word_embeddings", False):
        raise ConfigError(f"{model_type} with tie_word_embeddings is not supported (its head has a bias)")
    return ModelConfig(
        family=model_type,
        **gpt2_style_sizes(hf),
        rope=RopeConfig(theta=10000.0),
        mlp_bias=True,
        norm_kind="layer",
        mlp_kind="plain",
        activation=activation(hf.activation_function, model_type),
        rotary_dim=hf.rotary_dim,
        rotary_style="interleaved",
        residual="parallel_shared_norm",
        lm_head_bias=True,
    )


FAMILY = Family(
    model_types=("gptj",),
    config_from_hf=parallel_block_config,
    weights=WEIGHTS,
    ignored=IGNORED,
)
