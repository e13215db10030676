"""GPT-2: LayerNorm, learned position embeddings, Conv1D weights (already [in, out]), fused c_attn, tied head."""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxlora.config import ModelConfig, RopeConfig
from jaxlora.errors import ConfigError
from jaxlora.families.common import activation, gpt2_style_sizes, hf_config_object
from jaxlora.families.table import TRANSPOSE, Family, Split, WeightRule

_LAYER = "transformer.h.{i}."


def split_qkv(w: np.ndarray, config: ModelConfig) -> dict[str, np.ndarray]:
    """c_attn is [in, 3 * hidden] (or a [3 * hidden] bias) holding q, k, v side by side."""
    q, k, v = np.split(w, 3, axis=-1)
    return {"q": q, "k": k, "v": v}


# Conv1D stores [in, out], so nothing here is transposed.
WEIGHTS = (
    WeightRule("transformer.wte.weight", "embed/embedding"),
    WeightRule("transformer.wpe.weight", "pos_embed/embedding"),
    WeightRule(_LAYER + "ln_1.weight", "layers_{i}/attn_norm/scale"),
    WeightRule(_LAYER + "ln_1.bias", "layers_{i}/attn_norm/bias"),
    WeightRule(_LAYER + "attn.c_attn.weight", "layers_{i}/attn/q_proj/kernel", Split(split_qkv, "q")),
    WeightRule(_LAYER + "attn.c_attn.weight", "layers_{i}/attn/k_proj/kernel", Split(split_qkv, "k")),
    WeightRule(_LAYER + "attn.c_attn.weight", "layers_{i}/attn/v_proj/kernel", Split(split_qkv, "v")),
    WeightRule(_LAYER + "attn.c_attn.bias", "layers_{i}/attn/q_proj/bias", Split(split_qkv, "q")),
    WeightRule(_LAYER + "attn.c_attn.bias", "layers_{i}/attn/k_proj/bias", Split(split_qkv, "k")),
    WeightRule(_LAYER + "attn.c_attn.bias", "layers_{i}/attn/v_proj/bias", Split(split_qkv, "v")),
    WeightRule(_LAYER + "attn.c_proj.weight", "layers_{i}/attn/o_proj/kernel"),
    WeightRule(_LAYER + "attn.c_proj.bias", "layers_{i}/attn/o_proj/bias"),
    WeightRule(_LAYER + "ln_2.weight", "layers_{i}/mlp_norm/scale"),
    WeightRule(_LAYER + "ln_2.bias", "layers_{i}/mlp_norm/bias"),
    WeightRule(_LAYER + "mlp.c_fc.weight", "layers_{i}/mlp/up_proj/kernel"),
    WeightRule(_LAYER + "mlp.c_fc.bias", "layers_{i}/mlp/up_proj/bias"),
    WeightRule(_LAYER + "mlp.c_proj.weight", "layers_{i}/mlp/down_proj/kernel"),
    WeightRule(_LAYER + "mlp.c_proj.bias", "layers_{i}/mlp/down_proj/bias"),
    WeightRule("transformer.ln_f.weight", "final_norm/scale"),
    WeightRule("transformer.ln_f.bias", "final_norm/bias"),
    WeightRule("lm_head.weight", "lm_head/kernel", TRANSPOSE, when="untied"),
)

# Old checkpoints saved the causal-mask buffers.
IGNORED = (r"transformer\.h\.\d+\.attn\.(bias|masked_bias)",)
# The original OpenAI checkpoints name the base model's tensors without the "transformer." prefix.
RENAMES = ((r"^(?!transformer\.|lm_head\.)", "transformer."),)


def config_from_hf(raw: dict[str, Any]) -> ModelConfig:
    hf = hf_config_object(raw)
    if getattr(hf, "scale_attn_by_inverse_layer_idx", False):
        raise ConfigError("gpt2 option scale_attn_by_inverse_layer_idx is not supported")
    # reorder_and_upcast_attn only upcasts the scores to float32, which jaxlora always does.
    return ModelConfig(
        family="gpt2",
        **gpt2_style_sizes(hf),
        rope=RopeConfig(),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        norm_kind="layer",
        mlp_kind="plain",
        activation=activation(hf.activation_function, "gpt2"),
        learned_positions=True,
        attn_scale=None if getattr(hf, "scale_attn_weights", True) else 1.0,
    )


FAMILY = Family(
    model_types=("gpt2",),
    config_from_hf=config_from_hf,
    weights=WEIGHTS,
    ignored=IGNORED,
    renames=RENAMES,
    conv1d_weights=True,
)
