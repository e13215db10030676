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


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_bfloat16_conversion_loads_and_runs(tiny, tmp_path, name):
    """bfloat16 keeps 8 mantissa bits: logits stay within 5% of the float32 logits' range."""
    m = tiny(name)
    jaxlora.convert(str(m.hf_dir), tmp_path / "bf16", dtype="bfloat16")
    model = jaxlora.load(tmp_path / "bf16")
    assert {leaf.dtype.name for leaf in jax.tree.leaves(model.params)} == {"bfloat16"}
    ids = random_ids((2, 19), model.config.vocab_size, seed=6)
    ref = torch_logits(m.torch_model, ids)
    out = np.asarray(jit_forward(model.params, model.config, ids))
    assert out.dtype == np.float32
    assert np.abs(out - ref).max() <= 0.05 * np.abs(ref).max()
    tokens = jaxlora.generate(model.params, model.config, ids[:, :5], max_new_tokens=4).tokens
    assert tokens.shape == (2, 4) and (tokens >= 0).all() and (tokens < model.config.vocab_size).all()


def test_mixtral_original_per_expert_layout(tmp_path):
    """Hub Mixtral checkpoints store block_sparse_moe.experts.{e}.w1/w2/w3; transformers 5 saves them fused."""
    from safetensors.torch import save_file

    torch_model = hf_model(TINY_CONFIGS["mixtral"], seed=8)
    state = {}
    for name, tensor in torch_model.state_dict().items():
        layer = name.split(".mlp.")[0]
        if name.endswith("mlp.experts.gate_up_proj"):
            gate, up = tensor.chunk(2, dim=1)
            for e in range(tensor.shape[0]):
                state[f"{layer}.block_sparse_moe.experts.{e}.w1.weight"] = gate[e].contiguous()
                state[f"{layer}.block_sparse_moe.experts.{e}.w3.weight"] = up[e].contiguous()
        elif name.endswith("mlp.experts.down_proj"):
            for e in range(tensor.shape[0]):
                state[f"{layer}.block_sparse_moe.experts.{e}.w2.weight"] = tensor[e].contiguous()
        elif name.endswith("mlp.gate.weight"):
            state[f"{layer}.block_sparse_moe.gate.weight"] = tensor.contiguous()
        else:
            state[name] = tensor.contiguous()
    src = tmp_path / "src"
    src.mkdir()
    torch_model.config.save_pretrained(src)
    save_file(state, src / "model.safetensors")
    jaxlora.convert(str(src), tmp_path / "jax")
    model = jaxlora.load(tmp_path / "jax")
    ids = random_ids((2, 11), model.config.vocab_size, seed=9)
    out = np.asarray(jit_forward(model.params, model.config, ids))
    np.testing.assert_allclose(out, torch_logits(torch_model, ids), rtol=0, atol=ATOL)
