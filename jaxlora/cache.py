"""The KV cache: one key and one value buffer per layer plus which slots hold real tokens.

A layer with a sliding window shorter than the cache keeps a ring buffer of `window` entries instead: slot a of
the sequence lives at entry a % window, so a long generation's memory for that layer stays bounded.
"""

from __future__ import annotations

from functools import partial
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


def entry_shapes(config: ModelConfig) -> tuple[tuple[int, int], tuple[int, int]]:
    """(heads, width) of one slot's keys and of its values. Latent attention (DeepSeek-V3) caches one latent of
    kv_lora_rank per token as its "keys" and the rotated key part shared by all heads as its "values": MLA's
    point is that this is all it needs to keep (see `model.LatentAttention`)."""
    if config.mla:
        return (1, config.kv_lora_rank), (1, config.rope_dim)
    return (config.num_kv_heads, config.head_dim), (config.num_kv_heads, config.head_dim)


def bytes_per_token(config: ModelConfig, dtype=jnp.float32) -> int:
    """The cache's bytes for one token of one row, over all layers (full-length layers: a ring's are bounded)."""
    (kh, kd), (vh, vd) = entry_shapes(config)
    return config.num_layers * (kh * kd + vh * vd) * jnp.dtype(dtype).itemsize


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
    (kh, kd), (vh, vd) = entry_shapes(config)

    def buffers(heads: int, width: int) -> tuple[jax.Array, ...]:
        shapes = [(batch, n, heads, width) for n in lengths]
        if config.scan_layers:  # layers of a period member share a kind, hence a length
            shapes = [(s.repeats, *shapes[s.start + j]) for s in layer_stacks(config) for j in range(s.period)]
        return tuple(jnp.zeros(shape, dtype) for shape in shapes)

    return KVCache(keys=buffers(kh, kd), values=buffers(vh, vd), key_valid=jnp.zeros((batch, max_len), bool))


def ring_slots(next_slot: jax.Array, size: int) -> jax.Array:
    """The sequence slot each ring entry holds once slots < next_slot are written: [size] int32, negative for an
    entry never written. Entry j holds the latest slot a < next_slot with a % size == j."""
    return next_slot - 1 - jnp.mod(next_slot - 1 - jnp.arange(size), size)


def ring_write(
    buffer: jax.Array, new: jax.Array, write_index: jax.Array, end: jax.Array | None = None, layer=None
) -> jax.Array:
    """Write new [batch, t, ...] at sequence slots write_index.. into a ring [batch, size, ...] (or into entry
    `layer` of a stacked ring [repeats, batch, size, ...]).

    Only slots before `end` (default: all t) are kept, right padding (a chat turn's) being dropped so it cannot
    evict live entries; of those only the last `size` land.
    """
    size, t = buffer.shape[-3], new.shape[1]
    new = new.astype(buffer.dtype)
    if t == 1:
        return _write_at(buffer, new, write_index % size, layer)
    end = write_index + t if end is None else end
    slots = write_index + jnp.arange(t)
    entries = jnp.where((slots >= end - size) & (slots < end), slots % size, size)  # size: out of range, dropped
    if layer is None:
        return buffer.at[:, entries].set(new, mode="drop")
    return buffer.at[layer, :, entries].set(new.swapaxes(0, 1), mode="drop")


def _write_at(buffer: jax.Array, new: jax.Array, slot, layer=None) -> jax.Array:
    """new [batch, t, ...] written in place at `slot` of a layer's buffer, or of entry `layer` of a stacked one."""
    if layer is None:
        return jax.lax.dynamic_update_slice_in_dim(buffer, new, slot, axis=1)
    zero = jnp.zeros((), jnp.int32)
    return jax.lax.dynamic_update_slice(buffer, new[None], (layer, zero, slot, zero, zero))


class LayerCache(NamedTuple):
    """One layer's part of the cache as its attention sees it: the layer's own key/value buffers [batch, slots,
    kv_heads, head_dim], or a stack's buffers [repeats, batch, ...] and the layer's index in them. A scanned
    decoder carries the stacked buffers through its scan, so each layer writes its new entries into them in place
    and reads its slice, instead of copying its whole slice out and back every step."""

    keys: jax.Array
    values: jax.Array
    layer: jax.Array | None = None

    @property
    def size(self) -> int:
        """Entries per layer: the cache's slots, or a ring's window."""
        return self.keys.shape[-3]

    def read(self) -> tuple[jax.Array, jax.Array]:
        """This layer's keys and values [batch, size, kv_heads, head_dim]."""
        if self.layer is None:
            return self.keys, self.values
        take = partial(jax.lax.dynamic_index_in_dim, index=self.layer, axis=0, keepdims=False)
        return take(self.keys), take(self.values)

    def write(self, k: jax.Array, v: jax.Array, slot) -> LayerCache:
        """k, v [batch, t, kv_heads, head_dim] written at slots slot.. (a full buffer, not a ring)."""
        return self._replace(
            keys=_write_at(self.keys, k.astype(self.keys.dtype), slot, self.layer),
            values=_write_at(self.values, v.astype(self.values.dtype), slot, self.layer),
        )

    def write_ring(self, k: jax.Array, v: jax.Array, write_index, end=None) -> LayerCache:
        """k, v written into a ring at sequence slots write_index.. (see `ring_write`)."""
        return self._replace(
            keys=ring_write(self.keys, k, write_index, end, self.layer),
            values=ring_write(self.values, v, write_index, end, self.layer),
        )
