"""Choosing the next token from logits: pure functions, traced inside the decode loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_next(logits: jax.Array, temperature: jax.Array, key: jax.Array) -> jax.Array:
    """logits [batch, vocab] float32, temperature [batch] float32 (0 = greedy), key -> tokens [batch] int32."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    safe_temperature = jnp.where(temperature > 0, temperature, 1.0)
    sampled = jax.random.categorical(key, logits / safe_temperature[:, None], axis=-1).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)
