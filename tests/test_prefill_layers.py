"""Prefill layer by layer from the host (`jaxlora.prefill_layers`): the state `decoding.prefill` returns, one
compiled program per kind of layer."""

import jax
import numpy as np
import pytest
from conftest import random_ids
from test_lora import nonzero

import jaxlora
from jaxlora import lora, prefill_layers
from jaxlora.decoding import prefill
from jaxlora.generate import left_pad, make_plan, plan_cache, prefill_prompt
from jaxlora.sampling import Sampling
from jaxlora.stacking import layer_kind

# Every way a block differs from its neighbours or from Llama's: windows and their own RoPE tables (gemma3),
# windowed and full layers mixed (qwen2-window), mixture-of-experts and dense layers mixed and latent attention
# (deepseek_v3), experts with sinks and alternating windows (gpt_oss), learned positions (gpt2), a parallel
# residual (codegen), Granite's multipliers.
FAMILIES = ["llama-gqa", "gemma3", "qwen2-window", "deepseek_v3", "gpt_oss", "gpt2", "codegen", "granite"]


def host_values(state):
    """Every array of a DecodeState as numpy (PRNG keys as their key data)."""

    def value(a):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a = jax.random.key_data(a)
        return np.asarray(a)

    return jax.tree.map(value, state)


def both_prefills(model, prompts, **options):
    """The state from `prefill_by_layer` and from the one-program `prefill` on the same left-padded prompts."""
    ids, mask = left_pad(prompts, 0, 32)
    plan = make_plan(model.config, len(prompts), max_new_tokens=8, **options)
    keys = jax.random.split(jax.random.key(3), len(prompts))
    dtype = jaxlora.model.activation_dtype(model.params)
    assert prefill_layers.applies(model.config, ids, plan.lora, plan.layout)
    layered = prefill_prompt(model.params, plan, plan_cache(plan, len(prompts), 32, dtype), ids, mask, keys)
    whole = prefill(
        model.params, plan_cache(plan, len(prompts), 32, dtype), ids, mask, keys, plan.arrays, plan.lora, **plan.static
    )
    return host_values(layered), host_values(whole)


def assert_same_state(layered, whole):
    """Integers (tokens, positions, keys, masks) equal; floats (the cache, scores) within the float32 tolerance
    every parity test holds to: separate programs fuse and round differently, a few ulps a layer."""
    np.testing.assert_array_equal(layered.token, whole.token)
    for a, b in zip(jax.tree.leaves(layered), jax.tree.leaves(whole), strict=True):
        if np.issubdtype(a.dtype, np.floating):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        else:
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", FAMILIES)
def test_prefill_by_layer_returns_prefills_state(tiny, name):
    """The first token, its scores, the cache's keys and values, the positions, the row keys and the seen mask:
    the same as the one-program prefill, on left-padded prompts of different lengths, sampling with every
    processor on."""
    model = tiny(name).load()
    vocab = model.config.vocab_size
    prompts = [list(random_ids((n,), vocab, seed=n)) for n in (5, 23, 14)]
    sampling = Sampling(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.3)
    layered, whole = both_prefills(model, prompts, sampling=sampling, return_logprobs=True, top_logprobs=3)
    assert_same_state(layered, whole)


def test_prefill_by_layer_on_quantized_weights(tiny):
    model = jaxlora.load(tiny("llama-gqa").jax_dir, quantize="int4:16")
    prompts = [list(random_ids((n,), model.config.vocab_size, seed=n)) for n in (9, 17)]
    assert_same_state(*both_prefills(model, prompts))


def test_one_program_per_kind_of_layer(tiny):
    """qwen2-window's layers are of two kinds (its first layer full, the rest windowed): two layer programs,
    whatever the number of layers."""
    model = tiny("qwen2-window").load()
    kinds = {layer_kind(model.config, i) for i in range(model.config.num_layers)}
    assert len(kinds) == 2 < model.config.num_layers
    before = prefill_layers._layer._cache_size()
    batch = 5  # a batch size no other test uses, so each kind's program compiles here
    ids = random_ids((batch, 20), model.config.vocab_size, seed=4)
    jaxlora.generate(model.params, model.config, ids, max_new_tokens=3)
    assert prefill_layers._layer._cache_size() == before + len(kinds)


def test_prefill_by_layer_with_adapters_and_an_adapter_bank(tiny):
    """Adapters on attention, MLP and the head; then a bank's per-row selection (two adapters and the bare base)."""
    model = tiny("llama-gqa").load()
    c = model.config
    prompts = [list(random_ids((n,), c.vocab_size, seed=n)) for n in (6, 19, 11)]
    one = nonzero(lora.init(c, jax.random.key(1), rank=4, targets=("q_proj", "down_proj", "lm_head")), 1)
    assert_same_state(*both_prefills(model, prompts, lora=one))
    other = nonzero(lora.init(c, jax.random.key(2), rank=2, targets=("v_proj", "up_proj")), 2)
    mixed = lora.select(lora.bank([one, other], c), [1, -1, 0])
    layered, whole = both_prefills(model, prompts, lora=mixed, return_logprobs=True, top_logprobs=2)
    assert_same_state(layered, whole)
    bare, _ = both_prefills(model, prompts, return_logprobs=True, top_logprobs=2)
    assert np.abs(layered.scores.top_logprobs - bare.scores.top_logprobs)[[0, 2]].max() > 1e-3  # adapters matter


def test_where_prefill_runs_as_one_program(tiny):
    """The scanned layout, stacked adapters, a mesh's layout and a one-token prompt take `decoding.prefill`."""
    model = tiny("llama-gqa").load()
    c = model.config
    ids = random_ids((1, 12), c.vocab_size)
    adapters = lora.init(c, jax.random.key(0), rank=2, targets=("q_proj",))
    assert prefill_layers.applies(c, ids, None, None) and prefill_layers.applies(c, ids, adapters, None)
    assert not prefill_layers.applies(c.with_scan(True), ids, None, None)
    assert not prefill_layers.applies(c, ids, adapters.laid_out_for(c.with_scan(True)), None)
    assert not prefill_layers.applies(c, ids, None, object())
    assert not prefill_layers.applies(c, ids[:, :1], None, None)
