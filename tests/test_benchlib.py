"""Benchmark helpers: medians for rows, the best call for limits, the weight matmuls prefill is set against."""

import time
from collections import Counter

import pytest
from benchlib import best_of, median_of


def slowed_by_a_neighbour(durations):
    """fn sleeping each of `durations` in turn: calls a busy machine slowed down, then one it did not."""
    remaining = list(durations)
    return lambda: time.sleep(remaining.pop(0))


def test_a_limit_is_the_best_call_and_a_row_the_median():
    # Sleeps never end early and a loaded worker oversleeps by milliseconds, not the 0.19 s between the two.
    assert best_of(slowed_by_a_neighbour([0.2, 0.2, 0.01]), 3) < 0.1
    assert median_of(slowed_by_a_neighbour([0.2, 0.2, 0.01]), 3) >= 0.2


@pytest.mark.parametrize("name", ["llama-gqa", "llama-tied-mha"])
def test_prefill_weight_matmuls_are_every_kernel_and_a_tied_head_once(tiny, name):
    from bench import weight_matmul_shapes

    model = tiny(name).load()
    config = model.config
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    # q, k, v, o, gate, up, down (q and o share a shape where q's width is the hidden size)
    per_layer = [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]
    expected = Counter(per_layer * config.num_layers + [(h, v)])
    assert weight_matmul_shapes(model.params, config) == expected


def test_prefill_is_set_against_its_weight_matmuls_alone():
    from bench import describe_weight_matmuls

    results = {
        "limits": {"weight_matmuls_s": 0.5},
        "prefill_len": 512,
        "jaxlora": {"prefill_tok_s": 512.0},
        "transformers": {"prefill_tok_s": 256.0},
    }
    line = describe_weight_matmuls(results)
    assert "500 ms for 512 tokens (1024 tok/s)" in line
    assert "jaxlora 50%, transformers 25%" in line
