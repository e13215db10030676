"""Losses over the decoder's logits as pure functions."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlora.config import ModelConfig
from jaxlora.errors import UsageError
from jaxlora.model import forward


def next_token_logprobs(logits: jax.Array, input_ids: jax.Array) -> jax.Array:
    """logits [batch, seq, vocab], input_ids [batch, seq] -> [batch, seq - 1] float32: log p(input_ids[:, t + 1])
    under the distribution at position t. Computed as logit - logsumexp, in float32, without a [batch, seq, vocab]
    log-softmax array."""
    logits = logits[:, :-1].astype(jnp.float32)
    picked = jnp.take_along_axis(logits, input_ids[:, 1:, None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def score(params, config: ModelConfig, input_ids, attention_mask=None, lora=None) -> jax.Array:
    """Per-token log-probabilities of a batch of texts: [batch, seq - 1] float32, entry t = log p(input_ids[:, t + 1]
    | input_ids[:, : t + 1]); 0 where that token or the one before it is padding. Left- or right-padded batches
    (positions follow attention_mask, as in `forward`). Pure: works under jit (config static), grad and vmap."""
    ids = jnp.asarray(input_ids, jnp.int32)
    if ids.ndim != 2:
        raise UsageError(f"input_ids must be [batch, seq], got shape {ids.shape}")
    mask = jnp.ones(ids.shape, bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
    logits = forward(params, config, ids, attention_mask=mask, lora=lora)
    return jnp.where(mask[:, :-1] & mask[:, 1:], next_token_logprobs(logits, ids), 0.0)
