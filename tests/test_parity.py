"""jaxlora vs transformers PyTorch on the same tiny random weights: float32 logits within 1e-4, same greedy tokens."""

import jax
import numpy as np
import pytest
import torch
from conftest import TINY_CONFIGS, hf_model, random_ids, save_hf

import jaxlora

ATOL = 1e-4
jit_forward = jax.jit(jaxlora.forward, static_argnums=1)


def torch_logits(model, ids, mask=None):
    with torch.no_grad():
        kwargs = {} if mask is None else {"attention_mask": torch.tensor(mask, dtype=torch.long)}
        return model(torch.tensor(ids, dtype=torch.long), **kwargs).logits.numpy()


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_logits_match_transformers(tiny, name):
    m = tiny(name)
    model = m.load()
    # 19 tokens: longer than every sliding window in the table, past llama3's original context of 16.
    ids = random_ids((2, 19), model.config.vocab_size, seed=1)
    ref = torch_logits(m.torch_model, ids)
    out = np.asarray(jit_forward(model.params, model.config, ids))
    assert out.dtype == np.float32 and out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", ["llama-gqa", "mistral-window", "qwen2"])
def test_left_padded_logits_match_transformers(tiny, name):
    m = tiny(name)
    model = m.load()
    ids = random_ids((3, 15), model.config.vocab_size, seed=2)
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :9] = 0
    ref = torch_logits(m.torch_model, ids, mask)
    out = np.asarray(jit_forward(model.params, model.config, ids, attention_mask=mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(out[real], ref[real], rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_greedy_tokens_match_transformers(tiny, name):
    m = tiny(name)
    model = m.load()
    ids = random_ids((2, 7), model.config.vocab_size, seed=3)
    with torch.no_grad():
        ref = m.torch_model.generate(
            torch.tensor(ids, dtype=torch.long),
            max_new_tokens=24,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[:, ids.shape[1] :].numpy()
    out = jaxlora.generate(model.params, model.config, ids, max_new_tokens=24)
    np.testing.assert_array_equal(out.tokens, ref)
    np.testing.assert_array_equal(out.lengths, [24, 24])


@pytest.mark.parametrize("fmt", ["sharded", "bin", "sharded-bin", "pth"])
def test_every_source_format_converts_to_the_same_logits(tmp_path, fmt):
    torch_model = hf_model(TINY_CONFIGS["llama-gqa"], seed=5)
    src = save_hf(torch_model, tmp_path / "src", fmt)
    config = str(tmp_path / "src" / "hf_config.json") if fmt == "pth" else None
    jaxlora.convert(str(src), tmp_path / "jax", config_path=config)
    model = jaxlora.load(tmp_path / "jax")
    ids = random_ids((2, 11), model.config.vocab_size, seed=4)
    out = np.asarray(jit_forward(model.params, model.config, ids))
    np.testing.assert_allclose(out, torch_logits(torch_model, ids), rtol=0, atol=ATOL)
