"""GPT-NeoX (Pythia): LayerNorms, fused per-head query_key_value, partial rotate-half RoPE, parallel residual."""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxlora.config import ModelConfig
from jaxlora.families.common import activation, hf_config_object, rope_config, rope_parameters
from jaxlora.families.table import TRANSPOSE, Family, Split, WeightRule

_LAYER = "gpt_neox.layers.{i}."
_QKV = _LAYER + "attention.query_key_value."


def split_qkv(w: np.ndarray, config: ModelConfig) -> dict[str, np.ndarray]:
    """query_key_value's rows are grouped per head: [head, (q | k | v), head_dim] (the bias likewise)."""
    heads, head_dim = config.num_heads, config.head_dim
    grouped = w.reshape(heads, 3, head_dim, *w.shape[1:])
    parts = (grouped[:, j].reshape(heads * head_dim, *w.shape[1:]) for j in range(3))
    q, k, v = (p.T if p.ndim == 2 else p for p in parts)
    return {"q": q, "k": k, "v": v}


WEIGHTS = (
    WeightRule("gpt_neox.embed_in.weight", "embed/embedding"),
    WeightRule(_LAYER + "input_layernorm.weight", "layers_{i}/attn_norm/scale"),
    WeightRule(_LAYER + "input_layernorm.bias", "layers_{i}/attn_norm/bias"),
    WeightRule(_LAYER + "post_attention_layernorm.weight", "layers_{i}/mlp_norm/scale"),
    WeightRule(_LAYER + "post_attention_layernorm.bias", "layers_{i}/mlp_norm/bias"),
    WeightRule(_QKV + "weight", "layers_{i}/attn/q_proj/kernel", Split(split_qkv, "q")),
    WeightRule(_QKV + "weight", "layers_{i}/attn/k_proj/kernel", Split(split_qkv, "k")),
    WeightRule(_QKV + "weight", "layers_{i}/attn/v_proj/kernel", Split(split_qkv, "v")),
    WeightRule(_QKV + "bias", "layers_{i}/attn/q_proj/bias", Split(split_qkv, "q"), when="qkv_bias"),
    WeightRule(_QKV + "bias", "layers_{i}/attn/k_proj/bias", Split(split_qkv, "k"), when="qkv_bias"),
    WeightRule(_QKV + "bias", "layers_{i}/attn/v_proj/bias", Split(split_qkv, "v"), when="qkv_bias"),
    WeightRule(_LAYER + "attention.dense.weight", "layers_{i}/attn/o_proj/kernel", TRANSPOSE),
    WeightRule(_LAYER + "attention.dense.bias", "layers_{i}/attn/o_proj/bias", when="o_bias"),
    WeightRule(_LAYER + "mlp.dense_h_to_4h.weight", "layers_{i}/mlp/up_proj/kernel", TRANSPOSE),
    WeightRule(_LAYER + "mlp.dense_h_to_4h.bias", "layers_{i}/mlp/up_proj/bias"),
    WeightRule(_LAYER + "mlp.dense_4h_to_h.weight", "layers_{i}/mlp/down_proj/kernel", TRANSPOSE),
    WeightRule(_LAYER + "mlp.dense_4h_to_h.bias", "layers_{i}/mlp/down_proj/bias"),
    WeightRule("gpt_neox.final_layer_norm.weight", "final_norm/scale"),
    WeightRule("gpt_neox.final_layer_norm.bias", "final_norm/bias"),
    WeightRule("lm_head.weight", "lm_head/kernel", TRANSPOSE, when="untied"),
)

IGNORED = (r"gpt_neox\.layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)",)
# Pythia checkpoints call the head embed_out.
RENAMES = ((r"^embed_out\.", "lm_head."),)


def config_from_hf(raw: dict[str, Any]) -> ModelConfig:
    hf = hf_config_object(raw)
    head_dim = hf.hidden_size // hf.num_attention_heads
    partial = rope_parameters(hf).get("partial_rotary_factor", getattr(hf, "rotary_pct", 1.0))
    bias = bool(getattr(hf, "attention_bias", True))
    return ModelConfig(
        family="gpt_neox",
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads,
        num_kv_heads=hf.num_attention_heads,
        head_dim=head_dim,
        max_position_embeddings=hf.max_position_embeddings,
        norm_eps=float(hf.layer_norm_eps),
        rope=rope_config(hf),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=True,
        norm_kind="layer",
        mlp_kind="plain",
        activation=activation(hf.hidden_act, "gpt_neox"),
        rotary_dim=int(head_dim * partial),
        residual="parallel" if hf.use_parallel_residual else "sequential",
    )


FAMILY = Family(
    model_types=("gpt_neox",),
    config_from_hf=config_from_hf,
    weights=WEIGHTS,
    ignored=IGNORED,
    renames=RENAMES,
)
