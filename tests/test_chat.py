"""Multi-turn chat keeps its cache: a later turn runs only the new tokens and answers as a fresh prefill would."""

import numpy as np
import pytest

import jaxlora
from jaxlora.chat import ChatSession

pytestmark = [pytest.mark.real, pytest.mark.xla_defaults]


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_second_turn_reuses_the_cache_and_matches_a_fresh_generation(smollm2_checkpoint, scan_layers):
    """Also with SmolLM2's 30 layers scanned: the turn's extend and decode write into the stacked cache."""
    dst = smollm2_checkpoint
    model = jaxlora.load(dst, scan_layers=scan_layers)
    assert model.config.scan_layers == scan_layers
    session = ChatSession(model, max_new_tokens=40)
    replies = []
    for text in ("What is the capital of France?", "And what is the capital of Italy?"):
        reply = []
        for chunk in session.send(text):
            reply.extend(chunk.row(0))
        replies.append(reply)
    assert session.reused_turns == 1
    assert "Paris" in session.messages[1]["content"] and "Rome" in session.messages[3]["content"]

    # The second reply equals generating from the whole two-turn conversation at once.
    history = session.messages[:3]
    ids = model.tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=True, return_dict=False)
    fresh = jaxlora.generate(
        model.params,
        model.config,
        [list(ids)],
        max_new_tokens=40,
        eos_token_ids=model.eos_token_ids,
        pad_token_id=model.tokenizer.pad_token_id,
    )
    np.testing.assert_array_equal(replies[1], fresh.tokens[0, : fresh.lengths[0]])


def test_a_session_with_unmerged_adapters_answers_as_the_merged_model(tiny_with_tokenizer):
    import dataclasses

    import jax

    from jaxlora import lora

    model = jaxlora.load(tiny_with_tokenizer / "jax")
    adapters = lora.init(model.config, jax.random.key(0), rank=4, targets=("q_proj", "v_proj", "up_proj"))
    leaves, treedef = jax.tree.flatten(adapters.weights)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    adapters = adapters.replace(
        weights=jax.tree.unflatten(
            treedef, [x + 0.5 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
        )
    )
    merged = dataclasses.replace(model, params=lora.merge(model.params, adapters))
    replies = []
    for session in (ChatSession(model, max_new_tokens=12, lora=adapters), ChatSession(merged, max_new_tokens=12)):
        turns = []
        for text in ("Hello there.", "And again?"):
            turns.append(sum((chunk.row(0) for chunk in session.send(text)), []))
        replies.append(turns)
    assert replies[0] == replies[1]
    plain = ChatSession(model, max_new_tokens=12)
    assert sum((chunk.row(0) for chunk in plain.send("Hello there.")), []) != replies[0][0]
