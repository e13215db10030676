"""GGUF files written here with the `gguf` package's own writer, from tiny transformers models: Llama-architecture
files (Mistral's too) and Qwen2 convert to logits within 1e-4 of the source model; RoPE-scaled files are refused.
Tensor names and llama.cpp's q/k row order are written out here, not taken from the converter."""

import gguf
import numpy as np
import pytest
import torch
from conftest import hf_model, random_ids

import jaxlora
from jaxlora.errors import ConversionError

pytestmark = pytest.mark.real  # the tokenizer metadata comes from the demo GGUF (SmolLM2's 49152 tokens)

SIZES = dict(
    vocab_size=49152,
    hidden_size=40,
    intermediate_size=67,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)

# HF name -> llama.cpp name ({} is the layer).
GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{}.input_layernorm.weight": "blk.{}.attn_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "blk.{}.ffn_norm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "blk.{}.attn_q.weight",
    "model.layers.{}.self_attn.k_proj.weight": "blk.{}.attn_k.weight",
    "model.layers.{}.self_attn.v_proj.weight": "blk.{}.attn_v.weight",
    "model.layers.{}.self_attn.o_proj.weight": "blk.{}.attn_output.weight",
    "model.layers.{}.self_attn.q_proj.bias": "blk.{}.attn_q.bias",
    "model.layers.{}.self_attn.k_proj.bias": "blk.{}.attn_k.bias",
    "model.layers.{}.self_attn.v_proj.bias": "blk.{}.attn_v.bias",
    "model.layers.{}.mlp.gate_proj.weight": "blk.{}.ffn_gate.weight",
    "model.layers.{}.mlp.up_proj.weight": "blk.{}.ffn_up.weight",
    "model.layers.{}.mlp.down_proj.weight": "blk.{}.ffn_down.weight",
}


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert script reorders each head's q/k rows from rotate-half to interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, model, arch: str, tokenizer_from, rope_scaling: str | None = None):
    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    source = gguf.GGUFReader(str(tokenizer_from))
    for key, field in source.fields.items():
        if key.startswith("tokenizer."):
            array = field.types[0] == gguf.GGUFValueType.ARRAY
            writer.add_key_value(key, field.contents(), field.types[0], field.types[-1] if array else None)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    if rope_scaling:
        writer.add_rope_scaling_type(gguf.RopeScalingType(rope_scaling))
        writer.add_rope_scaling_factor(2.0)
    for name, tensor in model.state_dict().items():
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        template = name.replace(f".{layer}.", ".{}.", 1) if layer else name
        w = tensor.numpy()
        if arch == "llama" and template.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in template else config.num_key_value_heads
            w = llama_cpp_permute(w, heads)
        writer.add_tensor(GGUF_NAMES[template].format(layer), np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("model_type, arch", [("llama", "llama"), ("mistral", "llama"), ("qwen2", "qwen2")])
def test_gguf_converts_to_the_source_logits(smollm2_gguf, tmp_path, model_type, arch):
    model = hf_model({"model_type": model_type, **SIZES})
    path = write_gguf(tmp_path / "tiny.gguf", model, arch, smollm2_gguf)
    converted = jaxlora.load(jaxlora.convert(str(path), tmp_path / "jax"))
    assert converted.config.family == {"llama": "llama", "qwen2": "qwen2"}[arch]
    assert converted.config.qkv_bias == (model_type == "qwen2")
    ids = random_ids((2, 11), SIZES["vocab_size"], seed=4)
    with torch.no_grad():
        ref = model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(jaxlora.forward(converted.params, converted.config, ids)), ref, atol=1e-4)
    assert converted.tokenizer("Hello")["input_ids"] == [19556]  # SmolLM2's tokenizer, rebuilt from the file


@pytest.mark.parametrize("scaling", ["linear", "yarn"])
def test_rope_scaled_gguf_is_refused(smollm2_gguf, tmp_path, scaling):
    model = hf_model({"model_type": "llama", **SIZES})
    path = write_gguf(tmp_path / "scaled.gguf", model, "llama", smollm2_gguf, rope_scaling=scaling)
    with pytest.raises(ConversionError, match="GGUF files with RoPE scaling are not supported"):
        jaxlora.convert(str(path), tmp_path / "jax")
    assert not (tmp_path / "jax").exists()
