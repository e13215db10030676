"""Attention's forward pass on the CPU as one C++ kernel (`kernels/causal_attention.cc`).

XLA:CPU runs chunked attention as a loop of small batched dots with the masks, maxima, exps and sums between them
as separate passes over each score block; SmolLM2's 512-token prefill spent about a fifth of its thread time there
(more than its share of the FLOPs). The kernel computes a block of query rows' scores in registers, their softmax
in the core's cache and their weighted values in registers again, one kv head and a chunk of query positions per
work item, the items split over XLA's intra-op thread pool.

It takes float32 calls without a soft cap (Gemma 2's) in a process with one device (a custom call has no sharding
rule), and returns what `attention._chunked_forward` does: the output and each query row's logsumexp, so the
chunked core's backward pass serves its gradients. Where it is not built
(`jaxlora.native`) or JAXLORA_CPU_KERNEL=off, attention runs XLA's cores as before.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import native
from jaxlora.errors import ConfigError

TARGET = "jaxlora_causal_attention"


_registered = native.declare(
    "causal_attention", "JaxloraCausalAttention", TARGET, "CPU attention kernel", "attention runs XLA's cores"
)


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
    s, kvh, dv = k.shape[1], k.shape[2], v.shape[-1]
    if segments is None:
        q_segments, k_segments = jnp.zeros((b, t), jnp.int32), jnp.zeros((b, s), jnp.int32)
    else:
        q_segments = k_segments = segments.astype(jnp.int32)
    results = (
        jax.ShapeDtypeStruct((b, t, h, dv), jnp.float32),
        jax.ShapeDtypeStruct((b, kvh, h // kvh, t), jnp.float32),
    )
    # Under a caller's vmap each mapped call runs by itself (`sequential`): the handler takes one batch.
    call = jax.ffi.ffi_call(TARGET, results, vmap_method="sequential")
    return call(
        q,
        k,
        v,
        q_slots.astype(jnp.int32),
        k_slots.astype(jnp.int32),
        key_valid.astype(jnp.uint8),
        q_segments,
        k_segments,
        scale=np.float32(scale),
        window=np.int64(window or 0),
        contiguous=np.int64(contiguous),
    )
