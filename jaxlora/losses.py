"""Losses over the decoder's logits as pure functions."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def next_token_logprobs(logits: jax.Array, input_ids: jax.Array) -> jax.Array:
    """logits [batch, seq, vocab], input_ids [batch, seq] -> [batch, seq - 1] float32: log p(input_ids[:, t + 1])
    under the distribution at position t. Computed as logit - logsumexp, in float32, without a [batch, seq, vocab]
    log-softmax array."""
    logits = logits[:, :-1].astype(jnp.float32)
    picked = jnp.take_along_axis(logits, input_ids[:, 1:, None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)
