"""Helpers the family adapters share: parsing with transformers' own config classes, RoPE, activations."""

from __future__ import annotations

from typing import Any

from jaxlora.config import RopeConfig
from jaxlora.errors import ConfigError

SUPPORTED_ROPE = ("default", "linear", "llama3")

# HF activation names -> ours. "gelu_new", "gelu_pytorch_tanh" and "gelu_fast" are all the tanh approximation.
ACTIVATIONS = {
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
    if name not in ACTIVATIONS:
        raise ConfigError(f"activation {name!r} is not supported for {model_type}; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def rope_parameters(hf) -> dict[str, Any]:
    params = getattr(hf, "rope_parameters", None)
    if not params:  # transformers 4 spelling
        params = dict(getattr(hf, "rope_scaling", None) or {})
        params["rope_theta"] = getattr(hf, "rope_theta", 10000.0)
    return dict(params)


def rope_config(source) -> RopeConfig:
    """RoPE from an HF config object or from one rope-parameters dict."""
    params = source if isinstance(source, dict) else rope_parameters(source)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in SUPPORTED_ROPE:
        raise ConfigError(f"rope_type {kind!r} is not supported yet; supported: {', '.join(SUPPORTED_ROPE)}")
    return RopeConfig(
        theta=float(params.get("rope_theta", 10000.0)),
        kind=kind,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings") or 0),
    )
