"""Phi-3: the Llama block with fused qkv_proj and gate_up_proj (and Phi-3's optional sliding window)."""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxlora.config import ModelConfig
from jaxlora.families.common import activation, hf_config_object, llama_style_sizes, rope_config, rope_parameters
from jaxlora.families.table import TRANSPOSE, Family, Split, WeightRule

_LAYER = "model.layers.{i}."


def split_qkv(w: np.ndarray, config: ModelConfig) -> dict[str, np.ndarray]:
    """qkv_proj rows: all query heads, then key heads, then value heads."""
    q_rows = config.num_heads * config.head_dim
    kv_rows = config.num_kv_heads * config.head_dim
    q, k, v = np.split(w, [q_rows, q_rows + kv_rows])
    return {"q": q.T, "k": k.T, "v": v.T}


def split_gate_up(w: np.ndarray, config: ModelConfig) -> dict[str, np.ndarray]:
    """gate_up_proj rows: the gate half, then the up half."""
    gate, up = np.split(w, 2)
    return {"gate": gate.T, "up": up.T}


WEIGHTS = (
    WeightRule("model.embed_tokens.weight", "embed/embedding"),
    WeightRule(_LAYER + "input_layernorm.weight", "layers_{i}/attn_norm/scale"),
    WeightRule(_LAYER + "self_attn.qkv_proj.weight", "layers_{i}/attn/q_proj/kernel", Split(split_qkv, "q")),
    WeightRule(_LAYER + "self_attn.qkv_proj.weight", "layers_{i}/attn/k_proj/kernel", Split(split_qkv, "k")),
    WeightRule(_LAYER + "self_attn.qkv_proj.weight", "layers_{i}/attn/v_proj/kernel", Split(split_qkv, "v")),
    WeightRule(_LAYER + "self_attn.o_proj.weight", "layers_{i}/attn/o_proj/kernel", TRANSPOSE),
    WeightRule(_LAYER + "post_attention_layernorm.weight", "layers_{i}/mlp_norm/scale"),
    WeightRule(_LAYER + "mlp.gate_up_proj.weight", "layers_{i}/mlp/gate_proj/kernel", Split(split_gate_up, "gate")),
    WeightRule(_LAYER + "mlp.gate_up_proj.weight", "layers_{i}/mlp/up_proj/kernel", Split(split_gate_up, "up")),
    WeightRule(_LAYER + "mlp.down_proj.weight", "layers_{i}/mlp/down_proj/kernel", TRANSPOSE),
    WeightRule("model.norm.weight", "final_norm/scale"),
    WeightRule("lm_head.weight", "lm_head/kernel", TRANSPOSE, when="untied"),
)


def config_from_hf(raw: dict[str, Any]) -> ModelConfig:
    hf = hf_config_object(raw)
    num_heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
    partial = rope_parameters(hf).get("partial_rotary_factor", 1.0)
    rope = rope_config(hf)
    return ModelConfig(
        family="phi3",
        **llama_style_sizes(hf),
        rope=rope,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        layer_windows=(getattr(hf, "sliding_window", None),) * hf.num_hidden_layers,
        activation=activation(hf.hidden_act, "phi3"),
        rotary_dim=int(head_dim * partial) if partial != 1.0 else None,
        # Phi3ForCausalLM.prepare_inputs_for_generation recomputes the cache at the short/long switch.
        reprefill_past_original_context=rope.kind == "longrope",
    )


FAMILY = Family(
    model_types=("phi3",),
    config_from_hf=config_from_hf,
    weights=WEIGHTS,
)
