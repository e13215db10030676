"""What a family's weight table is made of: rows (`WeightRule`) mapping HF tensors onto param paths, `Split` for
fused HF tensors, and the `Family` that bundles a table with its config adapter."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxlora.config import ModelConfig

# A fused HF tensor -> all of its parts, already as [in, out] kernels or vectors.
Splitter = Callable[[np.ndarray, ModelConfig], dict[str, np.ndarray]]

TRANSPOSE = "transpose"


@dataclass(frozen=True)
class Split:
    """Take `part` of a fused HF tensor as cut by `splitter` (e.g. CodeGen's qkv_proj -> its "q" kernel).

    Export to HF runs the same splitter over the fused tensor's element indices to learn where each part goes.
    """

    splitter: Splitter
    part: str


Transform = str | Split | None


@dataclass(frozen=True)
class WeightRule:
    """One param filled from one HF tensor. `{i}` stands for the layer index in both names; an HF name with `{e}`
    (an expert index) names one tensor per expert, stacked on a new leading axis.

    transform: None copies as is; TRANSPOSE turns a torch Linear weight [out, in] into a kernel [in, out] (on the
    trailing two axes); a `Split` takes one part of a fused tensor.
    when: name of a boolean ModelConfig attribute, or of a ModelConfig method of the layer index (`moe_layer`,
    `dense_layer`, ...); the rule applies only (in the layers) where it is true.
    """

    hf_name: str
    param_path: str
    transform: Transform = None
    when: str | None = None

    def __post_init__(self):
        if not (self.transform is None or self.transform == TRANSPOSE or isinstance(self.transform, Split)):
            raise ValueError(f"unknown transform {self.transform!r} for {self.hf_name}")


@dataclass(frozen=True)
class Family:
    model_types: tuple[str, ...]
    config_from_hf: Callable[[dict[str, Any]], ModelConfig]
    weights: tuple[WeightRule, ...]
    # HF tensors a checkpoint may carry that hold nothing the model needs (regex over the full name).
    ignored: tuple[str, ...] = ()
    # (regex, replacement) applied to source tensor names first: other spellings of the same checkpoint.
    renames: tuple[tuple[str, str], ...] = ()
    # Another complete table for the same params, used when a checkpoint has its tensors and not the main
    # table's (Mixtral: one tensor per expert in the original checkpoints, fused in transformers 5's).
    alternative_weights: tuple[WeightRule, ...] = ()
    # Tensors of layers past num_hidden_layers are dropped with this note (DeepSeek-V3's multi-token prediction;
    # formatted with {layers} and {count}); empty: such tensors are refused like any unexpected one.
    extra_layers_note: str = ""
    # transformers keeps this family's Linear layers as Conv1D, weight [in, out] (GPT-2): PEFT's fan_in_fan_out.
    conv1d_weights: bool = False


@dataclass(frozen=True)
class TensorPlan:
    """One param and where it comes from: one HF tensor, or one per expert stacked (`stacked`)."""

    hf_names: tuple[str, ...]
    param_path: tuple[str, ...]
    transform: Transform
    stacked: bool = False


def applies(rule: WeightRule, config: ModelConfig, layer: int | None) -> bool:
    """Whether `rule` fills a param of `config` (in layer `layer`, for a per-layer rule)."""
    if rule.when is None:
        return True
    condition = getattr(config, rule.when)
    return bool(condition(layer) if callable(condition) else condition)


def layers_of(rule: WeightRule, config: ModelConfig) -> list[int | None]:
    """The layer indices a rule fills a param in ([None] for a rule outside the layers)."""
    if "{i}" not in rule.hf_name:
        return [None] if applies(rule, config, None) else []
    return [i for i in range(config.num_layers) if applies(rule, config, i)]


def apply_transform(transform: Transform, array: np.ndarray, config: ModelConfig) -> np.ndarray:
    """An HF tensor (or one expert's) -> the param it fills."""
    if transform is None:
        return array
    if transform == TRANSPOSE:
        return np.swapaxes(array, -1, -2)
    return transform.splitter(array, config)[transform.part]
