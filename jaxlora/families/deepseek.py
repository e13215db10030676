"""DeepSeek-V3: multi-head latent attention (compressed queries, keys and values from one cached latent per token,
RoPE on a decoupled part in interleaved pairs, YaRN with its mscale on the attention scale), then a dense MLP in
the first `first_k_dense_replace` layers and a mixture elsewhere: sigmoid routing limited to the best expert
groups, with a load-balancing bias that only chooses, scaled by `routed_scaling_factor`, plus ungated shared
experts. The multi-token-prediction layer of the released checkpoints (a layer past num_hidden_layers) predicts a
second token ahead for speculative decoding; generation does not use it, so conversion drops it and says so."""

from __future__ import annotations

import math
from typing import Any

from jaxlora.config import ModelConfig
from jaxlora.errors import ConfigError
from jaxlora.families.common import activation, hf_config_object, rope_config, rope_parameters
from jaxlora.families.llama import FINAL_NORM_AND_HEAD
from jaxlora.families.mixtral import split_gate_up
from jaxlora.families.table import TRANSPOSE, Family, Split, WeightRule

_LAYER = "model.layers.{i}."
_ATTN = _LAYER + "self_attn."
_MLP = _LAYER + "mlp."
_SHARED = _MLP + "shared_experts."

_COMMON = (
    WeightRule("model.embed_tokens.weight", "embed/embedding"),
    WeightRule(_LAYER + "input_layernorm.weight", "layers_{i}/attn_norm/scale"),
    WeightRule(_ATTN + "q_a_proj.weight", "layers_{i}/attn/q_a_proj/kernel", TRANSPOSE, "compressed_queries"),
    WeightRule(_ATTN + "q_a_proj.bias", "layers_{i}/attn/q_a_proj/bias", when="compressed_query_bias"),
    WeightRule(_ATTN + "q_a_layernorm.weight", "layers_{i}/attn/q_a_layernorm/scale", when="compressed_queries"),
    WeightRule(_ATTN + "q_b_proj.weight", "layers_{i}/attn/q_b_proj/kernel", TRANSPOSE, "compressed_queries"),
    WeightRule(_ATTN + "q_proj.weight", "layers_{i}/attn/q_proj/kernel", TRANSPOSE, "direct_queries"),
    WeightRule(_ATTN + "kv_a_proj_with_mqa.weight", "layers_{i}/attn/kv_a_proj_with_mqa/kernel", TRANSPOSE),
    WeightRule(_ATTN + "kv_a_proj_with_mqa.bias", "layers_{i}/attn/kv_a_proj_with_mqa/bias", when="qkv_bias"),
    WeightRule(_ATTN + "kv_a_layernorm.weight", "layers_{i}/attn/kv_a_layernorm/scale"),
    WeightRule(_ATTN + "kv_b_proj.weight", "layers_{i}/attn/kv_b_proj/kernel", TRANSPOSE),
    WeightRule(_ATTN + "o_proj.weight", "layers_{i}/attn/o_proj/kernel", TRANSPOSE),
    WeightRule(_ATTN + "o_proj.bias", "layers_{i}/attn/o_proj/bias", when="o_bias"),
    WeightRule(_LAYER + "post_attention_layernorm.weight", "layers_{i}/mlp_norm/scale"),
    WeightRule(_MLP + "gate_proj.weight", "layers_{i}/mlp/gate_proj/kernel", TRANSPOSE, when="dense_layer"),
    WeightRule(_MLP + "up_proj.weight", "layers_{i}/mlp/up_proj/kernel", TRANSPOSE, when="dense_layer"),
    WeightRule(_MLP + "down_proj.weight", "layers_{i}/mlp/down_proj/kernel", TRANSPOSE, when="dense_layer"),
    WeightRule(_MLP + "gate.weight", "layers_{i}/moe/router/kernel", TRANSPOSE, when="moe_layer"),
    WeightRule(_MLP + "gate.e_score_correction_bias", "layers_{i}/moe/score_bias", when="moe_layer"),
    WeightRule(_SHARED + "gate_proj.weight", "layers_{i}/moe/shared/gate_proj/kernel", TRANSPOSE, "shared_layer"),
    WeightRule(_SHARED + "up_proj.weight", "layers_{i}/moe/shared/up_proj/kernel", TRANSPOSE, "shared_layer"),
    WeightRule(_SHARED + "down_proj.weight", "layers_{i}/moe/shared/down_proj/kernel", TRANSPOSE, "shared_layer"),
) + FINAL_NORM_AND_HEAD

# The hub's layout (and what transformers' save_pretrained writes): one gate/up/down Linear per expert.
PER_EXPERT_WEIGHTS = _COMMON + (
    WeightRule(_MLP + "experts.{e}.gate_proj.weight", "layers_{i}/moe/gate", TRANSPOSE, when="moe_layer"),
    WeightRule(_MLP + "experts.{e}.up_proj.weight", "layers_{i}/moe/up", TRANSPOSE, when="moe_layer"),
    WeightRule(_MLP + "experts.{e}.down_proj.weight", "layers_{i}/moe/down", TRANSPOSE, when="moe_layer"),
)

# transformers 5's in-memory layout, fused: gate_up_proj [experts, 2 * mlp, hidden], down_proj [experts, hidden, mlp].
WEIGHTS = _COMMON + (
    WeightRule(_MLP + "experts.gate_up_proj", "layers_{i}/moe/gate", Split(split_gate_up, "gate"), "moe_layer"),
    WeightRule(_MLP + "experts.gate_up_proj", "layers_{i}/moe/up", Split(split_gate_up, "up"), "moe_layer"),
    WeightRule(_MLP + "experts.down_proj", "layers_{i}/moe/down", TRANSPOSE, when="moe_layer"),
)

# Options of the original config.json that transformers does not read; values other than these change the model.
_FIXED_OPTIONS = {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "moe_layer_freq": 1}

MTP_NOTE = "dropped the multi-token-prediction layer(s) {layers} ({count} tensors): generation does not use them"


def _mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def attention_scale(hf, head_dim: int) -> float:
    """1 / sqrt(head_dim), times mscale(factor, mscale_all_dim) squared under a scaled RoPE (YaRN), as
    transformers' DeepSeek attention computes it (the RoPE tables carry YaRN's own attention factor besides)."""
    params = rope_parameters(hf)
    scale = head_dim**-0.5
    if params.get("rope_type", params.get("type", "default")) != "default" and params.get("mscale_all_dim"):
        scale *= _mscale(float(params["factor"]), float(params["mscale_all_dim"])) ** 2
    return scale


def config_from_hf(raw: dict[str, Any]) -> ModelConfig:
    for name, value in _FIXED_OPTIONS.items():
        if name in raw and raw[name] != value:
            raise ConfigError(f"deepseek_v3 with {name}={raw[name]!r} is not supported (only {value!r})")
    if raw.get("quantization_config"):
        quantization = raw["quantization_config"]
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else "?"
        raise ConfigError(
            f"deepseek_v3 weights quantized by {method!r} (quantization_config) are not supported: dequantize to "
            "bfloat16 first"
        )
    hf = hf_config_object(raw)
    head_dim = hf.qk_nope_head_dim + hf.qk_rope_head_dim
    attention_bias = bool(hf.attention_bias)
    return ModelConfig(
        family="deepseek_v3",
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads,
        num_kv_heads=hf.num_attention_heads,
        head_dim=head_dim,
        max_position_embeddings=hf.max_position_embeddings,
        norm_eps=float(hf.rms_norm_eps),
        rope=rope_config(hf),
        tie_word_embeddings=bool(hf.tie_word_embeddings),
        qkv_bias=attention_bias,
        o_bias=attention_bias,
        activation=activation(hf.hidden_act, "deepseek_v3"),
        rotary_dim=hf.qk_rope_head_dim,
        rotary_style="interleaved" if hf.rope_interleave else "half",
        attn_scale=attention_scale(hf, head_dim),
        kv_lora_rank=hf.kv_lora_rank,
        q_lora_rank=hf.q_lora_rank or 0,
        v_head_dim=hf.v_head_dim,
        num_experts=hf.n_routed_experts,
        experts_per_token=hf.num_experts_per_tok,
        expert_intermediate_size=hf.moe_intermediate_size,
        normalize_expert_weights=bool(hf.norm_topk_prob),
        shared_expert_size=hf.moe_intermediate_size * hf.n_shared_experts,
        shared_expert_gated=False,
        dense_layers=tuple(range(min(hf.first_k_dense_replace or 0, hf.num_hidden_layers))),
        router="sigmoid_grouped",
        expert_groups=hf.n_group or 1,
        groups_per_token=hf.topk_group or 1,
        routed_scaling=float(hf.routed_scaling_factor),
    )


FAMILY = Family(
    model_types=("deepseek_v3",),
    config_from_hf=config_from_hf,
    weights=WEIGHTS,
    alternative_weights=PER_EXPERT_WEIGHTS,
    extra_layers_note=MTP_NOTE,
)
