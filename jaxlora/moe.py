"""Mixture-of-experts dispatch: a router picks `k` of `e` gated MLPs per token; four ways to compute them.

All four take the same arrays and give the same numbers (up to the order of float additions):

- `dense`: every expert on every token, unpicked weights zero. e / k times the FLOPs; XLA-friendly everywhere.
- `gathered`: each token's picked experts' kernels gathered ([tokens, k, d, f]) and applied. Computes only the
  picked experts, but the gather copies their kernels on every call.
- `blocked`: (token, expert) pairs sorted by expert, each expert's run padded to a multiple of a block, then one
  `lax.scan` over blocks, each a plain matmul with its expert's kernels (empty trailing blocks skipped, so only
  the picked experts' kernels are read). Grouped matmuls in pure JAX.
- `ragged`: the same sorted pairs through `jax.lax.ragged_dot` (grouped matmul kernels on TPU).

`auto` is `ragged` on TPU and `blocked` elsewhere. Measured on a 2-core CPU (scripts/bench_moe.py), blocked is
the fastest at prefill and at decode batch 1 and 8 alike, 2.5-7x dense; gathered beats dense only at decode;
ragged_dot runs slower than dense on XLA:CPU. GPU is not measured (blocked until it is).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxlora.config import MOE_IMPLS

# (gate projection, up projection) -> the hidden activation: act(gate) * up, or gpt-oss's clamped form.
Glu = Callable[[jax.Array, jax.Array], jax.Array]


class Experts(NamedTuple):
    """A mixture's stacked expert weights: kernels gate, up [e, d, f] and down [e, f, d]; biases gate_bias,
    up_bias [e, f] and down_bias [e, d], or None (no biases)."""

    gate: jax.Array
    up: jax.Array
    down: jax.Array
    gate_bias: jax.Array | None = None
    up_bias: jax.Array | None = None
    down_bias: jax.Array | None = None


def gated(act: Callable[[jax.Array], jax.Array]) -> Glu:
    """The usual gated MLP activation: act(gate) * up."""
    return lambda gate, up: act(gate) * up


def _plus(y: jax.Array, bias: jax.Array | None, index=None) -> jax.Array:
    """y + bias (bias[index] rows, when given), or y without biases."""
    if bias is None:
        return y
    return y + (bias if index is None else bias[index]).astype(y.dtype)


def route(router_logits: jax.Array, k: int, normalize: bool = True) -> tuple[jax.Array, jax.Array]:
    """Top-k routing: (weights [..., k] float32, experts [..., k] int32). The weights are the picked experts'
    softmax probabilities over all experts, renormalized to sum to 1 with `normalize` (Mixtral; Qwen-MoE's
    norm_topk_prob), which is the softmax over the picked logits."""
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    top_probs, top_experts = jax.lax.top_k(probs, k)
    if normalize:
        top_probs = top_probs / jnp.sum(top_probs, axis=-1, keepdims=True)
    return top_probs, top_experts


def route_grouped(
    router_logits: jax.Array,
    score_bias: jax.Array,
    k: int,
    groups: int,
    groups_per_token: int,
    normalize: bool,
    scaling: float,
) -> tuple[jax.Array, jax.Array]:
    """DeepSeek-V3's routing: (weights [..., k] float32, experts [..., k] int32) for router_logits [..., e].

    Scores are sigmoids; a learned bias (e_score_correction_bias, load balancing) is added for choosing only.
    The experts fall into `groups` groups, each rated by the sum of its two best biased scores; a token picks
    its `k` best biased scores within its `groups_per_token` best groups, and weighs them by their unbiased
    scores (renormalized to sum to 1 with `normalize`), times `scaling` (routed_scaling_factor)."""
    scores = jax.nn.sigmoid(router_logits.astype(jnp.float32))
    choice = scores + score_bias.astype(jnp.float32)
    e = choice.shape[-1]
    by_group = choice.reshape(*choice.shape[:-1], groups, e // groups)
    group_rating = jnp.sum(jax.lax.top_k(by_group, 2)[0], axis=-1)  # [..., groups]
    _, best_groups = jax.lax.top_k(group_rating, groups_per_token)
    in_best = jnp.any(best_groups[..., None] == jnp.arange(groups), axis=-2)  # [..., groups]
    allowed = jnp.repeat(in_best, e // groups, axis=-1)
    _, experts = jax.lax.top_k(jnp.where(allowed, choice, -jnp.inf), k)
    weights = jnp.take_along_axis(scores, experts, axis=-1)
    if normalize:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return weights * scaling, experts


def pick_impl(impl: str) -> str:
    """The implementation `auto` stands for on this platform."""
    if impl != "auto":
        return impl
    return "ragged" if jax.default_backend() == "tpu" else "blocked"


def mixture(
    x: jax.Array, weights: jax.Array, experts: jax.Array, w: Experts, glu: Glu, impl: str = "auto"
) -> jax.Array:
    """sum_j weights[t, j] * expert_e(x[t]) with e = experts[t, j] and expert_e(x) = glu(x gate_e + b, x up_e + b)
    down_e + b, for x [tokens, d]; weights [tokens, k] (cast to x's dtype); experts [tokens, k]."""
    impl = pick_impl(impl)
    weights = weights.astype(x.dtype)
    if impl == "dense":
        return _dense(x, weights, experts, w, glu)
    if impl == "gathered":
        out = _gathered(x, experts, w, glu)
    elif impl == "blocked":
        out = _blocked(x, experts, w, glu)
    elif impl == "ragged":
        out = _ragged(x, experts, w, glu)
    else:
        raise ValueError(f"unknown mixture-of-experts implementation {impl!r}; choose one of {', '.join(MOE_IMPLS)}")
    return jnp.einsum("tkd,tk->td", out, weights)


def _dense(x, weights, experts, w: Experts, glu):
    per_expert = jnp.sum(jax.nn.one_hot(experts, w.gate.shape[0], dtype=x.dtype) * weights[..., None], axis=-2)
    gate = _plus(jnp.einsum("td,edf->tef", x, w.gate), w.gate_bias)
    up = _plus(jnp.einsum("td,edf->tef", x, w.up), w.up_bias)
    out = _plus(jnp.einsum("tef,efd->ted", glu(gate, up), w.down), w.down_bias)
    return jnp.einsum("ted,te->td", out, per_expert)


def _gathered(x, experts, w: Experts, glu):
    """[tokens, k, d]: each pair's expert applied to its token, with the picked kernels gathered."""
    gate = _plus(jnp.einsum("td,tkdf->tkf", x, w.gate[experts]), w.gate_bias, experts)
    up = _plus(jnp.einsum("td,tkdf->tkf", x, w.up[experts]), w.up_bias, experts)
    return _plus(jnp.einsum("tkf,tkfd->tkd", glu(gate, up), w.down[experts]), w.down_bias, experts)


class _Sorted:
    """(token, expert) pairs sorted by expert: `order` [pairs] (pair index, i.e. token * k + j, in sorted order),
    `sizes` [e] (pairs per expert) and the token of each sorted pair."""

    def __init__(self, experts: jax.Array, num_experts: int):
        flat = experts.reshape(-1)
        self.k = experts.shape[1]
        self.order = jnp.argsort(flat, stable=True)
        self.expert = flat[self.order]
        self.sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
        self.token = self.order // self.k

    def unsort(self, sorted_out: jax.Array) -> jax.Array:
        """[pairs, d] in sorted order -> [tokens, k, d]."""
        out = jnp.zeros_like(sorted_out).at[self.order].set(sorted_out, unique_indices=True)
        return out.reshape(-1, self.k, out.shape[-1])


def _block_size(pairs: int, num_experts: int) -> int:
    """Rows per block: about a quarter of an expert's average run (padding wastes about half a block per expert),
    a power of two in [8, 64] (measured on CPU: smaller blocks cost per-step overhead, larger ones padding)."""
    target = max(pairs // (4 * num_experts), 1)
    return min(64, max(8, 1 << (target.bit_length() - 1)))


def _blocked(x, experts, w: Experts, glu):
    num_experts = w.gate.shape[0]
    pairs = experts.size
    s = _Sorted(experts, num_experts)
    block = _block_size(pairs, num_experts)
    padded = -(-s.sizes // block) * block
    padded_ends = jnp.cumsum(padded)
    # Row of each sorted pair in the padded layout: its expert's padded start plus its rank within the expert.
    rank = jnp.arange(pairs) - (jnp.cumsum(s.sizes) - s.sizes)[s.expert]
    row = (padded_ends - padded)[s.expert] + rank
    blocks = -(-(pairs + num_experts * (block - 1)) // block)  # the most any routing can need
    rows = jnp.zeros((blocks * block, x.shape[-1]), x.dtype).at[row].set(x[s.token], unique_indices=True)
    starts = jnp.arange(blocks) * block
    block_expert = jnp.minimum(jnp.searchsorted(padded_ends, starts, side="right"), num_experts - 1)
    used = starts < padded_ends[-1]

    def one_block(_, inputs):
        xb, e, is_used = inputs

        def apply(xb):
            hidden = glu(_plus(xb @ w.gate[e], w.gate_bias, e), _plus(xb @ w.up[e], w.up_bias, e))
            return _plus(hidden @ w.down[e], w.down_bias, e)

        return None, jax.lax.cond(is_used, apply, jnp.zeros_like, xb)

    _, out = jax.lax.scan(one_block, None, (rows.reshape(blocks, block, -1), block_expert, used))
    return s.unsort(out.reshape(blocks * block, -1)[row])


def _ragged(x, experts, w: Experts, glu):
    s = _Sorted(experts, w.gate.shape[0])
    xs = x[s.token]
    gate = _plus(jax.lax.ragged_dot(xs, w.gate, s.sizes), w.gate_bias, s.expert)
    up = _plus(jax.lax.ragged_dot(xs, w.up, s.sizes), w.up_bias, s.expert)
    return s.unsort(_plus(jax.lax.ragged_dot(glu(gate, up), w.down, s.sizes), w.down_bias, s.expert))
