"""The KV cache: one key and one value buffer per layer plus which slots hold real tokens.

A layer with a sliding window shorter than the cache keeps a ring buffer of `window` entries instead: slot a of
the sequence lives at entry a % window, so a long generation's memory for that layer stays bounded.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxlora.config import ModelConfig
from jaxlora.stacking import layer_stacks


class KVCache(NamedTuple):
    """keys/values: per layer [batch, max_len or window, kv_heads, head_dim]; key_valid [batch, max_len] bool, the
    slots that hold a real token. A model that scans its layers (`jaxlora.stacking`) keeps one buffer per period
    member of each stack instead, [repeats, batch, ...]: the batch axis of a buffer is `batch_axis(buffer)`."""

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    key_valid: jax.Array

    @property
    def max_len(self) -> int:
        return self.key_valid.shape[1]


def layer_lengths(config: ModelConfig, max_len: int, ring: bool = True) -> tuple[int, ...]:
    """Entries per layer: the window for windowed layers (when shorter than max_len and `ring`), else max_len."""
    return tuple(w if ring and w is not None and w < max_len else max_len for w in config.layer_windows)


def batch_axis(buffer: jax.Array) -> int:
    """The batch axis of a cache buffer: 0 per layer, 1 when stacked ([repeats, batch, slots, heads, dim])."""
    return buffer.ndim - 4


def map_rows(fn, cache: KVCache) -> KVCache:
    """fn(array, batch axis) applied to every array of the cache: a gather, repeat or reorder of its rows."""
    return KVCache(
        tuple(fn(k, batch_axis(k)) for k in cache.keys),
        tuple(fn(v, batch_axis(v)) for v in cache.values),
        fn(cache.key_valid, 0),
    )


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32, ring: bool = True) -> KVCache:
    """An empty cache for `max_len` slots; ring buffers for windowed layers unless `ring=False`."""
    lengths = layer_lengths(config, max_len, ring)
    shapes = [(batch, n, config.num_kv_heads, config.head_dim) for n in lengths]
    if config.scan_layers:  # layers of a period member share a kind, hence a length
        shapes = [(s.repeats, *shapes[s.start + j]) for s in layer_stacks(config) for j in range(s.period)]
    return KVCache(
        keys=tuple(jnp.zeros(shape, dtype) for shape in shapes),
        values=tuple(jnp.zeros(shape, dtype) for shape in shapes),
        key_valid=jnp.zeros((batch, max_len), bool),
    )


def ring_slots(next_slot: jax.Array, size: int) -> jax.Array:
    """The sequence slot each ring entry holds once slots < next_slot are written: [size] int32, negative for an
    entry never written. Entry j holds the latest slot a < next_slot with a % size == j."""
    return next_slot - 1 - jnp.mod(next_slot - 1 - jnp.arange(size), size)


def ring_write(buffer: jax.Array, new: jax.Array, write_index: jax.Array, end: jax.Array | None = None) -> jax.Array:
    """Write new [batch, t, ...] at sequence slots write_index.. into a ring [batch, size, ...].

    Only slots before `end` (default: all t) are kept, right padding (a chat turn's) being dropped so it cannot
    evict live entries; of those only the last `size` land.
    """
    size, t = buffer.shape[1], new.shape[1]
    new = new.astype(buffer.dtype)
    if t == 1:
        return jax.lax.dynamic_update_slice_in_dim(buffer, new, write_index % size, axis=1)
    end = write_index + t if end is None else end
    slots = write_index + jnp.arange(t)
    entries = jnp.where((slots >= end - size) & (slots < end), slots % size, size)  # size: out of range, dropped
    return buffer.at[:, entries].set(new, mode="drop")
