"""LoRA adapters as a pure pytree beside the base params.

`init` makes adapters for the Linear layers named in `targets` (HF module names, so PEFT configs map 1:1);
`forward(..., lora=adapters)` adds scale * (x @ A) @ B to those layers without forming W + AB; `merge` and
`unmerge` fold the update into the kernels and back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import struct

from jaxlora.config import LoraConfig, ModelConfig
from jaxlora.errors import UsageError
from jaxlora.model import get_path, linear_kernels, set_path

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@struct.dataclass
class Adapters:
    """weights mirrors the params: {"layers_0": {"attn": {"q_proj": {"a": [in, r], "b": [r, out]}}}, ...}.

    `config` is static pytree metadata: jax transformations see only the weights.
    """

    weights: dict
    config: LoraConfig = struct.field(pytree_node=False)


def target_paths(config: ModelConfig, targets: Sequence[str]) -> dict[tuple[str, ...], tuple[int, int]]:
    """Module paths of the Linear layers named in `targets` -> their kernel shape [in, out]."""
    kernels = linear_kernels(config)
    paths = {path: shape for path, shape in kernels.items() if path[-1] in targets}
    missing = sorted(set(targets) - {p[-1] for p in paths})
    if missing:
        available = sorted({p[-1] for p in kernels})
        raise UsageError(
            f"no Linear layer named {', '.join(missing)} in {config.family}; available: {', '.join(available)}"
        )
    return paths


def adapter_shapes(config: LoraConfig, model_config: ModelConfig) -> dict:
    """The adapters' weight tree as jax.ShapeDtypeStruct leaves (float32): a: [in, rank], b: [rank, out]."""
    tree: dict = {}
    for path, (fan_in, fan_out) in target_paths(model_config, config.targets).items():
        a = jax.ShapeDtypeStruct((fan_in, config.rank), jnp.float32)
        set_path(tree, path, {"a": a, "b": jax.ShapeDtypeStruct((config.rank, fan_out), jnp.float32)})
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
        set_path(weights, path, {"a": a, "b": jnp.zeros((rank, fan_out), dtype)})
    return Adapters(weights, lora_config)


def _fold(params: dict, adapters: Adapters, sign: float) -> dict:
    params = jax.tree.map(lambda x: x, params)  # a new tree: the caller's params are not touched
    leaves, _ = jax.tree_util.tree_flatten_with_path(
        adapters.weights, is_leaf=lambda x: isinstance(x, dict) and "a" in x
    )
    for path, ab in leaves:
        module = get_path(params, tuple(k.key for k in path))
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
