"""The attention core: one entry point, `attend`, over interchangeable implementations.

- "xla": the reference. Builds the [batch, heads, queries, keys] score matrix and masks it; in decode it scores
  every slot of the cache buffer, filled or not, and masks the unfilled tail.
- "chunked": flash-style attention in pure JAX. Queries and keys go in blocks with an online softmax, so memory
  grows linearly with the sequence; key blocks a query block cannot see (the future, or past its sliding window)
  are skipped, so decode reads only the filled part of the cache and causal prefill does about half the work.
  Differentiable through its own backward pass (recomputes the blocks; saves only the output and logsumexp).
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, GPU only, float16/bfloat16 only.
- "splash": the Pallas splash-attention kernel, TPU only.
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

from jaxlora.config import ATTENTION_IMPLS
from jaxlora.errors import ConfigError

# Online softmax floor: finite, so a block with every key masked leaves the running max finite and exp() at 0.
_FLOOR = float(jnp.finfo(jnp.float32).min)

# "auto" on CPU switches to chunked once the score matrix of one row and head would pass this many entries
# (about 4 MiB of float32); below it the one-shot XLA path is faster.
AUTO_CHUNKED_SCORES = 1 << 20

Q_BLOCK = 512
K_BLOCK = 512


class AttentionSpec(NamedTuple):
    """The static part of an attention call (hashable: a jit and custom_vjp static argument)."""

    window: int | None  # a query sees itself and the window - 1 slots before it (HF's sliding window)
    scale: float
    softcap: float | None
    q_block: int = Q_BLOCK
    k_block: int = K_BLOCK
    contiguous_keys: bool = True  # key slots are 0..k_len-1, so blocks can be skipped by slot


def attention_mask(query_slots: jax.Array, key_slots: jax.Array, key_valid: jax.Array, window: int | None) -> jax.Array:
    """Which keys each query may see: [batch, q_len, k_len] bool (causal, windowed, real keys only)."""
    visible = key_slots[None, :] <= query_slots[:, None]
    if window is not None:
        visible &= query_slots[:, None] - key_slots[None, :] < window
    return visible[None] & key_valid[:, None, :]


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    scale: float | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """The reference: grouped-query attention with a materialized score matrix; scores are scaled by `scale`
    (default 1 / sqrt(head_dim)), then soft-capped.

    q [batch, q_len, heads, head_dim], k/v [batch, k_len, kv_heads, head_dim], mask [batch, q_len, k_len] bool
    -> [batch, q_len, heads, head_dim] in q's dtype.
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
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
        out = out * jnp.any(mask, axis=-1)[:, :, None, None, None].astype(out.dtype)
    return out.reshape(b, t, h, d)


def _blocks(length: int, block: int) -> tuple[int, int]:
    """(block size, number of blocks) covering `length`, the block no larger than the length."""
    size = min(block, length)
    return size, -(-length // size)


def _key_block_range(spec: AttentionSpec, q_slots: jax.Array, num_k_blocks: int, k_size: int):
    """The key blocks [lo, hi) a query block with these slots can see."""
    if not spec.contiguous_keys:
        return 0, num_k_blocks
    hi = jnp.minimum(jnp.max(q_slots) // k_size + 1, num_k_blocks)
    if spec.window is None:
        return 0, hi
    return jnp.maximum(jnp.min(q_slots) - spec.window + 1, 0) // k_size, hi


def _block_scores(spec: AttentionSpec, q_blk, k_blk, q_slots, k_slots, k_valid):
    """Capped scores and mask of one block pair: [b, kvh, g, qb, kb] float32 and bool; also the uncapped tanh
    (for the backward pass) or None."""
    raw = jnp.einsum("bkgqd,bksd->bkgqs", q_blk, k_blk, preferred_element_type=jnp.float32) * spec.scale
    tanh = None
    if spec.softcap is not None:
        tanh = jnp.tanh(raw / spec.softcap)
        raw = spec.softcap * tanh
    visible = k_slots[None, :] <= q_slots[:, None]
    if spec.window is not None:
        visible &= q_slots[:, None] - k_slots[None, :] < spec.window
    mask = (visible[None] & k_valid[:, None, :])[:, None, None]  # [b, 1, 1, qb, kb]
    return jnp.where(mask, raw, _FLOOR), mask, tanh


def _to_blocks(q, k, v, q_slots, k_slots, k_valid, spec: AttentionSpec):
    """Head-major, padded copies: q [b, kvh, g, nq*qb, d], k/v [b, kvh, nk*kb, d], and the padded slots."""
    b, t, h, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    qb, nq = _blocks(t, spec.q_block)
    kb, nk = _blocks(s, spec.k_block)
    qh = q.reshape(b, t, kvh, h // kvh, d).transpose(0, 2, 3, 1, 4)
    qh = jnp.pad(qh, ((0, 0),) * 3 + ((0, nq * qb - t), (0, 0)))
    kh = jnp.pad(k.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, nk * kb - s), (0, 0)))
    vh = jnp.pad(v.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, nk * kb - s), (0, 0)))
    # Padded queries repeat the last slot (their rows are dropped); padded keys are invalid.
    q_slots = jnp.pad(q_slots, (0, nq * qb - t), mode="edge")
    k_slots = jnp.pad(k_slots, (0, nk * kb - s), mode="edge")
    k_valid = jnp.pad(k_valid, ((0, 0), (0, nk * kb - s)))
    return qh, kh, vh, q_slots, k_slots, k_valid, (qb, nq, kb, nk)


def _chunked_forward(q, k, v, q_slots, k_slots, k_valid, spec: AttentionSpec):
    """-> out [b, t, h, d] in q's dtype and the logsumexp [b, kvh, g, nq*qb] float32 of every query row."""
    b, t, h, d = q.shape
    qh, kh, vh, q_slots, k_slots, k_valid, (qb, nq, kb, nk) = _to_blocks(q, k, v, q_slots, k_slots, k_valid, spec)
    kvh, g = kh.shape[1], h // kh.shape[1]

    def query_block(i, acc):
        out, lse = acc
        q_blk = jax.lax.dynamic_slice_in_dim(qh, i * qb, qb, axis=3)
        slots = jax.lax.dynamic_slice_in_dim(q_slots, i * qb, qb)

        def key_block(j, carry):
            o, m, total = carry
            k_blk = jax.lax.dynamic_slice_in_dim(kh, j * kb, kb, axis=2)
            v_blk = jax.lax.dynamic_slice_in_dim(vh, j * kb, kb, axis=2)
            scores, mask, _ = _block_scores(
                spec,
                q_blk,
                k_blk,
                slots,
                jax.lax.dynamic_slice_in_dim(k_slots, j * kb, kb),
                jax.lax.dynamic_slice_in_dim(k_valid, j * kb, kb, axis=1),
            )
            m_new = jnp.maximum(m, scores.max(axis=-1))
            p = jnp.where(mask, jnp.exp(scores - m_new[..., None]), 0.0)
            rescale = jnp.exp(m - m_new)
            total = total * rescale + p.sum(axis=-1)
            pv = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(v_blk.dtype), v_blk, preferred_element_type=jnp.float32)
            return o * rescale[..., None] + pv, m_new, total

        init = (
            jnp.zeros((b, kvh, g, qb, d), jnp.float32),
            jnp.full((b, kvh, g, qb), _FLOOR, jnp.float32),
            jnp.zeros((b, kvh, g, qb), jnp.float32),
        )
        lo, hi = _key_block_range(spec, slots, nk, kb)
        o, m, total = jax.lax.fori_loop(lo, hi, key_block, init)
        seen = total > 0
        o = o / jnp.where(seen, total, 1.0)[..., None]
        block_lse = jnp.where(seen, m + jnp.log(jnp.where(seen, total, 1.0)), jnp.inf)  # inf: p = exp(s - inf) = 0
        out = jax.lax.dynamic_update_slice_in_dim(out, o.astype(out.dtype), i * qb, axis=3)
        return out, jax.lax.dynamic_update_slice_in_dim(lse, block_lse, i * qb, axis=3)

    out = jnp.zeros((b, kvh, g, nq * qb, d), q.dtype)
    lse = jnp.zeros((b, kvh, g, nq * qb), jnp.float32)
    out, lse = jax.lax.fori_loop(0, nq, query_block, (out, lse))
    return out[:, :, :, :t].transpose(0, 3, 1, 2, 4).reshape(b, t, h, d), lse


def _chunked_backward(spec: AttentionSpec, residuals, d_out):
    q, k, v, q_slots, k_slots, k_valid, out, lse = residuals
    b, t, h, d = q.shape
    s = k.shape[1]
    qh, kh, vh, q_slots, k_slots, k_valid, (qb, nq, kb, nk) = _to_blocks(q, k, v, q_slots, k_slots, k_valid, spec)
    kvh, g = kh.shape[1], h // kh.shape[1]

    def head_major(x):  # [b, t, h, d] -> [b, kvh, g, nq*qb, d] float32
        x = x.astype(jnp.float32).reshape(b, t, kvh, g, d).transpose(0, 2, 3, 1, 4)
        return jnp.pad(x, ((0, 0),) * 3 + ((0, nq * qb - t), (0, 0)))

    d_out_h = head_major(d_out)
    # D_i = sum_d dO_i * O_i = sum_j P_ij dP_ij: the softmax backward's row term.
    delta = jnp.sum(d_out_h * head_major(out), axis=-1)

    def query_block(i, grads):
        dq, dk, dv = grads
        q_blk = jax.lax.dynamic_slice_in_dim(qh, i * qb, qb, axis=3)
        do_blk = jax.lax.dynamic_slice_in_dim(d_out_h, i * qb, qb, axis=3)
        lse_blk = jax.lax.dynamic_slice_in_dim(lse, i * qb, qb, axis=3)
        delta_blk = jax.lax.dynamic_slice_in_dim(delta, i * qb, qb, axis=3)
        slots = jax.lax.dynamic_slice_in_dim(q_slots, i * qb, qb)

        def key_block(j, carry):
            dq_blk, dk, dv = carry
            k_blk = jax.lax.dynamic_slice_in_dim(kh, j * kb, kb, axis=2)
            v_blk = jax.lax.dynamic_slice_in_dim(vh, j * kb, kb, axis=2)
            scores, mask, tanh = _block_scores(
                spec,
                q_blk,
                k_blk,
                slots,
                jax.lax.dynamic_slice_in_dim(k_slots, j * kb, kb),
                jax.lax.dynamic_slice_in_dim(k_valid, j * kb, kb, axis=1),
            )
            p = jnp.where(mask, jnp.exp(scores - lse_blk[..., None]), 0.0)
            dv_blk = jnp.einsum("bkgqs,bkgqd->bksd", p, do_blk)
            dp = jnp.einsum("bkgqd,bksd->bkgqs", do_blk, v_blk.astype(jnp.float32))
            ds = p * (dp - delta_blk[..., None])
            if tanh is not None:
                ds = ds * (1 - tanh * tanh)  # through cap * tanh(x / cap)
            ds = ds * spec.scale
            dq_blk = dq_blk + jnp.einsum("bkgqs,bksd->bkgqd", ds, k_blk.astype(jnp.float32))
            dk_blk = jnp.einsum("bkgqs,bkgqd->bksd", ds, q_blk.astype(jnp.float32))

            def add(acc, blk):
                return jax.lax.dynamic_update_slice_in_dim(
                    acc, jax.lax.dynamic_slice_in_dim(acc, j * kb, kb, axis=2) + blk, j * kb, axis=2
                )

            return dq_blk, add(dk, dk_blk), add(dv, dv_blk)

        lo, hi = _key_block_range(spec, slots, nk, kb)
        dq_blk, dk, dv = jax.lax.fori_loop(lo, hi, key_block, (jnp.zeros_like(q_blk, jnp.float32), dk, dv))
        return jax.lax.dynamic_update_slice_in_dim(dq, dq_blk, i * qb, axis=3), dk, dv

    grads = (
        jnp.zeros(qh.shape, jnp.float32),
        jnp.zeros(kh.shape, jnp.float32),
        jnp.zeros(vh.shape, jnp.float32),
    )
    dq, dk, dv = jax.lax.fori_loop(0, nq, query_block, grads)
    dq = dq[:, :, :, :t].transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype)
    dk = dk[:, :, :s].transpose(0, 2, 1, 3).astype(k.dtype)
    dv = dv[:, :, :s].transpose(0, 2, 1, 3).astype(v.dtype)
    return dq, dk, dv, None, None, None


@partial(jax.custom_vjp, nondiff_argnums=(6,))
def _chunked(q, k, v, q_slots, k_slots, k_valid, spec):
    return _chunked_forward(q, k, v, q_slots, k_slots, k_valid, spec)[0]


def _chunked_fwd(q, k, v, q_slots, k_slots, k_valid, spec):
    out, lse = _chunked_forward(q, k, v, q_slots, k_slots, k_valid, spec)
    return out, (q, k, v, q_slots, k_slots, k_valid, out, lse)


_chunked.defvjp(_chunked_fwd, _chunked_backward)


def chunked_attention(q, k, v, query_slots, key_valid, key_slots=None, *, spec: AttentionSpec) -> jax.Array:
    """Flash-style attention: shapes as in `dot_product_attention`, memory O(q_block * k_block) per head."""
    if key_slots is None:
        key_slots = jnp.arange(k.shape[1], dtype=jnp.int32)
    else:
        spec = spec._replace(contiguous_keys=False)
    return _chunked(q, k, v, query_slots.astype(jnp.int32), key_slots.astype(jnp.int32), key_valid, spec)


def _cudnn_attention(q, k, v, mask, spec: AttentionSpec) -> jax.Array:
    if spec.softcap is not None:
        raise ConfigError("attention 'cudnn' has no score soft-capping (Gemma 2); use 'chunked' or 'xla'")
    if q.dtype not in (jnp.float16, jnp.bfloat16):
        raise ConfigError(f"attention 'cudnn' needs float16 or bfloat16 (got {q.dtype}); convert with --dtype")
    out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=spec.scale, implementation="cudnn")
    return out * jnp.any(mask, axis=-1)[:, :, None, None].astype(out.dtype)


def _splash_attention(q, k, v, query_slots, key_valid, spec: AttentionSpec) -> jax.Array:
    """TPU splash attention for a full causal (or windowed) self-attention over one sequence per row.

    Padding is expressed with segment ids (padding keys in segment 0, real tokens in 1); a padding query then
    sees only padding keys, and its output is zeroed like every implementation's.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    b, t, h, d = q.shape
    if k.shape[1] != t:
        raise ConfigError("attention 'splash' covers prefill and training (queries = keys); decode uses 'xla'")
    head_mask = masks.CausalMask((t, t)) if spec.window is None else masks.LocalMask((t, t), (spec.window - 1, 0), 0)
    mha = kernel.make_splash_mha(
        masks.MultiHeadMask([head_mask] * h), head_shards=1, q_seq_shards=1, attn_logits_soft_cap=spec.softcap
    )
    groups = h // k.shape[2]
    segments = kernel.SegmentIds(q=key_valid.astype(jnp.int32), kv=key_valid.astype(jnp.int32))
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
    needs = {"cudnn": "gpu", "splash": "tpu"}
    if impl in needs and plat != needs[impl]:
        raise ConfigError(f"attention {impl!r} needs a {needs[impl].upper()}; this process runs on {plat}")


def resolve_impl(impl: str, q_len: int, k_len: int, dtype, spec: AttentionSpec, plat: str | None = None) -> str:
    """The implementation a call runs: `impl` itself, or for "auto" the best the platform has for this call.

    auto: TPU -> splash for prefill/training, GPU -> cudnn for float16/bfloat16 without a soft cap; otherwise (and
    on CPU) chunked once a row's score matrix per head passes AUTO_CHUNKED_SCORES entries, else xla.
    """
    plat = plat or platform()
    check_impl(impl, plat)
    if impl != "auto":
        return impl
    if plat == "tpu" and q_len == k_len and q_len % 128 == 0:
        return "splash"
    if plat == "gpu" and jnp.dtype(dtype) in (jnp.float16, jnp.bfloat16) and spec.softcap is None:
        return "cudnn"
    return "chunked" if q_len * k_len > AUTO_CHUNKED_SCORES else "xla"


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
) -> jax.Array:
    """Causal (optionally windowed, soft-capped) grouped-query attention with the chosen implementation.

    q [batch, q_len, heads, head_dim]; k, v [batch, k_len, kv_heads, head_dim]; query_slots [q_len] int32;
    key_valid [batch, k_len] bool; key_slots [k_len] int32 (default 0..k_len-1). -> [batch, q_len, heads, head_dim].
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    spec = AttentionSpec(window, scale, softcap)
    chosen = resolve_impl(impl, q.shape[1], k.shape[1], q.dtype, spec)
    if chosen == "splash" and (key_slots is not None or q.shape[1] != k.shape[1]):
        chosen = "chunked"  # splash covers self-attention over one sequence; cached calls go chunked
    if chosen == "chunked":
        return chunked_attention(q, k, v, query_slots, key_valid, key_slots, spec=spec)
    if chosen == "splash" and key_slots is None:
        return _splash_attention(q, k, v, query_slots, key_valid, spec)
    if key_slots is None:
        key_slots = jnp.arange(k.shape[1])
    mask = attention_mask(query_slots, key_slots, key_valid, window)
    if chosen == "cudnn":
        return _cudnn_attention(q, k, v, mask, spec)
    return dot_product_attention(q, k, v, mask, scale, softcap)
