"""Choosing the next token: logits processors with Hugging Face semantics, as pure functions traced in the loop.

Order as in transformers' `generate`: repetition penalty, temperature, top-k, top-p, min-p. Every parameter is
a per-row array, so rows of one batch may sample differently; which processors run at all is static
(`Processors`), so a batch that never uses top-p pays nothing for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.errors import UsageError
from jaxlora.executables import stored_jit

FILTERED = -jnp.inf


class Processors(NamedTuple):
    """Which processors any row uses (static: part of the compiled loop's identity)."""

    sample: bool = False
    repetition_penalty: bool = False
    top_k: bool = False
    top_p: bool = False
    min_p: bool = False


class SamplingArrays(NamedTuple):
    """Per-row parameters [batch] as device arrays."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    repetition_penalty: jax.Array


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters: each a number (same for every row) or one value per row.

    temperature 0 is greedy; top_k 0, top_p 1, min_p 0 and repetition_penalty 1 switch that processor off.
    """

    temperature: float | Sequence[float] = 0.0
    top_k: int | Sequence[int] = 0
    top_p: float | Sequence[float] = 1.0
    min_p: float | Sequence[float] = 0.0
    repetition_penalty: float | Sequence[float] = 1.0

    def per_row(self, batch: int) -> dict[str, np.ndarray]:
        rows = {}
        for name in SamplingArrays._fields:
            value = np.asarray(getattr(self, name), np.int32 if name == "top_k" else np.float32)
            if value.ndim == 0:
                value = np.full((batch,), value)
            if value.shape != (batch,):
                raise UsageError(f"{name} has {value.shape[0]} values for a batch of {batch}")
            rows[name] = value
        checks = {
            "temperature": (rows["temperature"] >= 0, "must be >= 0"),
            "top_k": (rows["top_k"] >= 0, "must be >= 0"),
            "top_p": ((rows["top_p"] > 0) & (rows["top_p"] <= 1), "must be in (0, 1]"),
            "min_p": ((rows["min_p"] >= 0) & (rows["min_p"] <= 1), "must be in [0, 1]"),
            "repetition_penalty": (rows["repetition_penalty"] > 0, "must be > 0"),
        }
        for name, (ok, rule) in checks.items():
            if not np.all(ok & np.isfinite(rows[name])):
                raise UsageError(f"{name} {rule}, got {rows[name][~ok][0] if (~ok).any() else rows[name]}")
        return rows

    def compile(self, batch: int) -> tuple[Processors, SamplingArrays]:
        rows = self.per_row(batch)
        sampling = rows["temperature"] > 0
        processors = Processors(
            sample=bool(sampling.any()),
            repetition_penalty=bool((rows["repetition_penalty"] != 1).any()),
            # Warpers only matter for sampled rows: each keeps the top token, so greedy is unchanged.
            top_k=bool((sampling & (rows["top_k"] > 0)).any()),
            top_p=bool((sampling & (rows["top_p"] < 1)).any()),
            min_p=bool((sampling & (rows["min_p"] > 0)).any()),
        )
        # device_put, not jnp.asarray: a host array moves without a compiled program of its own.
        return processors, SamplingArrays(**{k: jax.device_put(v) for k, v in rows.items()})


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: jax.Array) -> jax.Array:
    """HF: a token already in the sequence has its logit divided by the penalty (multiplied when negative)."""
    p = penalty[:, None]
    penalized = jnp.where(logits < 0, logits * p, logits / p)
    return jnp.where(seen, penalized, logits)


def apply_top_k(logits: jax.Array, top_k: jax.Array) -> jax.Array:
    """Keep the k largest logits per row (ties with the k-th kept, as HF); k = 0 keeps all."""
    descending = -jnp.sort(-logits, axis=-1)
    k = jnp.clip(top_k, 1, logits.shape[-1])
    kth = jnp.take_along_axis(descending, (k - 1)[:, None], axis=-1)
    return jnp.where((top_k[:, None] > 0) & (logits < kth), FILTERED, logits)


def apply_top_p(logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """HF nucleus: drop the low tail whose cumulative probability is <= 1 - top_p; the top token always stays."""
    order = jnp.argsort(logits, axis=-1)  # ascending
    ascending = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    remove_sorted = cumulative <= (1 - top_p[:, None])
    remove_sorted = remove_sorted.at[:, -1].set(False)
    rows = jnp.arange(logits.shape[0])[:, None]
    remove = jnp.zeros_like(remove_sorted).at[rows, order].set(remove_sorted)
    return jnp.where(remove, FILTERED, logits)


def first_argmax(x: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis (the first index of the largest value; of the first NaN, if any), as int32,
    computed as two plain reductions, a max and then the least index holding it. XLA:CPU runs argmax's paired
    (value, index) reduction as a scalar loop: over [8, 49152] logits it took 1.09 ms a decode step, this 0.35."""
    top = x.max(axis=-1, keepdims=True)
    holds = (x == top) | (jnp.isnan(x) & jnp.isnan(top))
    index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(holds, index, x.shape[-1]), axis=-1)


def apply_min_p(logits: jax.Array, min_p: jax.Array) -> jax.Array:
    """HF min-p: drop tokens whose probability is below min_p times the top token's."""
    probs = jax.nn.softmax(logits, axis=-1)
    threshold = min_p[:, None] * probs.max(axis=-1, keepdims=True)
    remove = probs < threshold
    top = first_argmax(probs)
    remove = remove.at[jnp.arange(logits.shape[0]), top].set(False)
    return jnp.where(remove, FILTERED, logits)


def process_logits(
    logits: jax.Array, params: SamplingArrays, processors: Processors, seen: jax.Array | None = None
) -> jax.Array:
    """logits [batch, vocab] float32 -> processed logits (filtered entries are -inf)."""
    if processors.repetition_penalty:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if processors.sample:
        safe_temperature = jnp.where(params.temperature > 0, params.temperature, 1.0)
        logits = logits / safe_temperature[:, None]
    if processors.top_k:
        logits = apply_top_k(logits, params.top_k)
    if processors.top_p:
        logits = apply_top_p(logits, params.top_p)
    if processors.min_p:
        logits = apply_min_p(logits, params.min_p)
    return logits


def choose_token(processed: jax.Array, params: SamplingArrays, processors: Processors, keys: jax.Array) -> jax.Array:
    """Processed logits [batch, vocab] -> the next token [batch] int32: drawn for rows with temperature > 0, the
    argmax for the others."""
    greedy = first_argmax(processed)
    if not processors.sample:
        return greedy
    sampled = jax.vmap(jax.random.categorical)(keys, processed).astype(jnp.int32)
    return jnp.where(params.temperature > 0, sampled, greedy)


def sample_next(
    logits: jax.Array,
    params: SamplingArrays,
    processors: Processors,
    keys: jax.Array,
    seen: jax.Array | None = None,
) -> jax.Array:
    """logits [batch, vocab] float32, one PRNG key per row [batch] -> next tokens [batch] int32."""
    return choose_token(process_logits(logits, params, processors, seen), params, processors, keys)


class TokenScores(NamedTuple):
    """How likely each chosen token was, and the model's alternatives, for one step.

    logprob [batch]: the chosen token under the processed distribution it was drawn from (repetition penalty,
    temperature, top-k/p, min-p applied: transformers' `compute_transition_scores(..., normalize_logits=True)`);
    raw_logprob [batch]: under the model's own distribution (log-softmax of the logits); top_ids / top_logprobs
    [batch, k]: the model's own k most likely tokens, most likely first. All float32 / int32.
    """

    logprob: jax.Array
    raw_logprob: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array


def score_choice(logits: jax.Array, processed: jax.Array, token: jax.Array, top: int) -> TokenScores:
    """logits / processed [batch, vocab], the chosen token [batch] -> its `TokenScores` with `top` alternatives."""
    raw = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = token[:, None]
    if top:
        top_logprobs, top_ids = jax.lax.top_k(raw, top)
    else:
        top_logprobs, top_ids = jnp.zeros((raw.shape[0], 0), jnp.float32), jnp.zeros((raw.shape[0], 0), jnp.int32)
    return TokenScores(
        logprob=jnp.take_along_axis(jax.nn.log_softmax(processed, axis=-1), chosen, axis=-1)[:, 0],
        raw_logprob=jnp.take_along_axis(raw, chosen, axis=-1)[:, 0],
        top_ids=top_ids.astype(jnp.int32),
        top_logprobs=top_logprobs,
    )


def next_token(
    logits: jax.Array,
    params: SamplingArrays,
    processors: Processors,
    keys: jax.Array,
    seen: jax.Array | None = None,
    top: int | None = None,
) -> tuple[jax.Array, TokenScores | None]:
    """`sample_next`, plus the chosen tokens' `TokenScores` with `top` alternatives when `top` is not None."""
    processed = process_logits(logits, params, processors, seen)
    token = choose_token(processed, params, processors, keys)
    return token, None if top is None else score_choice(logits, processed, token, top)


def row_keys(key: jax.Array | None, batch: int, sampling: bool) -> jax.Array:
    """One PRNG key per row [batch] from one key (row r gets fold_in(key, r)) or one per row; None is fine for
    greedy decoding (`sampling` False)."""
    if key is None:
        if sampling:
            raise UsageError("sampling with temperature > 0 needs a PRNG key")
        return _greedy_row_keys(batch)
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)  # a raw uint32 key from jax.random.PRNGKey
    if key.shape == (batch,):
        return key
    if key.shape != ():
        raise UsageError(f"key must be one PRNG key or one per row ({batch}), got shape {key.shape}")
    return _fold_in_rows(key, batch)


@stored_jit(static_argnums=1)
def _fold_in_rows(key: jax.Array, batch: int) -> jax.Array:
    """Row r's key: fold_in(key, r), so its randomness depends on (key, r) only, not on the rest of the batch.
    (One compiled program: a new process reads each program from the compile cache, a few ms apiece.)"""
    return jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(batch))


@cache
def _key_data_shape(impl: str) -> tuple[int, ...]:
    """The shape of one key's data under the PRNG implementation `impl` (traced, never compiled)."""
    return jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0, impl=impl))).shape


def _greedy_row_keys(batch: int) -> jax.Array:
    """Placeholder row keys for greedy decoding, which never reads them: zero key data wrapped on the host, so no
    program is traced, lowered or read from the compile cache for them (folding key(0) per row did all three, and
    in a new process the lowering of its threefry rounds was 0.19 s of the first token)."""
    impl = jax.config.jax_default_prng_impl
    return jax.random.wrap_key_data(np.zeros((batch, *_key_data_shape(impl)), np.uint32), impl=impl)
