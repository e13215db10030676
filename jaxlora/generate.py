"""The generation engine: a jitted prefill over the bucketed, left-padded prompt, then `lax.scan` decode chunks
over a KV cache that is donated from call to call and updated in place.

Compiled shapes depend only on (batch, prompt bucket, decode steps rounded to whole chunks), so prompts of
different lengths inside one bucket reuse the same two executables. Between chunks the host can stream the new
tokens out, apply stop strings, and stop early once every row is done.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.cache import KVCache, init_cache
from jaxlora.config import ModelConfig
from jaxlora.errors import UsageError
from jaxlora.model import Decoder, default_positions
from jaxlora.sampling import Processors, Sampling, SamplingArrays, sample_next

MIN_PROMPT_BUCKET = 16
DEFAULT_CHUNK = 32


class GenerateOutput(NamedTuple):
    """tokens [batch, max_new_tokens] int32 (new tokens only, pad after a row's end); lengths [batch] int32."""

    tokens: np.ndarray
    lengths: np.ndarray


class DecodeState(NamedTuple):
    """What the decode loop carries. `token` is the last sampled token, to be written at cache slot `write_index`."""

    cache: KVCache
    token: jax.Array  # [batch] int32
    position: jax.Array  # [batch] int32, the position of `token`
    write_index: jax.Array  # [] int32
    done: jax.Array  # [batch] bool
    keys: jax.Array  # [batch] PRNG keys
    seen: jax.Array  # [batch, vocab] bool (tokens in the sequence, for the repetition penalty) or [batch, 1]


def prompt_bucket(length: int) -> int:
    """Prompts are left-padded to a power of two (at least 16) so their lengths share compiled code."""
    return max(MIN_PROMPT_BUCKET, 1 << (length - 1).bit_length())


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int = 0, width: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> input_ids, attention_mask [batch, width] (default: the longest) padded on the left."""
    if not len(prompts) or any(len(p) == 0 for p in prompts):
        raise UsageError("every prompt needs at least one token")
    width = width or max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = True
    return ids, mask


def _mark_seen(seen: jax.Array, tokens: jax.Array, processors: Processors) -> jax.Array:
    if not processors.repetition_penalty:
        return seen
    return seen.at[jnp.arange(tokens.shape[0]), tokens].set(True)


def _split_keys(keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    pairs = jax.vmap(jax.random.split)(keys)
    return pairs[:, 0], pairs[:, 1]


@partial(jax.jit, static_argnames=("config", "processors", "stop_ids"), donate_argnames=("cache",))
def prefill(
    params,
    cache: KVCache,
    input_ids,
    attention_mask,
    keys,
    sampling: SamplingArrays,
    *,
    config: ModelConfig,
    processors: Processors,
    stop_ids: tuple[int, ...],
) -> DecodeState:
    """Run the prompt [batch, bucket] (left-padded) into slots 0..bucket-1 of `cache` and sample the first token."""
    batch, width = input_ids.shape
    positions = default_positions(attention_mask)
    key_valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask, (0, 0))
    logits, cache = Decoder(config).apply({"params": params}, input_ids, positions, key_valid, cache, 0, last_only=True)
    if processors.repetition_penalty:
        seen = jnp.zeros((batch, config.vocab_size), bool)
        rows = jnp.broadcast_to(jnp.arange(batch)[:, None], input_ids.shape)
        # Padding slots point at a column past the vocab, dropped by the scatter.
        seen = seen.at[rows, jnp.where(attention_mask, input_ids, config.vocab_size)].set(True, mode="drop")
    else:
        seen = jnp.zeros((batch, 1), bool)
    keys, step_keys = _split_keys(keys)
    first = sample_next(logits[:, 0], sampling, processors, step_keys, seen)
    stop = jnp.asarray(stop_ids or (-1,), jnp.int32)
    return DecodeState(
        cache=cache,
        token=first,
        position=positions[:, -1] + 1,
        write_index=jnp.asarray(width, jnp.int32),
        done=jnp.isin(first, stop),
        keys=keys,
        seen=_mark_seen(seen, first, processors),
    )


@partial(
    jax.jit,
    static_argnames=("config", "processors", "stop_ids", "pad_id", "steps"),
    donate_argnames=("state",),
)
def decode(
    params,
    state: DecodeState,
    sampling: SamplingArrays,
    *,
    config: ModelConfig,
    processors: Processors,
    stop_ids: tuple[int, ...],
    pad_id: int,
    steps: int,
) -> tuple[DecodeState, jax.Array]:
    """`steps` decode steps as one `lax.scan`. Returns the new state and the sampled tokens [batch, steps]."""
    decoder = Decoder(config)
    stop = jnp.asarray(stop_ids or (-1,), jnp.int32)
    batch = state.token.shape[0]

    def step(state: DecodeState, _):
        key_valid = jax.lax.dynamic_update_slice(state.cache.valid, jnp.ones((batch, 1), bool), (0, state.write_index))
        logits, cache = decoder.apply(
            {"params": params},
            state.token[:, None],
            state.position[:, None],
            key_valid,
            state.cache,
            state.write_index,
        )
        keys, step_keys = _split_keys(state.keys)
        token = sample_next(logits[:, 0], sampling, processors, step_keys, state.seen)
        token = jnp.where(state.done, pad_id, token)
        new_state = DecodeState(
            cache=cache,
            token=token,
            position=state.position + 1,
            write_index=state.write_index + 1,
            done=state.done | jnp.isin(token, stop),
            keys=keys,
            seen=_mark_seen(state.seen, token, processors),
        )
        return new_state, token

    state, tokens = jax.lax.scan(step, state, None, length=steps)
    return state, tokens.T


def _row_keys(key: jax.Array | None, batch: int, sampling: bool) -> jax.Array:
    if key is None:
        if sampling:
            raise UsageError("sampling with temperature > 0 needs a PRNG key")
        key = jax.random.key(0)
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)  # a raw uint32 key from jax.random.PRNGKey
    if key.shape == (batch,):
        return key
    if key.shape != ():
        raise UsageError(f"key must be one PRNG key or one per row ({batch}), got shape {key.shape}")
    # Row r's randomness depends on (key, r) only, not on the rest of the batch.
    return jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(batch))


def _stop_string_length(tokenizer, tokens: np.ndarray, stop: Sequence[str]) -> int | None:
    """The number of tokens up to and including the one that completes the first stop string, if any."""
    text = tokenizer.decode(tokens)
    if not any(s in text for s in stop):
        return None
    for n in range(1, len(tokens) + 1):
        if any(s in tokenizer.decode(tokens[:n]) for s in stop):
            return n
    return len(tokens)


class _Ends:
    """Host-side end of each row: stop ids (also caught in the loop) and stop strings (text, so host only)."""

    def __init__(self, batch: int, stop_ids: tuple[int, ...], stop: Sequence[str], tokenizer, pad_id: int):
        self.lengths = np.zeros((batch,), np.int64)  # 0 while the row runs
        self.history = np.zeros((batch, 0), np.int32)
        self.stop_ids, self.stop, self.tokenizer, self.pad_id = stop_ids, stop, tokenizer, pad_id

    @property
    def all_done(self) -> bool:
        return bool((self.lengths > 0).all())

    def add(self, new: np.ndarray) -> np.ndarray:
        """Append a chunk [batch, n]; returns it with everything past each row's end set to the pad id."""
        start = self.history.shape[1]
        self.history = np.concatenate([self.history, new], axis=1)
        for row in np.flatnonzero(self.lengths == 0):
            end = None
            hits = np.flatnonzero(np.isin(self.history[row, start:], self.stop_ids))
            if hits.size:
                end = start + int(hits[0]) + 1
            if self.stop:
                by_text = _stop_string_length(self.tokenizer, self.history[row, : end or None], self.stop)
                end = by_text if by_text is not None else end
            if end is not None:
                self.lengths[row] = end
                self.history[row, end:] = self.pad_id
        return self.history[:, start:]


def _run(
    params,
    config: ModelConfig,
    input_ids,
    *,
    max_new_tokens: int,
    key: jax.Array | None = None,
    attention_mask=None,
    sampling: Sampling | None = None,
    temperature: float | None = None,
    eos_token_ids: Sequence[int] = (),
    stop_token_ids: Sequence[int] = (),
    stop: Sequence[str] = (),
    tokenizer=None,
    pad_token_id: int = 0,
    chunk_size: int = DEFAULT_CHUNK,
) -> Iterator[tuple[np.ndarray, _Ends]]:
    input_ids = np.asarray(input_ids, np.int32)
    if input_ids.ndim != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise UsageError(f"input_ids must be [batch, prompt_len] with both >= 1, got shape {input_ids.shape}")
    if max_new_tokens < 1:
        raise UsageError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if chunk_size < 1:
        raise UsageError(f"chunk_size must be at least 1, got {chunk_size}")
    if stop and tokenizer is None:
        raise UsageError("stop strings need the tokenizer to match text")
    if sampling is None:
        sampling = Sampling(temperature=temperature or 0.0)
    elif temperature is not None:
        raise UsageError("give temperature inside `sampling`, not both")
    batch, prompt_len = input_ids.shape
    mask = np.ones(input_ids.shape, bool) if attention_mask is None else np.asarray(attention_mask, bool)
    if mask.shape != input_ids.shape:
        raise UsageError(f"attention_mask shape {mask.shape} differs from input_ids shape {input_ids.shape}")
    longest = int(mask.sum(axis=1).max())
    if longest + max_new_tokens > config.max_position_embeddings:
        raise UsageError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context of "
            f"{config.max_position_embeddings} tokens"
        )
    processors, arrays = sampling.compile(batch)
    keys = _row_keys(key, batch, processors.sample)

    # Left-pad to the bucket: real tokens stay right-aligned, so every row writes the same cache slot.
    width = prompt_bucket(prompt_len)
    ids = np.full((batch, width), pad_token_id, np.int32)
    ids[:, width - prompt_len :] = input_ids
    full_mask = np.zeros((batch, width), bool)
    full_mask[:, width - prompt_len :] = mask

    steps = max_new_tokens - 1
    chunk = min(chunk_size, max(steps, 1))
    chunks = -(-steps // chunk)
    cache = init_cache(config, batch, width + chunks * chunk, params["embed"]["embedding"].dtype)
    stop_ids = tuple(sorted({int(t) for t in (*eos_token_ids, *stop_token_ids)}))
    static = dict(config=config, processors=processors, stop_ids=stop_ids)
    ends = _Ends(batch, stop_ids, stop, tokenizer, pad_token_id)

    state = prefill(params, cache, ids, full_mask, keys, arrays, **static)
    yield ends.add(np.asarray(state.token)[:, None]), ends
    emitted = 1
    for _ in range(chunks):
        if ends.all_done or emitted >= max_new_tokens:
            break
        # Rows ended by a stop string are news to the loop: from now on it pads them.
        state = state._replace(done=jnp.asarray(ends.lengths > 0))
        state, tokens = decode(params, state, arrays, pad_id=pad_token_id, steps=chunk, **static)
        new = np.asarray(tokens)[:, : max_new_tokens - emitted]
        emitted += new.shape[1]
        yield ends.add(new), ends


def stream(params, config: ModelConfig, input_ids, *, max_new_tokens: int, **kwargs) -> Iterator[np.ndarray]:
    """Generate like `generate`, yielding new tokens as they come: arrays [batch, n], n <= chunk_size (default 32).

    Every yielded chunk is final: tokens past a row's end (EOS, stop id, stop string) are already the pad id.
    The iterator ends when every row is done or `max_new_tokens` tokens were produced.
    """
    for tokens, _ in _run(params, config, input_ids, max_new_tokens=max_new_tokens, **kwargs):
        yield tokens


def generate(params, config: ModelConfig, input_ids, *, max_new_tokens: int, **kwargs) -> GenerateOutput:
    """Generate up to `max_new_tokens` after each prompt.

    input_ids [batch, prompt_len] int32, left-padded when prompts differ in length (see `left_pad`), with
    attention_mask [batch, prompt_len] (1 = token). Sampling: `temperature=` (0 = greedy) or `sampling=Sampling(
    temperature, top_k, top_p, min_p, repetition_penalty)`, each a number or one value per row; `key`: one PRNG key
    (row r uses fold_in(key, r)) or one per row. A row ends after its first token in `eos_token_ids` or
    `stop_token_ids`, or the token completing one of the `stop` strings (needs `tokenizer`); later slots hold
    `pad_token_id`. Returns tokens [batch, max_new_tokens] int32 and lengths [batch] int32.
    """
    *_, (_, ends) = _run(params, config, input_ids, max_new_tokens=max_new_tokens, **kwargs)
    history = ends.history[:, :max_new_tokens]
    tokens = np.full((history.shape[0], max_new_tokens), kwargs.get("pad_token_id", 0), np.int32)
    tokens[:, : history.shape[1]] = history
    lengths = np.where(ends.lengths > 0, ends.lengths, max_new_tokens).astype(np.int32)
    return GenerateOutput(tokens, lengths)
