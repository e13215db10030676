"""LoRA adapters as a pure pytree beside the base params.

`init` makes adapters for the Linear layers named in `targets` (HF module names, so PEFT configs map 1:1);
`forward(..., lora=adapters)` adds scale * (x @ A) @ B to those layers without forming W + AB; `merge` and
`unmerge` fold the update into the kernels and back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import struct

from jaxlora.config import ModelConfig
from jaxlora.errors import UsageError

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float
    targets: tuple[str, ...]
    rslora: bool = False  # PEFT's use_rslora: scale alpha / sqrt(rank) instead of alpha / rank
    dropout: float = 0.0  # PEFT's lora_dropout: on the adapter's input, in training only

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


@struct.dataclass
class Adapters:
    """weights mirrors the params: {"layers_0": {"attn": {"q_proj": {"a": [in, r], "b": [r, out]}}}, ...}.

    `config` is static pytree metadata: jax transformations see only the weights.
    """

    weights: dict
    config: LoraConfig = struct.field(pytree_node=False)


def target_paths(config: ModelConfig, targets: Sequence[str]) -> dict[tuple[str, ...], tuple[int, int]]:
    """Param paths of the Linear modules named in `targets` -> their kernel shape [in, out]."""
    from jaxlora.model import param_shapes

    leaves, _ = jax.tree_util.tree_flatten_with_path(param_shapes(config))
    paths = {}
    for path, leaf in leaves:
        keys = tuple(k.key for k in path)
        if keys[-1] == "kernel" and keys[-2] in targets:
            paths[keys[:-1]] = leaf.shape
    found = {p[-1] for p in paths}
    missing = sorted(set(targets) - found)
    if missing:
        available = sorted({tuple(k.key for k in p)[-2] for p, _ in leaves if p[-1].key == "kernel"})
        raise UsageError(
            f"no Linear layer named {', '.join(missing)} in {config.family}; available: {', '.join(available)}"
        )
    return paths


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def init(
    config: ModelConfig,
    key: jax.Array,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    targets: Sequence[str] = DEFAULT_TARGETS,
    dropout: float = 0.0,
    rslora: bool = False,
    dtype=jnp.float32,
) -> Adapters:
    """New adapters: A from PEFT's Kaiming-uniform (bound 1 / sqrt(in)), B zero, so the model starts unchanged."""
    if rank < 1:
        raise UsageError(f"LoRA rank must be at least 1, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise UsageError(f"LoRA dropout must be in [0, 1), got {dropout}")
    lora_config = LoraConfig(
        rank=rank, alpha=float(alpha), targets=tuple(sorted(set(targets))), rslora=rslora, dropout=float(dropout)
    )
    weights: dict = {}
    paths = target_paths(config, lora_config.targets)
    for path, key_i in zip(sorted(paths), jax.random.split(key, len(paths)), strict=True):
        fan_in, fan_out = paths[path]
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(key_i, (fan_in, rank), dtype, -bound, bound)
        _set(weights, path, {"a": a, "b": jnp.zeros((rank, fan_out), dtype)})
    return Adapters(weights, lora_config)


def _fold(params: dict, adapters: Adapters, sign: float) -> dict:
    params = jax.tree.map(lambda x: x, params)  # a new tree: the caller's params are not touched
    leaves, _ = jax.tree_util.tree_flatten_with_path(
        adapters.weights, is_leaf=lambda x: isinstance(x, dict) and "a" in x
    )
    for path, ab in leaves:
        module = _get(params, tuple(k.key for k in path))
        kernel = module["kernel"]
        delta = adapters.config.scale * (ab["a"].astype(jnp.float32) @ ab["b"].astype(jnp.float32))
        module["kernel"] = (kernel.astype(jnp.float32) + sign * delta).astype(kernel.dtype)
    return params


def merge(params: dict, adapters: Adapters) -> dict:
    """New params with W + scale * A @ B in every adapted kernel."""
    return _fold(params, adapters, 1.0)


def unmerge(params: dict, adapters: Adapters) -> dict:
    """The inverse of `merge` (up to float rounding)."""
    return _fold(params, adapters, -1.0)
