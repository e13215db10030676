"""Losses over the decoder's logits as pure functions."""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

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


# Rows of the vocabulary projection computed at once by `head_cross_entropy`: about 8M logits (32 MB float32).
HEAD_CHUNK_LOGITS = 1 << 23


def _chunk_logits(hidden, weight, bias, vocab_major: bool, softcap: float | None):
    """float32 logits of one chunk of rows [rows, hidden] and, with a soft-cap, its tanh (for the derivative)."""
    contract = (1,) if vocab_major else (0,)
    z = jax.lax.dot_general(hidden, weight.astype(hidden.dtype), (((1,), contract), ((), ())))
    if bias is not None:
        z = z + bias.astype(z.dtype)
    z = z.astype(jnp.float32)
    if softcap is None:
        return z, None
    tanh = jnp.tanh(z / softcap)
    return softcap * tanh, tanh


def _chunk_loss(z, targets, weights, groups, num_groups: int):
    """One chunk's weighted cross-entropy summed per group [num_groups] from its logits z [rows, vocab], and the
    rows' logsumexp."""
    lse = jax.nn.logsumexp(z, axis=-1)
    picked = jnp.take_along_axis(z, targets[:, None], axis=-1)[:, 0]
    return jax.ops.segment_sum(weights * (lse - picked), groups, num_groups), lse


def _chunk_loss_and_dlogits(hidden, weight, bias, targets, weights, groups, num_groups, vocab_major, softcap):
    """One chunk's weighted cross-entropy per group and each row's gradient with respect to its pre-cap logits."""
    z, tanh = _chunk_logits(hidden, weight, bias, vocab_major, softcap)
    loss, lse = _chunk_loss(z, targets, weights, groups, num_groups)
    dz = (jnp.exp(z - lse[:, None]) - jax.nn.one_hot(targets, z.shape[-1], dtype=z.dtype)) * weights[:, None]
    return loss, dz if tanh is None else dz * (1 - tanh * tanh)


def _row_chunks(chunk: int, *arrays) -> tuple[jax.Array, ...]:
    """The rows' arrays as [chunks, chunk, ...], what each loop below scans over."""
    return tuple(x.reshape(x.shape[0] // chunk, chunk, *x.shape[1:]) for x in arrays)


@partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _head_loss(hidden, weight, bias, targets, weights, groups, num_groups, vocab_major, softcap, chunk):
    def body(total, rows):
        h, t, w, s = rows
        z, _ = _chunk_logits(h, weight, bias, vocab_major, softcap)
        return total + _chunk_loss(z, t, w, s, num_groups)[0], None

    rows = _row_chunks(chunk, hidden, targets, weights, groups)
    return jax.lax.scan(body, jnp.zeros(num_groups, jnp.float32), rows)[0]


def _head_loss_fwd(hidden, weight, bias, targets, weights, groups, num_groups, vocab_major, softcap, chunk):
    # The gradient with respect to the hidden states is computed here, chunk by chunk, as the loss is: the
    # backward pass then only scales each row by its group's cotangent, and no [rows, vocab] array outlives its
    # chunk.
    contract = (0,) if vocab_major else (1,)

    def body(total, rows):
        h, t, w, s = rows
        loss, dlogits = _chunk_loss_and_dlogits(h, weight, bias, t, w, s, num_groups, vocab_major, softcap)
        dh = jax.lax.dot_general(dlogits.astype(h.dtype), weight.astype(h.dtype), (((1,), contract), ((), ())))
        return total + loss, dh

    rows = _row_chunks(chunk, hidden, targets, weights, groups)
    total, dh = jax.lax.scan(body, jnp.zeros(num_groups, jnp.float32), rows)
    return total, (dh.reshape(hidden.shape), hidden, weight, bias, targets, weights, groups)


def _head_loss_bwd(num_groups, vocab_major, softcap, chunk, residuals, g):
    dh, hidden, weight, bias, targets, weights, groups = residuals
    row_g = g[groups]  # [rows]: each row's cotangent, its group's

    # The head's own gradient, recomputed chunk by chunk; when the head is frozen nothing uses it and XLA drops
    # this loop.
    def body(sums, rows):
        h, t, w, s, gs = rows
        _, dlogits = _chunk_loss_and_dlogits(h, weight, bias, t, w, s, num_groups, vocab_major, softcap)
        dlogits = (dlogits * gs[:, None]).astype(h.dtype)
        if vocab_major:  # weight [vocab, hidden]
            dw = jax.lax.dot_general(dlogits, h, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        else:  # kernel [hidden, vocab]
            dw = jax.lax.dot_general(h, dlogits, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return (sums[0] + dw, sums[1] + dlogits.sum(0, dtype=jnp.float32)), None

    rows = _row_chunks(chunk, hidden, targets, weights, groups, row_g)
    start = (jnp.zeros(weight.shape, jnp.float32), jnp.zeros(weight.shape[0 if vocab_major else 1], jnp.float32))
    (dw, dbias), _ = jax.lax.scan(body, start, rows)
    return (
        (row_g[:, None] * dh).astype(hidden.dtype),
        dw.astype(weight.dtype),
        None if bias is None else dbias.astype(bias.dtype),
        None,
        None,
        None,
    )


_head_loss.defvjp(_head_loss_fwd, _head_loss_bwd)


def head_cross_entropy(
    hidden,
    weight,
    bias,
    targets,
    weights,
    *,
    vocab_major: bool,
    softcap: float | None = None,
    groups=None,
    num_groups: int | None = None,
) -> jax.Array:
    """sum(weights * -log softmax(logits)[targets]) where logits = hidden @ head (+ bias, then the soft-cap), without
    ever holding the [rows, vocab] logits: the rows go through the vocabulary projection a chunk at a time.

    hidden [rows, hidden] (the final norm's output); weight: the tied embedding [vocab, hidden] (vocab_major) or an
    lm_head kernel [hidden, vocab]; bias [vocab] or None; targets [rows] int32; weights [rows] float32. groups
    [rows] int32 in [0, num_groups): the sum per group, [num_groups] (a sequence's log-likelihood per row of a
    batch); without them one scalar. The same value and gradients as computing the full logits and
    `next_token_logprobs`, with the same FLOPs: under differentiation the forward pass also computes the gradient
    with respect to `hidden` (the projection the backward pass would otherwise do), and the head's own gradient is
    computed only where something uses it.
    """
    rows = hidden.shape[0]
    scalar = groups is None
    groups = jnp.zeros(rows, jnp.int32) if scalar else jnp.asarray(groups, jnp.int32)
    num_groups = 1 if scalar else num_groups
    vocab = weight.shape[0 if vocab_major else 1]
    chunk = min(max(16, HEAD_CHUNK_LOGITS // vocab), rows)
    padded = -(-rows // chunk) * chunk
    if padded != rows:  # padding rows weigh 0: no loss, no gradient
        hidden = jnp.pad(hidden, ((0, padded - rows), (0, 0)))
        targets, weights, groups = (jnp.pad(x, (0, padded - rows)) for x in (targets, weights, groups))
    total = _head_loss(hidden, weight, bias, targets, weights, groups, num_groups, vocab_major, softcap, chunk)
    return total[0] if scalar else total


PREFERENCE_OBJECTIVES = ("dpo", "ipo", "orpo", "simpo")


class PreferenceConfig(NamedTuple):
    """A preference objective and its constants (static: hashable, a jit argument).

    dpo: -(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d), d the policy's log-ratio to the reference on
    the chosen minus the rejected response (Rafailov et al. 2023; eps = label_smoothing: conservative DPO).
    ipo: (d' - 1 / (2 beta))^2 with d' the same difference of log-ratios, each divided by its response's token
    count (Azar et al. 2023, length-normalized as TRL does it). orpo: the SFT loss of the chosen sequences minus
    beta log sigmoid(log-odds ratio of the per-token mean log-probs) (Hong et al. 2024; no reference). simpo:
    DPO's form on the per-token mean log-probs without a reference, margin simpo_gamma (Meng et al. 2024).
    """

    objective: str
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5

    @property
    def needs_reference(self) -> bool:
        return self.objective in ("dpo", "ipo")


def log1mexp(x: jax.Array) -> jax.Array:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012)."""
    return jnp.where(x > -0.6931472, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def _smoothed_sigmoid_loss(logits: jax.Array, beta: float, label_smoothing: float) -> jax.Array:
    return -(1 - label_smoothing) * jax.nn.log_sigmoid(beta * logits) - label_smoothing * jax.nn.log_sigmoid(
        -beta * logits
    )


def preference_loss(
    preference: PreferenceConfig,
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    chosen_tokens: jax.Array,
    rejected_tokens: jax.Array,
    ref_chosen_logps: jax.Array | None = None,
    ref_rejected_logps: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-pair preference losses and implicit rewards from sequence log-probabilities.

    chosen_logps/rejected_logps [pairs] float32: the policy's summed log-probs of each response's tokens;
    *_tokens [pairs]: how many tokens each sum covers; ref_*: the reference model's sums (dpo and ipo).
    Returns (loss, chosen_reward, rejected_reward), each [pairs]: the loss to average over pairs (orpo's: the
    odds-ratio term only; its SFT term is a token mean, added by the train step), and the rewards whose
    difference is the reward margin (beta times the log-ratio for dpo/ipo, beta times the mean log-prob for
    orpo/simpo).
    """
    p = preference
    if p.objective not in PREFERENCE_OBJECTIVES:
        raise UsageError(f"unknown preference objective {p.objective!r}; choose one of {PREFERENCE_OBJECTIVES}")
    if p.needs_reference:
        chosen_ratio, rejected_ratio = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
        if p.objective == "dpo":
            loss = _smoothed_sigmoid_loss(chosen_ratio - rejected_ratio, p.beta, p.label_smoothing)
        else:
            chosen_mean = chosen_ratio / jnp.maximum(chosen_tokens, 1)
            rejected_mean = rejected_ratio / jnp.maximum(rejected_tokens, 1)
            loss = (chosen_mean - rejected_mean - 1 / (2 * p.beta)) ** 2
        return loss, p.beta * chosen_ratio, p.beta * rejected_ratio
    chosen_mean = chosen_logps / jnp.maximum(chosen_tokens, 1)
    rejected_mean = rejected_logps / jnp.maximum(rejected_tokens, 1)
    if p.objective == "orpo":
        log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
        loss = -p.beta * jax.nn.log_sigmoid(log_odds)
    else:
        loss = _smoothed_sigmoid_loss(chosen_mean - rejected_mean - p.simpo_gamma / p.beta, p.beta, p.label_smoothing)
    return loss, p.beta * chosen_mean, p.beta * rejected_mean
