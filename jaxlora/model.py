"""The decoder as flax linen modules (params are a plain nested dict) and the pure `forward` over it."""

from __future__ import annotations

import contextlib
import functools
import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import errors as flax_errors
from flax import linen as nn

from jaxlora import cpu_matmul, moe
from jaxlora.attention import attend
from jaxlora.cache import KVCache, LayerCache, ring_slots
from jaxlora.config import LoraConfig, ModelConfig
from jaxlora.cpu_matmul import HEAD_TILES, is_tiled
from jaxlora.cpu_matmul import matmul as tiled_matmul
from jaxlora.errors import UsageError
from jaxlora.hooks import CAPTURED, Sites, at_site, collect, make_sites
from jaxlora.quant import (
    dequantize,
    dequantized_in_order,
    float_dtype,
    held_in_loop,
    is_quantized,
    matmul,
    one_row,
    take_rows,
)
from jaxlora.rope import apply_rope, rope_cos_sin
from jaxlora.stacking import Stack, layer_stacks, stack_tree, unstack_tree

_init = nn.initializers.normal(stddev=0.02)


def _axes(init, *names: str | None):
    """Declare a param's logical axes where it is defined; `jaxlora.sharding` maps them onto a mesh."""
    return nn.with_logical_partitioning(init, names)


def weight(module: nn.Module, name: str, init, shape: tuple[int, ...]):
    """A module's param: the float32 array `shape` (created by `init` when the model is initialized), or a
    quantized one (`jaxlora.quant`) standing for it. A stored float param's shape is checked here rather than by
    flax's `param`, which traces its initializer (`eval_shape`) for every param at every trace: it cost a second
    process's first SmolLM2 token 0.2 s (1.77 -> 1.54 s)."""
    if not module.has_variable("params", name):
        return module.param(name, init, shape, jnp.float32)
    stored = module.get_variable("params", name)
    if not is_quantized(stored) and not is_tiled(stored) and tuple(stored.shape) != tuple(shape):
        raise flax_errors.ScopeParamShapeError(name, module.scope.path_text, tuple(stored.shape), tuple(shape))
    return stored


class Embedding(nn.Module):
    """A token table [vocab, hidden] ("embedding", as flax's nn.Embed names it), float or quantized."""

    num_embeddings: int
    features: int
    axes: tuple[str, str] = ("vocab", "embed")

    def setup(self):
        self.embedding = weight(self, "embedding", _axes(_init, *self.axes), (self.num_embeddings, self.features))


class Linear(nn.Module):
    """y = x @ kernel (+ bias); kernel [in, out] as in HF's Linear weight transposed, with logical axes."""

    features: int
    use_bias: bool = False
    axes: tuple[str, str] = ("embed", "embed")
    lora: LoraConfig | None = None  # this model's LoRA adapters, if any (their weights: the "lora" collection)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = weight(self, "kernel", _axes(_init, *self.axes), (x.shape[-1], self.features))
        if is_quantized(kernel):  # stored [out, in] (`jaxlora.quant`), dequantized here, inside the computation
            y = matmul(x, kernel)
        elif is_tiled(kernel):  # a decode loop's copy for the CPU kernel (`jaxlora.cpu_matmul`)
            y = tiled_matmul(x, kernel, self.features)
        else:
            y = jnp.dot(x, kernel.astype(x.dtype) if kernel.dtype != x.dtype else kernel)
        if self.use_bias:
            bias = weight(self, "bias", _axes(nn.initializers.zeros, self.axes[1]), (self.features,))
            y = y + bias.astype(y.dtype)
        if self.has_variable("lora", "a"):
            # Low-rank update without forming W + AB: x @ W + scale * (dropout(x) @ A) @ B. Dropout (PEFT's
            # lora_dropout) acts only when a "dropout" rng is given, i.e. in training.
            a, b = self.get_variable("lora", "a"), self.get_variable("lora", "b")
            if self.lora.dropout > 0 and self.has_rng("dropout"):
                x = nn.Dropout(self.lora.dropout, deterministic=False)(x)
            if a.ndim == 3:  # one adapter per row (`jaxlora.lora.select`): a [batch, in, r], b [batch, r, out]
                xa = jnp.einsum("b...i,bir->b...r", x, a.astype(x.dtype))
                return y + self.lora.scale * jnp.einsum("b...r,bro->b...o", xa, b.astype(x.dtype))
            y = y + low_rank_update(x, a.astype(x.dtype), b.astype(x.dtype), self.lora.scale)
        return y


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def low_rank_update(x, a, b, scale: float):
    """scale * (x @ a) @ b for x [..., in], a [in, rank], b [rank, out]: a LoRA adapter's output."""
    return scale * jnp.dot(jnp.dot(x, a), b)


def _low_rank_update_fwd(x, a, b, scale):
    xa = jnp.dot(x, a)
    return scale * jnp.dot(xa, b), (x, a, b, xa)


def _low_rank_update_bwd(scale, residuals, dy):
    # The adapters' weight gradients contract over the tokens. Written as (rank-sized)^T @ (token-major), the
    # small operand is the one transposed: autodiff's x^T @ g would copy every layer input [tokens, in] transposed.
    x, a, b, xa = residuals
    rows = (((0,), (0,)), ((), ()))
    x2, xa2, dy2 = x.reshape(-1, x.shape[-1]), xa.reshape(-1, xa.shape[-1]), dy.reshape(-1, dy.shape[-1])
    dxa = scale * jnp.dot(dy2, b.T)
    db = scale * jax.lax.dot_general(xa2, dy2, rows)
    da = jax.lax.dot_general(dxa, x2, rows).T
    dx = jnp.dot(dxa, a.T).reshape(x.shape)
    return dx, da.astype(a.dtype), db.astype(b.dtype)


low_rank_update.defvjp(_low_rank_update_fwd, _low_rank_update_bwd)


@jax.custom_vjp
def silu_gated(gate, up):
    """silu(gate) * up, a SwiGLU MLP's hidden activation, with its derivative written out: XLA:CPU computes the
    backward pass in fewer, leaner fusions than it does from autodiff's (SmolLM2's LoRA step, one process, the two
    alternated 12 times: median 3.79 -> 3.67 s, fastest 3.67 -> 3.53 s). The same values as autodiff's up to
    float32 rounding."""
    return jax.nn.silu(gate) * up


def _silu_gated_fwd(gate, up):
    return silu_gated(gate, up), (gate, up)


def _silu_gated_bwd(residuals, dh):
    gate, up = residuals
    sigmoid = jax.nn.sigmoid(gate)
    silu = gate * sigmoid
    return dh * up * (sigmoid + silu * (1 - sigmoid)), dh * silu


silu_gated.defvjp(_silu_gated_fwd, _silu_gated_bwd)


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


class Norm(nn.Module):
    """RMSNorm (Llama: normalize in float32, cast, scale; Gemma: scale by 1 + w in float32) or LayerNorm."""

    eps: float
    kind: str = "rms"
    weight_offset: float = 0.0
    axis: str = "norm"
    scale_in_float32: bool = False  # multiply by the weight before casting back (OLMo 2; Gemma's offset does too)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = weight(self, "scale", _axes(nn.initializers.ones, self.axis), (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        if self.kind == "layer":
            bias = weight(self, "bias", _axes(nn.initializers.zeros, self.axis), (x.shape[-1],))
            centered = x32 - jnp.mean(x32, axis=-1, keepdims=True)
            normed = centered * jax.lax.rsqrt(jnp.mean(centered * centered, axis=-1, keepdims=True) + self.eps)
            return (normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.weight_offset or self.scale_in_float32:
            return (normed * (self.weight_offset + scale.astype(jnp.float32))).astype(x.dtype)
        return scale.astype(x.dtype) * normed.astype(x.dtype)


def make_norm(config: ModelConfig, name: str | None = None, axis: str = "norm") -> Norm:
    return Norm(
        config.norm_eps, config.norm_kind, config.norm_weight_offset, axis, config.norm_scale_in_float32, name=name
    )


class AttentionInputs(NamedTuple):
    """What a layer's attention takes from the call besides its activations (the same for every layer, but for
    the RoPE tables of windowed layers in families that give those their own)."""

    cos: jax.Array  # [batch, seq, rope_dim // 2] float32
    sin: jax.Array
    query_slots: jax.Array  # [seq] int32: the cache slot of each query
    key_valid: jax.Array  # [batch, k_len] bool: keys that hold a real token (k_len: seq, or the cache's slots)
    write_index: jax.Array | int  # the cache slot this call's first token is written to
    segments: jax.Array | None = None  # [batch, seq] int32: packed documents' ids (no cache); None: one per row


class Attention(nn.Module):
    config: ModelConfig
    window: int | None
    lora: LoraConfig | None = None
    index: int = 0  # the layer's index (names its hook points)
    sites: Sites | None = None

    @nn.compact
    def __call__(self, x, inputs: AttentionInputs, cache: LayerCache | None):
        """x [batch, t, hidden] -> (output [batch, t, hidden], the layer's updated cache or None)."""
        c, here = self.config, f"blocks.{self.index}.attn."
        cos, sin, query_slots, key_valid, write_index, segments = inputs
        b, t, _ = x.shape
        q = Linear(c.num_heads * c.head_dim, c.qkv_bias, ("embed", "heads"), name="q_proj", lora=self.lora)(x)
        k = Linear(c.num_kv_heads * c.head_dim, c.qkv_bias, ("embed", "kv_heads"), name="k_proj", lora=self.lora)(x)
        v = Linear(c.num_kv_heads * c.head_dim, c.qkv_bias, ("embed", "kv_heads"), name="v_proj", lora=self.lora)(x)
        if c.qk_norm and c.qk_norm_span == "all":  # over the whole projection, every head at once
            q = make_norm(c, "q_norm", "heads")(q)
            k = make_norm(c, "k_norm", "kv_heads")(k)
        q = q.reshape(b, t, c.num_heads, c.head_dim)
        k = k.reshape(b, t, c.num_kv_heads, c.head_dim)
        v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
        if c.qk_norm and c.qk_norm_span == "head":
            q = Norm(c.norm_eps, "rms", c.norm_weight_offset, "head_dim", name="q_norm")(q)
            k = Norm(c.norm_eps, "rms", c.norm_weight_offset, "head_dim", name="k_norm")(k)
        q, k, v = (
            at_site(self, self.sites, here + name, a) for name, a in (("hook_q", q), ("hook_k", k), ("hook_v", v))
        )
        if not c.learned_positions and self.index not in c.no_rope_layers:
            q = apply_rope(q, cos, sin, c.rotary_style)
            k = apply_rope(k, cos, sin, c.rotary_style)
        on_pattern = None
        if self.sites is not None and self.sites.wants(here + "hook_pattern"):
            on_pattern = partial(at_site, self, self.sites, here + "hook_pattern")
        sinks = None
        if c.attention_sinks:
            sinks = weight(self, "sinks", _axes(nn.initializers.zeros, "heads"), (c.num_heads,))
        core = partial(
            attend,
            window=self.window,
            scale=c.attn_scale,
            softcap=c.attn_softcap,
            impl=c.attention_impl,
            on_pattern=on_pattern,
            sinks=sinks,
        )
        if cache is None:
            out, new_cache = core(q, k, v, query_slots, key_valid, segments=segments), None
        elif cache.size == key_valid.shape[1]:
            # A buffer with every slot: write this call's keys/values and attend over it.
            new_cache = cache.write(k, v, write_index)
            keys, values = new_cache.read()
            out = core(q, keys.astype(q.dtype), values.astype(q.dtype), query_slots, key_valid)
        else:
            out, new_cache = self._ring_attention(core, q, k, v, query_slots, key_valid, cache, write_index)
        out = at_site(self, self.sites, here + "hook_z", out)
        out = Linear(c.hidden_size, c.o_bias, ("heads", "embed"), name="o_proj", lora=self.lora)(
            out.reshape(b, t, c.num_heads * c.head_dim)
        )
        return out, new_cache

    @staticmethod
    def _ring_attention(core, q, k, v, query_slots, key_valid, cache: LayerCache, write_index):
        """Attention through a windowed layer's ring buffer (see `jaxlora.cache`)."""
        size, t = cache.size, q.shape[1]

        def valid_at(slots):
            return jnp.take(key_valid, jnp.maximum(slots, 0), axis=1) & (slots >= 0)

        if t == 1:
            # One new token: it replaces the entry `window` slots back, which it could not see anyway.
            new_cache = cache.write_ring(k, v, write_index)
            new_k, new_v = new_cache.read()
            slots = ring_slots(write_index + 1, size)
            out = core(q, new_k.astype(q.dtype), new_v.astype(q.dtype), query_slots, valid_at(slots), slots)
            return out, new_cache
        # Several: earlier queries still need entries the later tokens overwrite, so attend over ring + new first.
        old_slots = ring_slots(write_index, size)
        cached_k, cached_v = cache.read()
        keys = jnp.concatenate([cached_k.astype(q.dtype), k], axis=1)
        values = jnp.concatenate([cached_v.astype(q.dtype), v], axis=1)
        slots = jnp.concatenate([old_slots, write_index + jnp.arange(t)])
        new_valid = jax.lax.dynamic_slice_in_dim(key_valid, write_index, t, axis=1)
        valid = jnp.concatenate([valid_at(old_slots), new_valid], axis=1)
        out = core(q, keys, values, query_slots, valid, slots)
        # The ring keeps slots up to the last real one: a chat turn's right padding is overwritten by decoding.
        end = write_index + jnp.max(jnp.where(jnp.any(new_valid, axis=0), jnp.arange(1, t + 1), 0))
        return out, cache.write_ring(k, v, write_index, end)


class LatentUp(nn.Module):
    """Latent attention's up-projection (HF's kv_b_proj, kernel [kv_lora_rank, heads * (nope + v_head_dim)]): a
    token's latent -> each head's key part without RoPE (nope wide) and its value.

    mode "expand": latent [b, s, kv_lora] -> [b, s, heads, nope + v], as transformers computes (no cache).
    With a cache the latents are never expanded: the key half is absorbed into the queries, "keys": q_nope
    [b, t, heads, nope] -> [b, t, heads, kv_lora], so scores come straight from the cached latents; the value
    half is applied after attention, "values": [b, t, heads, kv_lora] -> [b, t, heads, v]. LoRA adapters on
    kv_b_proj apply in every mode, in their low-rank form."""

    config: ModelConfig
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x: jax.Array, mode: str) -> jax.Array:
        c = self.config
        heads, nope, rank = c.num_heads, c.head_dim - c.rope_dim, c.kv_lora_rank
        stored = weight(self, "kernel", _axes(_init, "kv_lora", "heads"), (rank, heads * (nope + c.value_dim)))
        kernel = dequantize(stored, x.dtype).T if is_quantized(stored) else stored.astype(x.dtype)
        adapter = None
        if self.has_variable("lora", "a"):
            a, b = (self.get_variable("lora", n).astype(x.dtype) for n in ("a", "b"))
            rows = x.shape[0]
            if a.ndim == 2:  # one adapter for every row; per-row adapters come [batch, ...] (`lora.select`)
                a, b = jnp.broadcast_to(a, (rows, *a.shape)), jnp.broadcast_to(b, (rows, *b.shape))
            adapter = (a, b.reshape(rows, -1, heads, nope + c.value_dim), self.lora.scale)
        if mode == "expand":
            y = jnp.dot(x, kernel)
            if adapter is not None:
                a, b, scale = adapter
                if self.lora.dropout > 0 and self.has_rng("dropout"):
                    x = nn.Dropout(self.lora.dropout, deterministic=False)(x)
                xa = jnp.einsum("bsl,blr->bsr", x, a)
                y = y + scale * jnp.einsum("bsr,bro->bso", xa, b.reshape(*b.shape[:2], -1))
            return y.reshape(*x.shape[:2], heads, nope + c.value_dim)
        kernel = kernel.reshape(rank, heads, nope + c.value_dim)
        if mode == "keys":
            y = jnp.einsum("bthn,lhn->bthl", x, kernel[..., :nope])
            if adapter is not None:
                a, b, scale = adapter
                y = y + scale * jnp.einsum("bthr,blr->bthl", jnp.einsum("bthn,brhn->bthr", x, b[..., :nope]), a)
            return y
        y = jnp.einsum("bthl,lhv->bthv", x, kernel[..., nope:])
        if adapter is not None:
            a, b, scale = adapter
            y = y + scale * jnp.einsum("bthr,brhv->bthv", jnp.einsum("bthl,blr->bthr", x, a), b[..., nope:])
        return y


class LatentAttention(nn.Module):
    """DeepSeek-V3's multi-head latent attention (MLA): queries from a compressed latent (q_a_proj, its norm,
    q_b_proj); keys and values from one latent of kv_lora_rank per token (kv_a_proj_with_mqa, its norm,
    kv_b_proj), plus a rotated key part shared by all heads. The last rotary_dim dims of each query and that
    shared part carry RoPE (DeepSeek's interleaved pairs); the rest of a key and the value come from the latent.

    Without a cache the latent is expanded into per-head keys and values, as transformers does. With one, the
    cache holds only the normed latent ("keys") and the rotated part ("values"), kv_lora_rank + rotary_dim
    numbers per token and layer, and attention runs over them directly: each head's query is taken into latent
    space (`LatentUp` "keys"), attends as one multi-query head over [latent, rotated part], and its output
    leaves latent space through the value half of kv_b_proj. The same numbers, in another order."""

    config: ModelConfig
    lora: LoraConfig | None = None
    index: int = 0
    sites: Sites | None = None

    @nn.compact
    def __call__(self, x, inputs: AttentionInputs, cache: LayerCache | None):
        c, here = self.config, f"blocks.{self.index}.attn."
        cos, sin, query_slots, key_valid, write_index, segments = inputs
        b, t, _ = x.shape
        heads, rope, rank = c.num_heads, c.rope_dim, c.kv_lora_rank
        nope = c.head_dim - rope
        if c.q_lora_rank:
            q = Linear(c.q_lora_rank, c.qkv_bias, ("embed", "q_lora"), name="q_a_proj", lora=self.lora)(x)
            q = Norm(c.norm_eps, axis="q_lora", name="q_a_layernorm")(q)
            q = Linear(heads * c.head_dim, False, ("q_lora", "heads"), name="q_b_proj", lora=self.lora)(q)
        else:
            q = Linear(heads * c.head_dim, False, ("embed", "heads"), name="q_proj", lora=self.lora)(x)
        q = at_site(self, self.sites, here + "hook_q", q.reshape(b, t, heads, c.head_dim))
        compressed = Linear(rank + rope, c.qkv_bias, ("embed", None), name="kv_a_proj_with_mqa", lora=self.lora)(x)
        latent = Norm(c.norm_eps, axis="kv_lora", name="kv_a_layernorm")(compressed[..., :rank])
        rotated = not c.learned_positions and self.index not in c.no_rope_layers

        def rope_of(x):  # the last `rope` dims of x rotated by position
            return apply_rope(x, cos, sin, c.rotary_style) if rotated else x

        q_nope, q_rope = q[..., :nope], rope_of(q[..., nope:])
        up = LatentUp(c, self.lora, name="kv_b_proj")
        on_pattern = None
        if self.sites is not None and self.sites.wants(here + "hook_pattern"):
            on_pattern = partial(at_site, self, self.sites, here + "hook_pattern")
        core = partial(attend, scale=c.attn_scale, impl=c.attention_impl, on_pattern=on_pattern)
        if cache is None:
            kv = up(latent, "expand")  # [b, t, heads, nope + v]
            k_nope = kv[..., :nope]
            k = jnp.concatenate([k_nope, jnp.broadcast_to(compressed[..., None, rank:], (b, t, heads, rope))], -1)
            k = at_site(self, self.sites, here + "hook_k", k)
            v = at_site(self, self.sites, here + "hook_v", kv[..., nope:])
            k = jnp.concatenate([k[..., :nope], rope_of(k[..., nope:])], -1)
            query = jnp.concatenate([q_nope, q_rope], -1)
            out, new_cache = core(query, k, v, query_slots, key_valid, segments=segments), None
        else:
            k_rope = rope_of(compressed[..., None, rank:])  # [b, t, 1, rope]
            new_cache = cache.write(latent[:, :, None], k_rope, write_index)
            latents, k_ropes = (a.astype(q.dtype) for a in new_cache.read())  # [b, slots, 1, rank], [.., rope]
            query = jnp.concatenate([up(q_nope, "keys"), q_rope], -1)  # [b, t, heads, rank + rope]
            keys = jnp.concatenate([latents, k_ropes], -1)
            out = up(core(query, keys, latents, query_slots, key_valid), "values")
        out = at_site(self, self.sites, here + "hook_z", out)
        out = Linear(c.hidden_size, c.o_bias, ("heads", "embed"), name="o_proj", lora=self.lora)(
            out.reshape(b, t, heads * c.value_dim)
        )
        return out, new_cache


class MLP(nn.Module):
    config: ModelConfig
    lora: LoraConfig | None = None
    width: int | None = None  # the hidden width (None: intermediate_size; a shared expert's is its own)

    @nn.compact
    def __call__(self, x):
        c = self.config
        act = ACTIVATIONS[c.activation]
        width = self.width or c.intermediate_size
        up = Linear(width, c.mlp_bias, ("embed", "mlp"), name="up_proj", lora=self.lora)(x)
        if c.gated_mlp:
            gate = Linear(width, c.mlp_bias, ("embed", "mlp"), name="gate_proj", lora=self.lora)(x)
            up = silu_gated(gate, up) if c.activation == "silu" else act(gate) * up
        else:
            up = act(up)
        return Linear(c.hidden_size, c.mlp_bias, ("mlp", "embed"), name="down_proj", lora=self.lora)(up)


class MixtureOfExperts(nn.Module):
    """A sparse MLP (Mixtral, Qwen-MoE): a router picks experts_per_token gated MLPs per token, weighted by their
    router probabilities (renormalized over the picked ones where the family does), plus a shared expert times
    a sigmoid gate where the family has one (Qwen2-MoE). The experts run as `config.moe_impl` says
    (`jaxlora.moe`: sparse dispatch by default)."""

    config: ModelConfig
    lora: LoraConfig | None = None  # for the shared expert's Linear layers

    @nn.compact
    def __call__(self, x):
        c = self.config
        e, d, f = c.num_experts, c.hidden_size, c.expert_size
        if c.router == "sigmoid_grouped":  # DeepSeek-V3, whose router runs in float32 whatever the model's dtype
            router_logits = Linear(e, axes=("embed", "experts"), name="router")(x.astype(jnp.float32))
            score_bias = weight(self, "score_bias", _axes(nn.initializers.zeros, "experts"), (e,))
            weights, experts = moe.route_grouped(
                router_logits,
                score_bias,
                c.experts_per_token,
                c.expert_groups,
                c.groups_per_token,
                c.normalize_expert_weights,
                c.routed_scaling,
            )
        else:
            router_logits = Linear(e, c.router_bias, ("embed", "experts"), name="router")(x)  # [b, t, e]
            weights, experts = moe.route(router_logits, c.experts_per_token, c.normalize_expert_weights)
        kernels = moe.Experts(
            self._experts("gate", ("experts", "embed", "mlp"), (e, d, f), x.dtype),
            self._experts("up", ("experts", "embed", "mlp"), (e, d, f), x.dtype),
            self._experts("down", ("experts", "mlp", "embed"), (e, f, d), x.dtype),
        )
        if c.expert_bias:
            zeros = nn.initializers.zeros
            kernels = kernels._replace(
                gate_bias=weight(self, "gate_bias", _axes(zeros, "experts", "mlp"), (e, f)),
                up_bias=weight(self, "up_bias", _axes(zeros, "experts", "mlp"), (e, f)),
                down_bias=weight(self, "down_bias", _axes(zeros, "experts", "embed"), (e, d)),
            )
        tokens = x.reshape(-1, d)
        with jax.named_scope("experts"):
            out = moe.mixture(
                tokens,
                weights.reshape(tokens.shape[0], -1),
                experts.reshape(tokens.shape[0], -1),
                kernels,
                self._glu(),
                c.moe_impl,
            )
        out = out.reshape(x.shape)
        if c.shared_expert_size:
            shared = MLP(c, self.lora, c.shared_expert_size, name="shared")(x)
            if c.shared_expert_gated:
                shared = jax.nn.sigmoid(Linear(1, axes=("embed", None), name="shared_gate")(x)) * shared
            out = out + shared
        return out

    def _glu(self) -> moe.Glu:
        c = self.config
        act = ACTIVATIONS[c.activation]
        if c.swiglu_limit is None:
            return moe.gated(act)
        limit, alpha = c.swiglu_limit, c.swiglu_alpha

        def clamped(gate, up):  # gpt-oss
            gate = jnp.minimum(gate, limit)
            up = jnp.clip(up, -limit, limit)
            return (up + 1) * (gate * jax.nn.sigmoid(gate * alpha))

        return clamped

    def _experts(self, name: str, axes: tuple[str, str, str], shape: tuple[int, int, int], dtype):
        """A stacked expert kernel [experts, in, out] in `dtype`; a quantized one is stored [experts, out, in]."""
        stored = weight(self, name, _axes(_init, *axes), shape)
        return dequantize(stored, dtype).swapaxes(-1, -2) if is_quantized(stored) else stored.astype(dtype)


class Block(nn.Module):
    config: ModelConfig
    window: int | None
    lora: LoraConfig | None = None
    index: int = 0  # the layer's index (names its hook points)
    sites: Sites | None = None

    @nn.compact
    def __call__(self, x, inputs: AttentionInputs, cache: LayerCache | None):
        c, here = self.config, f"blocks.{self.index}."

        def site(name, value):
            return at_site(self, self.sites, here + name, value)

        def pre_norm(name, x):
            return make_norm(c, name)(x) if c.pre_norm else x

        def scaled(out):  # Granite: a sublayer's output times residual_multiplier (in float32, as torch rounds it)
            if c.residual_multiplier == 1.0:
                return out
            return (out.astype(jnp.float32) * c.residual_multiplier).astype(out.dtype)

        x = site("hook_resid_pre", x)
        normed = pre_norm("attn_norm", x)
        if c.mla:
            attention = LatentAttention(c, self.lora, self.index, self.sites, name="attn")
        else:
            attention = Attention(c, self.window, self.lora, self.index, self.sites, name="attn")
        attn_out, new_cache = attention(normed, inputs, cache)
        mlp = MixtureOfExperts(c, self.lora, name="moe") if c.moe_layer(self.index) else MLP(c, self.lora, name="mlp")
        if c.sandwich_norm:
            x = x + site("hook_attn_out", make_norm(c, "post_attn_norm")(attn_out))
            x = x + site("hook_mlp_out", make_norm(c, "post_mlp_norm")(mlp(pre_norm("mlp_norm", x))))
        elif c.residual == "sequential":
            x = x + site("hook_attn_out", scaled(attn_out))
            x = x + site("hook_mlp_out", scaled(mlp(pre_norm("mlp_norm", x))))
        else:
            # Parallel: attention and MLP both read the block's input (GPT-J/CodeGen through the same norm).
            mlp_in = normed if c.residual == "parallel_shared_norm" else make_norm(c, "mlp_norm")(x)
            x = x + site("hook_attn_out", attn_out) + site("hook_mlp_out", mlp(mlp_in))
        return site("hook_resid_post", x), new_cache


class LayerPeriod(nn.Module):
    """One scan step of a stack (`jaxlora.stacking`): its period's layers in order. Every step runs the same
    kinds of block, so the first step's layer indices stand for all (they name no hook points: hooks run the
    unrolled decoder)."""

    config: ModelConfig
    stack: Stack
    lora: LoraConfig | None = None
    remat: bool = False

    def setup(self):
        c, start = self.config, self.stack.start
        block = nn.remat(Block) if self.remat else Block
        self.blocks = [
            block(c, c.layer_windows[start + j], self.lora, index=start + j) for j in range(self.stack.period)
        ]

    def __call__(self, carry, inputs: AttentionInputs, local_inputs: AttentionInputs):
        """carry: (x, the stack's cache buffers per period member as (keys, values) [repeats, ...] or None, this
        step's index): the buffers travel in the scan's carry, so each layer updates them in place."""
        x, buffers, step = carry
        updated = []
        for j, block in enumerate(self.blocks):
            windowed = self.config.layer_windows[self.stack.start + j] is not None
            cache = None if buffers is None else LayerCache(*buffers[j], step)
            x, cache = block(x, local_inputs if windowed else inputs, cache)
            updated.append(None if cache is None else (cache.keys, cache.values))
        return (x, None if buffers is None else tuple(updated), step + 1), None


def scanned_stack(config: ModelConfig, stack: Stack, lora: LoraConfig | None, remat: bool) -> nn.Module:
    """A stack's layers as one `lax.scan` over its repeats; params, adapters and cache buffers carry a leading
    axis of `stack.repeats`."""
    scanned = nn.scan(
        LayerPeriod,
        variable_axes={"params": 0, "lora": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast),
        length=stack.repeats,
    )
    return scanned(config, stack, lora, remat)


def embedding_rows(embedding: jax.Array | dict, config: ModelConfig, input_ids) -> jax.Array:
    """The input embeddings of input_ids [batch, seq]: table rows, times sqrt(hidden_size) for Gemma (rounded to
    the table's dtype, as transformers' scaled embedding does). A quantized table dequantizes only those rows."""
    x = take_rows(embedding, input_ids) if is_quantized(embedding) else jnp.take(embedding, input_ids, axis=0)
    if config.embed_scale:
        x = x * jnp.asarray(config.hidden_size**0.5, x.dtype)
    if config.embedding_multiplier is not None:  # in float32, rounded once, as torch multiplies by a Python float
        x = (x.astype(jnp.float32) * config.embedding_multiplier).astype(x.dtype)
    return x


class Decoder(nn.Module):
    config: ModelConfig
    lora: LoraConfig | None = None
    remat: bool = False  # recompute each layer in the backward pass (jax.checkpoint) to save memory
    sites: Sites | None = None  # hook points this call edits or captures (`jaxlora.hooks`)

    def setup(self):
        c = self.config
        self.embed = Embedding(c.vocab_size, c.hidden_size)
        if c.learned_positions:
            self.pos_embed = nn.Embed(
                c.max_position_embeddings,
                c.hidden_size,
                embedding_init=_axes(_init, "positions", "embed"),
                param_dtype=jnp.float32,
            )
        if c.scan_layers:
            if self.sites is not None:
                raise UsageError("hook points need the unrolled decoder (run_decoder unstacks for them)")
            self.stacks = [scanned_stack(c, stack, self.lora, self.remat) for stack in layer_stacks(c)]
        else:
            block = nn.remat(Block) if self.remat else Block
            self.layers = [
                block(c, c.layer_windows[i], self.lora, index=i, sites=self.sites) for i in range(c.num_layers)
            ]
        self.final_norm = make_norm(c)
        if not c.tie_word_embeddings:
            self.lm_head = Linear(c.vocab_size, c.lm_head_bias, ("embed", "vocab"), self.lora)

    def __call__(
        self,
        input_ids,
        positions,
        key_valid,
        cache: KVCache | None = None,
        write_index=0,
        logits_at=None,
        inputs_embeds=None,
        project: bool = True,
        segment_ids=None,
    ):
        """input_ids/positions [batch, seq] int32; key_valid [batch, seq] (no cache) or [batch, max_len] (cache);
        inputs_embeds [batch, seq, hidden] in place of input_ids (see `embed`); segment_ids [batch, seq] int32
        (no cache): tokens attend only within their own segment.

        Returns logits [batch, seq, vocab] float32, or [batch, 1, vocab] at sequence index `logits_at` (which skips
        the vocab projection everywhere else), and the updated cache (None without a cache). project=False returns
        the final norm's output [batch, seq, hidden] in place of the logits (a loss can then project it in chunks).
        """
        c = self.config
        x, inputs, local_inputs = self.layer_inputs(
            input_ids, positions, key_valid, write_index, inputs_embeds, segment_ids
        )
        new_keys, new_values = [], []
        if c.scan_layers:
            # The cache holds one stacked buffer per period member of each stack, in order.
            entry = 0
            for stack, scanned in zip(layer_stacks(c), self.stacks, strict=True):
                buffers = None
                if cache is not None:
                    members = range(entry, entry + stack.period)
                    buffers = tuple((cache.keys[m], cache.values[m]) for m in members)
                entry += stack.period
                (x, buffers, _), _ = scanned((x, buffers, jnp.zeros((), jnp.int32)), inputs, local_inputs)
                for k, v in buffers or ():
                    new_keys.append(k)
                    new_values.append(v)
        else:
            for i, layer in enumerate(self.layers):
                layer_cache = None if cache is None else LayerCache(cache.keys[i], cache.values[i])
                x, layer_cache = layer(x, local_inputs if c.layer_windows[i] is not None else inputs, layer_cache)
                if layer_cache is not None:
                    new_keys.append(layer_cache.keys)
                    new_values.append(layer_cache.values)
        new_cache = None if cache is None else KVCache(tuple(new_keys), tuple(new_values), key_valid)
        return self.head(x, logits_at, project), new_cache

    def layer_inputs(self, input_ids, positions, key_valid, write_index=0, inputs_embeds=None, segment_ids=None):
        """What the layers take: the embedded tokens [batch, seq, hidden], and the attention inputs of global and
        of local (windowed) layers."""
        c = self.config
        x = embedding_rows(self.embed.embedding, c, input_ids) if inputs_embeds is None else inputs_embeds
        x = at_site(self, self.sites, "hook_embed", x)
        if c.learned_positions:
            position_rows = jnp.take(self.pos_embed.embedding, positions, axis=0).astype(x.dtype)
            x = x + at_site(self, self.sites, "hook_pos_embed", position_rows)
        # iota, not arange: it keeps a symbolic sequence length symbolic (ONNX / StableHLO export).
        query_slots = write_index + jax.lax.iota(jnp.int32, x.shape[1])
        inputs = AttentionInputs(*rope_cos_sin(positions, c), query_slots, key_valid, write_index, segment_ids)
        local_inputs = inputs
        if c.rope_local is not None:
            cos, sin = rope_cos_sin(positions, c, c.rope_local)
            local_inputs = inputs._replace(cos=cos, sin=sin)
        return x, inputs, local_inputs

    def head(self, x, logits_at=None, project: bool = True):
        """The last layer's output [batch, seq, hidden] to logits float32 (see `__call__`)."""
        c, embedding = self.config, self.embed.embedding
        if logits_at is not None:
            x = jax.lax.dynamic_slice_in_dim(x, logits_at, 1, axis=1)
        x = at_site(self, self.sites, "ln_final.hook_normalized", self.final_norm(x))
        if not project:
            return x
        if c.tie_word_embeddings and self.has_variable("params", HEAD_TILES):  # `jaxlora.cpu_matmul`
            logits = tiled_matmul(x, self.get_variable("params", HEAD_TILES), c.vocab_size)
        elif c.tie_word_embeddings and is_quantized(embedding):
            logits = matmul(x, embedding)  # the table's rows are the head's output channels
        elif c.tie_word_embeddings:
            logits = jnp.dot(x, embedding.T.astype(x.dtype))
        else:
            logits = self.lm_head(x)
        if c.logits_divisor != 1.0:
            logits = logits.astype(jnp.float32) / c.logits_divisor
        if c.final_softcap is not None:
            logits = c.final_softcap * jnp.tanh(logits.astype(jnp.float32) / c.final_softcap)
        return logits.astype(jnp.float32)


def check_context(config: ModelConfig, tokens: int, new_tokens: int = 0) -> None:
    """Refuse a sequence (or a prompt plus `new_tokens` to generate) longer than the positions the model covers:
    its outputs there would be garbage."""
    limit = config.context_length
    if limit is None or not isinstance(tokens, int) or tokens + new_tokens <= limit:  # symbolic lengths (export)
        return
    if new_tokens:
        raise UsageError(
            f"prompt ({tokens} tokens) + max_new_tokens ({new_tokens}) exceeds the model's context of {limit} tokens"
        )
    raise UsageError(f"sequence of {tokens} tokens exceeds the model's context of {limit} tokens")


def default_positions(attention_mask: jax.Array) -> jax.Array:
    """Positions that skip left padding, as HF generate derives them: cumsum(mask) - 1, floored at 0."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def segment_positions(segment_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Positions that restart at each segment (documents packed into a row, each a contiguous run of one id):
    [batch, seq] int32, counting the segment's real tokens, floored at 0 like `default_positions`."""
    real = attention_mask.astype(jnp.int32)
    seen = jnp.cumsum(real, axis=-1)  # real tokens up to and including t
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=-1
    )
    # Real tokens before each segment's first slot: nondecreasing along the row, so a running max carries it.
    before = jax.lax.cummax(jnp.where(starts, seen - real, 0), axis=1)
    return jnp.maximum(seen - before - 1, 0)


def run_decoder(
    params,
    config: ModelConfig,
    input_ids,
    positions,
    key_valid,
    *,
    cache: KVCache | None = None,
    write_index=0,
    logits_at=None,
    lora=None,
    dropout_key=None,
    remat: bool = False,
    inputs_embeds=None,
    sites: Sites | None = None,
    project: bool = True,
    segment_ids=None,
) -> tuple[jax.Array, KVCache | None, dict]:
    """Run the decoder: the one way every caller (forward, generation, training, export) does.

    input_ids/positions [batch, seq] int32; key_valid [batch, seq] bool without a cache, [batch, max_len] with one
    (this call's slots included); write_index: the cache slot of input_ids[:, 0]; logits_at: a sequence index to
    project to logits alone ([batch, 1, vocab]); lora: `jaxlora.lora.Adapters` (unmerged); dropout_key: a PRNG key
    that turns LoRA dropout on (training); remat: recompute each layer in the backward pass; inputs_embeds
    [batch, seq, hidden]: embedding rows in place of input_ids (pass None for input_ids); sites: hook points to
    edit or capture (`jaxlora.hooks.make_sites`); project=False: the final norm's output in place of the logits;
    segment_ids [batch, seq] int32 (no cache): documents packed into one row, each attending only to itself.
    Returns logits [batch, seq or 1, vocab] float32, the updated cache (None without one) and {site: activation}
    for the captured hook points.
    """
    if config.scan_layers and sites is not None:
        # Hook points are named per layer: run the unrolled decoder on each layer's slice of the stacked params.
        if cache is not None:
            raise UsageError("hook points with a KV cache need the unrolled layout (load with scan_layers=False)")
        stacks = layer_stacks(config)
        params, config = unstack_tree(params, stacks), config.with_scan(False)
        lora = None if lora is None else lora.replace(weights=unstack_tree(lora.weights, stacks), stacks=())
    if cache is not None and one_row(jnp.shape(positions)):
        params = held_in_loop(params, positions)  # one token a step: multiply the stored integers each step
    model = Decoder(config, None if lora is None else lora.config, remat, sites)
    variables = {"params": params} if lora is None else {"params": params, "lora": lora.weights}
    rngs = None if dropout_key is None else {"dropout": dropout_key}
    if segment_ids is not None and cache is not None:
        raise UsageError("segment_ids cover a packed row without a KV cache")
    args = (input_ids, positions, key_valid, cache, write_index, logits_at, inputs_embeds, project, segment_ids)
    with dequantized_in_order() if cache is not None else contextlib.nullcontext():
        if sites is None or not sites.capture:
            logits, new_cache = model.apply(variables, *args, rngs=rngs)
            return logits, new_cache, {}
        (logits, new_cache), state = model.apply(variables, *args, rngs=rngs, mutable=[CAPTURED])
    return logits, new_cache, collect(state)


def apply_decoder(params, config: ModelConfig, input_ids, positions, key_valid, **options):
    """`run_decoder` without hook points: (logits, updated cache)."""
    logits, new_cache, _ = run_decoder(params, config, input_ids, positions, key_valid, **options)
    return logits, new_cache


class ForwardOutput(NamedTuple):
    """What `forward` returns when asked for more than logits (a pytree: it can leave a jitted function)."""

    logits: jax.Array  # [batch, seq, vocab] float32
    # num_layers + 1 arrays [batch, seq, hidden], as transformers' output_hidden_states: the embeddings, each
    # layer's output but the last, and the final norm's output.
    hidden_states: tuple[jax.Array, ...] | None = None
    attentions: tuple[jax.Array, ...] | None = None  # per layer [batch, heads, q, k] probabilities
    captured: dict[str, jax.Array] | None = None  # {hook point: activation} for `capture`


def activation_dtype(params: dict):
    """The dtype the model computes in: its embedding table's (a quantized table's: what it dequantizes to)."""
    embedding = params["embed"]["embedding"]
    return float_dtype(embedding) if is_quantized(embedding) else embedding.dtype


def embed(params, config: ModelConfig, input_ids) -> jax.Array:
    """input_ids [batch, seq] int32 -> the input embeddings [batch, seq, hidden] that `forward(inputs_embeds=...)`
    takes, as transformers' `get_input_embeddings()(input_ids)` gives them (with Gemma's sqrt(hidden_size) scale;
    GPT-2's position embeddings are added inside the model)."""
    return embedding_rows(params["embed"]["embedding"], config, jnp.asarray(input_ids, jnp.int32))


def token_ids(input_ids, config: ModelConfig) -> jax.Array:
    """input_ids as int32 [batch, seq], or a UsageError naming what is wrong. Ids outside the vocabulary are refused
    where they are concrete; under jit (traced ids) they give NaN logits, as an out-of-range gather does."""
    if not hasattr(input_ids, "dtype"):
        input_ids = np.asarray(input_ids)
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise UsageError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
    if input_ids.ndim != 2:
        raise UsageError(f"input_ids must be [batch, seq], got shape {input_ids.shape} (add a batch axis: ids[None])")
    if not isinstance(input_ids, jax.core.Tracer) and input_ids.size:
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= config.vocab_size:
            raise UsageError(
                f"token id {low if low < 0 else high} is outside the vocabulary (0..{config.vocab_size - 1})"
            )
    return jnp.asarray(input_ids, jnp.int32)


def forward(
    params,
    config: ModelConfig,
    input_ids=None,
    *,
    inputs_embeds=None,
    attention_mask=None,
    positions=None,
    segment_ids=None,
    lora=None,
    output_hidden_states: bool = False,
    output_attentions: bool = False,
    hooks: dict | None = None,
    capture=(),
) -> jax.Array | ForwardOutput:
    """The model's logits. Pure: works under jax.jit (config static), jax.grad and jax.vmap.

    params: the nested dict from `jaxlora.load(...).params`; input_ids [batch, seq] int32, or inputs_embeds
    [batch, seq, hidden] (exactly one of the two; see `embed`: a gradient with respect to inputs_embeds is a
    per-position saliency); attention_mask [batch, seq] (1 = real token, 0 = padding; default all ones);
    positions [batch, seq] int32 (default: derived from the mask, restarting at each segment); segment_ids
    [batch, seq] int32: documents packed into one row (each a contiguous run of one id) attend only within
    themselves, as if each were run alone; lora: `jaxlora.lora.Adapters` or None.
    hooks: {hook point: fn(x) -> x} to read or edit activations (see `jaxlora.hook_points(config)`);
    capture: hook points whose values to return.

    Returns logits [batch, seq, vocab] float32, or a `ForwardOutput` when output_hidden_states,
    output_attentions or capture asks for more (attentions need the "xla" attention core).
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise UsageError("give exactly one of input_ids and inputs_embeds")
    if input_ids is not None:
        input_ids = token_ids(input_ids, config)
        shape = input_ids.shape
    else:
        inputs_embeds = jnp.asarray(inputs_embeds)
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != config.hidden_size:
            raise UsageError(f"inputs_embeds must be [batch, seq, {config.hidden_size}], got {inputs_embeds.shape}")
        shape = inputs_embeds.shape[:2]
    if attention_mask is None:
        attention_mask = jnp.ones(shape, bool)
    attention_mask = jnp.asarray(attention_mask).astype(bool)
    if attention_mask.shape != shape:
        raise UsageError(f"attention_mask must have the ids' shape {shape}, got {attention_mask.shape}")
    if segment_ids is not None:
        segment_ids = jnp.asarray(segment_ids, jnp.int32)
        if segment_ids.shape != shape:
            raise UsageError(f"segment_ids must have the ids' shape {shape}, got {segment_ids.shape}")
    if positions is None:
        check_context(config, shape[1])
        positions = (
            default_positions(attention_mask) if segment_ids is None else segment_positions(segment_ids, attention_mask)
        )
    layers = range(config.num_layers)
    hidden_sites = ["blocks.0.hook_resid_pre", *(f"blocks.{i}.hook_resid_post" for i in layers[:-1])]
    hidden_sites.append("ln_final.hook_normalized")
    attention_sites = [f"blocks.{i}.attn.hook_pattern" for i in layers]
    capture = tuple(capture)
    needed = set(capture)
    needed |= set(hidden_sites) if output_hidden_states else set()
    needed |= set(attention_sites) if output_attentions else set()
    sites = make_sites(config, hooks, needed)
    logits, _, captured = run_decoder(
        params,
        config,
        input_ids,
        positions,
        attention_mask,
        lora=lora,
        inputs_embeds=inputs_embeds,
        sites=sites,
        segment_ids=segment_ids,
    )
    if not (output_hidden_states or output_attentions or capture):
        return logits
    return ForwardOutput(
        logits,
        tuple(captured[name] for name in hidden_sites) if output_hidden_states else None,
        tuple(captured[name] for name in attention_sites) if output_attentions else None,
        {name: captured[name] for name in capture} if capture else None,
    )


def _init_boxed(config: ModelConfig, key: jax.Array) -> dict:
    ids = jnp.zeros((1, 1), jnp.int32)
    return Decoder(config.with_scan(False)).init(key, ids, ids, jnp.ones((1, 1), bool))["params"]


def init_params(config: ModelConfig, key: jax.Array) -> dict:
    """Random float32 params (for tests and shapes) in the config's layout (stacked when it scans its layers);
    real weights come from `jaxlora.load`."""
    params = nn.unbox(_init_boxed(config, key))
    return stack_tree(params, layer_stacks(config)) if config.scan_layers else params


# The param-tree queries below describe the per-layer layout of checkpoints and weight tables, whatever
# config.scan_layers says. They trace the decoder's init once per config (configs are hashable) and share the
# result: treat what they return as read-only.


@functools.cache
def logical_axes(config: ModelConfig) -> dict:
    """The param tree with each leaf's logical axis names (a PartitionSpec of names like "embed", "heads")."""
    return nn.get_partition_spec(jax.eval_shape(lambda: _init_boxed(config, jax.random.key(0))))


@functools.cache
def param_shapes(config: ModelConfig) -> dict:
    """The param tree as jax.ShapeDtypeStruct leaves (float32), without allocating."""
    return jax.eval_shape(lambda: init_params(config.with_scan(False), jax.random.key(0)))


def num_params(config: ModelConfig) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(param_shapes(config)))


@functools.cache
@functools.cache
def flat_param_shapes(config: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Every param's path (e.g. ("layers_0", "attn", "q_proj", "kernel")) -> its shape."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(param_shapes(config))
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in leaves}


def linear_kernels(config: ModelConfig) -> dict[tuple[str, ...], tuple[int, int]]:
    """Every Linear layer's module path (e.g. ("layers_0", "attn", "q_proj")) -> its kernel shape [in, out]."""
    return {path[:-1]: shape for path, shape in flat_param_shapes(config).items() if path[-1] == "kernel"}


def decode_params(params, config: ModelConfig, rows: int):
    """The params a decode loop over `rows` sequences reads: on the CPU, with its float32 Linear kernels (and a
    tied embedding's head) tiled for `jaxlora.cpu_matmul`'s kernel where that serves, made once per param tree;
    else `params`. Not a MoE router (a handful of columns, whose order of sums picks the experts) nor MLA's
    kv_b_proj (not a Linear)."""
    if not isinstance(params, dict) or HEAD_TILES in params or not cpu_matmul.serves(params, rows):
        return params
    paths = [
        path[:-1]
        for path, leaf in _tree_paths(params)
        if path[-1] == "kernel"
        and path[-2] not in ("router", "kv_b_proj")
        and isinstance(leaf, jax.Array)
        and leaf.dtype == jnp.float32
    ]  # stacked layers' kernels too (`config.scan_layers`): the scan hands each layer its slice of the tiles
    embedding = params["embed"]["embedding"]
    head = config.tie_word_embeddings and isinstance(embedding, jax.Array) and embedding.dtype == jnp.float32
    if not paths and not head:
        return params

    def tiled_copy():
        kernels = [get_path(params, (*path, "kernel")) for path in paths]
        tiled = cpu_matmul.tiled(kernels, [embedding] if head else [])
        tree = jax.tree.map(lambda leaf: leaf, params)  # new dicts over the same arrays
        for path, kernel in zip(paths, tiled, strict=False):
            set_path(tree, (*path, "kernel"), kernel)
        if head:
            tree[HEAD_TILES] = tiled[-1]
        return tree

    return cpu_matmul.cached_copy(params, tiled_copy)


def tiled_for_one_program(params, config: ModelConfig, rows: int, *inputs):
    """For a program that prefills and then decodes in one jit (`beam_search`, `sample`), called from the host:
    `decode_params`' tiled copy where it serves `rows` sequences, or None (then the program decodes over `params`).
    None too when any of `inputs` (prompts, masks, keys, adapters) is traced, as inside a caller's jit or vmap
    (`decode_params` itself never tiles traced params)."""
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(inputs)):
        return None
    tiled = decode_params(params, config, rows)
    return None if tiled is params else tiled


def prefill_params(params, config: ModelConfig, tokens: int):
    """The params a prefill of `tokens` tokens in all (batch x prompt width) reads: the tiled copy a decode loop
    already made of this param tree (`decode_params`), where the kernel takes that many rows
    (`cpu_matmul.max_rows`); else `params`. Nothing is made here: a new tree's first prefill runs on it as it is.
    SmolLM2, a 64-token prompt at batch 1, warm: see README's Measured section."""
    held = cpu_matmul.held_copy(params) if isinstance(params, dict) else None
    if held is None or tokens > cpu_matmul.max_rows() or cpu_matmul.switched_off():
        return params
    return held


def _tree_paths(tree: dict, prefix: tuple[str, ...] = ()):
    """(path, leaf) for every leaf of a nested dict, a quantized weight's dict counting as one leaf."""
    for key, value in tree.items():
        if isinstance(value, dict) and not is_quantized(value):
            yield from _tree_paths(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def get_path(tree: dict, path: tuple[str, ...]):
    """The value at `path` (a tuple of keys) in a nested dict such as the params or the adapters' weights."""
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
    """Set the value at `path` in a nested dict, creating the dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
