"""Activations in and out: hidden states and attention probabilities against transformers, hook points that
fire once each and can read or edit, and the research one-liners (patching, steering, head ablation) against
computations that reach the same result another way."""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import TINY_CONFIGS, random_ids

import jaxlora
from jaxlora.errors import ConfigError, UsageError

ATOL = 1e-4


@contextmanager
def eager_attention(model):
    """transformers returns attention probabilities only from its eager attention."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        model.set_attn_implementation(before)


def close(ours, reference, atol=ATOL):
    """Within atol of the reference, relative to its scale when that is above 1 (a residual stream grows)."""
    ours, reference = np.asarray(ours, np.float32), np.asarray(reference, np.float32)
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    scale = max(1.0, float(np.abs(reference).max()))
    np.testing.assert_allclose(ours, reference, rtol=0, atol=atol * scale)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_hidden_states_and_attentions_match_transformers(tiny, name):
    m = tiny(name)
    model = m.load()
    ids = random_ids((2, 19), model.config.vocab_size, seed=5)
    with eager_attention(m.torch_model), torch.no_grad():
        ref = m.torch_model(torch.tensor(ids, dtype=torch.long), output_hidden_states=True, output_attentions=True)
    out = jax.jit(lambda p, x: jaxlora.forward(p, model.config, x, output_hidden_states=True, output_attentions=True))(
        model.params, ids
    )
    assert isinstance(out, jaxlora.ForwardOutput) and out.captured is None
    assert len(out.hidden_states) == model.config.num_layers + 1 == len(ref.hidden_states)
    for ours, theirs in zip(out.hidden_states, ref.hidden_states, strict=True):
        close(ours, theirs.numpy())
    assert len(out.attentions) == model.config.num_layers
    for ours, theirs in zip(out.attentions, ref.attentions, strict=True):
        close(ours, theirs.numpy())
    close(out.logits, ref.logits.numpy())


def test_plain_forward_is_unchanged_and_identity_hooks_change_nothing(tiny):
    model = tiny("gemma2").load()  # soft-caps, sandwich norms, windows: every site kind
    ids = random_ids((2, 11), model.config.vocab_size, seed=6)
    plain = jaxlora.forward(model.params, model.config, ids)
    assert isinstance(plain, jax.Array)
    fired: dict[str, int] = {}

    def identity(name):
        def hook(x):
            fired[name] = fired.get(name, 0) + 1
            return x

        return hook

    names = jaxlora.hook_points(model.config)
    assert len(names) == 2 + 9 * model.config.num_layers and names[0] == "hook_embed"
    hooked = jaxlora.forward(model.params, model.config, ids, hooks={n: identity(n) for n in names})
    assert fired == dict.fromkeys(names, 1)
    np.testing.assert_array_equal(np.asarray(hooked), np.asarray(plain))


def test_gpt2_has_a_position_embedding_hook(tiny):
    config = tiny("gpt2").load().config
    assert "hook_pos_embed" in jaxlora.hook_points(config)
    assert "hook_pos_embed" not in jaxlora.hook_points(tiny("llama-gqa").load().config)


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2", "gemma"])
def test_patching_the_embeddings_equals_a_run_on_the_other_input(tiny, name):
    model = tiny(name).load()
    clean, corrupt = random_ids((2, 1, 9), model.config.vocab_size, seed=7)
    cached = jaxlora.forward(model.params, model.config, clean, capture=["hook_embed"]).captured["hook_embed"]
    patched = jaxlora.forward(model.params, model.config, corrupt, hooks={"hook_embed": lambda x: cached})
    expected = jaxlora.forward(model.params, model.config, clean)
    np.testing.assert_array_equal(np.asarray(patched), np.asarray(expected))


def test_patching_one_layer_output_carries_the_clean_run_from_there_on(tiny):
    model = tiny("llama-gqa").load()
    clean, corrupt = random_ids((2, 1, 9), model.config.vocab_size, seed=8)
    site = "blocks.1.hook_resid_post"
    clean_run = jaxlora.forward(model.params, model.config, clean, capture=[site])
    patched = jaxlora.forward(model.params, model.config, corrupt, hooks={site: lambda x: clean_run.captured[site]})
    np.testing.assert_allclose(np.asarray(patched), np.asarray(clean_run.logits), rtol=0, atol=1e-6)
    # Patching only the last position's residual leaves the earlier positions' logits as the corrupt run's.
    last_only = jaxlora.forward(
        model.params, model.config, corrupt, hooks={site: lambda x: x.at[:, -1].set(clean_run.captured[site][:, -1])}
    )
    corrupt_logits = jaxlora.forward(model.params, model.config, corrupt)
    np.testing.assert_array_equal(np.asarray(last_only)[:, :-1], np.asarray(corrupt_logits)[:, :-1])
    assert not np.allclose(np.asarray(last_only)[:, -1], np.asarray(corrupt_logits)[:, -1])


def test_a_steering_vector_on_the_embeddings_equals_shifted_input_embeddings(tiny):
    model = tiny("qwen2").load()
    ids = random_ids((1, 8), model.config.vocab_size, seed=9)
    vector = jax.random.normal(jax.random.key(0), (model.config.hidden_size,)) * 0.1
    steered = jaxlora.forward(model.params, model.config, ids, hooks={"hook_embed": lambda x: x + vector})
    shifted = jaxlora.forward(
        model.params, model.config, inputs_embeds=jaxlora.embed(model.params, model.config, ids) + vector
    )
    np.testing.assert_array_equal(np.asarray(steered), np.asarray(shifted))


def test_zeroing_a_head_equals_zeroing_its_rows_of_the_output_projection(tiny):
    model = tiny("llama-gqa").load()
    c = model.config
    ids = random_ids((2, 10), c.vocab_size, seed=10)
    head, layer = 2, 1
    ablated = jaxlora.forward(
        model.params, c, ids, hooks={f"blocks.{layer}.attn.hook_z": lambda z: z.at[:, :, head].set(0.0)}
    )
    params = jax.tree.map(lambda a: a, model.params)
    kernel = params[f"layers_{layer}"]["attn"]["o_proj"]["kernel"]
    params[f"layers_{layer}"]["attn"]["o_proj"]["kernel"] = kernel.at[head * c.head_dim : (head + 1) * c.head_dim].set(
        0
    )
    np.testing.assert_allclose(np.asarray(ablated), np.asarray(jaxlora.forward(params, c, ids)), rtol=0, atol=1e-6)
    assert not np.allclose(np.asarray(ablated), np.asarray(jaxlora.forward(model.params, c, ids)), atol=1e-3)


def test_editing_the_pattern_is_what_the_values_are_mixed_with(tiny):
    """A pattern forced onto the first key makes every query's head output that key's value."""
    model = tiny("llama-gqa").load()
    c = model.config
    ids = random_ids((1, 6), c.vocab_size, seed=11)
    first_only = lambda p: jnp.zeros_like(p).at[..., 0].set(1.0)  # noqa: E731
    out = jaxlora.forward(
        model.params,
        c,
        ids,
        hooks={"blocks.0.attn.hook_pattern": first_only},
        capture=["blocks.0.attn.hook_z", "blocks.0.attn.hook_v"],
    )
    z, v = out.captured["blocks.0.attn.hook_z"], out.captured["blocks.0.attn.hook_v"]
    groups = c.num_heads // c.num_kv_heads
    expected = jnp.repeat(v[:, :1], ids.shape[1], axis=1).repeat(groups, axis=2)  # head h reads kv head h // groups
    np.testing.assert_allclose(np.asarray(z), np.asarray(expected), rtol=0, atol=1e-6)


def test_captures_leave_jit_and_take_gradients(tiny):
    model = tiny("llama-gqa").load()
    ids = random_ids((1, 7), model.config.vocab_size, seed=12)
    site = "blocks.0.hook_mlp_out"

    @jax.jit
    def captured(params):
        return jaxlora.forward(params, model.config, ids, capture=[site]).captured[site]

    assert captured(model.params).shape == (1, 7, model.config.hidden_size)

    def last_logit(scale):
        out = jaxlora.forward(model.params, model.config, ids, hooks={site: lambda x: x * scale})
        return out[0, -1, ids[0, -1]]

    # d logit / d scale of a site = the site's contribution along the logit's gradient: finite differences agree.
    grad = float(jax.grad(last_logit)(1.0))
    numeric = float(last_logit(1.0 + 1e-3) - last_logit(1.0 - 1e-3)) / 2e-3
    assert grad == pytest.approx(numeric, rel=1e-2, abs=1e-3)


def test_bad_requests_are_one_line_errors(tiny):
    model = tiny("llama-gqa").load()
    ids = random_ids((1, 5), model.config.vocab_size)
    with pytest.raises(UsageError, match="no hook point 'blocks.9.hook_resid_pre'"):
        jaxlora.forward(model.params, model.config, ids, capture=["blocks.9.hook_resid_pre"])
    with pytest.raises(UsageError, match="returned shape"):
        jaxlora.forward(model.params, model.config, ids, hooks={"hook_embed": lambda x: x[:, :1]})
    chunked = dataclasses.replace(model.config, attention_impl="chunked")
    with pytest.raises(ConfigError, match="'xla' attention core"):
        jaxlora.forward(model.params, chunked, ids, output_attentions=True)
    # Hidden states need no score matrix: chunked gives them (equal to xla's).
    a = jaxlora.forward(model.params, chunked, ids, output_hidden_states=True).hidden_states
    b = jaxlora.forward(model.params, model.config, ids, output_hidden_states=True).hidden_states
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-5)
