"""The Llama block: Llama 2/3, Mistral, Qwen2, SmolLM2 (pre-norm RMSNorm, rotate-half RoPE, GQA, SwiGLU)."""

from __future__ import annotations

from typing import Any

from jaxlora.config import ModelConfig, RopeConfig
from jaxlora.errors import ConfigError
from jaxlora.families import Family, WeightRule

_LAYER = "model.layers.{i}."

WEIGHTS = (
    WeightRule("model.embed_tokens.weight", "embed/embedding"),
    WeightRule(_LAYER + "input_layernorm.weight", "layers_{i}/attn_norm/scale"),
    WeightRule(_LAYER + "self_attn.q_proj.weight", "layers_{i}/attn/q_proj/kernel", "transpose"),
    WeightRule(_LAYER + "self_attn.k_proj.weight", "layers_{i}/attn/k_proj/kernel", "transpose"),
    WeightRule(_LAYER + "self_attn.v_proj.weight", "layers_{i}/attn/v_proj/kernel", "transpose"),
    WeightRule(_LAYER + "self_attn.o_proj.weight", "layers_{i}/attn/o_proj/kernel", "transpose"),
    WeightRule(_LAYER + "self_attn.q_proj.bias", "layers_{i}/attn/q_proj/bias", when="qkv_bias"),
    WeightRule(_LAYER + "self_attn.k_proj.bias", "layers_{i}/attn/k_proj/bias", when="qkv_bias"),
    WeightRule(_LAYER + "self_attn.v_proj.bias", "layers_{i}/attn/v_proj/bias", when="qkv_bias"),
    WeightRule(_LAYER + "self_attn.o_proj.bias", "layers_{i}/attn/o_proj/bias", when="o_bias"),
    WeightRule(_LAYER + "post_attention_layernorm.weight", "layers_{i}/mlp_norm/scale"),
    WeightRule(_LAYER + "mlp.gate_proj.weight", "layers_{i}/mlp/gate_proj/kernel", "transpose"),
    WeightRule(_LAYER + "mlp.up_proj.weight", "layers_{i}/mlp/up_proj/kernel", "transpose"),
    WeightRule(_LAYER + "mlp.down_proj.weight", "layers_{i}/mlp/down_proj/kernel", "transpose"),
    WeightRule(_LAYER + "mlp.gate_proj.bias", "layers_{i}/mlp/gate_proj/bias", when="mlp_bias"),
    WeightRule(_LAYER + "mlp.up_proj.bias", "layers_{i}/mlp/up_proj/bias", when="mlp_bias"),
    WeightRule(_LAYER + "mlp.down_proj.bias", "layers_{i}/mlp/down_proj/bias", when="mlp_bias"),
    WeightRule("model.norm.weight", "final_norm/scale"),
    WeightRule("lm_head.weight", "lm_head/kernel", "transpose", when="untied"),
)

# Older checkpoints saved the rotary buffer; it is recomputed from the config.
IGNORED = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)

SUPPORTED_ROPE = ("default", "linear", "llama3")


def _hf_config_object(raw: dict[str, Any]):
    """Parse with transformers' own config class so defaults (and old/new key spellings) match HF exactly."""
    from transformers import AutoConfig

    fields = {k: v for k, v in raw.items() if k != "model_type"}
    try:
        return AutoConfig.for_model(raw["model_type"], **fields)
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"invalid {raw['model_type']} config: {e}") from None


def _rope_config(hf) -> RopeConfig:
    params = getattr(hf, "rope_parameters", None)
    if not params:  # transformers 4 spelling
        params = dict(getattr(hf, "rope_scaling", None) or {})
        params["rope_theta"] = getattr(hf, "rope_theta", 10000.0)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in SUPPORTED_ROPE:
        raise ConfigError(f"rope_type {kind!r} is not supported yet; supported: {', '.join(SUPPORTED_ROPE)}")
    return RopeConfig(
        theta=float(params["rope_theta"]),
        kind=kind,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings") or 0),
    )


def _layer_windows(hf, model_type: str, num_layers: int) -> tuple[int | None, ...]:
    window = getattr(hf, "sliding_window", None)
    if model_type == "mistral":
        return (window,) * num_layers
    layer_types = getattr(hf, "layer_types", None)
    if layer_types is None:
        return (None,) * num_layers
    unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise ConfigError(f"unsupported layer_types {unknown}")
    return tuple(window if t == "sliding_attention" else None for t in layer_types)


def config_from_hf(raw: dict[str, Any]) -> ModelConfig:
    model_type = raw["model_type"]
    hf = _hf_config_object(raw)
    act = getattr(hf, "hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hidden_act {act!r} is not supported for {model_type} (only 'silu')")
    num_heads = hf.num_attention_heads
    attention_bias = bool(getattr(hf, "attention_bias", False))
    return ModelConfig(
        family=model_type,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or num_heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // num_heads,
        max_position_embeddings=hf.max_position_embeddings,
        norm_eps=float(hf.rms_norm_eps),
        rope=_rope_config(hf),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        # Qwen2 always biases q/k/v (never o); Llama's attention_bias covers all four projections.
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=model_type != "qwen2" and attention_bias,
        mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        layer_windows=_layer_windows(hf, model_type, hf.num_hidden_layers),
    )


FAMILY = Family(
    model_types=("llama", "mistral", "qwen2"),
    config_from_hf=config_from_hf,
    weights=WEIGHTS,
    ignored=IGNORED,
)
