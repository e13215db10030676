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
from jaxlora.quant import is_quantized
from jaxlora.stacking import Stack, layer_stacks, stack_tree, unstack_tree

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@struct.dataclass
class Adapters:
    """weights mirrors the params: {"layers_0": {"attn": {"q_proj": {"a": [in, r], "b": [r, out]}}}, ...}, or their
    stacked layout for a model that scans its layers (`stacks`: its `jaxlora.stacking.layer_stacks`; () when
    per layer, as adapters are on disk).

    `config` and `stacks` are static pytree metadata: jax transformations see only the weights.
    """

    weights: dict
    config: LoraConfig = struct.field(pytree_node=False)
    stacks: tuple[Stack, ...] = struct.field(pytree_node=False, default=())

    def per_layer(self) -> Adapters:
        """These adapters in the per-layer layout (a copy of each layer's slice when stacked)."""
        if not self.stacks:
            return self
        return self.replace(weights=unstack_tree(self.weights, self.stacks), stacks=())

    def laid_out_for(self, config: ModelConfig) -> Adapters:
        """These adapters in the layout of a model of `config` (stacked when it scans its layers)."""
        adapters = self.per_layer()
        if not config.scan_layers:
            return adapters
        stacks = layer_stacks(config)
        return adapters.replace(weights=stack_tree(adapters.weights, stacks), stacks=stacks)


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
    return Adapters(weights, lora_config).laid_out_for(config)


def _fold(params: dict, adapters: Adapters, sign: float) -> dict:
    params = jax.tree.map(lambda x: x, params)  # a new tree: the caller's params are not touched
    scanned = any(group.startswith("stacks_") for group in params)
    if adapters.stacks and not scanned:
        adapters = adapters.per_layer()
    elif scanned and not adapters.stacks:
        raise UsageError("the params are stacked (scanned layers): lay the adapters out alike, adapters.laid_out_for")
    leaves, _ = jax.tree_util.tree_flatten_with_path(
        adapters.weights, is_leaf=lambda x: isinstance(x, dict) and "a" in x
    )
    for path, ab in leaves:
        module = get_path(params, tuple(k.key for k in path))
        kernel = module["kernel"]
        if is_quantized(kernel):
            raise UsageError(
                "adapters cannot be merged into quantized weights: pass them unmerged (lora=) to forward/generate"
            )
        delta = adapters.config.scale * (ab["a"].astype(jnp.float32) @ ab["b"].astype(jnp.float32))
        module["kernel"] = (kernel.astype(jnp.float32) + sign * delta).astype(kernel.dtype)
    return params


def merge(params: dict, adapters: Adapters) -> dict:
    """New params with W + scale * A @ B in every adapted kernel."""
    return _fold(params, adapters, 1.0)


def unmerge(params: dict, adapters: Adapters) -> dict:
    """The inverse of `merge` (up to float rounding)."""
    return _fold(params, adapters, -1.0)


@struct.dataclass
class AdapterBank:
    """Several adapters stacked for one batch (multi-LoRA): weights mirrors `Adapters.weights` with a leading
    adapter axis, a [n, in, rank] and b [n, rank, out], every adapter's ranks padded with zeros to the largest
    (exactly inert: zero columns of A meet zero rows of B) and its scale folded into its B; an adapter without a
    layer the others adapt has zeros there. `select` turns it into the per-row adapters a call runs."""

    weights: dict
    targets: tuple[str, ...] = struct.field(pytree_node=False)
    count: int = struct.field(pytree_node=False)
    stacks: tuple[Stack, ...] = struct.field(pytree_node=False, default=())  # as `Adapters.stacks`


def bank(adapters: Sequence[Adapters], config: ModelConfig) -> AdapterBank:
    """Stack adapters (any ranks, alphas, rsLoRA or not, target sets) into one bank; adapter k is index k."""
    if not adapters:
        raise UsageError("an adapter bank needs at least one adapter")
    rank = max(a.config.rank for a in adapters)
    targets = tuple(sorted({t for a in adapters for t in a.config.targets}))
    adapters = [adapter.per_layer() for adapter in adapters]
    weights: dict = {}
    for path, (fan_in, fan_out) in target_paths(config, targets).items():
        a = jnp.zeros((len(adapters), fan_in, rank), jnp.float32)
        b = jnp.zeros((len(adapters), rank, fan_out), jnp.float32)
        for k, adapter in enumerate(adapters):
            if path[-1] not in adapter.config.targets:
                continue
            ab, r = get_path(adapter.weights, path), adapter.config.rank
            a = a.at[k, :, :r].set(ab["a"].astype(jnp.float32))
            b = b.at[k, :r, :].set(adapter.config.scale * ab["b"].astype(jnp.float32))
        set_path(weights, path, {"a": a, "b": b})
    if config.scan_layers:  # the layers axis leads: [layers, n, in, rank]
        stacks = layer_stacks(config)
        return AdapterBank(stack_tree(weights, stacks), targets, len(adapters), stacks)
    return AdapterBank(weights, targets, len(adapters))


def select(adapter_bank: AdapterBank, adapter_ids) -> Adapters:
    """The adapters of a batch whose row r runs bank adapter adapter_ids[r] (-1: the bare base): [batch] int32 ->
    `Adapters` with per-row weights (a [batch, in, rank], b [batch, rank, out], scale 1: folded into b) that
    `forward`, `score`, `generate`, `stream` and `sample` take as `lora=` like any adapters. Works under jit."""
    ids = jnp.asarray(adapter_ids, jnp.int32)
    if ids.ndim != 1:
        raise UsageError(f"adapter_ids must be [batch], got shape {ids.shape}")
    if (
        not isinstance(ids, jax.core.Tracer)
        and ids.size
        and not (-1 <= int(ids.min()) and int(ids.max()) < adapter_bank.count)
    ):
        raise UsageError(f"adapter ids must be in [-1, {adapter_bank.count - 1}], got {ids.tolist()}")
    present = (ids >= 0)[:, None, None]
    safe = jnp.maximum(ids, 0)

    def rows(ab):
        axis = ab["a"].ndim - 3  # the adapter axis: after the layers axis of a stacked bank
        return {
            "a": jnp.take(ab["a"], safe, axis=axis),
            "b": jnp.where(present, jnp.take(ab["b"], safe, axis=axis), 0.0),
        }

    weights = jax.tree.map(rows, adapter_bank.weights, is_leaf=lambda x: isinstance(x, dict) and "a" in x)
    rank = jax.tree.leaves(weights)[0].shape[-1]
    config = LoraConfig(rank=rank, alpha=float(rank), targets=adapter_bank.targets)
    return Adapters(weights, config, adapter_bank.stacks)
