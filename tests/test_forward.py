"""forward is a pure function (jit, grad, vmap); the cached path equals the full forward; batching is exact."""

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_ids

import jaxlora
from jaxlora.cache import init_cache
from jaxlora.model import apply_decoder


def test_forward_under_jit_grad_vmap(tiny):
    model = tiny("llama-gqa").load()
    config = model.config
    ids = random_ids((2, 9), config.vocab_size, seed=7)

    eager = np.asarray(jaxlora.forward(model.params, config, ids))
    jitted = np.asarray(jax.jit(jaxlora.forward, static_argnums=1)(model.params, config, ids))
    np.testing.assert_allclose(jitted, eager, rtol=0, atol=1e-5)

    def loss(params):
        logits = jaxlora.forward(params, config, ids[:, :-1])
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()

    value, grads = jax.value_and_grad(loss)(model.params)
    assert np.isfinite(value)
    leaves = jax.tree.leaves(grads)
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
    assert jax.tree.structure(grads) == jax.tree.structure(model.params)
    assert any(np.abs(np.asarray(g)).max() > 0 for g in leaves)

    per_row = jax.vmap(lambda row: jaxlora.forward(model.params, config, row[None])[0])(jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(per_row), eager, rtol=0, atol=1e-5)


@partial(jax.jit, static_argnums=1)
def cached_step(params, config, ids, positions, key_valid, cache, write_index):
    return apply_decoder(params, config, ids, positions, key_valid, cache=cache, write_index=write_index)


def test_prefill_plus_cached_decode_equals_full_forward(tiny):
    """Feeding tokens one at a time through the KV cache gives the logits of one full forward."""
    # Windows (6-7 tokens) shorter than the 15 tokens; Gemma 3 mixes windowed layers (own RoPE) and global ones.
    for name in ("llama-gqa", "mistral-window", "qwen2-window", "gemma2", "gemma3", "phi3-window", "gpt2", "codegen"):
        model = tiny(name).load()
        config = model.config
        ids = random_ids((2, 15), config.vocab_size, seed=8)
        full = np.asarray(jaxlora.forward(model.params, config, ids))
        cache = init_cache(config, 2, 20)
        prefill = 6
        valid = cache.key_valid.at[:, :prefill].set(True)
        positions = jnp.broadcast_to(jnp.arange(prefill), (2, prefill))
        logits, cache = cached_step(model.params, config, ids[:, :prefill], positions, valid, cache, 0)
        steps = [np.asarray(logits)]
        for t in range(prefill, ids.shape[1]):
            valid = cache.key_valid.at[:, t].set(True)
            pos = jnp.full((2, 1), t)
            logits, cache = cached_step(model.params, config, ids[:, t : t + 1], pos, valid, cache, t)
            steps.append(np.asarray(logits))
        np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=0, atol=1e-5)


def test_config_is_hashable_and_static(tiny):
    config = tiny("llama-gqa").load().config
    assert hash(config) == hash(dataclasses.replace(config))
    assert jaxlora.ModelConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("kind", ["llama", "gemma", "layer"])
def test_norms_in_bfloat16_equal_transformers_bit_for_bit(kind):
    """Each norm in bfloat16 matches the transformers module it stands for: Llama's RMSNorm (normalize in float32,
    cast, then scale), Gemma's (scale by 1 + w in float32, then cast) and LayerNorm. The whole-model bfloat16
    tolerance (test_parity.py) is too coarse to see a norm computed at the wrong precision."""
    import torch
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from jaxlora.model import Norm

    rng = np.random.default_rng(0)
    x = (3 * rng.normal(size=(4, 64, 40))).astype(np.float32)
    w = (0.1 * rng.normal(size=40)).astype(np.float32)
    b = (0.1 * rng.normal(size=40)).astype(np.float32)
    reference, norm, scale = {
        "llama": (LlamaRMSNorm(40, eps=1e-6), Norm(1e-6, "rms"), 1 + w),
        "gemma": (GemmaRMSNorm(40, eps=1e-6), Norm(1e-6, "rms", weight_offset=1.0), w),
        "layer": (torch.nn.LayerNorm(40, eps=1e-6), Norm(1e-6, "layer"), 1 + w),
    }[kind]
    params = {"scale": jnp.asarray(scale, jnp.bfloat16)}
    with torch.no_grad():
        reference.weight.copy_(torch.tensor(scale))
        if kind == "layer":
            reference.bias.copy_(torch.tensor(b))
            params["bias"] = jnp.asarray(b, jnp.bfloat16)
        want = reference.to(torch.bfloat16)(torch.tensor(x).to(torch.bfloat16)).float().numpy()
    got = np.asarray(norm.apply({"params": params}, jnp.asarray(x, jnp.bfloat16)).astype(jnp.float32))
    same = got == want
    assert same.mean() >= 0.999, f"only {same.mean():.1%} of the outputs are bit-identical"
    # Where rsqrt rounds differently, one bfloat16 step (8 mantissa bits) apart at most.
    assert (np.abs(got - want) <= np.abs(want) * 2**-7)[~same].all()


def test_bad_ids_are_named_errors_where_they_are_concrete(tiny):
    model = tiny("llama-gqa").load()
    c = model.config
    cases = [
        (np.arange(5), "must be \\[batch, seq\\], got shape \\(5,\\)"),
        (np.zeros((1, 5), np.float32), "integer token ids"),
        (np.array([[1, c.vocab_size]]), f"token id {c.vocab_size} is outside the vocabulary"),
        (np.array([[-1, 2]]), "token id -1 is outside"),
    ]
    for ids, message in cases:
        with pytest.raises(jaxlora.errors.UsageError, match=message):
            jaxlora.forward(model.params, c, ids)
    with pytest.raises(jaxlora.errors.UsageError, match="attention_mask must have the ids' shape"):
        jaxlora.forward(model.params, c, np.ones((1, 5), np.int32), attention_mask=np.ones((1, 4)))
    with pytest.raises(jaxlora.errors.UsageError, match="inputs_embeds must be"):
        jaxlora.forward(model.params, c, inputs_embeds=np.ones((5, c.hidden_size), np.float32))
    # Under jit the ids are not known: an out-of-range id is documented to give NaN logits, not an error.
    logits = jax.jit(jaxlora.forward, static_argnums=1)(model.params, c, np.array([[1, c.vocab_size + 5]]))
    assert np.isnan(np.asarray(logits)[0, 1]).all()


def test_a_param_of_the_wrong_shape_is_refused_by_name(tiny):
    """`model.weight` checks stored params' shapes itself (flax's own check traced every initializer): a kernel
    or a norm scale that does not fit the config is an error naming it, not a silently broadcast product."""
    from flax.errors import ScopeParamShapeError

    model = tiny("llama-gqa").load()
    ids = random_ids((1, 4), model.config.vocab_size)
    loaded_shape = model.params["layers_0"]["attn"]["q_proj"]["kernel"].shape
    for path, name in ((("attn", "q_proj"), "kernel"), (("mlp_norm",), "scale")):
        params = jax.tree.map(lambda a: a, model.params)
        holder = params["layers_0"]
        for part in path:
            holder = holder[part]
        holder[name] = holder[name][..., :-1]
        with pytest.raises(ScopeParamShapeError, match=name):
            jaxlora.forward(params, model.config, ids)
    assert model.params["layers_0"]["attn"]["q_proj"]["kernel"].shape == loaded_shape  # the loaded params untouched
    jaxlora.forward(model.params, model.config, ids)
