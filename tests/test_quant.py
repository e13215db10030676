"""Quantized weights (`jaxlora.quant`): GGUF blocks re-laid bit for bit against the `gguf` package's own
dequantization, int8/int4 round trips within their bounds, quantized models equal to their dequantized float
selves (forward, generate, LoRA gradients), checkpoints that save and load bit-exactly, and bad input refused."""

import dataclasses
import importlib

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import hf_model, random_ids, save_hf

import jaxlora
from jaxlora import prefill_layers, quant
from jaxlora.checkpoint import read_config
from jaxlora.convert.gguf_blocks import BLOCKS, relayout
from jaxlora.errors import UsageError
from jaxlora.lora import Adapters
from jaxlora.lora import init as lora_init
from jaxlora.train import token_loss

# hidden 64 and mlp 96 split into groups of 8, 16, 32; vocab 97 and 3 layers as the other tiny models.
SIZES = dict(
    model_type="llama",
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def gguf_blocks_file(path, type_name: str, rows: int, cols: int, seed: int):
    """A GGUF file holding one [rows, cols] tensor of `type_name`, quantized by the `gguf` package where it has a
    quantizer, else random blocks (any bytes are a valid block once the float16 fields are finite)."""
    qtype = gguf.GGMLQuantizationType[type_name]
    elements, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    try:
        data = gguf.quants.quantize(rng.normal(size=(rows, cols)).astype(np.float32), qtype)
    except NotImplementedError:
        blocks = rng.integers(0, 256, size=(rows * cols // elements, size), dtype=np.uint8)
        halves = rng.normal(size=(len(blocks), 2)).astype(np.float16).view(np.uint8)
        if type_name == "Q6_K":  # d sits last
            blocks[:, -2:] = halves[:, :2]
        else:  # d (and dmin) first
            blocks[:, :4] = halves
        data = blocks.reshape(rows, -1)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("w", data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("type_name", sorted(BLOCKS))
def test_gguf_blocks_relayout_equals_gguf_dequantization_bit_for_bit(tmp_path, type_name):
    rows, cols = 6, 512
    tensor = gguf.GGUFReader(str(gguf_blocks_file(tmp_path / "w.gguf", type_name, rows, cols, seed=3))).tensors[0]
    assert tensor.tensor_type.name == type_name
    reference = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(rows, cols)
    kept = relayout(tensor.data, type_name, rows, cols)
    assert all(np.issubdtype(a.dtype, np.integer) for name, a in kept.items() if name == "values")
    ours = np.asarray(jax.jit(quant.dequantize)(jax.tree.map(jnp.asarray, kept)))
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours.view(np.uint32), reference.view(np.uint32))
    bits = 4 if type_name in ("Q4_0", "Q4_1", "Q4_K") else 8
    assert quant.format_of(kept).bits == bits


def single_row_products(q, cols: int, seed: int):
    """quant.matmul of one row (the stored integers read in place) and of two rows (the weight dequantized first),
    with the float product of the dequantized weight."""
    x = np.random.default_rng(seed).normal(size=(2, cols)).astype(np.float32)
    q = jax.tree.map(jnp.asarray, q)
    reference = x @ np.asarray(quant.dequantize(q)).T
    one = np.asarray(jax.jit(quant.matmul)(jnp.asarray(x[None, :1]), q))[0]
    two = np.asarray(jax.jit(quant.matmul)(jnp.asarray(x), q))
    return one, two, reference


@pytest.mark.parametrize("type_name", sorted(BLOCKS))
def test_one_row_product_of_each_kept_block_type_equals_the_float_product(tmp_path, type_name):
    rows, cols = 6, 512
    tensor = gguf.GGUFReader(str(gguf_blocks_file(tmp_path / "w.gguf", type_name, rows, cols, seed=4))).tensors[0]
    one, two, reference = single_row_products(relayout(tensor.data, type_name, rows, cols), cols, seed=5)
    scale = np.abs(reference).max()
    np.testing.assert_allclose(one, reference[:1], atol=1e-6 * scale, rtol=0)
    np.testing.assert_allclose(two, reference, atol=1e-6 * scale, rtol=0)


@pytest.mark.parametrize("name", ["int8", "int8:16", "int4:32", "int4:128"])
def test_one_row_product_of_each_format_equals_the_float_product(name):
    w = np.random.default_rng(6).normal(size=(40, 256)).astype(np.float32)
    one, two, reference = single_row_products(quant.quantize_rows(w, quant.parse_format(name)), 256, seed=7)
    scale = np.abs(reference).max()
    np.testing.assert_allclose(one, reference[:1], atol=1e-6 * scale, rtol=0)
    np.testing.assert_allclose(two, reference, atol=1e-6 * scale, rtol=0)


def test_float_and_rare_types_are_not_kept():
    assert relayout(np.zeros((2, 64), np.float32), "F32", 2, 64) is None
    assert relayout(np.zeros((2, 42), np.uint8), "IQ4_NL", 2, 64) is None


@pytest.mark.parametrize("name, bits", [("int8", 8), ("int8:16", 8), ("int4", 4), ("int4:32", 4), ("int4:128", 4)])
def test_round_trip_error_is_within_half_a_step(name, bits):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(24, 256)).astype(np.float32) * rng.uniform(0.01, 3, size=(24, 1)).astype(np.float32)
    w[3] = 0.0  # a zero row: scale 0, exact zeros
    w[5, :128] = 1.5  # constant groups
    fmt = quant.parse_format(name)
    q = quant.quantize_rows(w, fmt)
    assert quant.format_of(q) == fmt and fmt.bits == bits
    back = np.asarray(quant.dequantize(q))
    group = 256 if fmt.group is None else fmt.group
    step = np.repeat(q["scale"], group, axis=1)  # each element's quantization step
    slack = 1e-6 * np.abs(w).max()  # float32 rounding of the scaling itself
    assert (np.abs(back - w) <= step / 2 + slack).all()
    np.testing.assert_array_equal(back[3], 0.0)
    # The steps are the smallest that cover each group: max |w| / 127 (int8), (max - min) / 15 (int4).
    g = w.reshape(24, -1, group)
    smallest = (g.max(-1) - g.min(-1)) / 15 if fmt.offset else np.abs(g).max(-1) / 127
    np.testing.assert_allclose(q["scale"], smallest, rtol=1e-6)
    assert np.abs(back - w).max() > step.max() / 8  # and the bound is not vacuous


def test_formats_parse_and_refuse():
    assert quant.parse_format("int8") == quant.QuantFormat(8, None, False)
    assert quant.parse_format("int4") == quant.QuantFormat(4, 64, True)
    assert quant.parse_format("int4:32").name == "int4:32:min"
    assert quant.parse_stored("int4:32:min") == quant.QuantFormat(4, 32, True)
    for bad in ("int3", "int4:7", "int4:0", "fp8", "int4:-2"):
        with pytest.raises(UsageError):
            quant.parse_format(bad)


@pytest.fixture(scope="module")
def tiny_quant(tmp_path_factory):
    """A tiny Llama converted to float32, and to int8 and int4 (group 16) by `convert --quantize`."""
    root = tmp_path_factory.mktemp("quant")
    hf = save_hf(hf_model(SIZES), root / "hf")
    paths = {"float32": jaxlora.convert(str(hf), root / "float32")}
    for name in ("int8", "int4:16"):
        paths[name] = jaxlora.convert(str(hf), root / name.replace(":", "_"), quantize=name)
    return paths


def dequantized(params):
    return jax.tree.map(jnp.asarray, quant.dequantize_params(params))


@pytest.mark.parametrize("name", ["int8", "int4:16"])
def test_quantized_model_equals_its_dequantized_float_model(tiny_quant, name):
    model = jaxlora.load(tiny_quant[name])
    formats = quant.formats_of(model.params)
    # every linear kernel and the embedding (the lm_head is untied here), nothing else
    assert len(formats) == 3 * 7 + 2 and "embed/embedding" in formats and "lm_head/kernel" in formats
    assert all(not quant.is_quantized(v) for v in model.params["layers_0"]["attn_norm"].values())
    ids = random_ids((2, 13), SIZES["vocab_size"], seed=1)
    logits = np.asarray(jaxlora.forward(model.params, model.config, ids))
    reference = np.asarray(jaxlora.forward(dequantized(model.params), model.config, ids))
    np.testing.assert_allclose(logits, reference, atol=1e-5, rtol=1e-5)
    floats = jaxlora.load(tiny_quant["float32"])
    float_logits = np.asarray(jaxlora.forward(floats.params, floats.config, ids))
    assert not np.allclose(logits, float_logits, atol=1e-5)  # quantization did change the weights
    tokens = jaxlora.generate(model.params, model.config, ids, max_new_tokens=12).tokens
    expected = jaxlora.generate(dequantized(model.params), model.config, ids, max_new_tokens=12).tokens
    np.testing.assert_array_equal(tokens, expected)


def generate_scratch_bytes(model, batch: int, monkeypatch) -> tuple[dict, np.ndarray]:
    """The scratch memory of the compiled programs `generate` runs at `batch` rows: the largest of prefill's layer
    programs (`jaxlora.prefill_layers`: each holds one layer's weights) and the decode chunk ({"prefill": bytes,
    "decode": bytes}), and the tokens generated."""
    # XLA's own decode loop on both sides: the CPU kernel's tiled copy (`jaxlora.cpu_matmul`) serves float32 only.
    monkeypatch.setenv("JAXLORA_CPU_KERNEL", "off")
    decoding_module = importlib.import_module("jaxlora.decoding")
    programs = {"prefill": (prefill_layers, "_layer"), "decode": (decoding_module, "decode")}
    scratch = {}
    for name, (module, attribute) in programs.items():
        original = getattr(module, attribute)

        def measured(*args, _name=name, _original=original, **kwargs):
            compiled = _original.lower(*args, **kwargs).compile()
            scratch[_name] = max(scratch.get(_name, 0), compiled.memory_analysis().temp_size_in_bytes)
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, attribute, measured)
    ids = random_ids((batch, 7), SIZES["vocab_size"], seed=9)
    tokens = np.asarray(jaxlora.generate(model.params, model.config, ids, max_new_tokens=10).tokens)
    monkeypatch.undo()
    return scratch, tokens


@pytest.mark.parametrize("name", ["int8", "int4:16"])
def test_quantized_generate_holds_no_float_copy_of_the_weights(tiny_quant, name, monkeypatch):
    """Prefill dequantizes each weight where it is used (not all of them first), and one sequence's decode steps
    multiply the stored integers (no float copy lifted out of the loop), with the dequantized model's tokens.
    Several sequences: the weights are dequantized once per chunk (the copy shows up: the measure sees one)."""
    model = jaxlora.load(tiny_quant[name])
    float_bytes = sum(a.nbytes for a in jax.tree.leaves(dequantized(model.params)))
    layer_bytes = sum(a.nbytes for a in jax.tree.leaves(dequantized(model.params["layers_0"])))
    floats = dataclasses.replace(model, params=dequantized(model.params))
    one, tokens = generate_scratch_bytes(model, 1, monkeypatch)
    one_float, expected = generate_scratch_bytes(floats, 1, monkeypatch)
    np.testing.assert_array_equal(tokens, expected)
    # A layer program holds one layer's weights. Dequantized where used, a weight's float copy lives only around
    # its product (here the largest, an MLP matrix, is 0.3 of the layer: measured 0.30 above the float program);
    # dequantized all first, they add most of the layer (measured 0.83).
    assert one["prefill"] < one_float["prefill"] + layer_bytes / 2, (one, one_float, layer_bytes)
    assert one["decode"] < one_float["decode"] + float_bytes / 4, (one, one_float, float_bytes)
    two, _ = generate_scratch_bytes(model, 2, monkeypatch)
    two_float, _ = generate_scratch_bytes(floats, 2, monkeypatch)
    assert two["decode"] > two_float["decode"] + float_bytes / 2, (two, two_float, float_bytes)


def test_tied_quantized_embedding_serves_lookup_and_head(tmp_path):
    hf = save_hf(hf_model({**SIZES, "tie_word_embeddings": True}), tmp_path / "hf")
    model = jaxlora.load(jaxlora.convert(str(hf), tmp_path / "jax"), quantize="int4:16")
    assert "lm_head" not in model.params and quant.is_quantized(model.params["embed"]["embedding"])
    ids = random_ids((1, 9), SIZES["vocab_size"], seed=2)
    np.testing.assert_allclose(
        np.asarray(jaxlora.forward(model.params, model.config, ids)),
        np.asarray(jaxlora.forward(dequantized(model.params), model.config, ids)),
        atol=1e-5,
        rtol=1e-5,
    )
    table = quant.dequantize(model.params["embed"]["embedding"])
    np.testing.assert_array_equal(
        np.asarray(jaxlora.embed(model.params, model.config, ids))[0], np.asarray(table)[ids[0]]
    )


def test_quantize_on_load_equals_quantized_conversion_and_saves_bit_exactly(tiny_quant):
    converted = jaxlora.load(tiny_quant["int4:16"])
    on_load = jaxlora.load(tiny_quant["float32"], quantize="int4:16")
    leaves = jax.tree_util.tree_leaves_with_path(converted.params)
    assert len(leaves) == len(jax.tree.leaves(on_load.params))
    for path, leaf in leaves:
        other = on_load.params
        for key in path:
            other = other[key.key]
        assert leaf.dtype == other.dtype, path
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(other))
    _, meta = read_config(tiny_quant["int4:16"])
    assert meta["quantization"] == quant.formats_of(on_load.params)
    nbytes = {name: sum(a.nbytes for a in jax.tree.leaves(jaxlora.load(p).params)) for name, p in tiny_quant.items()}
    # int8: a byte a weight and a scale a row; int4 in groups of 16: half a byte plus a float32 scale and min
    assert nbytes["int8"] < 0.27 * nbytes["float32"] and nbytes["int4:16"] < nbytes["int8"]


def test_lora_gradients_over_a_quantized_base_equal_those_over_its_float_copy(tiny_quant):
    model = jaxlora.load(tiny_quant["int4:16"])
    config = model.config
    adapters = lora_init(config, jax.random.key(0), rank=4, targets=("q_proj", "v_proj", "down_proj"))
    weights = jax.tree.map(lambda b: b + 0.01, adapters.weights)  # B nonzero: gradients reach A too
    ids = random_ids((2, 12), SIZES["vocab_size"], seed=5)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)}

    def loss(w, params):
        total, count = token_loss(params, config, batch, lora=Adapters(w, adapters.config))
        return total / count

    grads = jax.grad(loss)(weights, model.params)
    expected = jax.grad(loss)(weights, dequantized(model.params))
    for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), atol=1e-5, rtol=1e-5)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-4


def test_bad_quantization_requests_are_refused(tiny_quant, tmp_path):
    with pytest.raises(UsageError, match="already quantized"):
        jaxlora.load(tiny_quant["int8"], quantize="int8")
    with pytest.raises(UsageError, match="unknown quantization"):
        jaxlora.load(tiny_quant["float32"], quantize="int2")
    with pytest.raises(UsageError, match="GGUF"):
        jaxlora.convert(str(tiny_quant["float32"].parent / "hf"), tmp_path / "x", quantize="keep")
    assert not (tmp_path / "x").exists()
    model = jaxlora.load(tiny_quant["int8"])
    adapters = lora_init(model.config, jax.random.key(0), rank=2, targets=("q_proj",))
    with pytest.raises(UsageError, match="quantized"):
        jaxlora.lora.merge(model.params, adapters)


def test_export_dequantizes_and_info_shows_each_groups_formats(tiny_quant, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from jaxlora.checkpoint import describe
    from jaxlora.export import run

    rows = dict(describe(tiny_quant["int4:16"]))
    assert rows["params embed"].startswith("int8 ") and rows["params lm_head"].startswith("int8 ")
    assert rows["params layers (3)"].startswith("int4:16:min ") and " + float32 " in rows["params layers (3)"]
    model = jaxlora.load(tiny_quant["int4:16"])
    summary = run("hf", model, tmp_path / "hf")
    assert "dequantized to float32" in summary
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    ids = random_ids((1, 10), SIZES["vocab_size"], seed=7)
    with torch.no_grad():
        theirs = exported(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(jaxlora.forward(model.params, model.config, ids)), theirs, atol=1e-4)


@pytest.mark.parametrize("name", ["int8", "int4:8"])
def test_quantized_mixture_of_experts_equals_its_dequantized_float_model(tiny, name):
    model = jaxlora.load(tiny("mixtral").jax_dir, quantize=name)
    formats = quant.formats_of(model.params)
    moe = model.params["layers_0"]["moe"]
    assert all(quant.is_quantized(moe[k]) for k in ("gate", "up", "down")) and not quant.is_quantized(moe["router"])
    assert moe["gate"]["values"].shape[0] == 4 and formats["layers_0/moe/down"].startswith(name.split(":")[0])
    ids = random_ids((2, 11), 97, seed=8)
    np.testing.assert_allclose(
        np.asarray(jaxlora.forward(model.params, model.config, ids)),
        np.asarray(jaxlora.forward(dequantized(model.params), model.config, ids)),
        atol=1e-5,
        rtol=1e-5,
    )
