"""Rotary position embeddings: inverse frequencies for each HF `rope_type`, cos/sin tables, and the rotation.

Frequencies are computed the way transformers computes them (float32, same operation order), so positions past a
model's original context rotate exactly as they do in PyTorch. Two kinds depend on the call's longest sequence,
as in HF's `dynamic_rope_update`: "dynamic" (NTK) raises the base once the sequence outgrows the original
context, and "longrope" switches from the short to the long factors there. Both take the sequence length as the
largest position in the call plus one, so a decode step past the original context uses the scaled frequencies
for its own key, and keys already in the cache keep the ones they were written with (HF does the same).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.config import ModelConfig, RopeConfig


def _exponents(dim: int) -> np.ndarray:
    """0, 2, ..., dim - 2 over dim, float32: theta ** this is each rotated pair's wavelength factor."""
    return np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim


def _base_inv_freq(theta: float, dim: int) -> np.ndarray:
    return (1.0 / (np.float32(theta) ** _exponents(dim))).astype(np.float32)


def _llama3(rope: RopeConfig, inv_freq: np.ndarray) -> np.ndarray:
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    old_context = rope.original_max_position_embeddings
    low_freq_wavelen = old_context / rope.low_freq_factor
    high_freq_wavelen = old_context / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def _yarn(rope: RopeConfig, dim: int) -> np.ndarray:
    """YaRN (Peng et al. 2023): dims that turn fewer than beta_slow times over the original context are
    interpolated by `factor`, those turning more than beta_fast times are kept, with a linear ramp between."""

    def correction_dim(rotations: float) -> float:
        return (
            dim
            * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi))
            / (2 * math.log(rope.theta))
        )

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # HF's guard against a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    keep = 1 - ramp
    pos_freqs = np.float32(rope.theta) ** _exponents(dim)
    extrapolated = 1.0 / pos_freqs
    interpolated = 1.0 / (np.float32(rope.factor) * pos_freqs)
    return (interpolated * (1 - keep) + extrapolated * keep).astype(np.float32)


def rope_inv_freq(rope: RopeConfig, dim: int, long: bool = False) -> np.ndarray:
    """Inverse frequencies [dim // 2] float32 for a fixed sequence length.

    "dynamic" gives its frequencies within the original context (no scaling); "longrope" gives the short factors'
    unless `long`.
    """
    if rope.kind == "yarn":
        return _yarn(rope, dim)
    if rope.kind == "longrope":
        factors = np.asarray(rope.long_factor if long else rope.short_factor, np.float32)
        return (1.0 / (factors * np.float32(rope.theta) ** _exponents(dim))).astype(np.float32)
    inv_freq = _base_inv_freq(rope.theta, dim)
    if rope.kind == "linear":
        return inv_freq / np.float32(rope.factor)
    if rope.kind == "llama3":
        return _llama3(rope, inv_freq)
    return inv_freq


def _dynamic_ntk_inv_freq(rope: RopeConfig, dim: int, seq_len: jax.Array) -> jax.Array:
    """NTK-aware scaling: base * (factor * len / original - (factor - 1)) ** (dim / (dim - 2)), len >= original."""
    original = rope.original_max_position_embeddings
    seq_len = jnp.maximum(seq_len, original).astype(jnp.float32)
    growth = (jnp.float32(rope.factor) * seq_len / original - jnp.float32(rope.factor - 1)) ** jnp.float32(
        dim / (dim - 2)
    )
    base = jnp.float32(rope.theta) * growth
    return 1.0 / base ** jnp.asarray(_exponents(dim))


def inv_freq_for(positions: jax.Array, rope: RopeConfig, dim: int) -> jax.Array:
    """The inverse frequencies [dim // 2] for a call over `positions` (the length-dependent kinds read its max)."""
    if rope.kind == "dynamic":
        return _dynamic_ntk_inv_freq(rope, dim, jnp.max(positions) + 1)
    if rope.kind == "longrope":
        beyond = jnp.max(positions) + 1 > rope.original_max_position_embeddings
        return jnp.where(beyond, rope_inv_freq(rope, dim, long=True), rope_inv_freq(rope, dim))
    return jnp.asarray(rope_inv_freq(rope, dim))


def rope_cos_sin(
    positions: jax.Array, config: ModelConfig, rope: RopeConfig | None = None
) -> tuple[jax.Array, jax.Array]:
    """positions [batch, seq] int32 -> cos, sin [batch, seq, rope_dim // 2] float32, one angle per rotated pair.

    YaRN and LongRoPE scale cos and sin by their attention factor (HF's `attention_scaling`).
    """
    rope = rope or config.rope
    angles = positions.astype(jnp.float32)[..., None] * inv_freq_for(positions, rope, config.rope_dim)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if rope.attention_factor != 1.0:
        cos, sin = cos * jnp.float32(rope.attention_factor), sin * jnp.float32(rope.attention_factor)
    return computed_once(cos), computed_once(sin)


def computed_once(table: jax.Array) -> jax.Array:
    """On the CPU, the table [..., n] as a product with the n x n identity, which XLA computes once and stores.

    XLA:CPU fuses an elementwise producer such as cos into each of its consumers, and a loop fusion computes it
    again for every element it writes: each RoPE rotation of q and k, and each of their gradients, in every layer,
    took cos and sin once per head and half-dimension. A dot's output it reads from memory instead. Exact: each entry
    is itself times 1 plus zeros. SmolLM2's 512-token prefill, alternated in fresh processes, best of 7: 803-819 ->
    780-787 ms on an AMD EPYC (Zen 4) host.
    """
    if jax.default_backend() != "cpu":
        return table
    identity = jnp.eye(table.shape[-1], dtype=table.dtype)
    return jnp.matmul(table, identity, precision=jax.lax.Precision.HIGHEST)


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
