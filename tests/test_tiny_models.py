"""The tiny random models exercise what the parity tests claim to check: switching off RoPE, a sliding window or a
soft-cap changes their greedy tokens (see `conftest.sharpen`). Without this, a model whose attention is nearly
uniform would pass the parity tests with positions, windows and caps computed wrongly."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_CONFIGS, random_ids

import jaxlora

PROMPT, NEW = 7, 24  # as in test_parity.py's greedy test: the sequence runs past every window in the table
# When a switch is turned off, at least this many of the 2 x 24 greedy tokens must change (measured: 8 to 48;
# greedy runs of tied-embedding models fall into repeating a token early)...
MIN_CHANGED = 4
# ... and, for positions, the next-token argmax at this share of the positions of random sequences (measured:
# 0.14 for GPT-NeoX, whose RoPE turns 6 of 10 dims, to 0.87).
MIN_ARGMAX_CHANGED = 0.1


def greedy(params, config):
    ids = random_ids((2, PROMPT), config.vocab_size, seed=3)
    return jaxlora.generate(params, config, ids, max_new_tokens=NEW).tokens


def without_positions(params, config):
    """The same model with no position information: RoPE off (an all-zero learned table in its place), or GPT-2's
    learned positions zeroed."""
    # The zero table covers the positions these tests use (dynamic NTK models have no context limit of their own).
    config = dataclasses.replace(config, learned_positions=True, max_position_embeddings=PROMPT + NEW)
    table = {"embedding": jnp.zeros((config.max_position_embeddings, config.hidden_size))}
    return {**params, "pos_embed": table}, config


# Greedy runs for one model of each block shape (generation compiles twice per model); every model's predictions.
GREEDY_CHECKED = {
    "llama-gqa",
    "gemma",
    "qwen2",
    "phi3-longrope",
    "mixtral",
    "qwen3_moe",
    "gpt2",
    "gptj",
    "codegen",
    "gpt_neox",
}


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_positions_change_the_predictions(tiny, name):
    model = tiny(name).load()
    blind = without_positions(model.params, model.config)
    if name in GREEDY_CHECKED:
        changed = (greedy(model.params, model.config) != greedy(*blind)).sum()
        assert changed >= MIN_CHANGED, f"{name}: only {changed} greedy tokens depend on positions"
    ids = random_ids((4, 31), model.config.vocab_size, seed=1)
    predicted = np.asarray(jaxlora.forward(model.params, model.config, ids)).argmax(-1)
    predicted_blind = np.asarray(jaxlora.forward(*blind, ids)).argmax(-1)
    share = (predicted != predicted_blind)[:, 1:].mean()  # the first position has no context to place
    assert share >= MIN_ARGMAX_CHANGED, f"{name}: positions change only {share:.0%} of the next-token predictions"


WINDOWED = sorted(n for n, c in TINY_CONFIGS.items() if c.get("sliding_window"))


@pytest.mark.parametrize("name", WINDOWED)
def test_sliding_windows_change_greedy_tokens(tiny, name):
    model = tiny(name).load()
    config = model.config
    assert any(w is not None and w < PROMPT + NEW for w in config.layer_windows)
    full = dataclasses.replace(config, layer_windows=(None,) * config.num_layers)
    changed = (greedy(model.params, config) != greedy(model.params, full)).sum()
    assert changed >= MIN_CHANGED, f"{name}: only {changed} greedy tokens depend on the window"


def test_soft_caps_change_the_output(tiny):
    model = tiny("gemma2").load()
    config = model.config
    uncapped = dataclasses.replace(config, attn_softcap=None)
    changed = (greedy(model.params, config) != greedy(model.params, uncapped)).sum()
    assert changed >= MIN_CHANGED, f"only {changed} greedy tokens depend on the attention soft-cap"
    # The final cap is monotonic, so it cannot change a greedy token: it must change the logits visibly instead.
    ids = random_ids((2, 19), config.vocab_size, seed=1)
    capped = np.asarray(jaxlora.forward(model.params, config, ids))
    free = np.asarray(jaxlora.forward(model.params, dataclasses.replace(config, final_softcap=None), ids))
    assert np.abs(capped - free).max() >= 0.2 * np.abs(free).max()
