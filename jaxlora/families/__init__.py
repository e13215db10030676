"""Model families: each is a config adapter plus a declarative HF-name -> param-path weight table.

A family differs from another by data, not by a copy of the decoder: the table says where each HF tensor goes,
the adapter turns an HF `config.json` into a `ModelConfig` (refusing options the decoder does not implement).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from jaxlora.config import SIZE_LIMITS, ModelConfig
from jaxlora.errors import ConfigError
from jaxlora.families import (
    codegen,
    deepseek,
    gemma2,
    gpt2,
    gpt_neox,
    gpt_oss,
    gptj,
    llama,
    llama_kin,
    mixtral,
    olmo2,
    phi3,
    qwen_moe,
)
from jaxlora.families.table import Family, TensorPlan, WeightRule, apply_transform, layers_of

_FAMILIES = (
    llama.FAMILY,
    llama_kin.SMOLLM3,
    llama_kin.GRANITE,
    olmo2.FAMILY,
    gemma2.FAMILY,
    phi3.FAMILY,
    mixtral.FAMILY,
    qwen_moe.FAMILY,
    gpt_oss.FAMILY,
    deepseek.FAMILY,
    gpt2.FAMILY,
    gptj.FAMILY,
    codegen.FAMILY,
    gpt_neox.FAMILY,
)
_REGISTRY = {model_type: family for family in _FAMILIES for model_type in family.model_types}


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def family_for(model_type: str | None) -> Family:
    family = _REGISTRY.get(model_type or "")
    if family is None:
        raise ConfigError(f"unsupported model_type {model_type!r}; supported: {', '.join(supported_model_types())}")
    return family


# HF config keys that size a model (every family's spelling) -> the ModelConfig field whose limit applies.
HF_SIZE_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "n_embd": "hidden_size",
    "intermediate_size": "intermediate_size",
    "n_inner": "intermediate_size",
    "num_hidden_layers": "num_layers",
    "n_layer": "num_layers",
    "num_attention_heads": "num_heads",
    "n_head": "num_heads",
    "num_key_value_heads": "num_kv_heads",
    "head_dim": "head_dim",
    "max_position_embeddings": "max_position_embeddings",
    "n_positions": "max_position_embeddings",
    "n_ctx": "max_position_embeddings",
    "num_local_experts": "num_experts",
}


def check_hf_sizes(hf_config: dict[str, Any]) -> None:
    """Refuse absurd sizes before transformers parses the config (it builds per-layer lists from them)."""
    for key, field in HF_SIZE_KEYS.items():
        value = hf_config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"config {key} must be a positive integer, got {value!r}")
        if value > SIZE_LIMITS[field]:
            raise ConfigError(f"config {key} = {value} is past any real model's (at most {SIZE_LIMITS[field]})")


def config_from_hf(hf_config: dict[str, Any]) -> ModelConfig:
    """HF `config.json` contents -> ModelConfig, through the family's adapter."""
    check_hf_sizes(hf_config)
    return family_for(hf_config.get("model_type")).config_from_hf(hf_config)


def _plan(config: ModelConfig, rules: tuple[WeightRule, ...]) -> list[TensorPlan]:
    plan = []
    for rule in rules:
        for i in layers_of(rule, config):
            path = tuple(rule.param_path.format(i=i).split("/"))
            if "{e}" in rule.hf_name:
                names = tuple(rule.hf_name.format(i=i, e=e) for e in range(config.num_experts))
                plan.append(TensorPlan(names, path, rule.transform, stacked=True))
            else:
                plan.append(TensorPlan((rule.hf_name.format(i=i),), path, rule.transform))
    return plan


def tensor_plan(config: ModelConfig, available: set[str] | None = None) -> list[TensorPlan]:
    """Every param of this config and the HF tensor(s) it comes from (a fused tensor feeds several params).

    With `available` (the checkpoint's tensor names), a family's alternative table is chosen when the checkpoint
    has all of its tensors and not all of the main table's.
    """
    family = family_for(config.family)
    plan = _plan(config, family.weights)
    if available is not None and family.alternative_weights:
        alternative = _plan(config, family.alternative_weights)
        if not _complete(plan, available) and _complete(alternative, available):
            return alternative
    return plan


def _complete(plan: list[TensorPlan], available: set[str]) -> bool:
    return all(name in available for item in plan for name in item.hf_names)


def param_from_hf(item: TensorPlan, array: np.ndarray, config: ModelConfig) -> np.ndarray:
    """One HF tensor of `item` -> the param it fills (for a stacked item: one expert's slice)."""
    return apply_transform(item.transform, array, config)


def canonical_name(config: ModelConfig, name: str) -> str:
    for pattern, replacement in family_for(config.family).renames:
        name = re.sub(pattern, replacement, name)
    return name


def ignored_pattern(config: ModelConfig) -> re.Pattern[str]:
    family = family_for(config.family)
    patterns = list(family.ignored)
    if config.tie_word_embeddings:
        # Tied models saved from a state dict carry lm_head.weight, a second view of the embedding.
        patterns.append(r"lm_head\.weight")
    return re.compile("|".join(f"(?:{p})" for p in patterns) or r"(?!)")
