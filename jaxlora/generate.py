"""Text generation: one jitted prefill over the (left-padded) prompt, then a `lax.scan` decode over a KV cache."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.cache import init_cache
from jaxlora.config import ModelConfig
from jaxlora.errors import UsageError
from jaxlora.model import Decoder, default_positions
from jaxlora.sampling import sample_next


class GenerateOutput(NamedTuple):
    """tokens [batch, max_new_tokens] int32 (new tokens only, pad after a row's end); lengths [batch] int32."""

    tokens: np.ndarray
    lengths: np.ndarray


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> input_ids, attention_mask [batch, longest] with padding on the left."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UsageError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = True
    return ids, mask


@partial(jax.jit, static_argnames=("config", "max_new_tokens", "eos_token_ids", "pad_token_id"))
def _generate(
    params,
    config,
    input_ids,
    attention_mask,
    key,
    temperature,
    *,
    max_new_tokens,
    eos_token_ids,
    pad_token_id,
):
    batch, prompt_len = input_ids.shape
    decoder = Decoder(config)
    dtype = params["embed"]["embedding"].dtype
    cache = init_cache(config, batch, prompt_len + max_new_tokens, dtype)
    eos = jnp.asarray(eos_token_ids or (-1,), jnp.int32)

    positions = default_positions(attention_mask)
    key_valid = cache.valid.at[:, :prompt_len].set(attention_mask)
    logits, cache = decoder.apply({"params": params}, input_ids, positions, key_valid, cache, 0)
    key, sub = jax.random.split(key)
    first = sample_next(logits[:, -1], temperature, sub)

    def step(carry, write_index):
        cache, token, position, done, key = carry
        key_valid = jax.lax.dynamic_update_slice(cache.valid, jnp.ones((batch, 1), bool), (0, write_index))
        logits, cache = decoder.apply(
            {"params": params}, token[:, None], position[:, None], key_valid, cache, write_index
        )
        key, sub = jax.random.split(key)
        token = jnp.where(done, pad_token_id, sample_next(logits[:, 0], temperature, sub))
        done = done | jnp.isin(token, eos)
        return (cache, token, position + 1, done, key), token

    carry = (cache, first, positions[:, -1] + 1, jnp.isin(first, eos), key)
    write_slots = prompt_len + jnp.arange(max_new_tokens - 1)
    _, rest = jax.lax.scan(step, carry, write_slots)
    tokens = jnp.concatenate([first[:, None], rest.T], axis=1)
    is_eos = jnp.isin(tokens, eos)
    lengths = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1, max_new_tokens)
    return tokens, lengths.astype(jnp.int32)


def generate(
    params,
    config: ModelConfig,
    input_ids,
    *,
    key: jax.Array | None = None,
    max_new_tokens: int,
    temperature: float = 0.0,
    attention_mask=None,
    eos_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
) -> GenerateOutput:
    """Generate up to `max_new_tokens` after each prompt.

    input_ids [batch, prompt_len] int32, left-padded when prompts differ in length, with attention_mask
    [batch, prompt_len] (1 = token); temperature 0 is greedy; key: a jax PRNG key (needed when sampling).
    A row stops after its first token in `eos_token_ids`; later slots hold `pad_token_id`.
    """
    input_ids = np.asarray(input_ids, np.int32)
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise UsageError(f"input_ids must be [batch, prompt_len] with prompt_len >= 1, got {input_ids.shape}")
    if max_new_tokens < 1:
        raise UsageError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise UsageError(f"temperature must be >= 0, got {temperature}")
    total = input_ids.shape[1] + max_new_tokens
    if total > config.max_position_embeddings:
        raise UsageError(
            f"prompt ({input_ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"context of {config.max_position_embeddings} tokens"
        )
    if key is None:
        if temperature > 0:
            raise UsageError("sampling with temperature > 0 needs a PRNG key")
        key = jax.random.key(0)
    mask = np.ones(input_ids.shape, bool) if attention_mask is None else np.asarray(attention_mask, bool)
    temperatures = jnp.full((input_ids.shape[0],), temperature, jnp.float32)
    tokens, lengths = _generate(
        params,
        config,
        input_ids,
        mask,
        key,
        temperatures,
        max_new_tokens=max_new_tokens,
        eos_token_ids=tuple(int(e) for e in eos_token_ids),
        pad_token_id=int(pad_token_id),
    )
    return GenerateOutput(np.asarray(tokens), np.asarray(lengths))
