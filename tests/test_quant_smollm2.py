"""The real SmolLM2 kept quantized: its GGUF's Q4_1/Q8_0 blocks as they are, and int8/int4 from the float weights.

The float32 checkpoint the suite converts from the same GGUF is the GGUF dequantized, so the kept model must give
the same numbers (computed in another order); int8 and int4 are judged by perplexity on a fixed text."""

from pathlib import Path

import jax
import numpy as np
import pytest

import jaxlora
from jaxlora import quant
from jaxlora.eval.perplexity import perplexity

pytestmark = [pytest.mark.real, pytest.mark.xla_defaults]

TEXT = Path(__file__).with_name("data") / "perplexity.txt"


@pytest.fixture(scope="module")
def kept(smollm2_gguf, tmp_path_factory):
    lines = []
    path = jaxlora.convert(
        str(smollm2_gguf), tmp_path_factory.mktemp("kept") / "jax", quantize="keep", report=lines.append
    )
    return jaxlora.load(path), lines


def test_kept_gguf_equals_the_dequantized_float_model(kept, smollm2_checkpoint):
    model, lines = kept
    floats = jaxlora.load(smollm2_checkpoint)
    formats = quant.formats_of(model.params)
    # the file's Q4_1 linear weights and its Q8_0 (tied) embedding, kept; only the float32 norms left
    assert set(formats.values()) == {"int4:32:min", "int8:32"} and formats["embed/embedding"] == "int8:32"
    assert len(formats) == 1 + 7 * model.config.num_layers
    assert lines == [f"quantized {len(formats)} weights (int4:32:min, int8:32)"]
    param_bytes = sum(a.nbytes for a in jax.tree.leaves(model.params))
    assert param_bytes < 0.22 * sum(a.nbytes for a in jax.tree.leaves(floats.params))
    prompt = floats.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a Python function that reverses a string."}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    ids = np.asarray([prompt])
    logits = np.asarray(jaxlora.forward(model.params, model.config, ids))
    reference = np.asarray(jaxlora.forward(floats.params, floats.config, ids))
    assert np.abs(logits - reference).max() <= 1e-5 * np.abs(reference).max()
    tokens = jaxlora.generate(model.params, model.config, ids, max_new_tokens=64).tokens
    expected = jaxlora.generate(floats.params, floats.config, ids, max_new_tokens=64).tokens
    np.testing.assert_array_equal(tokens, expected)


def text_perplexity(model) -> float:
    tokens = model.tokenizer(TEXT.read_text())["input_ids"]
    return perplexity(model.params, model.config, tokens, window=256, stride=128)["perplexity"]


def test_perplexity_of_quantized_smollm2(kept, smollm2_checkpoint):
    reference = text_perplexity(jaxlora.load(smollm2_checkpoint))
    assert 2 < reference < 30  # a real model on real text
    kept_model, _ = kept
    assert abs(text_perplexity(kept_model) / reference - 1) <= 1e-4
    int8 = text_perplexity(jaxlora.load(smollm2_checkpoint, quantize="int8"))
    # Groups of 32, as in the Q4_1 file these float weights come from: groups of 64 cannot land on two blocks'
    # grids at once (perplexity +48% here, in README's table), so 32 is the group this model is judged at.
    int4 = text_perplexity(jaxlora.load(smollm2_checkpoint, quantize="int4:32"))
    assert abs(int8 / reference - 1) <= 0.005, (int8, reference)
    assert abs(int4 / reference - 1) <= 0.05, (int4, reference)
