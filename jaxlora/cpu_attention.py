"""Attention on the CPU as C++ kernels (`kernels/causal_attention.cc`): the forward pass and its gradients.

XLA:CPU runs chunked attention as a loop of small batched dots with the masks, maxima, exps and sums between them
as separate passes over each score block; SmolLM2's 512-token prefill spent about a fifth of its thread time there
(more than its share of the FLOPs). The kernel computes a block of query rows' scores in registers, their softmax
in the core's cache and their weighted values in registers again, one kv head and a chunk of query positions per
work item, the items split over XLA's intra-op thread pool.

It takes float32 calls without a soft cap (Gemma 2's) in a process with one device (a custom call has no sharding
rule), and returns what `attention._chunked_forward` does: the output and each query row's logsumexp. The backward
kernel recomputes the probabilities from them (flash attention's backward pass), one (row, query head) per work item:
in SmolLM2's LoRA training step XLA's chunked backward loop took about a tenth of the step. Where it is not built
(`jaxlora.native`) or JAXLORA_CPU_KERNEL=off, attention runs XLA's cores as before.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import native
from jaxlora.errors import ConfigError

TARGET = "jaxlora_causal_attention"
BACKWARD_TARGET = "jaxlora_causal_attention_backward"


_registered = native.declare(
    "causal_attention", "JaxloraCausalAttention", TARGET, "CPU attention kernel", "attention runs XLA's cores"
)
_backward_registered = native.declare(
    "causal_attention",
    "JaxloraCausalAttentionBackward",
    BACKWARD_TARGET,
    "CPU attention backward kernel",
    "attention's gradients run XLA's chunked loop",
)


def takes_backward() -> bool:
    """Whether the backward kernel is there (for a call the forward kernel took)."""
    return not native.switched_off() and _backward_registered()


def _operands(q, k, v, q_slots, k_slots, key_valid, segments) -> tuple:
    """The kernels' shared operands, in their order: q, k, v, the slots, key_valid as bytes, the query and key
    segments (zeros for a call without any)."""
    b, t, s = q.shape[0], q.shape[1], k.shape[1]
    if segments is None:
        q_segments, k_segments = jnp.zeros((b, t), jnp.int32), jnp.zeros((b, s), jnp.int32)
    else:
        q_segments = k_segments = segments.astype(jnp.int32)
    return (
        q,
        k,
        v,
        q_slots.astype(jnp.int32),
        k_slots.astype(jnp.int32),
        key_valid.astype(jnp.uint8),
        q_segments,
        k_segments,
    )


def _attributes(scale: float, window: int | None, contiguous: bool) -> dict:
    return {"scale": np.float32(scale), "window": np.int64(window or 0), "contiguous": np.int64(contiguous)}


def takes(q: jax.Array, k: jax.Array, v: jax.Array, softcap: float | None) -> bool:
    """Whether the kernel can run this call (shapes as in `attention.attend`), building it on first use."""
    if jax.default_backend() != "cpu" or jax.device_count() != 1 or native.switched_off():
        return False
    if softcap is not None or q.shape[-2] % k.shape[-2]:
        return False
    if any(x.dtype != jnp.float32 for x in (q, k, v)):
        return False
    return _registered()


def forward(q, k, v, q_slots, k_slots, key_valid, segments, *, scale: float, window: int | None, contiguous: bool):
    """q [b, t, h, d], k [b, s, kvh, d], v [b, s, kvh, dv] float32; q_slots [t], k_slots [s] int32; key_valid
    [b, s] bool; segments [b, t] int32 (self-attention, t = s) or None; contiguous: k_slots are 0..s-1.
    -> out [b, t, h, dv] float32 and the logsumexp [b, kvh, h / kvh, t] float32 of each query row (+inf where a
    row sees no key; its output is zero)."""
    if not _registered():
        raise ConfigError("the CPU attention kernel is not built here (see the warning above); use another attention")
    b, t, h, _ = q.shape
    kvh, dv = k.shape[2], v.shape[-1]
    results = (
        jax.ShapeDtypeStruct((b, t, h, dv), jnp.float32),
        jax.ShapeDtypeStruct((b, kvh, h // kvh, t), jnp.float32),
    )
    # Under a caller's vmap each mapped call runs by itself (`sequential`): the handler takes one batch.
    call = jax.ffi.ffi_call(TARGET, results, vmap_method="sequential")
    operands = _operands(q, k, v, q_slots, k_slots, key_valid, segments)
    return call(*operands, **_attributes(scale, window, contiguous))


def backward(q, k, v, q_slots, k_slots, key_valid, segments, out, lse, d_out, *, scale, window, contiguous):
    """The gradients of `forward`'s out: arguments as there, plus its out and lse and d_out [b, t, h, dv] float32
    -> dq [b, t, h, d], dk [b, s, kvh, d], dv [b, s, kvh, dv] float32 (rows that see no key contribute nothing)."""
    if not _backward_registered():
        raise ConfigError("the CPU attention backward kernel is not built here (see the warning above)")
    b, t, h, d = q.shape
    s, kvh, dv = k.shape[1], k.shape[2], v.shape[-1]
    results = (
        jax.ShapeDtypeStruct((b, t, h, d), jnp.float32),
        jax.ShapeDtypeStruct((b, s, h, d), jnp.float32),  # each query head's share of its kv head's dk
        jax.ShapeDtypeStruct((b, s, h, dv), jnp.float32),
    )
    call = jax.ffi.ffi_call(BACKWARD_TARGET, results, vmap_method="sequential")
    operands = _operands(q, k, v, q_slots, k_slots, key_valid, segments)
    dq, dk_shares, dv_shares = call(
        *operands, out, lse, d_out.astype(jnp.float32), **_attributes(scale, window, contiguous)
    )
    # Query head qh shares kv head qh // (h / kvh): sum each kv head's group of shares.
    dk = dk_shares.reshape(b, s, kvh, h // kvh, d).sum(axis=3)
    dv = dv_shares.reshape(b, s, kvh, h // kvh, dv).sum(axis=3)
    return dq, dk, dv
