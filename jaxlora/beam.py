"""Beam search on device, with transformers' semantics (its vectorized `_beam_search`, transformers 4.50+).

Each step scores every beam's continuations by accumulated log-probability, keeps the best `max(2, 1 + n_eos) *
num_beams` candidates, moves candidates that end (an EOS id, or the last allowed token) into a table of finished
hypotheses scored by `sum of log-probs / length ** length_penalty`, and continues the best `num_beams` that did
not end. The loop stops as transformers' does: when no running beam can still beat the finished ones (its length
heuristic for `early_stopping=False` or "never"), when every beam is finished (`early_stopping=True`), or at
`max_new_tokens`. The whole search is one compiled `lax.while_loop`; the KV cache holds batch * num_beams rows and
is reordered by each step's parent beams.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.cache import init_cache, map_rows
from jaxlora.config import ModelConfig
from jaxlora.decoding import checked_prompt
from jaxlora.errors import UsageError
from jaxlora.model import activation_dtype, apply_decoder, default_positions, tiled_for_one_program
from jaxlora.quant import for_decode_loop

# transformers' sentinel for "cannot be chosen"; its float32 rounding is part of the semantics being matched.
EXCLUDED = -1.0e9


class BeamSearchOutput(NamedTuple):
    """Finished hypotheses, best first: tokens [batch, num_beams, max_new_tokens] int32 (pad after each one's
    end); lengths [batch, num_beams] int32; scores [batch, num_beams] float32, the sum of the tokens' log-probs
    divided by length ** length_penalty (transformers' `sequences_scores`)."""

    tokens: jax.Array
    lengths: jax.Array
    scores: jax.Array


def beam_search(
    params,
    config: ModelConfig,
    input_ids,
    *,
    num_beams: int,
    max_new_tokens: int,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    eos_token_ids: Sequence[int] = (),
    attention_mask=None,
    pad_token_id: int = 0,
    lora=None,
) -> BeamSearchOutput:
    """Beam search for input_ids [batch, prompt_len] int32 (left-padded, with attention_mask, when prompts differ),
    equal to transformers' `generate(num_beams=..., do_sample=False, num_return_sequences=num_beams)`.

    early_stopping: False (transformers' default heuristic), True (stop once `num_beams` hypotheses are finished) or
    "never". Pure and compiled once per shape: works inside a caller's `jax.jit`; config, num_beams,
    max_new_tokens, length_penalty, early_stopping, eos_token_ids and pad_token_id are static.
    """
    if num_beams < 1:
        raise UsageError(f"num_beams must be at least 1, got {num_beams}")
    if early_stopping not in (True, False, "never"):
        raise UsageError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    ids, mask = checked_prompt(config, input_ids, attention_mask, max_new_tokens)
    return _beam_search(
        params,
        tiled_for_one_program(params, config, ids.shape[0] * int(num_beams), ids, mask, lora),
        ids,
        mask,
        lora,
        config=config,
        num_beams=int(num_beams),
        max_new_tokens=int(max_new_tokens),
        length_penalty=float(length_penalty),
        early_stopping=early_stopping,
        stop_ids=tuple(sorted({int(t) for t in eos_token_ids})),
        pad_id=int(pad_token_id),
    )


def _gather_beams(x: jax.Array, index: jax.Array) -> jax.Array:
    """x [batch, beams, ...], index [batch, k] -> x[b, index[b, j], ...] as [batch, k, ...]."""
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def _length_divisors(max_new_tokens: int, length_penalty: float) -> jax.Array:
    """length ** length_penalty for lengths 1..max_new_tokens, computed in double and rounded once to float32, as
    transformers divides a float32 tensor by a Python float."""
    lengths = np.arange(1, max_new_tokens + 1, dtype=np.float64)
    return jnp.asarray((lengths**length_penalty).astype(np.float32))


class _Beams(NamedTuple):
    step: jax.Array  # [] int32: tokens chosen so far
    logits: jax.Array  # [batch * beams, vocab]: the next token's logits for each running beam
    cache: object
    running_tokens: jax.Array  # [batch, beams, max_new_tokens]
    running_scores: jax.Array  # [batch, beams] accumulated log-probs
    finished_tokens: jax.Array  # [batch, beams, max_new_tokens]
    finished_scores: jax.Array  # [batch, beams]
    finished: jax.Array  # [batch, beams] bool: the slot holds a real hypothesis
    finished_lengths: jax.Array  # [batch, beams]
    improvable: jax.Array  # [batch, 1] bool: running beams may still beat the finished ones
    going: jax.Array  # [] bool


@partial(
    jax.jit,
    static_argnames=(
        "config",
        "num_beams",
        "max_new_tokens",
        "length_penalty",
        "early_stopping",
        "stop_ids",
        "pad_id",
    ),
)
def _beam_search(
    params,
    tiled_params,
    input_ids,
    attention_mask,
    lora,
    *,
    config: ModelConfig,
    num_beams: int,
    max_new_tokens: int,
    length_penalty: float,
    early_stopping: bool | str,
    stop_ids: tuple[int, ...],
    pad_id: int,
) -> BeamSearchOutput:
    batch, width = input_ids.shape
    beams, new = num_beams, max_new_tokens
    candidates = max(2, 1 + len(stop_ids)) * beams
    divisors = _length_divisors(new, length_penalty)

    positions = default_positions(attention_mask)
    cache = init_cache(config, batch, width + new, activation_dtype(params))
    key_valid = jax.lax.dynamic_update_slice(cache.key_valid, attention_mask, (0, 0))
    logits, cache = apply_decoder(
        params, config, input_ids, positions, key_valid, cache=cache, write_index=0, logits_at=width - 1, lora=lora
    )
    # Every beam starts as the prompt; only beam 0 may be extended at the first step.
    cache = map_rows(lambda a, axis: jnp.repeat(a, beams, axis=axis), cache)
    next_position = jnp.repeat(positions[:, -1] + 1, beams)  # [batch * beams]
    empty = jnp.full((batch, beams, new), pad_id, jnp.int32)
    start = _Beams(
        step=jnp.int32(0),
        logits=jnp.repeat(logits[:, 0], beams, axis=0),
        cache=cache,
        running_tokens=empty,
        running_scores=jnp.zeros((batch, beams), jnp.float32).at[:, 1:].set(EXCLUDED),
        finished_tokens=empty,
        finished_scores=jnp.full((batch, beams), EXCLUDED, jnp.float32),
        finished=jnp.zeros((batch, beams), bool),
        finished_lengths=jnp.zeros((batch, beams), jnp.int32),
        improvable=jnp.ones((batch, 1), bool),
        going=jnp.bool_(True),
    )

    loop_params = for_decode_loop(params, batch * beams) if tiled_params is None else tiled_params

    def step(s: _Beams) -> _Beams:
        vocab = s.logits.shape[-1]
        log_probs = jax.nn.log_softmax(s.logits.astype(jnp.float32), axis=-1).reshape(batch, beams, vocab)
        accumulated = (log_probs + s.running_scores[:, :, None]).reshape(batch, beams * vocab)
        top_scores, top_index = jax.lax.top_k(accumulated, candidates)
        parents, tokens = top_index // vocab, (top_index % vocab).astype(jnp.int32)
        sequences = _gather_beams(s.running_tokens, parents).at[:, :, s.step].set(tokens)
        ends = jnp.isin(tokens, jnp.asarray(stop_ids or (-1,), jnp.int32)) | (s.step == new - 1)

        # The best candidates that did not end keep running.
        running_scores = top_scores + ends.astype(jnp.float32) * EXCLUDED
        keep = jax.lax.top_k(running_scores, beams)[1]
        running_tokens = _gather_beams(sequences, keep)
        running_scores = _gather_beams(running_scores, keep)
        running_parents = _gather_beams(parents, keep)

        # Candidates among the top `beams` that ended compete with the finished hypotheses.
        just_finished = ends & (jnp.arange(candidates) < beams)[None, :]
        scores = top_scores / divisors[s.step]
        full = jnp.all(s.finished, axis=-1, keepdims=True) & (early_stopping is True)
        scores = scores + full.astype(jnp.float32) * EXCLUDED
        scores = scores + (~s.improvable).astype(jnp.float32) * EXCLUDED
        scores = scores + (~just_finished).astype(jnp.float32) * EXCLUDED
        merged_scores = jnp.concatenate([s.finished_scores, scores], axis=1)
        best = jax.lax.top_k(merged_scores, beams)[1]
        finished_tokens = _gather_beams(jnp.concatenate([s.finished_tokens, sequences], axis=1), best)
        finished_scores = _gather_beams(merged_scores, best)
        finished = _gather_beams(jnp.concatenate([s.finished, just_finished], axis=1), best)
        lengths = jnp.full((batch, candidates), s.step + 1, jnp.int32)
        finished_lengths = _gather_beams(jnp.concatenate([s.finished_lengths, lengths], axis=1), best)

        # transformers' stopping test, after the step.
        if early_stopping == "never" and length_penalty > 0.0:
            best_divisor = divisors[new - 1]
        else:
            best_divisor = divisors[s.step]
        best_possible = running_scores[:, :1] / best_divisor
        worst_finished = jnp.where(finished, jnp.min(finished_scores, axis=1, keepdims=True), EXCLUDED)
        improvable = s.improvable & jnp.any(best_possible > worst_finished, axis=-1, keepdims=True)
        all_full = jnp.all(finished) & (early_stopping is True)
        going = jnp.any(improvable) & ~all_full & ~jnp.all(ends) & (s.step + 1 < new)

        # Each running beam continues its parent's cache with its newest token.
        rows = (jnp.arange(batch)[:, None] * beams + running_parents).reshape(-1)
        cache = map_rows(lambda a, axis: jnp.take(a, rows, axis=axis), s.cache)
        write_index = width + s.step
        key_valid = jax.lax.dynamic_update_slice(cache.key_valid, jnp.ones((batch * beams, 1), bool), (0, write_index))
        last = jax.lax.dynamic_index_in_dim(running_tokens, s.step, axis=2, keepdims=False).reshape(-1, 1)
        logits, cache = apply_decoder(
            loop_params,
            config,
            last,
            (next_position + s.step)[:, None],
            key_valid,
            cache=cache,
            write_index=write_index,
            lora=lora,
        )
        return _Beams(
            step=s.step + 1,
            logits=logits[:, 0],
            cache=cache,
            running_tokens=running_tokens,
            running_scores=running_scores,
            finished_tokens=finished_tokens,
            finished_scores=finished_scores,
            finished=finished,
            finished_lengths=finished_lengths,
            improvable=improvable,
            going=going,
        )

    done = jax.lax.while_loop(lambda s: s.going, step, start)
    past_end = jnp.arange(new)[None, None, :] >= done.finished_lengths[:, :, None]
    tokens = jnp.where(past_end, pad_id, done.finished_tokens)
    return BeamSearchOutput(tokens, done.finished_lengths, done.finished_scores)
