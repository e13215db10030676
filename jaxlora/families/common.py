"""Helpers the family adapters share: parsing with transformers' own config classes, RoPE, activations."""

from __future__ import annotations

import math
from typing import Any

from jaxlora.config import ROPE_KINDS, RopeConfig
from jaxlora.errors import ConfigError

# HF activation names -> ours. "gelu_new", "gelu_pytorch_tanh" and "gelu_fast" are all the tanh approximation.
HF_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
}


def hf_config_object(raw: dict[str, Any]):
    """Parse with transformers' own config class so defaults (and old/new key spellings) match HF exactly."""
    from transformers import AutoConfig

    fields = {k: v for k, v in raw.items() if k != "model_type"}
    try:
        return AutoConfig.for_model(raw["model_type"], **fields)
    except Exception as e:  # transformers' validators raise assorted types, some of their own
        detail = " ".join(str(e).split()) or type(e).__name__
        raise ConfigError(f"invalid {raw['model_type']} config: {detail}") from None


def activation(name: str | None, model_type: str) -> str:
    if name not in HF_ACTIVATIONS:
        raise ConfigError(
            f"activation {name!r} is not supported for {model_type}; supported: {', '.join(HF_ACTIVATIONS)}"
        )
    return HF_ACTIVATIONS[name]


def llama_style_sizes(hf) -> dict[str, Any]:
    """The ModelConfig sizes read the same way from every Llama-style HF config (Llama, Phi-3, Mixtral, Gemma 2)."""
    num_heads = hf.num_attention_heads
    return dict(
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or num_heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // num_heads,
        max_position_embeddings=hf.max_position_embeddings,
        norm_eps=float(hf.rms_norm_eps),
    )


def gpt2_style_sizes(hf) -> dict[str, Any]:
    """The ModelConfig sizes of GPT-2-style HF configs (n_embd, n_layer, ...: GPT-2, GPT-J, CodeGen)."""
    hidden = hf.n_embd
    return dict(
        vocab_size=hf.vocab_size,
        hidden_size=hidden,
        intermediate_size=hf.n_inner or 4 * hidden,
        num_layers=hf.n_layer,
        num_heads=hf.n_head,
        num_kv_heads=hf.n_head,
        head_dim=hidden // hf.n_head,
        max_position_embeddings=hf.n_positions,
        norm_eps=float(hf.layer_norm_epsilon),
    )


def rope_parameters(hf) -> dict[str, Any]:
    params = getattr(hf, "rope_parameters", None)
    if not params:  # transformers 4 spelling
        params = dict(getattr(hf, "rope_scaling", None) or {})
        params["rope_theta"] = getattr(hf, "rope_theta", 10000.0)
    return dict(params)


def windows_by_layer_type(layer_types, window: int | None) -> tuple[int | None, ...]:
    """HF `layer_types` ("full_attention" / "sliding_attention" per layer) -> each layer's window (None: full)."""
    unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise ConfigError(f"unsupported layer_types {unknown}")
    return tuple(window if kind == "sliding_attention" else None for kind in layer_types)


def rope_config(source, max_position_embeddings: int | None = None) -> RopeConfig:
    """RoPE from an HF config object, or from one rope-parameters dict with the model's max_position_embeddings.

    Defaults the way transformers' `_compute_*_parameters` resolve them: YaRN and LongRoPE take a missing factor as
    max_position_embeddings / original and derive the attention factor from it; dynamic NTK scales from
    max_position_embeddings.
    """
    if isinstance(source, dict):
        params = source
    else:
        params, max_position_embeddings = rope_parameters(source), source.max_position_embeddings
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_KINDS:
        raise ConfigError(f"rope_type {kind!r} is not supported yet; supported: {', '.join(ROPE_KINDS)}")
    original = int(params.get("original_max_position_embeddings") or 0)
    if kind == "dynamic":
        original = int(max_position_embeddings)
    elif kind in ("yarn", "longrope", "llama3") and not original:
        original = int(max_position_embeddings)
    factor = params.get("factor")
    if factor is None:
        factor = max_position_embeddings / original if kind in ("yarn", "longrope") else 1.0
    factor = float(factor)
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        attention_factor = _default_attention_factor(kind, factor, original, params)
    return RopeConfig(
        theta=float(params.get("rope_theta", 10000.0)),
        kind=kind,
        factor=factor,
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=original,
        attention_factor=float(attention_factor),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        truncate=bool(params.get("truncate", True)),
        short_factor=tuple(params.get("short_factor") or ()),
        long_factor=tuple(params.get("long_factor") or ()),
    )


def _default_attention_factor(kind: str, factor: float, original: int, params: dict[str, Any]) -> float:
    if kind == "yarn":

        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if params.get("mscale") and params.get("mscale_all_dim"):
            return mscale(factor, params["mscale"]) / mscale(factor, params["mscale_all_dim"])
        return mscale(factor)
    if kind == "longrope" and factor > 1.0:
        return math.sqrt(1 + math.log(factor) / math.log(original))
    return 1.0
