"""The attention core, its mask, and rotary position embeddings: pure functions over arrays."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.config import ModelConfig, RopeConfig


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """Inverse frequencies [head_dim // 2] float32, with the config's scaling applied (as HF computes them)."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
    inv_freq = (1.0 / (rope.theta**exponents)).astype(np.float32)
    if rope.kind == "linear":
        inv_freq = inv_freq / np.float32(rope.factor)
    elif rope.kind == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
        old_context = rope.original_max_position_embeddings
        low_freq_wavelen = old_context / rope.low_freq_factor
        high_freq_wavelen = old_context / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        inv_freq = np.where(is_medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_cos_sin(
    positions: jax.Array, config: ModelConfig, rope: RopeConfig | None = None
) -> tuple[jax.Array, jax.Array]:
    """positions [batch, seq] int32 -> cos, sin [batch, seq, rope_dim // 2] float32, one angle per rotated pair."""
    inv_freq = jnp.asarray(rope_inv_freq(rope or config.rope, config.rope_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, style: str = "half") -> jax.Array:
    """Rotate the first 2 * cos.shape[-1] dims of each head of x [batch, seq, heads, head_dim]; the rest pass.

    "half" pairs dim i with dim i + d/2 (Llama, NeoX: rotate_half); "interleaved" pairs dims 2i and 2i + 1
    (GPT-J, CodeGen: rotate_every_two).
    """
    rope_dim = 2 * cos.shape[-1]
    rot, rest = x[..., :rope_dim], x[..., rope_dim:]
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    if style == "half":
        first, second = rot[..., : rope_dim // 2], rot[..., rope_dim // 2 :]
        rot = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    else:
        even, odd = rot[..., 0::2], rot[..., 1::2]
        rot = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1).reshape(rot.shape)
    return jnp.concatenate([rot, rest], axis=-1) if rest.shape[-1] else rot


def attention_mask(query_slots: jax.Array, key_valid: jax.Array, window: int | None) -> jax.Array:
    """Which keys each query may see: [batch, q_len, k_len] bool.

    query_slots [q_len] int32: the cache slot of each query; keys occupy slots 0..k_len-1.
    key_valid [batch, k_len] bool: slots holding a real token (not padding, not yet written).
    Slots are consecutive in time for every row (prompts are left-padded), so slot distance is token distance.
    """
    key_slots = jnp.arange(key_valid.shape[-1])
    visible = key_slots[None, :] <= query_slots[:, None]
    if window is not None:
        # HF sliding window: a query sees itself and the window - 1 tokens before it.
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
    """Grouped-query attention; scores are scaled by `scale` (default 1 / sqrt(head_dim)), then soft-capped.

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
        # Softmax in float32 with a finite floor: a fully masked row (a padding query) stays finite.
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)
