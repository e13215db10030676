"""The host side of generation: `generate` and `stream` over the jitted steps of `jaxlora.decoding`.

A prompt batch is left-padded to a power-of-two bucket, prefilled into a KV cache sized for the bucket plus the
new tokens, then decoded in `lax.scan` chunks. Compiled shapes depend only on (batch, prompt bucket, decode steps
rounded to whole chunks), so prompts of different lengths inside one bucket reuse the same two executables.
Between chunks the host streams the new tokens out, applies stop strings, and stops once every row is done.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import jax
import numpy as np

from jaxlora.config import ModelConfig
from jaxlora.decoding import DecodeState, decode_for, new_cache, prefill
from jaxlora.errors import UsageError
from jaxlora.model import activation_dtype, check_context, decode_params, prefill_params
from jaxlora.prefill_layers import applies, prefill_by_layer
from jaxlora.sampling import Processors, Sampling, SamplingArrays, TokenScores, row_keys
from jaxlora.sharding import DecodeLayout, decode_layout, params_mesh, put, to_host

MIN_PROMPT_BUCKET = 16
DEFAULT_CHUNK = 32


class GenerateOutput(NamedTuple):
    """tokens [batch, max_new_tokens] int32 (new tokens only, pad after a row's end); lengths [batch] int32.

    With `return_logprobs=True`: logprobs [batch, max_new_tokens] float32, each token's log-probability under the
    processed distribution it was drawn from (transformers' `compute_transition_scores(..., normalize_logits=True)`);
    raw_logprobs, the same under the model's own distribution; top_ids / top_logprobs [batch, max_new_tokens, k]
    (k = `top_logprobs`), the model's own most likely tokens at each step. 0 past a row's end.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    logprobs: np.ndarray | None = None
    raw_logprobs: np.ndarray | None = None
    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None


class StreamChunk(NamedTuple):
    """New tokens from one step of `stream`.

    tokens [batch, n] int32 (pad past a row's end); start: index of tokens[:, 0] among the new tokens;
    lengths [batch]: a row's final length once it has ended, 0 while it runs; scores: with `return_logprobs`, the
    tokens' `TokenScores` as numpy arrays [batch, n, ...] (0 past a row's end).
    """

    tokens: np.ndarray
    start: int
    lengths: np.ndarray
    scores: TokenScores | None = None

    def row(self, r: int) -> list[int]:
        """Row r's real tokens in this chunk (none past its end)."""
        n = self.tokens.shape[1]
        keep = n if self.lengths[r] == 0 else min(max(int(self.lengths[r]) - self.start, 0), n)
        return [int(t) for t in self.tokens[r, :keep]]


def prompt_bucket(length: int) -> int:
    """Prompts are left-padded to a power of two (at least 16) so their lengths share compiled code."""
    return max(MIN_PROMPT_BUCKET, 1 << (length - 1).bit_length())


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int = 0, width: int | None = None, masks=None
) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> input_ids, attention_mask [batch, width] (default: the longest) padded on the left.

    masks: for rows that carry their own padding already (rows of a [batch, n] array), which entries are tokens.
    """
    if not len(prompts) or any(len(p) == 0 for p in prompts):
        raise UsageError("every prompt needs at least one token")
    width = width or max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = True if masks is None else masks[row]
    return ids, mask


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

    def __init__(
        self, batch: int, stop_ids: tuple[int, ...], stop: Sequence[str], tokenizer, pad_id: int, max_new_tokens: int
    ):
        self.lengths = np.zeros((batch,), np.int64)  # 0 while the row runs
        self.history = np.zeros((batch, 0), np.int32)
        self.stop_ids, self.stop, self.tokenizer, self.pad_id = stop_ids, stop, tokenizer, pad_id
        self.max_new_tokens = max_new_tokens

    @property
    def all_done(self) -> bool:
        return bool((self.lengths > 0).all())

    def sequences(self, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        """Each row's prompt followed by its tokens so far (up to its end, for a row that has ended)."""
        return [
            [*prompt, *(int(t) for t in history[: length or None])]
            for prompt, history, length in zip(prompts, self.history, self.lengths, strict=True)
        ]

    def add(self, new: np.ndarray, scores: TokenScores | None = None) -> StreamChunk:
        """Append a chunk [batch, n] (and its scores); returns it with everything past each row's end set to the pad
        id (scores to 0)."""
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
        if self.history.shape[1] >= self.max_new_tokens:  # the last chunk: rows still running end here
            self.lengths[self.lengths == 0] = self.max_new_tokens
        if scores is not None:
            ended = self.lengths > 0
            past_end = ended[:, None] & (start + np.arange(new.shape[1]) >= self.lengths[:, None])
            scores = TokenScores(
                *(np.where(past_end.reshape(past_end.shape + (1,) * (a.ndim - 2)), 0, a) for a in scores)
            )
        return StreamChunk(self.history[:, start:].copy(), start, self.lengths.copy(), scores)


@dataclass(frozen=True)
class DecodePlan:
    """Everything about a generation call that is fixed before it starts (validated)."""

    config: ModelConfig
    processors: Processors
    arrays: SamplingArrays
    stop_ids: tuple[int, ...]
    stop: tuple[str, ...]
    tokenizer: object
    pad_id: int
    max_new_tokens: int
    chunk: int  # decode steps per jitted call
    chunks: int  # calls needed for max_new_tokens - 1 steps
    layout: DecodeLayout | None = None  # where arrays live when the params are on a mesh
    lora: object = None  # unmerged `jaxlora.lora.Adapters` every call applies, or None
    score_top: int | None = None  # None: no scores; k: each token's log-probs and the top k alternatives

    @property
    def decode_slots(self) -> int:
        """Cache slots the decode loop may write after the prompt."""
        return self.chunk * self.chunks

    @property
    def static(self) -> dict:
        return dict(
            config=self.config,
            processors=self.processors,
            stop_ids=self.stop_ids,
            layout=self.layout,
            score_top=self.score_top,
        )

    def to_device(self, value, batch_split: bool = False) -> jax.Array:
        """A host value as an input of the compiled functions (on a mesh: a global array)."""
        if self.layout is None:
            return jax.device_put(np.asarray(value))  # a transfer; jnp.asarray would compile a program for it
        return put(value, self.layout.batch if batch_split else self.layout.replicated)


def check_stop_strings(stop: Sequence[str]) -> None:
    if any(not isinstance(s, str) or not s for s in stop):
        raise UsageError("a stop string must be non-empty text")


def make_plan(
    config: ModelConfig,
    batch: int,
    *,
    max_new_tokens: int,
    sampling: Sampling | None = None,
    temperature: float | None = None,
    eos_token_ids: Sequence[int] = (),
    stop_token_ids: Sequence[int] = (),
    stop: Sequence[str] = (),
    tokenizer=None,
    pad_token_id: int = 0,
    chunk_size: int = DEFAULT_CHUNK,
    mesh=None,
    lora=None,
    return_logprobs: bool = False,
    top_logprobs: int = 0,
) -> DecodePlan:
    if max_new_tokens < 1:
        raise UsageError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if chunk_size < 1:
        raise UsageError(f"chunk_size must be at least 1, got {chunk_size}")
    if not 0 <= top_logprobs <= config.vocab_size:
        raise UsageError(f"top_logprobs must be in [0, {config.vocab_size}], got {top_logprobs}")
    if top_logprobs and not return_logprobs:
        raise UsageError("top_logprobs needs return_logprobs=True")
    if stop and tokenizer is None:
        raise UsageError("stop strings need the tokenizer to match text")
    check_stop_strings(stop)
    if sampling is None:
        sampling = Sampling(temperature=temperature or 0.0)
    elif temperature is not None:
        raise UsageError("give temperature inside `sampling`, not both")
    processors, arrays = sampling.compile(batch)
    layout = None if mesh is None else decode_layout(mesh, config, batch)
    if layout is not None:
        arrays = SamplingArrays(*(put(a, layout.replicated) for a in arrays))
        if lora is not None:
            lora = jax.tree.map(lambda a: jax.device_put(a, layout.replicated), lora)
    steps = max_new_tokens - 1
    chunk = min(chunk_size, max(steps, 1))
    return DecodePlan(
        config=config,
        processors=processors,
        arrays=arrays,
        stop_ids=tuple(sorted({int(t) for t in (*eos_token_ids, *stop_token_ids)})),
        stop=tuple(stop),
        tokenizer=tokenizer,
        pad_id=int(pad_token_id),
        max_new_tokens=max_new_tokens,
        chunk=chunk,
        chunks=-(-steps // chunk),
        layout=layout,
        lora=lora,
        score_top=int(top_logprobs) if return_logprobs else None,
    )


def decode_chunks(
    params, state: DecodeState, plan: DecodePlan, prompts: Sequence[Sequence[int]] | None = None
) -> Generator[StreamChunk, None, DecodeState]:
    """Stream the state's first token, then decode chunk by chunk; returns the final state.

    prompts: each row's real tokens before the first new one; with them, a model that must run the whole sequence
    again once it passes the original context (`ModelConfig.reprefill_past_original_context`) does so there.
    """
    batch = state.token.shape[0]
    ends = _Ends(batch, plan.stop_ids, plan.stop, plan.tokenizer, plan.pad_id, plan.max_new_tokens)
    yield ends.add(to_host(state.token)[:, None], _first_scores(state))
    loop_params = decode_params(params, plan.config, batch)  # after the first token: it may tile the weights
    emitted = 1
    refill_at = _reprefill_step(plan.config, prompts)
    while not ends.all_done and emitted < plan.max_new_tokens:
        done_steps = emitted - 1
        if done_steps == refill_at:
            rows = [list(p) + [int(t) for t in h] for p, h in zip(prompts, ends.history, strict=True)]
            state = _prefill_rows(params, plan, rows, state.keys, plan.max_new_tokens - emitted)
            new, scores = to_host(state.token)[:, None], _first_scores(state)
        else:
            steps = (
                plan.chunk if refill_at is None or refill_at < done_steps else min(plan.chunk, refill_at - done_steps)
            )
            # Rows ended by a stop string are news to the loop: from now on it pads them.
            state = state._replace(done=plan.to_device(ends.lengths > 0))
            state, tokens, scores = decode_for(params, loop_params)(
                loop_params, state, plan.arrays, plan.lora, pad_id=plan.pad_id, steps=steps, **plan.static
            )
            keep = plan.max_new_tokens - emitted
            new = to_host(tokens)[:, :keep]
            scores = None if scores is None else TokenScores(*(to_host(a)[:, :keep] for a in scores))
        emitted += new.shape[1]
        yield ends.add(new, scores)
    return state


def _first_scores(state: DecodeState) -> TokenScores | None:
    """The scores of the state's token as a one-step chunk [batch, 1, ...] on the host."""
    return None if state.scores is None else TokenScores(*(to_host(a)[:, None] for a in state.scores))


def _reprefill_step(config: ModelConfig, prompts) -> int | None:
    """The decode step whose token lands at the original context's last position + 1, for a model that runs the
    whole sequence again there (None: no such step)."""
    if prompts is None or not config.reprefill_past_original_context:
        return None
    longest = max(len(p) for p in prompts)
    original = config.rope.original_max_position_embeddings
    return original - longest if longest <= original else None


def prefill_prompt(params, plan: DecodePlan, cache, ids, mask, keys) -> DecodeState:
    """Run a left-padded prompt into an empty cache and sample the first token: layer by layer from the host
    where that applies (`jaxlora.prefill_layers`: a new process's first token sooner), else as one program."""
    params = prefill_params(params, plan.config, ids.shape[0] * ids.shape[1])  # a decode loop's tiled copy, if any
    if applies(plan.config, ids, plan.lora, plan.layout):
        return prefill_by_layer(params, cache, ids, mask, keys, plan.arrays, plan.lora, **plan.static)
    return prefill(params, cache, ids, mask, keys, plan.arrays, plan.lora, **plan.static)


def _prefill_rows(params, plan: DecodePlan, rows: list[list[int]], keys, new_tokens: int) -> DecodeState:
    """Prefill token rows (left-padded to their bucket) into a fresh cache with room for `new_tokens` more."""
    ids, mask = left_pad(rows, plan.pad_id, prompt_bucket(max(len(r) for r in rows)))
    capacity = ids.shape[1] + plan.chunk * -(-max(new_tokens - 1, 0) // plan.chunk)
    cache = new_cache(plan.config, len(rows), capacity, activation_dtype(params), plan.layout)
    ids, mask = plan.to_device(ids, batch_split=True), plan.to_device(mask, batch_split=True)
    return prefill_prompt(params, plan, cache, ids, mask, keys)


def plan_cache(plan: DecodePlan, batch: int, prompt_width: int, dtype):
    """An empty cache for a prompt bucket plus the plan's decode slots, where the plan's arrays live."""
    return new_cache(plan.config, batch, prompt_width + plan.decode_slots, dtype, plan.layout)


def stream(
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
    lora=None,
    return_logprobs: bool = False,
    top_logprobs: int = 0,
) -> Iterator[StreamChunk]:
    """Generate like `generate` (the same arguments), yielding new tokens as they come: `StreamChunk`s of up to
    `chunk_size` tokens.

    Each chunk is one jitted `lax.scan` of `chunk_size` decode steps (the cache donated from one to the next);
    every chunk is final (rows that ended hold the pad id, see `StreamChunk.row`), and the iterator ends when every
    row is done or `max_new_tokens` tokens were produced; in the last chunk every row has its length.
    """
    options = dict(
        sampling=sampling,
        temperature=temperature,
        eos_token_ids=eos_token_ids,
        stop_token_ids=stop_token_ids,
        stop=stop,
        tokenizer=tokenizer,
        pad_token_id=pad_token_id,
        chunk_size=chunk_size,
        lora=lora,
        return_logprobs=return_logprobs,
        top_logprobs=top_logprobs,
    )
    input_ids = np.asarray(input_ids, np.int32)
    if input_ids.ndim != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise UsageError(f"input_ids must be [batch, prompt_len] with both >= 1, got shape {input_ids.shape}")
    batch, prompt_len = input_ids.shape
    plan = make_plan(config, batch, max_new_tokens=max_new_tokens, mesh=params_mesh(params), **options)
    mask = np.ones(input_ids.shape, bool) if attention_mask is None else np.asarray(attention_mask, bool)
    if mask.shape != input_ids.shape:
        raise UsageError(f"attention_mask shape {mask.shape} differs from input_ids shape {input_ids.shape}")
    check_context(config, int(mask.sum(axis=1).max()), max_new_tokens)
    keys = row_keys(key, batch, plan.processors.sample)

    # Left-pad to the bucket: real tokens stay right-aligned, so every row writes the same cache slot.
    width = prompt_bucket(prompt_len)
    ids, full_mask = left_pad(input_ids, plan.pad_id, width, masks=mask)

    cache = plan_cache(plan, batch, width, activation_dtype(params))
    if plan.layout is not None:
        keys = jax.random.wrap_key_data(plan.to_device(jax.random.key_data(keys)))
    ids, full_mask = plan.to_device(ids, batch_split=True), plan.to_device(full_mask, batch_split=True)
    state = prefill_prompt(params, plan, cache, ids, full_mask, keys)
    prompts = [list(row[m]) for row, m in zip(input_ids, mask, strict=True)]
    yield from decode_chunks(params, state, plan, prompts)


def generate(
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
    lora=None,
    return_logprobs: bool = False,
    top_logprobs: int = 0,
) -> GenerateOutput:
    """Generate up to `max_new_tokens` after each prompt.

    input_ids [batch, prompt_len] int32, left-padded when prompts differ in length (see `left_pad`), with
    attention_mask [batch, prompt_len] (1 = token). Sampling: `temperature=` (0 = greedy) or `sampling=Sampling(
    temperature, top_k, top_p, min_p, repetition_penalty)`, each a number or one value per row; `key`: one PRNG key
    (row r uses fold_in(key, r)) or one per row. A row ends after its first token in `eos_token_ids` or
    `stop_token_ids`, or the token completing one of the `stop` strings (needs `tokenizer`); later slots hold
    `pad_token_id`. `chunk_size`: decode steps per jitted call (between two, the host checks stop strings and
    whether every row is done). lora: unmerged `jaxlora.lora.Adapters` applied at every step (swap adapters without
    re-merging the base). return_logprobs: also each token's log-probabilities, processed and raw, and with
    `top_logprobs=k` the model's k most likely tokens at each step (see `GenerateOutput`). Returns tokens
    [batch, max_new_tokens] int32 and lengths [batch] int32 (and the scores).
    """
    chunks = list(
        stream(
            params,
            config,
            input_ids,
            max_new_tokens=max_new_tokens,
            key=key,
            attention_mask=attention_mask,
            sampling=sampling,
            temperature=temperature,
            eos_token_ids=eos_token_ids,
            stop_token_ids=stop_token_ids,
            stop=stop,
            tokenizer=tokenizer,
            pad_token_id=pad_token_id,
            chunk_size=chunk_size,
            lora=lora,
            return_logprobs=return_logprobs,
            top_logprobs=top_logprobs,
        )
    )
    produced = np.concatenate([c.tokens for c in chunks], axis=1)
    tokens = np.full((produced.shape[0], max_new_tokens), pad_token_id, np.int32)
    tokens[:, : produced.shape[1]] = produced
    lengths = chunks[-1].lengths.astype(np.int32)
    if not return_logprobs:
        return GenerateOutput(tokens, lengths)
    scores = []
    for field in TokenScores._fields:
        done = np.concatenate([getattr(c.scores, field) for c in chunks], axis=1)
        full = np.zeros((done.shape[0], max_new_tokens, *done.shape[2:]), done.dtype)
        full[:, : done.shape[1]] = done
        scores.append(full)
    return GenerateOutput(tokens, lengths, *scores)
