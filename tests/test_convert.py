"""Conversion: complete weight tables, bit-exact orbax round trip, atomic output, and clear errors on bad input."""

import json
import pickle
import re
import shutil
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from conftest import TINY_CONFIGS, hf_model, save_hf
from safetensors.numpy import load_file, save_file

import jaxlora
from jaxlora.checkpoint import TokenizerFolder
from jaxlora.errors import CheckpointError, ConfigError, ConversionError, JaxloraError, UsageError
from jaxlora.families import config_from_hf, ignored_pattern, supported_model_types, tensor_plan
from jaxlora.model import param_shapes


def flat(tree):
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {tuple(k.key for k in path): np.asarray(leaf) for path, leaf in leaves}


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_weight_table_is_complete(name):
    """Every HF tensor is consumed exactly once and every param is filled exactly once."""
    model = hf_model(TINY_CONFIGS[name])
    config = config_from_hf({"model_type": model.config.model_type, **model.config.to_dict()})
    plan = tensor_plan(config)
    hf_names = set(model.state_dict())
    ignored = ignored_pattern(config)
    assert {n for p in plan for n in p.hf_names} == {n for n in hf_names if not ignored.fullmatch(n)}
    paths = [p.param_path for p in plan]
    assert len(paths) == len(set(paths))
    assert set(paths) == set(flat(param_shapes(config)))


# Llama's HF names and where each tensor lands, written out here rather than read from the family table.
LLAMA_BY_HAND = [
    (r"model\.embed_tokens\.weight", "embed/embedding", False),
    (r"model\.norm\.weight", "final_norm/scale", False),
    (r"lm_head\.weight", "lm_head/kernel", True),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", "layers_{}/attn_norm/scale", False),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "layers_{}/mlp_norm/scale", False),
    (r"model\.layers\.(\d+)\.self_attn\.(\w+)\.weight", "layers_{}/attn/{}/kernel", True),
    (r"model\.layers\.(\d+)\.self_attn\.(\w+)\.bias", "layers_{}/attn/{}/bias", False),
    (r"model\.layers\.(\d+)\.mlp\.(\w+)\.weight", "layers_{}/mlp/{}/kernel", True),
    (r"model\.layers\.(\d+)\.mlp\.(\w+)\.bias", "layers_{}/mlp/{}/bias", False),
]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_bit_identical(tiny, tmp_path, dtype):
    m = tiny("llama-bias")
    dst = jaxlora.convert(str(m.hf_dir), tmp_path / "out", dtype=dtype)
    params = flat(jaxlora.load(dst).params)
    target = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[dtype]
    filled = set()
    for name, tensor in m.torch_model.state_dict().items():
        (pattern, path, transpose), match = next(
            (rule, re.fullmatch(rule[0], name)) for rule in LLAMA_BY_HAND if re.fullmatch(rule[0], name)
        )
        key = tuple(path.format(*match.groups()).split("/"))
        expected = tensor.numpy().T if transpose else tensor.numpy()
        got = params[key]
        assert got.dtype == np.dtype(target)
        np.testing.assert_array_equal(got.view(np.uint8), np.ascontiguousarray(expected.astype(target)).view(np.uint8))
        filled.add(key)
    assert filled == set(params)


def test_fused_tensors_split_by_hand(tiny):
    """The fused q/k/v layouts, cut here with explicit slices: GPT-2 (columns q | k | v), Phi-3 (rows q | k | v),
    GPT-NeoX (per head: q, k, v rows of head_dim), CodeGen (4 blocks, each q, v, k)."""
    for name, fused in (
        ("gpt2", "transformer.h.1.attn.c_attn.weight"),
        ("phi3", "model.layers.1.self_attn.qkv_proj.weight"),
        ("gpt_neox", "gpt_neox.layers.1.attention.query_key_value.weight"),
        ("codegen", "transformer.h.1.attn.qkv_proj.weight"),
    ):
        m = tiny(name)
        config = m.load().config
        params = flat(m.load().params)
        w = m.torch_model.state_dict()[fused].numpy()
        heads, kv_heads, d, hidden = config.num_heads, config.num_kv_heads, config.head_dim, config.hidden_size
        if name == "gpt2":  # Conv1D: [in, 3 * hidden], already [in, out]
            parts = {"q": w[:, :hidden], "k": w[:, hidden : 2 * hidden], "v": w[:, 2 * hidden :]}
        elif name == "phi3":  # Linear: [q rows, k rows, v rows, in]
            q_rows, kv_rows = heads * d, kv_heads * d
            rows = {"q": w[:q_rows], "k": w[q_rows : q_rows + kv_rows], "v": w[q_rows + kv_rows :]}
            parts = {k: v.T for k, v in rows.items()}
        elif name == "gpt_neox":  # rows: head 0's q, k, v, then head 1's, ...
            rows = {
                p: np.concatenate([w[(3 * h + j) * d : (3 * h + j + 1) * d] for h in range(heads)])
                for j, p in enumerate("qkv")
            }
            parts = {k: v.T for k, v in rows.items()}
        else:  # CodeGen: 4 model-parallel blocks of rows, each q, v, k
            block = hidden // 4
            rows = {
                p: np.concatenate([w[(3 * b + j) * block : (3 * b + j + 1) * block] for b in range(4)])
                for j, p in enumerate("qvk")
            }
            parts = {k: v.T for k, v in rows.items()}
        for part, expected in parts.items():
            np.testing.assert_array_equal(params[("layers_1", "attn", f"{part}_proj", "kernel")], expected)


@pytest.mark.parametrize(
    "name, options",
    [
        ("qwen2_moe", {"dtype": "bfloat16"}),
        ("gpt_oss", {}),
        ("deepseek_v3", {"quantize": "int4:8"}),
        ("gpt2", {"quantize": "int8"}),
    ],
)
def test_params_read_from_the_files_equal_orbax_restore(tiny, tmp_path, name, options):
    """`jaxlora.stored_arrays` reads every param group itself (expert stacks, bfloat16, int4/int8 blocks and their
    scales) and gets what orbax's restore gets; a group whose names or dtypes differ from the config's is left to
    orbax (None), whose checks name the difference."""
    import orbax.checkpoint as ocp

    from jaxlora.stored_arrays import read_group

    dst = jaxlora.convert(str(tiny(name).hf_dir), tmp_path / "out", **options)
    model = jaxlora.load(dst, compile_cache=False)
    for group, subtree in model.params.items():
        expected = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), subtree)
        got = read_group(dst / "params" / group, expected)
        assert got is not None, group
        want = ocp.StandardCheckpointer().restore((dst / "params" / group).absolute(), expected)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
        for leaf in jax.tree.leaves(model.params[group]):
            assert isinstance(leaf, jax.Array)
    group = dst / "params" / "layers_0"
    expected = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), model.params["layers_0"])
    assert read_group(group, {**expected, "extra": jax.ShapeDtypeStruct((2,), np.float32)}) is None
    recast = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, np.float16), expected)
    assert read_group(group, recast) is None
    assert read_group(tmp_path, expected) is None  # not a database at all


def test_load_can_cast(tiny):
    model = jaxlora.load(tiny("qwen2").jax_dir, dtype="bfloat16")
    assert {leaf.dtype for leaf in jax.tree.leaves(model.params)} == {np.dtype(ml_dtypes.bfloat16)}


def test_load_reads_the_tokenizer_when_first_asked(tiny_with_tokenizer, tmp_path):
    """`load` leaves the tokenizer on disk (reading it imports transformers and PyTorch: seconds); generation
    from token ids never reads it, `model.tokenizer` does, once, and a damaged one is a CheckpointError there."""
    model = jaxlora.load(tiny_with_tokenizer / "jax")
    assert isinstance(model.stored_tokenizer, TokenizerFolder)
    tokenizer = model.tokenizer
    assert tokenizer.decode(tokenizer("def f(x):")["input_ids"]) == "def f(x):"
    assert model.tokenizer is tokenizer and model.stored_tokenizer is tokenizer
    assert model.eos_token_ids  # from the generation config or the tokenizer, as before

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_with_tokenizer / "jax", damaged)
    (damaged / "tokenizer" / "tokenizer.json").write_bytes(b'{"version": 7')
    model = jaxlora.load(damaged)
    out = jaxlora.generate(model.params, model.config, np.array([[5, 7, 9]], np.int32), max_new_tokens=3)
    assert out.tokens.shape == (1, 3)
    with pytest.raises(CheckpointError, match="cannot read the tokenizer"):
        _ = model.tokenizer

    shutil.rmtree(damaged / "tokenizer")
    assert jaxlora.load(damaged).tokenizer is None


def test_load_and_generate_from_ids_import_neither_transformers_nor_torch(tiny_with_tokenizer):
    code = (
        "import sys, numpy as np, jaxlora\n"
        f"m = jaxlora.load({str(tiny_with_tokenizer / 'jax')!r}, compile_cache=False)\n"
        "jaxlora.generate(m.params, m.config, np.array([[5, 7]], np.int32), max_new_tokens=2)\n"
        "print(sorted(n for n in ('torch', 'transformers') if n in sys.modules))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def no_output(dst):
    """DST absent and no staging folder left beside it."""
    return not dst.exists() and not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]


@pytest.fixture
def hf_dir(tmp_path):
    return save_hf(hf_model(TINY_CONFIGS["llama-gqa"]), tmp_path / "hf")


def edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def edit_tensors(folder, drop=(), add=None):
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    for name in drop:
        del tensors[name]
    tensors.update(add or {})
    save_file(tensors, str(path), metadata={"format": "pt"})


def expect_error(src, dst, kind, match, **kwargs):
    with pytest.raises(kind, match=match):
        jaxlora.convert(str(src), dst, **kwargs)
    assert no_output(dst)


def test_missing_source(tmp_path):
    expect_error(tmp_path / "nope", tmp_path / "out", ConversionError, "no such file or folder")


def test_folder_without_config(hf_dir, tmp_path):
    (hf_dir / "config.json").unlink()
    expect_error(hf_dir, tmp_path / "out", ConversionError, "missing config.json")


def test_folder_without_weights(hf_dir, tmp_path):
    (hf_dir / "model.safetensors").unlink()
    expect_error(hf_dir, tmp_path / "out", ConversionError, "no weights in")


def test_invalid_config_json(hf_dir, tmp_path):
    (hf_dir / "config.json").write_text("{not json")
    expect_error(hf_dir, tmp_path / "out", ConversionError, "is not valid JSON")


def test_unknown_architecture(hf_dir, tmp_path):
    edit_config(hf_dir, model_type="bert")
    expect_error(
        hf_dir,
        tmp_path / "out",
        ConfigError,
        "unsupported model_type .bert.; supported: " + ", ".join(supported_model_types()),
    )


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"hidden_act": "quick_gelu"}, "activation 'quick_gelu' is not supported for llama"),
        ({"rope_scaling": {"rope_type": "proportional"}}, "rope_type 'proportional' is not supported yet"),
        ({"num_key_value_heads": 3}, "must be a multiple of"),
    ],
)
def test_unimplemented_options_are_refused(hf_dir, tmp_path, changes, match):
    edit_config(hf_dir, **changes)
    expect_error(hf_dir, tmp_path / "out", JaxloraError, match)


def test_shape_mismatch(hf_dir, tmp_path):
    edit_config(hf_dir, intermediate_size=66)
    expect_error(
        hf_dir,
        tmp_path / "out",
        ConversionError,
        r"tensor model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight gives layers_0/mlp/\w+/kernel the shape .* "
        r"but the config implies",
    )


def test_missing_tensors_are_listed(hf_dir, tmp_path):
    edit_tensors(hf_dir, drop=["model.layers.1.mlp.up_proj.weight", "model.norm.weight"])
    expect_error(
        hf_dir,
        tmp_path / "out",
        ConversionError,
        r"missing 2 tensor\(s\): model\.layers\.1\.mlp\.up_proj\.weight, model\.norm\.weight",
    )


def test_unexpected_tensors_are_listed(hf_dir, tmp_path):
    edit_tensors(hf_dir, add={"extra.weight": np.zeros(3, np.float32)})
    expect_error(hf_dir, tmp_path / "out", ConversionError, r"1 unexpected tensor\(s\): extra\.weight")


def test_truncated_safetensors(hf_dir, tmp_path):
    path = hf_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    expect_error(hf_dir, tmp_path / "out", ConversionError, "is not a readable safetensors file")


def test_missing_shard(tmp_path):
    src = save_hf(hf_model(TINY_CONFIGS["llama-gqa"]), tmp_path / "hf", "sharded")
    next(src.glob("model-0000*.safetensors")).unlink()
    expect_error(src, tmp_path / "out", ConversionError, "missing safetensors shard")


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("notes.txt", b"hello", "unrecognized source"),
        ("model.gguf", b"GGUF but not really", "is not a readable GGUF file"),
        ("pytorch_model.bin", b"\x00garbage", "is not a readable PyTorch checkpoint"),
    ],
)
def test_non_checkpoint_files(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content)
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIGS["llama-gqa"]))
    expect_error(path, tmp_path / "out", ConversionError, match)


class Exploit:
    def __reduce__(self):
        return (shutil.rmtree, ("/definitely/not/a/real/path",))


def test_pickle_needing_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "payload": Exploit()}, path)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_CONFIGS["llama-gqa"]))
    expect_error(
        path,
        tmp_path / "out",
        ConversionError,
        r"refused to load evil\.pth: unpickling it would call shutil\.rmtree",
        config_path=str(config),
    )
    with pytest.raises(pickle.UnpicklingError):  # the refusal is torch's weights_only check, not our guess
        torch.load(path, weights_only=True)


def test_bare_state_dict_needs_config(tmp_path):
    src = save_hf(hf_model(TINY_CONFIGS["llama-gqa"]), tmp_path / "src", "pth")
    expect_error(src, tmp_path / "out", ConversionError, "pass its HF config.json with --config")


def test_existing_destination_needs_force(tiny, tmp_path):
    m = tiny("llama-gqa")
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="already exists"):
        jaxlora.convert(str(m.hf_dir), dst)
    # --force replaces only our own output: the user's folder stays as it was.
    with pytest.raises(UsageError, match="not jaxlora output"):
        jaxlora.convert(str(m.hf_dir), dst, force=True)
    assert [p.name for p in dst.iterdir()] == ["keep.txt"] and (dst / "keep.txt").read_text() == "mine"
    ours = tmp_path / "ours"
    jaxlora.convert(str(m.hf_dir), ours)
    (ours / "stale.txt").write_text("from an earlier run")
    jaxlora.convert(str(m.hf_dir), ours, force=True)
    assert not (ours / "stale.txt").exists() and (ours / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours", "out"]


def test_failure_while_writing_leaves_nothing(tiny, tmp_path, monkeypatch):
    convert_module = sys.modules["jaxlora.convert"]  # the package; `jaxlora.convert` is the function

    def broken_save(*args, **kwargs):
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-write

    monkeypatch.setattr(convert_module, "write_config", broken_save)
    with pytest.raises(KeyboardInterrupt):
        jaxlora.convert(str(tiny("llama-gqa").hf_dir), tmp_path / "out")
    assert no_output(tmp_path / "out")


def test_unknown_dtype(tiny, tmp_path):
    expect_error(tiny("llama-gqa").hf_dir, tmp_path / "out", UsageError, "unknown dtype 'int8'", dtype="int8")


def test_load_rejects_non_checkpoints(tiny, tmp_path):
    from jaxlora.errors import CheckpointError

    with pytest.raises(CheckpointError, match="no config.json"):
        jaxlora.load(tmp_path)
    with pytest.raises(CheckpointError, match="run `jaxlora convert` first"):
        jaxlora.load(tiny("llama-gqa").hf_dir)


@pytest.mark.parametrize(
    "name, changes, message",
    [
        (
            "phi3",
            {
                "rope_scaling": {
                    "rope_type": "longrope",
                    "short_factor": [1.0] * 3,
                    "long_factor": [1.0] * 3,
                    "original_max_position_embeddings": 128,
                }
            },
            "invalid phi3 config: .*short_factor field must have length 5",
        ),
        ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx is not supported"),
        ("gptj", {"rotary_dim": None}, "invalid gptj config: .*rotary_dim"),
        ("llama-gqa", {"num_attention_heads": "four"}, "num_attention_heads must be a positive integer"),
        ("gpt_neox", {"hidden_act": "relu6"}, "activation 'relu6' is not supported for gpt_neox"),
        ("gemma2", {"layer_types": ["chunked_attention"] * 3}, "unsupported layer_types"),
    ],
)
def test_family_options_the_decoder_lacks_are_refused_by_name(name, changes, message):
    with pytest.raises(ConfigError, match=message):
        config_from_hf({**TINY_CONFIGS[name], **changes})


def resident_mb() -> float:
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) / 1024


def test_reading_a_safetensors_source_does_not_keep_it_resident(tmp_path):
    """Conversion holds one tensor at a time: pages read through a shard's memory map would stay resident (and
    count in the process's memory) for as long as the map lives, growing to the size of the source."""
    from jaxlora.convert.readers import SafetensorsReader

    rng = np.random.default_rng(0)
    save_file({f"t{i}": rng.standard_normal((1024, 1024), np.float32) for i in range(48)}, tmp_path / "a.safetensors")
    source_mb = (tmp_path / "a.safetensors").stat().st_size / 2**20  # 192 MB
    reader = SafetensorsReader([tmp_path / "a.safetensors"])
    before = resident_mb()
    total = 0.0
    for name in reader.names():
        total += float(reader.get(name)[0, 0])  # each tensor read, used and let go
    grown = resident_mb() - before
    reader.close()
    assert np.isfinite(total)
    assert grown < source_mb / 4, f"reading the source left {grown:.0f} of its {source_mb:.0f} MB resident"
