"""Export: ONNX checked with onnxruntime, StableHLO reloaded and called, HF checkpoints loaded by transformers."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import TINY_CONFIGS, hf_model, random_ids, save_hf
from test_cli import assert_clean_error, run_cli

import jaxlora
from jaxlora.errors import ExportError
from jaxlora.export import export_hf, export_onnx, export_stablehlo, run_onnx, to_onnx_file, verify_inputs

ONNX_FAMILIES = ["llama-gqa", "gemma2", "gpt2", "phi3-longrope", "mixtral"]
HF_FAMILIES = [
    "llama-gqa",
    "mistral-window",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3",
    "gpt2",
    "gptj",
    "codegen",
    "gpt_neox",
    "phi3",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmo2",
    "smollm3",
    "granite",
    "gpt_oss",
    "deepseek_v3",
]


def jax_logits(model, ids, mask):
    return np.asarray(jax.jit(jaxlora.forward, static_argnums=1)(model.params, model.config, ids, attention_mask=mask))


@pytest.mark.parametrize("name", ONNX_FAMILIES)
def test_onnx_with_dynamic_batch_and_length(tiny, tmp_path, name):
    model = tiny(name).load()
    report = export_onnx(model, tmp_path / "model.onnx")
    # What the export checked itself on, checked again here rather than trusting its report.
    ids, mask = verify_inputs(model.config.vocab_size, None, None)
    real = mask.astype(bool)
    np.testing.assert_allclose(
        run_onnx(tmp_path / "model.onnx", ids, mask)[real], jax_logits(model, ids, mask)[real], rtol=0, atol=1e-4
    )
    assert report["max_relative_diff"] <= 1e-4
    import onnx

    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input]
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    assert all(isinstance(d, str) for shape in dims for d in shape), dims  # batch and length both symbolic
    for shape in [(1, 5), (3, 17)]:  # other sizes than the export's own check
        ids = random_ids(shape, model.config.vocab_size, seed=shape[1])
        mask = np.ones(shape, np.int32)
        mask[-1, : shape[1] // 2] = 0
        got, want = run_onnx(tmp_path / "model.onnx", ids, mask), jax_logits(model, ids, mask)
        real = mask.astype(bool)
        np.testing.assert_allclose(got[real], want[real], rtol=0, atol=1e-4)


def test_onnx_fixed_shape(tiny, tmp_path):
    model = tiny("llama-gqa").load()
    export_onnx(model, tmp_path / "fixed.onnx", batch=2, seq_len=8)
    ids = random_ids((2, 8), model.config.vocab_size)
    mask = np.ones((2, 8), np.int32)
    np.testing.assert_allclose(run_onnx(tmp_path / "fixed.onnx", ids, mask), jax_logits(model, ids, mask), atol=1e-4)


@pytest.mark.parametrize("name", ["llama-gqa", "gemma2"])
def test_onnx_decode_step_generates_like_jaxlora(tiny, tmp_path, name):
    """Prefill, then one token at a time through the exported cached step, feeding `present` back as `past`."""
    import onnxruntime

    from jaxlora.export import export_onnx_step

    model = tiny(name).load()
    config = model.config
    export_onnx_step(model, tmp_path / "step.onnx", cache_len=40)
    session = onnxruntime.InferenceSession(str(tmp_path / "step.onnx"))
    names = [i.name for i in session.get_inputs()]
    assert names[:4] == ["input_ids", "positions", "cache_valid", "write_index"] and "past.0.key" in names
    assert "present.2.value" in [o.name for o in session.get_outputs()]
    prompt = random_ids((3, 9), config.vocab_size, seed=11)
    # Drive the graph by hand, as a user of the ONNX file would: inputs by name, `present` fed back as `past`.
    kv = [f"{i}.{part}" for part in ("key", "value") for i in range(config.num_layers)]
    past = {f"past.{n}": np.zeros((3, 40, config.num_kv_heads, config.head_dim), np.float32) for n in kv}
    valid = np.zeros((3, 40), np.int32)
    ids, positions, tokens = prompt, np.tile(np.arange(9, dtype=np.int32), (3, 1)), []
    for step in range(21):
        write = 9 + step - 1 if step else 0
        valid[:, write : write + ids.shape[1]] = 1
        feed = {
            "input_ids": ids,
            "positions": positions,
            "cache_valid": valid,
            "write_index": np.asarray(write, np.int32),
        }
        logits, *present = session.run(None, {**feed, **past})
        past = {f"past.{n}": value for n, value in zip(kv, present, strict=True)}
        last_logits = logits[:, -1]
        if step < 20:
            tokens.append(last_logits.argmax(-1).astype(np.int32))
            ids, positions = tokens[-1][:, None], np.full((3, 1), 9 + step, np.int32)
    tokens = np.stack(tokens, axis=1)
    last_logits = logits[:, -1]
    np.testing.assert_array_equal(
        tokens, jaxlora.generate(model.params, model.config, prompt, max_new_tokens=20).tokens
    )
    full = np.concatenate([prompt, tokens], axis=1)
    np.testing.assert_allclose(last_logits, jax_logits(model, full, np.ones_like(full))[:, -1], atol=1e-4)


def test_onnx_exports_that_do_not_match_are_refused(tiny, tmp_path, monkeypatch):
    """The export checks itself and writes nothing when onnxruntime disagrees (here made to disagree)."""
    from jaxlora import export

    model = tiny("llama-gqa").load()
    real_run = export.run_onnx
    monkeypatch.setattr(export, "run_onnx", lambda path, ids, mask: real_run(path, ids, mask) + 1e-2)
    with pytest.raises(ExportError, match="onnxruntime's logits differ from jaxlora's by"):
        export_onnx(model, tmp_path / "model.onnx")
    real_generate = export.generate
    monkeypatch.setattr(export, "generate", lambda *a, **k: real_generate(*a, **k)._replace(tokens=np.zeros(1)))
    with pytest.raises(ExportError, match="greedy decoding through the exported step differs"):
        export.export_onnx_step(model, tmp_path / "step.onnx", cache_len=16)
    assert list(tmp_path.iterdir()) == []


def test_op_without_onnx_mapping_is_named(tmp_path):
    def uses_platform_index(ids, mask):
        return jax.lax.platform_dependent(ids, cpu=lambda x: x * 2, default=lambda x: x + 1)

    shape = jax.ShapeDtypeStruct((2, 3), jnp.int32)
    with pytest.raises(ExportError, match="the JAX op 'platform_index', which has no ONNX mapping"):
        to_onnx_file(uses_platform_index, [shape, shape], tmp_path / "x.onnx")


def test_stablehlo_round_trip(tiny, tmp_path):
    model = tiny("gemma2").load()
    report = export_stablehlo(model, tmp_path / "model.stablehlo")
    assert report["max_relative_diff"] <= 1e-5 and "cpu" in report["platforms"]
    restored = jax.export.deserialize(bytearray((tmp_path / "model.stablehlo").read_bytes()))
    for shape in [(1, 4), (2, 13)]:
        ids = random_ids(shape, model.config.vocab_size, seed=7)
        mask = np.ones(shape, np.int32)
        np.testing.assert_allclose(np.asarray(restored.call(ids, mask)), jax_logits(model, ids, mask), atol=1e-5)


@pytest.mark.parametrize("name", HF_FAMILIES)
def test_hf_export_loads_in_transformers(tiny, tmp_path, name):
    from transformers import AutoModelForCausalLM

    model = tiny(name).load()
    export_hf(model, tmp_path / "hf")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = random_ids((2, 13), model.config.vocab_size, seed=2)
    with torch.no_grad():
        ref = reloaded(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(jax_logits(model, ids, np.ones_like(ids)), ref, rtol=0, atol=1e-5)
    # And back: converting the export gives the same params bit for bit.
    again = jaxlora.load(jaxlora.convert(str(tmp_path / "hf"), tmp_path / "again"))
    for got, want in zip(jax.tree.leaves(again.params), jax.tree.leaves(model.params), strict=True):
        np.testing.assert_array_equal(got, want)


def test_export_cli_and_bad_input(tiny, tmp_path):
    ckpt = tiny("llama-gqa").jax_dir
    result = run_cli("export", "stablehlo", ckpt, tmp_path / "m.shlo", "--seq-len", "12")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "m.shlo").is_file()
    assert_clean_error(run_cli("export", "stablehlo", ckpt, tmp_path / "m.shlo"), "already exists (pass --force")
    assert_clean_error(run_cli("export", "onnx", ckpt, tmp_path / "x.onnx", "--seq-len", "ten"), "--seq-len must be")
    assert_clean_error(run_cli("export", "hf", tmp_path / "nothing", tmp_path / "out"), "is not a jaxlora checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.shlo"]  # nothing half-written


def test_onnx_weights_sidecar_keeps_the_final_name(tmp_path):
    """jax2onnx moves tensors over 1 MB into `<name>.data`, which the graph names: after the staged write is moved
    into place the sidecar must carry the final name, and nothing else may be left beside it."""
    big_vocab = {**TINY_CONFIGS["llama-gqa"], "vocab_size": 8192}  # a 1.3 MB embedding
    save_hf(hf_model(big_vocab), tmp_path / "hf")
    model = jaxlora.load(jaxlora.convert(str(tmp_path / "hf"), tmp_path / "jax"))
    out = tmp_path / "out"
    report = export_onnx(model, out / "m.onnx")
    assert sorted(p.name for p in out.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert report["sidecars"] == ["m.onnx.data"]
    ids = random_ids((1, 6), model.config.vocab_size)
    mask = np.ones((1, 6), np.int32)
    np.testing.assert_allclose(run_onnx(out / "m.onnx", ids, mask), jax_logits(model, ids, mask), atol=1e-4)


@pytest.mark.real
def test_hf_export_of_the_gguf_converted_smollm2(smollm2_checkpoint, tmp_path):
    """GGUF -> jaxlora -> HF safetensors: transformers loads the folder, tokenizer included, with our logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dst = smollm2_checkpoint
    model = jaxlora.load(dst)
    export_hf(model, tmp_path / "hf")
    # The GGUF's config names no architecture; the export does, for loaders that go by it (transformers serve).
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = np.asarray([tokenizer("def fibonacci(n):\n    ")["input_ids"]], np.int32)
    assert ids.tolist() == [model.tokenizer("def fibonacci(n):\n    ")["input_ids"]]
    with torch.no_grad():
        ref = reloaded(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    out = jax_logits(model, ids, np.ones_like(ids))
    assert np.abs(out - ref).max() / np.abs(ref).max() <= 1e-4
    np.testing.assert_array_equal(out.argmax(-1), ref.argmax(-1))
