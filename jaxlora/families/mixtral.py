"""Mixtral: the Mistral block with a mixture of experts (top-k router, softmax over the picked experts)."""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxlora.config import ModelConfig
from jaxlora.families.common import activation, hf_config_object, llama_style_sizes, rope_config
from jaxlora.families.llama import EMBED_AND_ATTENTION, FINAL_NORM_AND_HEAD
from jaxlora.families.table import TRANSPOSE, Family, Split, WeightRule

_LAYER = "model.layers.{i}."

ATTENTION = (
    EMBED_AND_ATTENTION
    + (WeightRule(_LAYER + "post_attention_layernorm.weight", "layers_{i}/mlp_norm/scale"),)
    + FINAL_NORM_AND_HEAD
)


def split_gate_up(w: np.ndarray, config: ModelConfig) -> dict[str, np.ndarray]:
    gate, up = np.split(w, 2, axis=1)  # [experts, mlp, hidden] each
    return {"gate": gate.transpose(0, 2, 1), "up": up.transpose(0, 2, 1)}


# transformers 5 saves the experts fused: gate_up_proj [experts, 2 * mlp, hidden], down_proj [experts, hidden, mlp].
_MOE = _LAYER + "mlp."
WEIGHTS = ATTENTION + (
    WeightRule(_MOE + "gate.weight", "layers_{i}/moe/router/kernel", TRANSPOSE),
    WeightRule(_MOE + "experts.gate_up_proj", "layers_{i}/moe/gate", Split(split_gate_up, "gate")),
    WeightRule(_MOE + "experts.gate_up_proj", "layers_{i}/moe/up", Split(split_gate_up, "up")),
    WeightRule(_MOE + "experts.down_proj", "layers_{i}/moe/down", TRANSPOSE),
)

# The original checkpoints: one w1 (gate), w3 (up), w2 (down) Linear per expert.
_SPARSE = _LAYER + "block_sparse_moe."
PER_EXPERT_WEIGHTS = ATTENTION + (
    WeightRule(_SPARSE + "gate.weight", "layers_{i}/moe/router/kernel", TRANSPOSE),
    WeightRule(_SPARSE + "experts.{e}.w1.weight", "layers_{i}/moe/gate", TRANSPOSE),
    WeightRule(_SPARSE + "experts.{e}.w3.weight", "layers_{i}/moe/up", TRANSPOSE),
    WeightRule(_SPARSE + "experts.{e}.w2.weight", "layers_{i}/moe/down", TRANSPOSE),
)


def config_from_hf(raw: dict[str, Any]) -> ModelConfig:
    hf = hf_config_object(raw)
    return ModelConfig(
        family="mixtral",
        **llama_style_sizes(hf),
        rope=rope_config(hf),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        layer_windows=(getattr(hf, "sliding_window", None),) * hf.num_hidden_layers,
        activation=activation(hf.hidden_act, "mixtral"),
        num_experts=hf.num_local_experts,
        experts_per_token=hf.num_experts_per_tok,
    )


FAMILY = Family(
    model_types=("mixtral",),
    config_from_hf=config_from_hf,
    weights=WEIGHTS,
    alternative_weights=PER_EXPERT_WEIGHTS,
)
