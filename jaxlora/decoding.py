"""The device side of generation: jitted prefill, extend and decode over a KV cache, and the state they carry.

`prefill` runs a left-padded prompt into an empty cache and samples the first new token; `extend` runs more tokens
(a chat turn, or a suffix after a shared prefix) from wherever a state stopped; `decode` runs `steps` decode
steps as one `lax.scan`. Each donates its state (the cache is updated in place) and samples inside the compiled
code. Which sampling processors run, the stop ids and the mesh layout are static; the host side
(`jaxlora.generate`) picks prompt buckets, streams tokens out, applies stop strings and stops early.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxlora.cache import KVCache, batch_axis, init_cache
from jaxlora.config import ModelConfig
from jaxlora.cpu_matmul import loop_compiler_options
from jaxlora.errors import UsageError
from jaxlora.executables import stored_jit
from jaxlora.model import activation_dtype, apply_decoder, check_context, default_positions, tiled_for_one_program
from jaxlora.quant import for_decode_loop
from jaxlora.sampling import Processors, Sampling, SamplingArrays, TokenScores, next_token, row_keys
from jaxlora.sharding import DecodeLayout
from jaxlora.stacking import with_leading_axes

STATIC = ("config", "processors", "stop_ids", "layout", "score_top")


class DecodeState(NamedTuple):
    """What the decode loop carries. `token` is the last sampled token, to be written at cache slot `write_index`."""

    cache: KVCache
    token: jax.Array  # [batch] int32
    position: jax.Array  # [batch] int32, the position of `token`
    write_index: jax.Array  # [] int32
    done: jax.Array  # [batch] bool
    keys: jax.Array  # [batch] PRNG keys
    seen: jax.Array  # [batch, vocab] bool (tokens in the sequence, for the repetition penalty) or [batch, 1]
    scores: TokenScores | None = None  # how likely `token` was (when the call asked for scores)


@partial(jax.jit, static_argnames=("config",))
def forward_cached(
    params, config: ModelConfig, cache: KVCache, input_ids, write_index, attention_mask=None, lora=None
) -> tuple[jax.Array, KVCache]:
    """Run input_ids [batch, t] int32 into `cache` from slot `write_index` on, attending to what the cache holds:
    logits [batch, t, vocab] float32 and the updated cache (a new one: `cache` is not donated, so one prefix can be
    continued many ways).

    Prompt caching: `init_cache(config, batch, max_len)`, run the shared prefix at write_index 0, then each suffix at
    write_index = the prefix's width; its logits equal a full `forward` over prefix + suffix. attention_mask [batch,
    t] (1 = token) marks left padding of a first call; positions continue from the cache's real tokens.
    """
    mask = jnp.ones(input_ids.shape, bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
    before = jnp.sum(cache.key_valid, axis=1, keepdims=True, dtype=jnp.int32)
    positions = before + default_positions(mask)
    key_valid = jax.lax.dynamic_update_slice(cache.key_valid, mask, (0, write_index))
    return apply_decoder(
        params, config, input_ids, positions, key_valid, cache=cache, write_index=write_index, lora=lora
    )


def new_cache(config: ModelConfig, batch: int, max_len: int, dtype, layout: DecodeLayout | None = None) -> KVCache:
    """An empty cache, created where it will live (on a mesh: each device allocates only its shard)."""
    if layout is None:
        return _empty_cache(config, batch, max_len, jnp.dtype(dtype))
    shapes = jax.eval_shape(lambda: init_cache(config, batch, max_len, dtype))
    return jax.jit(lambda: init_cache(config, batch, max_len, dtype), out_shardings=cache_shardings(shapes, layout))()


# One compiled program (each zeros buffer made eagerly was a program of its own, read from the compile cache by a
# new process at a few ms apiece).
_empty_cache = stored_jit(init_cache, static_argnums=(0, 1, 2, 3))


def cache_shardings(cache: KVCache, layout: DecodeLayout) -> KVCache:
    """Where each buffer of `cache` (arrays or shapes) lives: split like the heads, a stacked one's leading axis
    whole."""

    def kv(buffer):
        return with_leading_axes(layout.cache_kv, batch_axis(buffer))

    return KVCache(tuple(map(kv, cache.keys)), tuple(map(kv, cache.values)), layout.cache_valid)


def place_state(state: DecodeState, layout: DecodeLayout | None) -> DecodeState:
    """On a mesh: the cache split like the heads (and the batch over `data`), the small per-row state replicated
    so every process can read it."""
    if layout is None:
        return state
    constrain = jax.lax.with_sharding_constraint
    cache = jax.tree.map(constrain, state.cache, cache_shardings(state.cache, layout))
    small = {
        f: jax.tree.map(lambda a: constrain(a, layout.replicated), getattr(state, f))
        for f in DecodeState._fields
        if f != "cache"
    }
    return DecodeState(cache=cache, **small)


def _split_keys(keys: jax.Array, processors: Processors) -> tuple[jax.Array, jax.Array]:
    """(the keys to carry on, this step's keys). A program that never draws (`processors.sample` False: greedy)
    passes its keys through unsplit, so it holds no threefry rounds to lower, compile or run."""
    if not processors.sample:
        return keys, keys
    pairs = jax.vmap(jax.random.split)(keys)
    return pairs[:, 0], pairs[:, 1]


def _is_stop(tokens: jax.Array, stop_ids: tuple[int, ...]) -> jax.Array:
    return jnp.isin(tokens, jnp.asarray(stop_ids or (-1,), jnp.int32))


def _mark_seen(seen: jax.Array, tokens: jax.Array, processors: Processors) -> jax.Array:
    """Add one token per row [batch] to the repetition-penalty mask."""
    if not processors.repetition_penalty:
        return seen
    return seen.at[jnp.arange(tokens.shape[0]), tokens].set(True)


def _mark_prompt_seen(seen: jax.Array, input_ids, attention_mask, processors: Processors) -> jax.Array:
    """Add the real prompt tokens [batch, t] to the repetition-penalty mask; padding points past the vocab and is
    dropped."""
    if not processors.repetition_penalty:
        return seen
    rows = jnp.broadcast_to(jnp.arange(input_ids.shape[0])[:, None], input_ids.shape)
    return seen.at[rows, jnp.where(attention_mask, input_ids, seen.shape[1])].set(True, mode="drop")


def _with_first_token(
    state: DecodeState, logits, sampling: SamplingArrays, processors: Processors, stop_ids, layout, score_top
) -> DecodeState:
    """`state` (its token not yet chosen) with the first new token sampled from the last logits [batch, vocab]."""
    keys, step_keys = _split_keys(state.keys, processors)
    first, scores = next_token(logits, sampling, processors, step_keys, state.seen, score_top)
    state = state._replace(
        token=first,
        done=_is_stop(first, stop_ids),
        keys=keys,
        seen=_mark_seen(state.seen, first, processors),
        scores=scores,
    )
    return place_state(state, layout)


@stored_jit(static_argnames=STATIC, donate_argnames=("cache",))
def prefill(
    params,
    cache: KVCache,
    input_ids,
    attention_mask,
    keys,
    sampling: SamplingArrays,
    lora=None,
    *,
    config: ModelConfig,
    processors: Processors,
    stop_ids: tuple[int, ...],
    layout: DecodeLayout | None = None,
    score_top: int | None = None,
) -> DecodeState:
    """Run the prompt [batch, bucket] (left-padded; attention_mask 1 = token) into slots 0..bucket-1 of an empty
    `cache` and sample the first token; keys [batch] PRNG keys, one per row; lora: unmerged adapters or None."""
    positions = default_positions(attention_mask)
    key_valid = jax.lax.dynamic_update_slice(cache.key_valid, attention_mask, (0, 0))
    logits, cache = apply_decoder(
        params,
        config,
        input_ids,
        positions,
        key_valid,
        cache=cache,
        write_index=0,
        logits_at=input_ids.shape[1] - 1,
        lora=lora,
    )
    return prefilled_state(
        cache,
        logits[:, 0],
        input_ids,
        attention_mask,
        positions,
        keys,
        sampling,
        config,
        processors,
        stop_ids,
        layout,
        score_top,
    )


def prefilled_state(
    cache: KVCache,
    last_logits,
    input_ids,
    attention_mask,
    positions,
    keys,
    sampling: SamplingArrays,
    config: ModelConfig,
    processors: Processors,
    stop_ids: tuple[int, ...],
    layout: DecodeLayout | None,
    score_top: int | None,
) -> DecodeState:
    """The state after a prompt [batch, width] ran into `cache`: the first new token sampled from the prompt's
    last logits [batch, vocab]."""
    batch, width = input_ids.shape
    seen = jnp.zeros((batch, config.vocab_size if processors.repetition_penalty else 1), bool)
    state = DecodeState(
        cache=cache,
        token=jnp.zeros((batch,), jnp.int32),
        position=positions[:, -1] + 1,
        write_index=jnp.asarray(width, jnp.int32),
        done=jnp.zeros((batch,), bool),
        keys=keys,
        seen=_mark_prompt_seen(seen, input_ids, attention_mask, processors),
    )
    return _with_first_token(state, last_logits, sampling, processors, stop_ids, layout, score_top)


@stored_jit(static_argnames=STATIC, donate_argnames=("state",))
def extend(
    params,
    state: DecodeState,
    input_ids,
    length,
    sampling: SamplingArrays,
    lora=None,
    *,
    config: ModelConfig,
    processors: Processors,
    stop_ids: tuple[int, ...],
    layout: DecodeLayout | None = None,
    score_top: int | None = None,
) -> DecodeState:
    """Continue every row with `length` more tokens (input_ids [batch, bucket], right-padded) from the state's slot.

    The state's `token` is discarded: the new tokens start at its slot and position. Used to add a chat turn to a
    conversation already in the cache instead of prefilling it again. Padding slots are left invalid; decoding
    overwrites them.
    """
    batch, width = input_ids.shape
    attention_mask = jnp.broadcast_to(jnp.arange(width) < length, (batch, width))
    positions = state.position[:, None] + jnp.arange(width)
    key_valid = jax.lax.dynamic_update_slice(state.cache.key_valid, attention_mask, (0, state.write_index))
    logits, cache = apply_decoder(
        params,
        config,
        input_ids,
        positions,
        key_valid,
        cache=state.cache,
        write_index=state.write_index,
        logits_at=length - 1,
        lora=lora,
    )
    state = state._replace(
        cache=cache,
        position=state.position + length,
        write_index=state.write_index + length,
        seen=_mark_prompt_seen(state.seen, input_ids, attention_mask, processors),
    )
    return _with_first_token(state, logits[:, 0], sampling, processors, stop_ids, layout, score_top)


def decode_step(
    params,
    state: DecodeState,
    sampling: SamplingArrays,
    lora=None,
    *,
    config: ModelConfig,
    processors: Processors,
    stop_ids: tuple[int, ...],
    pad_id: int,
    layout: DecodeLayout | None = None,
    score_top: int | None = None,
) -> DecodeState:
    """One decode step (traced, not jitted: the body of `decode`'s scan and of `sample`'s loop): write the state's
    token into the cache, sample the next one; rows already done get `pad_id` (and zero scores)."""
    batch = state.token.shape[0]
    new_slot = jnp.ones((batch, 1), bool)
    key_valid = jax.lax.dynamic_update_slice(state.cache.key_valid, new_slot, (0, state.write_index))
    logits, cache = apply_decoder(
        params,
        config,
        state.token[:, None],
        state.position[:, None],
        key_valid,
        cache=state.cache,
        write_index=state.write_index,
        lora=lora,
    )
    keys, step_keys = _split_keys(state.keys, processors)
    token, scores = next_token(logits[:, 0], sampling, processors, step_keys, state.seen, score_top)
    token = jnp.where(state.done, pad_id, token)
    if scores is not None:
        scores = jax.tree.map(lambda a: jnp.where(state.done.reshape((-1,) + (1,) * (a.ndim - 1)), 0, a), scores)
    new_state = DecodeState(
        cache=cache,
        token=token,
        position=state.position + 1,
        write_index=state.write_index + 1,
        done=state.done | _is_stop(token, stop_ids),
        keys=keys,
        seen=_mark_seen(state.seen, token, processors),
        scores=scores,
    )
    return place_state(new_state, layout)


def decode_steps(
    params,
    state: DecodeState,
    sampling: SamplingArrays,
    lora=None,
    *,
    config: ModelConfig,
    processors: Processors,
    stop_ids: tuple[int, ...],
    pad_id: int,
    steps: int,
    layout: DecodeLayout | None = None,
    score_top: int | None = None,
) -> tuple[DecodeState, jax.Array, TokenScores | None]:
    """`steps` decode steps as one `lax.scan`. Returns the new state, the sampled tokens [batch, steps] (rows already
    done get `pad_id`) and, when `score_top` is not None, their `TokenScores` (each field [batch, steps, ...])."""
    options = dict(config=config, processors=processors, stop_ids=stop_ids, pad_id=pad_id, layout=layout)
    loop_params = for_decode_loop(params, state.token.shape[0])

    def step(state: DecodeState, _):
        state = decode_step(loop_params, state, sampling, lora, score_top=score_top, **options)
        return state, (state.token, state.scores)

    state, (tokens, scores) = jax.lax.scan(step, state, None, length=steps)
    step_major = jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), (tokens, scores))
    if layout is not None:
        step_major = jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, layout.replicated), step_major)
    return state, *step_major


DECODE_JIT = dict(static_argnames=(*STATIC, "pad_id", "steps"), donate_argnames=("state",))
decode = stored_jit(decode_steps, **DECODE_JIT)


@functools.cache
def tiled_decode():
    """`decode` for params tiled for the CPU kernel (`model.decode_params`), compiled with
    `cpu_matmul.loop_compiler_options`."""
    return stored_jit(decode_steps, **DECODE_JIT, compiler_options=loop_compiler_options())


def decode_for(params, loop_params):
    """The jitted decode loop for `loop_params`, what `model.decode_params(params, ...)` returned."""
    return decode if loop_params is params else tiled_decode()


def checked_prompt(config: ModelConfig, input_ids, attention_mask, max_new_tokens: int) -> tuple[jax.Array, jax.Array]:
    """The prompt of an on-device generation (`sample`, `beam_search`) as ids [batch, prompt_len] int32 and mask
    bool, refused in one line when its shapes, dtype or length cannot work."""
    ids = jnp.asarray(input_ids)
    if ids.ndim != 2 or 0 in ids.shape or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise UsageError(f"input_ids must be integer ids [batch, prompt_len], got {ids.dtype} {ids.shape}")
    if max_new_tokens < 1:
        raise UsageError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    mask = jnp.ones(ids.shape, bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
    if mask.shape != ids.shape:
        raise UsageError(f"attention_mask shape {mask.shape} differs from input_ids shape {ids.shape}")
    check_context(config, ids.shape[1], max_new_tokens)
    return ids.astype(jnp.int32), mask


class SampleOutput(NamedTuple):
    """tokens [batch, max_new_tokens] int32 (pad after a row's end); lengths [batch] int32. Device arrays."""

    tokens: jax.Array
    lengths: jax.Array


def sample(
    params,
    config: ModelConfig,
    input_ids,
    *,
    key: jax.Array | None = None,
    max_new_tokens: int,
    attention_mask=None,
    sampling: Sampling | None = None,
    eos_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    lora=None,
) -> SampleOutput:
    """Generate on device, start to end: prefill and the whole decode loop (a `lax.while_loop` that stops once every
    row is done) in one compiled function, so it can sit inside a caller's `jax.jit` (an RL or eval step) and under
    `jax.vmap` (over keys, prompts or perturbed params).

    input_ids [batch, prompt_len] int32, left-padded when prompts differ (attention_mask [batch, prompt_len], 1 =
    token); pad prompts to a few fixed widths yourself to share compiles (`generate` does it for you). key: one PRNG
    key (row r uses fold_in(key, r), as in `generate`) or one per row. Static (hashable): config, max_new_tokens,
    sampling (a `Sampling` of numbers or tuples), eos_token_ids, pad_token_id. Greedy and sampled tokens equal
    `generate`'s for the same key. No stop strings or streaming: use `generate` / `stream` for those.
    """
    ids, mask = checked_prompt(config, input_ids, attention_mask, max_new_tokens)
    sampling = Sampling() if sampling is None else sampling
    keys = row_keys(key, ids.shape[0], sampling.compile(ids.shape[0])[0].sample)
    return _sample(
        params,
        tiled_for_one_program(params, config, ids.shape[0], ids, mask, keys, lora),
        ids,
        mask,
        keys,
        lora,
        config=config,
        max_new_tokens=int(max_new_tokens),
        sampling=sampling,
        stop_ids=tuple(sorted({int(t) for t in eos_token_ids})),
        pad_id=int(pad_token_id),
    )


@partial(jax.jit, static_argnames=("config", "max_new_tokens", "sampling", "stop_ids", "pad_id"))
def _sample(
    params, tiled_params, input_ids, attention_mask, keys, lora, *, config, max_new_tokens, sampling, stop_ids, pad_id
):
    """tiled_params: the decode loop's tiled copy (`model.tiled_for_one_program`), or None."""
    batch, width = input_ids.shape
    processors, arrays = sampling.compile(batch)
    static = dict(config=config, processors=processors, stop_ids=stop_ids)
    cache = init_cache(config, batch, width + max_new_tokens - 1, activation_dtype(params))
    state = prefill(params, cache, input_ids, attention_mask, keys, arrays, lora, **static)
    tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(state.token)
    loop_params = for_decode_loop(params, batch) if tiled_params is None else tiled_params

    def running(carry):
        produced, state, _ = carry
        return (produced < max_new_tokens) & ~state.done.all()

    def step(carry):
        produced, state, tokens = carry
        state = decode_step(loop_params, state, arrays, lora, pad_id=pad_id, **static)
        return produced + 1, state, jax.lax.dynamic_update_slice(tokens, state.token[:, None], (0, produced))

    _, _, tokens = jax.lax.while_loop(running, step, (jnp.int32(1), state, tokens))
    stops = _is_stop(tokens, stop_ids)
    lengths = jnp.where(stops.any(axis=1), jnp.argmax(stops, axis=1) + 1, max_new_tokens).astype(jnp.int32)
    return SampleOutput(tokens, lengths)
