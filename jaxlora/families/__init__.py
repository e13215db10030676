"""Model families: each is a config adapter plus a declarative HF-name -> param-path weight table.

A family differs from another by data, not by a copy of the decoder: the table says where each HF tensor goes,
the adapter turns an HF `config.json` into a `ModelConfig` (refusing options the decoder does not implement).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jaxlora.config import ModelConfig
from jaxlora.errors import ConfigError


@dataclass(frozen=True)
class WeightRule:
    """One HF tensor. `{i}` stands for the layer index in both names.

    transform: "transpose" turns a torch Linear weight [out, in] into a kernel [in, out]; None copies as is.
    when: name of a boolean ModelConfig field; the rule applies only when it is true.
    """

    hf_name: str
    param_path: str
    transform: str | None = None
    when: str | None = None


@dataclass(frozen=True)
class Family:
    model_types: tuple[str, ...]
    config_from_hf: Callable[[dict[str, Any]], ModelConfig]
    weights: tuple[WeightRule, ...]
    # HF tensors a checkpoint may carry that hold nothing the model needs (regex over the full name).
    ignored: tuple[str, ...] = ()


@dataclass(frozen=True)
class TensorPlan:
    """Where one source tensor goes."""

    param_path: tuple[str, ...]
    transform: str | None


def _registry() -> dict[str, Family]:
    from jaxlora.families import llama

    return {model_type: family for family in (llama.FAMILY,) for model_type in family.model_types}


def supported_model_types() -> list[str]:
    return sorted(_registry())


def family_for(model_type: str | None) -> Family:
    family = _registry().get(model_type or "")
    if family is None:
        raise ConfigError(f"unsupported model_type {model_type!r}; supported: {', '.join(supported_model_types())}")
    return family


def config_from_hf(hf_config: dict[str, Any]) -> ModelConfig:
    """HF `config.json` contents -> ModelConfig, through the family's adapter."""
    return family_for(hf_config.get("model_type")).config_from_hf(hf_config)


def tensor_plan(config: ModelConfig) -> dict[str, TensorPlan]:
    """Every HF tensor name this config needs -> where it goes. Each param is filled by exactly one tensor."""
    plan: dict[str, TensorPlan] = {}
    for rule in family_for(config.family).weights:
        if rule.when is not None and not getattr(config, rule.when):
            continue
        indices = range(config.num_layers) if "{i}" in rule.hf_name else [None]
        for i in indices:
            hf_name = rule.hf_name.format(i=i)
            path = tuple(rule.param_path.format(i=i).split("/"))
            plan[hf_name] = TensorPlan(path, rule.transform)
    return plan


def ignored_pattern(config: ModelConfig) -> re.Pattern[str]:
    family = family_for(config.family)
    patterns = list(family.ignored)
    if config.tie_word_embeddings:
        # Tied models saved from a state dict carry lm_head.weight, a second view of the embedding.
        patterns.append(r"lm_head\.weight")
    return re.compile("|".join(f"(?:{p})" for p in patterns) or r"(?!)")
