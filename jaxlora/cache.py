"""The KV cache: one key and one value buffer per layer plus which slots hold real tokens."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxlora.config import ModelConfig


class KVCache(NamedTuple):
    """keys/values: per layer [batch, max_len, kv_heads, head_dim]; valid [batch, max_len] bool."""

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    valid: jax.Array

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    shape = (batch, max_len, config.num_kv_heads, config.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
    return KVCache(
        keys=zeros,
        values=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
        valid=jnp.zeros((batch, max_len), bool),
    )
