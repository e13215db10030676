"""The attention core: one entry point, `attend`, over interchangeable implementations.

- "xla": the reference. Builds the [batch, heads, queries, keys] score matrix and masks it; in decode it scores
  every slot of the cache buffer, filled or not, and masks the unfilled tail.
- "chunked": flash-style attention in pure JAX. Queries and keys go in blocks with an online softmax, so memory
  grows linearly with the sequence; key blocks a query block cannot see (the future, or past its sliding window)
  are skipped, so decode reads only the filled part of the cache and causal prefill does about half the work.
  Differentiable through its own backward pass (recomputes the blocks; saves only the output and logsumexp).
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, GPU only, float16/bfloat16 only.
- "splash": the Pallas splash-attention kernel, TPU only.
- "cpu": jaxlora's C++ kernel for the forward pass (`jaxlora.cpu_attention`), CPU only; gradients through the
  chunked core's backward pass. Calls it cannot take (a soft cap, non-float32, several devices) run "chunked".
- "auto": the best available for the platform and the call (see `resolve_impl`).

Every implementation takes absolute cache slots: query_slots [q_len] and key_slots [k_len] (default 0..k_len-1),
shared by all rows (prompts are left-padded, so slot distance is token distance), and key_valid [batch, k_len]
for slots holding a real token. A query row that sees no key (a padding query) outputs zeros.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxlora import cpu_attention
from jaxlora.config import ATTENTION_IMPLS
from jaxlora.errors import ConfigError, UsageError

# Online softmax floor: finite, so a block with every key masked leaves the running max finite and exp() at 0.
_FLOOR = float(jnp.finfo(jnp.float32).min)

# "auto" switches prefill and training to chunked once the score matrix of one row and head reaches this many
# entries (128 x 128). Measured on a 2-core CPU with SmolLM2's heads (9 query, 3 kv, 64 wide), blocks sized by
# `block_side`, milliseconds per layer for forward / forward + backward against xla: 1 x 128 tokens 0.73 / 1.84
# against 0.91 / 2.36; 1 x 256 1.8 / 5.4 against 2.7 / 7.6; 4 x 256 6.3 / 21 against 8.3 / 33; 1 x 512 5.1 /
# 13.6 against 9.3 / 43. Without the kernel, decode (one query row) stays on XLA: its fused masked pass over the
# whole buffer measured as fast as chunked's loop over only the filled blocks, even at 8k slots.
AUTO_CHUNKED_SCORES = 1 << 14
# On GPU and TPU the calls auto does not give to cuDNN or splash keep the former threshold (512 x 512, measured on
# CPU with 512-blocks): the lower one is unmeasured there.
AUTO_CHUNKED_SCORES_ACCELERATOR = 1 << 18

# On CPU, block sides are powers of two from MIN_BLOCK to MAX_BLOCK, the largest whose block pair's scores (batch x
# heads x q_block x k_block float32) stay within SCORE_BLOCK_ENTRIES, so each block's softmax works in the cache.
# Same measurement, forward + backward per layer at 512 tokens: batch 1 with 256-blocks 13.6 ms, 512-blocks 29.8;
# batch 4 with 128-blocks 66 ms, 512-blocks 128; batch 8 with 64-blocks 138, 128-blocks 152, 256-blocks 160. At
# 1 x 256 tokens 128-blocks (two query blocks, so the causal mask skips one) 1.8 / 5.4 ms against one 256-block's
# 2.3 / 6.3.
# Long prompts take larger blocks again (at most MAX_QUERY_BLOCKS query blocks: each block pair is a loop trip):
# one row's 4096-token prefill (scripts/bench_longctx.py) took 9.1 s with 512-blocks and 10.0-10.2 s with
# 256-blocks, 2048 tokens 3.42 and 3.53-3.57 s, 1024 tokens 1.48 and 1.37-1.42 s; 4 x 1024 forward + backward per
# layer 203 ms with 256-blocks, 237 with 128-blocks, 4 x 2048 696 and 829.
SCORE_BLOCK_ENTRIES = 1 << 20
MAX_QUERY_BLOCKS = 4
MIN_BLOCK = 64
MAX_BLOCK = 512
DECODE_K_BLOCK = 2048


class AttentionSpec(NamedTuple):
    """The static part of an attention call (hashable: a jit and custom_vjp static argument)."""

    window: int | None  # a query sees itself and the window - 1 slots before it (HF's sliding window)
    scale: float
    softcap: float | None
    q_block: int | None = None  # None: sized to the call (`block_side`)
    k_block: int | None = None
    decode_k_block: int = DECODE_K_BLOCK  # key block when there is one query row
    contiguous_keys: bool = True  # key slots are 0..k_len-1, so blocks can be skipped by slot


def attention_mask(
    query_slots: jax.Array, key_slots: jax.Array, key_valid: jax.Array, window: int | None, segments=None
) -> jax.Array:
    """Which keys each query may see: [batch, q_len, k_len] bool (causal, windowed, real keys only, and with
    segments [batch, seq] only keys of the query's own segment)."""
    # expand_dims rather than [:, None]: slicing a symbolic dimension trips up ONNX export.
    queries, keys = jnp.expand_dims(query_slots, 1), jnp.expand_dims(key_slots, 0)
    visible = keys <= queries
    if window is not None:
        visible &= queries - keys < window
    mask = jnp.expand_dims(visible, 0) & jnp.expand_dims(key_valid, 1)
    if segments is not None:
        mask &= same_segment(segments, segments)
    return mask


def same_segment(query_segments: jax.Array, key_segments: jax.Array) -> jax.Array:
    """[batch, q] and [batch, k] segment ids -> [batch, q, k] bool: the query and the key are in one document."""
    return jnp.expand_dims(query_segments, 2) == jnp.expand_dims(key_segments, 1)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    scale: float | None = None,
    softcap: float | None = None,
    on_pattern=None,
    sinks: jax.Array | None = None,
) -> jax.Array:
    """The reference: grouped-query attention with a materialized score matrix; scores are scaled by `scale`
    (default 1 / sqrt(head_dim)), then soft-capped. sinks [heads] (gpt-oss): a logit per head that joins each
    row's softmax as one more column, taking probability but carrying no value.

    q [batch, q_len, heads, head_dim], k/v [batch, k_len, kv_heads, head_dim] (v's width may differ: latent
    attention), mask [batch, q_len, k_len] bool -> [batch, q_len, heads, v's width] in q's dtype. on_pattern:
    fn(probs) -> probs on the attention probabilities [batch, heads, q_len, k_len] float32 (query head h reads kv
    head h // (heads / kv_heads)).
    """
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, h // kv_heads, d)
    with jax.named_scope("attention"):
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
        scores = scores * (1.0 / math.sqrt(d) if scale is None else scale)
        if softcap is not None:
            scores = softcap * jnp.tanh(scores / softcap)
        # Softmax in float32 with a finite floor, so a fully masked row stays finite; it is zeroed below.
        scores = jnp.where(mask[:, None, None], scores, _FLOOR)
        if sinks is None:
            probs = jax.nn.softmax(scores, axis=-1)
        else:
            sink = jnp.broadcast_to(
                sinks.astype(jnp.float32).reshape(1, kv_heads, h // kv_heads, 1, 1), (*scores.shape[:-1], 1)
            )
            probs = jax.nn.softmax(jnp.concatenate([scores, sink], axis=-1), axis=-1)[..., :-1]
        if on_pattern is not None:
            shape = probs.shape
            probs = on_pattern(probs.reshape(b, h, t, shape[-1])).reshape(shape)
        probs = probs.astype(v.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
        out = out * jnp.any(mask, axis=-1)[:, :, None, None, None].astype(out.dtype)
    return out.reshape(b, t, h, v.shape[-1])


def _blocks(length: int, block: int) -> tuple[int, int]:
    """(block size, number of blocks) covering `length`, the block no larger than the length."""
    size = min(block, length)
    return size, -(-length // size)


def _block_start(index, size: int, length: int):
    """Where block `index` starts: at index * size, or pulled back so a ragged last block still fits (its first
    rows then repeat the previous block's; nothing is padded or copied)."""
    return jnp.minimum(index * size, length - size)


def _key_block_range(spec: AttentionSpec, q_slots: jax.Array, num_k_blocks: int, k_size: int):
    """The key blocks [lo, hi) a query block with these slots can see."""
    if not spec.contiguous_keys:
        return 0, num_k_blocks
    hi = jnp.minimum(jnp.max(q_slots) // k_size + 1, num_k_blocks)
    if spec.window is None:
        return 0, hi
    return jnp.maximum(jnp.min(q_slots) - spec.window + 1, 0) // k_size, hi


class _Layout(NamedTuple):
    qb: int  # query block size
    nq: int
    kb: int  # key block size
    nk: int


def block_side(score_rows: int, q_len: int) -> int:
    """The block side for `score_rows` (batch x query heads) score matrices of q_len query rows: the largest power
    of two from MIN_BLOCK to MAX_BLOCK whose square block of all of them stays within SCORE_BLOCK_ENTRIES and
    that splits the queries in at least two (so the causal mask skips a block), but never so small that the
    queries take more than MAX_QUERY_BLOCKS blocks (each block pair costs a loop trip)."""
    floor = MIN_BLOCK
    while floor < MAX_BLOCK and floor * MAX_QUERY_BLOCKS < q_len:
        floor *= 2
    side = MAX_BLOCK
    while side > floor and (score_rows * side * side > SCORE_BLOCK_ENTRIES or 2 * side > q_len):
        side //= 2
    return side


def block_layout(spec: AttentionSpec, q: jax.Array, s: int) -> _Layout:
    """Blocks for queries q [b, t, h, d] over s key slots: the spec's sizes, or on CPU `block_side`'s (measured
    there; GPU and TPU keep MAX_BLOCK)."""
    b, t, h, _ = q.shape
    side = block_side(b * h, t) if platform() == "cpu" else MAX_BLOCK
    qb, nq = _blocks(t, spec.q_block or side)
    # One query row (decode) has a tiny score block: larger key blocks mean fewer loop trips per step.
    kb, nk = _blocks(s, spec.decode_k_block if t == 1 else spec.k_block or side)
    return _Layout(qb, nq, kb, nk)


def _key_block(spec, layout, j, k, v, k_slots, key_valid, segments):
    """Key block j in the cache's own layout: k/v [b, kb, kvh, d], its slots, which columns to count (valid, and
    not already seen in block j - 1 when this ragged last block was pulled back) and their segments (or None)."""
    start = _block_start(j, layout.kb, k.shape[1])
    fresh = start + jnp.arange(layout.kb) >= j * layout.kb
    valid = jax.lax.dynamic_slice_in_dim(key_valid, start, layout.kb, axis=1) & fresh[None]
    return (
        start,
        jax.lax.dynamic_slice_in_dim(k, start, layout.kb, axis=1),
        jax.lax.dynamic_slice_in_dim(v, start, layout.kb, axis=1),
        jax.lax.dynamic_slice_in_dim(k_slots, start, layout.kb),
        valid,
        None if segments is None else jax.lax.dynamic_slice_in_dim(segments, start, layout.kb, axis=1),
    )


def _block_scores(spec: AttentionSpec, q_blk, k_blk, q_slots, k_slots, key_valid, q_segments=None, k_segments=None):
    """Scores and mask of one block pair: [b, kvh, g, qb, kb] float32 (capped, masked to the floor) and bool; also
    tanh of the uncapped scores (for the backward pass) or None."""
    raw = jnp.einsum("bkgqd,bskd->bkgqs", q_blk, k_blk, preferred_element_type=jnp.float32) * spec.scale
    tanh = None
    if spec.softcap is not None:
        tanh = jnp.tanh(raw / spec.softcap)
        raw = spec.softcap * tanh
    visible = k_slots[None, :] <= q_slots[:, None]
    if spec.window is not None:
        visible &= q_slots[:, None] - k_slots[None, :] < spec.window
    mask = visible[None] & key_valid[:, None, :]  # [b, qb, kb]
    if q_segments is not None:
        mask &= same_segment(q_segments, k_segments)
    mask = mask[:, None, None]  # [b, 1, 1, qb, kb]
    return jnp.where(mask, raw, _FLOOR), mask, tanh


def _head_major(x: jax.Array, kv_heads: int, dtype=None) -> jax.Array:
    """[b, t, h, d] -> [b, kvh, g, t, d]: query heads grouped under the kv head they share."""
    b, t, h, d = x.shape
    x = x.reshape(b, t, kv_heads, h // kv_heads, d).transpose(0, 2, 3, 1, 4)
    return x if dtype is None else x.astype(dtype)


def _chunked_forward(q, k, v, q_slots, k_slots, key_valid, segments, spec: AttentionSpec):
    """-> out [b, t, h, d] in q's dtype and the logsumexp [b, kvh, g, t] float32 of every query row."""
    b, t, h, _ = q.shape
    kvh, dv = k.shape[2], v.shape[-1]
    layout = block_layout(spec, q, k.shape[1])
    qh = _head_major(q, kvh)

    def query_block(i, acc):
        out, lse = acc
        q_start = _block_start(i, layout.qb, t)
        q_blk = jax.lax.dynamic_slice_in_dim(qh, q_start, layout.qb, axis=3)
        slots = jax.lax.dynamic_slice_in_dim(q_slots, q_start, layout.qb)
        q_seg = _query_segments(segments, q_start, layout.qb)

        def key_block(j, carry):
            o, m, total = carry
            _, k_blk, v_blk, blk_slots, block_valid, k_seg = _key_block(
                spec, layout, j, k, v, k_slots, key_valid, segments
            )
            scores, mask, _ = _block_scores(spec, q_blk, k_blk, slots, blk_slots, block_valid, q_seg, k_seg)
            m_new = jnp.maximum(m, scores.max(axis=-1))
            p = jnp.where(mask, jnp.exp(scores - m_new[..., None]), 0.0)
            rescale = jnp.exp(m - m_new)
            total = total * rescale + p.sum(axis=-1)
            pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v_blk.dtype), v_blk, preferred_element_type=jnp.float32)
            return o * rescale[..., None] + pv, m_new, total

        shape = q_blk.shape[:-1]
        init = (jnp.zeros((*shape, dv), jnp.float32), jnp.full(shape, _FLOOR), jnp.zeros(shape, jnp.float32))
        lo, hi = _key_block_range(spec, slots, layout.nk, layout.kb)
        o, m, total = jax.lax.fori_loop(lo, hi, key_block, init)
        seen = total > 0
        o = o / jnp.where(seen, total, 1.0)[..., None]
        block_lse = jnp.where(seen, m + jnp.log(jnp.where(seen, total, 1.0)), jnp.inf)  # inf: exp(s - inf) = 0
        out = jax.lax.dynamic_update_slice_in_dim(out, o.astype(out.dtype), q_start, axis=3)
        return out, jax.lax.dynamic_update_slice_in_dim(lse, block_lse, q_start, axis=3)

    out = jnp.zeros((*qh.shape[:-1], dv), q.dtype)
    lse = jnp.zeros(qh.shape[:-1], jnp.float32)
    out, lse = jax.lax.fori_loop(0, layout.nq, query_block, (out, lse))
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, dv), lse


def _query_segments(segments, start, size: int):
    return None if segments is None else jax.lax.dynamic_slice_in_dim(segments, start, size, axis=1)


def _add_at(acc: jax.Array, start, block: jax.Array, axis: int) -> jax.Array:
    current = jax.lax.dynamic_slice_in_dim(acc, start, block.shape[axis], axis=axis)
    return jax.lax.dynamic_update_slice_in_dim(acc, current + block, start, axis=axis)


def _chunked_backward(spec: AttentionSpec, residuals, d_out):
    q, k, v, q_slots, k_slots, key_valid, segments, out, lse = residuals
    b, t, h, d = q.shape
    kvh = k.shape[2]
    layout = block_layout(spec, q, k.shape[1])
    qh = _head_major(q, kvh)
    d_out_h = _head_major(d_out, kvh, jnp.float32)
    # D_i = sum_d dO_i * O_i = sum_j P_ij dP_ij: the softmax backward's row term.
    delta = jnp.sum(d_out_h * _head_major(out, kvh, jnp.float32), axis=-1)

    def query_block(i, grads):
        dq, dk, dv = grads
        q_start = _block_start(i, layout.qb, t)
        # Rows a pulled-back last block shares with the previous block were handled there: count them once.
        fresh = (q_start + jnp.arange(layout.qb) >= i * layout.qb)[:, None]
        q_blk = jax.lax.dynamic_slice_in_dim(qh, q_start, layout.qb, axis=3)
        do_blk = jax.lax.dynamic_slice_in_dim(d_out_h, q_start, layout.qb, axis=3)
        lse_blk = jax.lax.dynamic_slice_in_dim(lse, q_start, layout.qb, axis=3)
        delta_blk = jax.lax.dynamic_slice_in_dim(delta, q_start, layout.qb, axis=3)
        slots = jax.lax.dynamic_slice_in_dim(q_slots, q_start, layout.qb)
        q_seg = _query_segments(segments, q_start, layout.qb)

        def key_block(j, carry):
            dq_blk, dk, dv = carry
            k_start, k_blk, v_blk, blk_slots, block_valid, k_seg = _key_block(
                spec, layout, j, k, v, k_slots, key_valid, segments
            )
            scores, mask, tanh = _block_scores(spec, q_blk, k_blk, slots, blk_slots, block_valid, q_seg, k_seg)
            p = jnp.where(mask & fresh, jnp.exp(scores - lse_blk[..., None]), 0.0)
            dv_blk = jnp.einsum("bkgqs,bkgqd->bskd", p, do_blk)
            dp = jnp.einsum("bkgqd,bskd->bkgqs", do_blk, v_blk.astype(jnp.float32))
            ds = p * (dp - delta_blk[..., None])
            if tanh is not None:
                ds = ds * (1 - tanh * tanh)  # through cap * tanh(x / cap)
            ds = ds * spec.scale
            dq_blk = dq_blk + jnp.einsum("bkgqs,bskd->bkgqd", ds, k_blk.astype(jnp.float32))
            dk_blk = jnp.einsum("bkgqs,bkgqd->bskd", ds, q_blk.astype(jnp.float32))
            return dq_blk, _add_at(dk, k_start, dk_blk, axis=1), _add_at(dv, k_start, dv_blk, axis=1)

        lo, hi = _key_block_range(spec, slots, layout.nk, layout.kb)
        dq_blk, dk, dv = jax.lax.fori_loop(lo, hi, key_block, (jnp.zeros(q_blk.shape, jnp.float32), dk, dv))
        return _add_at(dq, q_start, dq_blk, axis=3), dk, dv

    grads = (jnp.zeros(qh.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dq, dk, dv = jax.lax.fori_loop(0, layout.nq, query_block, grads)
    dq = dq.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


@partial(jax.custom_vjp, nondiff_argnums=(7,))
def _chunked(q, k, v, q_slots, k_slots, key_valid, segments, spec):
    return _chunked_forward(q, k, v, q_slots, k_slots, key_valid, segments, spec)[0]


def _chunked_fwd(q, k, v, q_slots, k_slots, key_valid, segments, spec):
    out, lse = _chunked_forward(q, k, v, q_slots, k_slots, key_valid, segments, spec)
    return out, (q, k, v, q_slots, k_slots, key_valid, segments, out, lse)


_chunked.defvjp(_chunked_fwd, _chunked_backward)


def _kernel_options(spec: AttentionSpec) -> dict:
    return {"scale": spec.scale, "window": spec.window, "contiguous": spec.contiguous_keys}


@partial(jax.custom_vjp, nondiff_argnums=(7,))
def _kernel(q, k, v, q_slots, k_slots, key_valid, segments, spec):
    return _kernel_forward(q, k, v, q_slots, k_slots, key_valid, segments, spec)[0]


def _kernel_forward(q, k, v, q_slots, k_slots, key_valid, segments, spec):
    return cpu_attention.forward(q, k, v, q_slots, k_slots, key_valid, segments, **_kernel_options(spec))


def _kernel_fwd(q, k, v, q_slots, k_slots, key_valid, segments, spec):
    out, lse = _kernel_forward(q, k, v, q_slots, k_slots, key_valid, segments, spec)
    return out, (q, k, v, q_slots, k_slots, key_valid, segments, out, lse)


def _kernel_backward(spec: AttentionSpec, residuals, d_out):
    """The backward kernel where it is built, else the chunked core's backward (the forward kernel saves what the
    chunked core's forward does: the output and each row's logsumexp)."""
    if not cpu_attention.takes_backward():
        return _chunked_backward(spec, residuals, d_out)
    q, k, v, q_slots, k_slots, key_valid, segments, out, lse = residuals
    options = _kernel_options(spec)
    dq, dk, dv = cpu_attention.backward(q, k, v, q_slots, k_slots, key_valid, segments, out, lse, d_out, **options)
    return dq, dk, dv, None, None, None, None


_kernel.defvjp(_kernel_fwd, _kernel_backward)


def _slots_and_spec(k, key_slots, spec: AttentionSpec):
    """key_slots (0..k_len-1 when None) and the spec, told whether they are contiguous."""
    if key_slots is None:
        return jnp.arange(k.shape[1], dtype=jnp.int32), spec
    return key_slots.astype(jnp.int32), spec._replace(contiguous_keys=False)


def kernel_attention(q, k, v, query_slots, key_valid, key_slots=None, segments=None, *, spec: AttentionSpec):
    """The CPU kernel's attention (`jaxlora.cpu_attention`), differentiable through the chunked core's backward:
    shapes and arguments as in `chunked_attention`; only calls `cpu_attention.takes`."""
    key_slots, spec = _slots_and_spec(k, key_slots, spec)
    segments = None if segments is None else jnp.asarray(segments, jnp.int32)
    return _kernel(q, k, v, query_slots.astype(jnp.int32), key_slots, key_valid, segments, spec)


def chunked_attention(
    q, k, v, query_slots, key_valid, key_slots=None, segments=None, *, spec: AttentionSpec
) -> jax.Array:
    """Flash-style attention: shapes as in `dot_product_attention`, memory O(q_block * k_block) per head;
    segments [batch, seq] int32 for self-attention (queries = keys) keeps each query in its own segment."""
    key_slots, spec = _slots_and_spec(k, key_slots, spec)
    segments = None if segments is None else jnp.asarray(segments, jnp.int32)
    return _chunked(q, k, v, query_slots.astype(jnp.int32), key_slots, key_valid, segments, spec)


def _cudnn_attention(q, k, v, mask, spec: AttentionSpec) -> jax.Array:
    if spec.softcap is not None:
        raise ConfigError("attention 'cudnn' has no score soft-capping (Gemma 2); use 'chunked' or 'xla'")
    if q.dtype not in (jnp.float16, jnp.bfloat16):
        raise ConfigError(f"attention 'cudnn' needs float16 or bfloat16 (got {q.dtype}); convert with --dtype")
    out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=spec.scale, implementation="cudnn")
    return out * jnp.any(mask, axis=-1)[:, :, None, None].astype(out.dtype)


def _splash_attention(
    q, k, v, query_slots, key_valid, segments, spec: AttentionSpec, interpret: bool = False
) -> jax.Array:
    """TPU splash attention for a full causal (or windowed) self-attention over one sequence per row.

    Padding is expressed with segment ids (padding keys in segment 0, real tokens in 1, or in their document's
    segment + 1 when rows are packed); a padding query then sees only padding keys, and its output is zeroed like
    every implementation's. interpret: run the Pallas kernel in interpret mode (any platform; how it is tested
    without a TPU).
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    b, t, h, d = q.shape
    if k.shape[1] != t:
        raise ConfigError("attention 'splash' covers prefill and training (queries = keys); decode uses 'xla'")
    head_mask = masks.CausalMask((t, t)) if spec.window is None else masks.LocalMask((t, t), (spec.window - 1, 0), 0)
    mha = kernel.make_splash_mha(
        masks.MultiHeadMask([head_mask] * h),
        head_shards=1,
        q_seq_shards=1,
        attn_logits_soft_cap=spec.softcap,
        interpret=interpret,
    )
    groups = h // k.shape[2]
    ids = key_valid.astype(jnp.int32) if segments is None else jnp.where(key_valid, segments.astype(jnp.int32) + 1, 0)
    segments = kernel.SegmentIds(q=ids, kv=ids)
    qh = (q * spec.scale).transpose(0, 2, 1, 3)
    kh = jnp.repeat(k, groups, axis=2).transpose(0, 2, 1, 3)
    vh = jnp.repeat(v, groups, axis=2).transpose(0, 2, 1, 3)
    out = jax.vmap(mha)(qh, kh, vh, segment_ids=segments).transpose(0, 2, 1, 3)
    return out * key_valid[:, :, None, None].astype(out.dtype)


def platform() -> str:
    return jax.default_backend()


def check_impl(impl: str, plat: str | None = None) -> None:
    """A clear error when `impl` is unknown or needs hardware this process does not have."""
    plat = plat or platform()
    if impl not in ATTENTION_IMPLS:
        raise ConfigError(f"unknown attention implementation {impl!r}; choose one of {', '.join(ATTENTION_IMPLS)}")
    needs = {"cudnn": "gpu", "splash": "tpu", "cpu": "cpu"}
    if impl in needs and plat != needs[impl]:
        raise ConfigError(f"attention {impl!r} needs a {needs[impl].upper()}; this process runs on {plat}")


def resolve_impl(
    impl: str, q_len: int, k_len: int, dtype, spec: AttentionSpec, plat: str | None = None, kernel: bool = False
) -> str:
    """The implementation a call runs: `impl` itself, or for "auto" the best the platform has for this call.
    kernel: whether the CPU kernel can take the call (`cpu_attention.takes`); "cpu" runs "chunked" where it cannot.

    auto: TPU -> splash for prefill/training, GPU -> cudnn for float16/bfloat16 without a soft cap; CPU -> the
    kernel for every call it takes (decode too); otherwise chunked once a row's score matrix per head reaches
    AUTO_CHUNKED_SCORES entries (on GPU/TPU AUTO_CHUNKED_SCORES_ACCELERATOR), else xla (so xla for decode).
    """
    plat = plat or platform()
    check_impl(impl, plat)
    if impl == "cpu":
        return "cpu" if kernel else "chunked"
    if impl != "auto":
        return impl
    if plat == "cpu" and kernel:
        # Decode included: SmolLM2's attention over a 1024-slot cache at batch 8 took 0.059 ms a layer in the kernel
        # against 1.8 in XLA's masked pass; generate's batch-1 / batch-8 decode (64-token prompt, 128 new tokens)
        # 32-33 / 126-129 tok/s with decode on XLA, 40-41 / 179 on the kernel.
        return "cpu"
    if plat == "tpu" and q_len == k_len and q_len % 128 == 0:
        return "splash"
    if plat == "gpu" and jnp.dtype(dtype) in (jnp.float16, jnp.bfloat16) and spec.softcap is None:
        return "cudnn"
    threshold = AUTO_CHUNKED_SCORES if plat == "cpu" else AUTO_CHUNKED_SCORES_ACCELERATOR
    return "chunked" if q_len > 1 and q_len * k_len >= threshold else "xla"


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    query_slots: jax.Array,
    key_valid: jax.Array,
    key_slots: jax.Array | None = None,
    *,
    window: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    impl: str = "auto",
    on_pattern=None,
    segments: jax.Array | None = None,
    sinks: jax.Array | None = None,
) -> jax.Array:
    """Causal (optionally windowed, soft-capped) grouped-query attention with the chosen implementation.

    q [batch, q_len, heads, head_dim]; k, v [batch, k_len, kv_heads, head_dim] (v may be narrower or wider:
    latent attention); query_slots [q_len] int32; key_valid [batch, k_len] bool; key_slots [k_len] int32 (default
    0..k_len-1). -> [batch, q_len, heads, v's width].
    segments [batch, seq] int32, self-attention only (queries = keys, no cache): a query sees only keys of its own
    segment (documents packed into one row).
    on_pattern: read or edit the probabilities (see `dot_product_attention`): only "xla" materializes them, so
    "auto" picks it and the other implementations refuse.
    sinks [heads] float32 (gpt-oss's attention sinks): only the "xla" core takes them, so "auto" picks it.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    spec = AttentionSpec(window, scale, softcap)
    if on_pattern is not None:
        if impl not in ("auto", "xla"):
            raise ConfigError(f"attention probabilities need the 'xla' attention core; '{impl}' never forms them")
        impl = "xla"
    if sinks is not None:
        if impl not in ("auto", "xla"):
            raise ConfigError(f"attention sinks need the 'xla' attention core; '{impl}' does not take them")
        impl = "xla"
    if q.shape[-1] != v.shape[-1] and impl in ("cudnn", "splash"):
        raise ConfigError(f"attention {impl!r} needs values as wide as queries; latent attention uses 'chunked'")
    kernel = impl in ("auto", "cpu") and platform() == "cpu" and cpu_attention.takes(q, k, v, softcap)
    chosen = resolve_impl(impl, q.shape[1], k.shape[1], q.dtype, spec, kernel=kernel)
    if q.shape[-1] != v.shape[-1] and chosen in ("cudnn", "splash"):
        chosen = "chunked"
    if chosen == "splash" and (key_slots is not None or q.shape[1] != k.shape[1]):
        chosen = "chunked"  # splash covers self-attention over one sequence; cached calls go chunked
    if segments is not None and (key_slots is not None or q.shape[1] != k.shape[1]):
        raise UsageError("segment ids cover self-attention over one packed row, not a call with a KV cache")
    if chosen == "chunked":
        return chunked_attention(q, k, v, query_slots, key_valid, key_slots, segments, spec=spec)
    if chosen == "cpu":
        return kernel_attention(q, k, v, query_slots, key_valid, key_slots, segments, spec=spec)
    if chosen == "splash" and key_slots is None:
        return _splash_attention(q, k, v, query_slots, key_valid, segments, spec)
    if key_slots is None:
        key_slots = jax.lax.iota(jnp.int32, k.shape[1])
    mask = attention_mask(query_slots, key_slots, key_valid, window, segments)
    if chosen == "cudnn":
        return _cudnn_attention(q, k, v, mask, spec)
    return dot_product_attention(q, k, v, mask, scale, softcap, on_pattern, sinks)
