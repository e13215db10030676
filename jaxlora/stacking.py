"""Scanned layers: which layers stack together, and the re-layout of a per-layer tree into stacked arrays and back.

Checkpoints, adapters on disk and every weight table keep one layout, a group per layer ("layers_0", ...). With
`ModelConfig.scan_layers`, the decoder instead runs each *stack*: a run of layers whose block is the same, `repeats`
times a period of `period` layers (Gemma 2's local/global pairs: period 2), as one `lax.scan`, so a deep model
compiles one period instead of every layer. Its params (and adapters, and KV cache) hold, per stack, one tree per
layer of the period with a leading axis of `repeats`:

    {"layers_0": T0, ..., "layers_5": T5}  ->  {"stacks_0": {"blocks_0": stack(T0, T1, ..., T5)}}

`stack_tree` and `unstack_tree` map between the two for any tree keyed by layer group (params, LoRA weights,
shardings); `stack_groups` does it for a model as its layers are restored, one at a time.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from jaxlora.config import ModelConfig
from jaxlora.errors import UsageError

# The layer count from which `auto` scans off TPU. scripts/bench_compile.py measured, on a 2-core CPU: scanned
# compile time flat in depth (about 1.6 s for a first generate call at 8, 32 or 96 layers) and unrolled growing by
# about 0.17 s per layer (16.6 s at 96), while SmolLM2's scanned decode runs at 0.82x (batch 1) to 0.93x (batch 8)
# of the unrolled one (prefill and a LoRA step at the same speed). The persistent compile cache pays the unrolled
# compile once per machine, the slower decode is paid on every token: unrolled stays the default off TPU until
# the compile passes about 12 s (64 layers; Llama-2-70B's 80 among them).
AUTO_SCAN_MIN_LAYERS = 64
LONGEST_PERIOD = 8


class Stack(NamedTuple):
    """Layers start .. start + period * repeats - 1, run as `repeats` steps of `period` layers."""

    start: int
    period: int
    repeats: int

    @property
    def layers(self) -> range:
        return range(self.start, self.start + self.period * self.repeats)

    def layer(self, member: int, step: int) -> int:
        """The layer index of period member `member` at scan step `step`."""
        return self.start + step * self.period + member


def layer_kind(config: ModelConfig, index: int) -> tuple:
    """Everything a layer's block depends on besides its weights: layers of one kind can share one compiled body."""
    return (config.layer_windows[index], config.moe_layer(index), index in config.no_rope_layers)


@functools.cache
def layer_stacks(config: ModelConfig) -> tuple[Stack, ...]:
    """The model's layers cut into stacks, greedily from the first layer: at each point the period (up to
    LONGEST_PERIOD) that repeats over the most layers, the shortest among equals; a layer that starts no repeat
    is a stack of its own."""
    kinds = [layer_kind(config, i) for i in range(config.num_layers)]
    stacks, start = [], 0
    while start < len(kinds):
        best = Stack(start, 1, 1)
        for period in range(1, min(LONGEST_PERIOD, len(kinds) - start) + 1):
            pattern, repeats = kinds[start : start + period], 1
            while kinds[start + repeats * period : start + (repeats + 1) * period] == pattern:
                repeats += 1
            if repeats > 1 and period * repeats > best.period * best.repeats:
                best = Stack(start, period, repeats)
        stacks.append(best)
        start += best.period * best.repeats
    return tuple(stacks)


def stack_key(k: int) -> str:
    return f"stacks_{k}"


def member_key(j: int) -> str:
    return f"blocks_{j}"


def stack_tree(tree: dict, stacks: tuple[Stack, ...]) -> dict:
    """A tree keyed by layer group ("layers_3": subtree, plus others such as "embed") -> the stacked layout. Layers
    missing from `tree` (adapters on some layers only) must be missing from every repeat of their period member."""
    out = {k: v for k, v in tree.items() if not k.startswith("layers_")}
    for k, stack in enumerate(stacks):
        members = {}
        for j in range(stack.period):
            parts = [tree.get(f"layers_{stack.layer(j, step)}") for step in range(stack.repeats)]
            if all(p is None for p in parts):
                continue
            if any(p is None for p in parts):
                raise UsageError(f"layers {list(stack.layers)} must all carry the same weights to be scanned")
            members[member_key(j)] = jax.tree.map(lambda *leaves: jnp.stack(leaves), *parts)
        if members:
            out[stack_key(k)] = members
    return out


def unstack_tree(tree: dict, stacks: tuple[Stack, ...]) -> dict:
    """The inverse of `stack_tree`: each layer's slice of the stacked arrays, keyed "layers_i" again."""
    out = {k: v for k, v in tree.items() if not k.startswith("stacks_")}
    for k, stack in enumerate(stacks):
        for j, member in tree.get(stack_key(k), {}).items():
            index = int(j.removeprefix("blocks_"))
            for step in range(stack.repeats):
                out[f"layers_{stack.layer(index, step)}"] = jax.tree.map(lambda a, s=step: a[s], member)
    return dict(sorted(out.items(), key=lambda item: _group_order(item[0])))


def _group_order(group: str) -> tuple:
    if group.startswith("layers_"):
        return (1, int(group.removeprefix("layers_")))
    return (0 if group == "embed" else 2, group)


@functools.partial(jax.jit, donate_argnums=0)
def _write_step(buffer: jax.Array, value: jax.Array, step) -> jax.Array:
    """buffer[step] = value in place (step traced: one program per leaf shape, not per layer)."""
    return buffer.at[step].set(value)


def stack_groups(groups: Iterable[tuple[str, dict]], config: ModelConfig) -> dict:
    """A loaded model's param groups ("embed", "layers_0", ...: per layer, as a checkpoint stores them) -> the
    stacked layout of `config`'s stacks. Each layer is written into its stack's buffers as it arrives (the
    buffers allocated at the stack's first layer, where that layer lives: its sharding with an unsplit leading
    axis) and dropped, so a stream of groups restored one at a time peaks at the stacked model plus one layer."""
    place = {
        stack.layer(j, step): (k, j, step, stack.repeats)
        for k, stack in enumerate(layer_stacks(config))
        for j in range(stack.period)
        for step in range(stack.repeats)
    }
    out, members = {}, {}
    for group, subtree in groups:
        if not group.startswith("layers_"):
            out[group] = subtree
            continue
        k, j, step, repeats = place[int(group.removeprefix("layers_"))]
        buffers = members.get((k, j))
        if buffers is None:
            buffers = jax.tree.map(lambda a, n=repeats: _empty_stack(a, n), subtree)
        members[(k, j)] = jax.tree.map(lambda b, a, s=step: _write_step(b, a, s), buffers, subtree)
        del subtree, buffers
    for (k, j), buffers in sorted(members.items()):
        out.setdefault(stack_key(k), {})[member_key(j)] = buffers
    return out


def with_leading_axes(sharding: NamedSharding, count: int) -> NamedSharding:
    """`sharding` for an array with `count` more (unsplit) leading axes: a stacked buffer of such arrays."""
    return NamedSharding(sharding.mesh, PartitionSpec(*(None,) * count, *sharding.spec))


def _empty_stack(leaf: jax.Array, repeats: int) -> jax.Array:
    sharding = leaf.sharding
    if isinstance(sharding, NamedSharding):
        sharding = with_leading_axes(sharding, 1)
    return jnp.zeros((repeats, *leaf.shape), leaf.dtype, device=sharding)


def resolve(choice: bool | str, config: ModelConfig) -> bool:
    """Whether to scan: True/False (or the CLI's "on"/"off") as given, "auto" on TPU or from AUTO_SCAN_MIN_LAYERS
    layers on."""
    choice = {"on": True, "off": False}.get(choice, choice) if isinstance(choice, str) else choice
    if choice in (True, False):
        return choice
    if choice != "auto":
        raise UsageError(f"scan_layers must be True, False, 'on', 'off' or 'auto', got {choice!r}")
    return jax.default_backend() == "tpu" or config.num_layers >= AUTO_SCAN_MIN_LAYERS
