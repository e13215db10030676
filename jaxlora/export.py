"""Export a converted model: ONNX (through jax2onnx), serialized StableHLO (jax.export), or an HF checkpoint.

ONNX and StableHLO carry the forward pass: input_ids [batch, seq] int32 and attention_mask [batch, seq] int32
(1 = token, left padding allowed) -> logits [batch, seq, vocab] float32, weights baked in as constants, batch
and sequence length symbolic unless fixed. The attention core is the reference (`xla`) one: its masked softmax
maps onto plain ONNX ops for any length.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import quant
from jaxlora.cache import KVCache, entry_shapes
from jaxlora.checkpoint import Model
from jaxlora.errors import ExportError, UsageError
from jaxlora.families import canonical_name, ignored_pattern, tensor_plan
from jaxlora.families.table import Split, apply_transform
from jaxlora.generate import generate
from jaxlora.model import apply_decoder, forward, get_path
from jaxlora.sharding import to_host
from jaxlora.staging import check_destination, check_replaceable, staged, staged_files

VERIFY_BATCH, VERIFY_LEN = 2, 11
GRAPH_NAME = "jaxlora"


def recognise_onnx(path: Path) -> str | None:
    """An ONNX file this module wrote (its graph is named "jaxlora"), or None."""
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 (anything unreadable as ONNX is not ours)
        return None
    return "jaxlora ONNX export" if model.graph.name == GRAPH_NAME else None


def recognise_stablehlo(path: Path) -> str | None:
    """A serialized jax.export module (what `export_stablehlo` writes), or None."""
    try:
        jax.export.deserialize(bytearray(path.read_bytes()))
    except Exception:  # noqa: BLE001 (anything that does not deserialize is not ours)
        return None
    return "StableHLO export"


def input_shapes(batch: int | None, seq_len: int | None) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
    """The forward's inputs for export: fixed sizes, or symbolic ("batch", "seq") where None."""
    names = [n for n, size in (("batch", batch), ("seq", seq_len)) if size is None]
    symbols = dict(zip(names, jax.export.symbolic_shape(", ".join(names)) if names else (), strict=True))
    shape = (batch or symbols["batch"], seq_len or symbols["seq"])
    return jax.ShapeDtypeStruct(shape, jnp.int32), jax.ShapeDtypeStruct(shape, jnp.int32)


def _exportable(model: Model) -> tuple[dict, object]:
    """The params as host arrays (constants of the exported graph) and the config on the plain-ops attention core
    (its masked softmax maps onto ONNX for any length; "auto" would compare symbolic lengths) and dense experts
    (plain einsums; sparse dispatch sorts and scans, with shapes that follow the symbolic token count)."""
    model = model.per_layer()
    return jax.tree.map(to_host, model.params), model.config.with_attention("xla").with_moe("dense")


def forward_fn(model: Model):
    """(input_ids, attention_mask) -> logits with the params closed over, on the exportable attention core."""
    params, config = _exportable(model)

    def logits(input_ids, attention_mask):
        return forward(params, config, input_ids, attention_mask=attention_mask)

    return logits


def verify_inputs(vocab: int, batch: int | None, seq_len: int | None, seed: int = 0):
    """Random ids with a left-padded row, at the exported sizes (or small ones where symbolic)."""
    rng = np.random.default_rng(seed)
    b, t = batch or VERIFY_BATCH, seq_len or VERIFY_LEN
    ids = rng.integers(0, vocab, size=(b, t)).astype(np.int32)
    mask = np.ones((b, t), np.int32)
    if b > 1 and t > 2:
        mask[1, : t // 3] = 0
    return ids, mask


def _max_relative_diff(got: np.ndarray, want: np.ndarray, mask: np.ndarray) -> float:
    tokens = mask.astype(bool)
    return float(np.abs(got[tokens] - want[tokens]).max() / max(1.0, np.abs(want[tokens]).max()))


def _onnx_op_error(error: Exception) -> ExportError | None:
    """jax2onnx's "no plugin for primitive X" as our error naming the op (None for other failures)."""
    text = str(error)
    match = re.search(r"[Nn]o (?:ONNX )?(?:plugin|handler|converter)[^'\"`]*['\"`]([\w.\-]+)['\"`]", text)
    if match is None:
        match = re.search(r"primitive[^'\"`]*['\"`]([\w.\-]+)['\"`]", text)
    if match is None:
        return None
    return ExportError(f"the model uses the JAX op {match.group(1)!r}, which has no ONNX mapping in jax2onnx")


def to_onnx_file(fn, inputs, path: Path, input_names=None, output_names=None) -> None:
    """Convert `fn` at `inputs` (ShapeDtypeStructs) into an ONNX file; unmapped ops are an ExportError."""
    try:
        from jax2onnx import to_onnx
    except ImportError:
        raise UsageError(
            "ONNX export needs jax2onnx and onnxruntime: "
            "pip install 'jaxlora[export]' and pip install --no-deps jax2onnx"
        ) from None
    for logger in ("jax2onnx", "onnx_ir"):  # they log each optional plugin they cannot import, and type notes
        logging.getLogger(logger).setLevel(logging.ERROR)
    try:
        to_onnx(
            fn,
            list(inputs),
            model_name=GRAPH_NAME,
            return_mode="file",
            output_path=str(path),
            input_names=input_names or ["input_ids", "attention_mask"][: len(inputs)],
            output_names=output_names or ["logits"],
        )
    except (NotImplementedError, ValueError, TypeError, KeyError) as error:
        mapped = _onnx_op_error(error)
        if mapped is None:
            raise
        raise mapped from None


def run_onnx(path: Path, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]


def export_onnx(
    model: Model,
    out: str | Path,
    *,
    batch: int | None = None,
    seq_len: int | None = None,
    force: bool = False,
    tolerance: float = 1e-4,
) -> dict:
    """Write the forward pass as ONNX and check it with onnxruntime on random ids against jaxlora.

    Returns {"path", "max_relative_diff"}: the largest |onnx - jax| over the real tokens, relative to the
    largest |logit| (at least 1); above `tolerance` the export is refused and nothing is written.
    """
    out = Path(out)
    check_replaceable(out, force, recognise_onnx)
    fn = forward_fn(model)
    with staged_files(out, force, recognise_onnx) as folder:
        # Large weights go to a sidecar `<name>.data` that the graph refers to by name: write under the final name.
        staging = folder / out.name
        to_onnx_file(fn, input_shapes(batch, seq_len), staging)
        ids, mask = verify_inputs(model.config.vocab_size, batch, seq_len)
        diff = _max_relative_diff(run_onnx(staging, ids, mask), np.asarray(jax.jit(fn)(ids, mask)), mask)
        if not diff <= tolerance:
            raise ExportError(f"onnxruntime's logits differ from jaxlora's by {diff:.2e} (relative), over {tolerance}")
    sidecars = [p.name for p in out.parent.glob(f"{out.name}.*") if p.name != out.name]
    return {"path": str(out), "max_relative_diff": diff, "sidecars": sidecars}


def step_fn(model: Model):
    """One cached step for ONNX: the tokens [batch, t] at their positions go into cache slots write_index..; the
    cache buffers come in and go out (ONNX has no in-place update), one key and one value per layer."""
    params, config = _exportable(model)
    layers = config.num_layers

    def step(input_ids, positions, cache_valid, write_index, *past):
        key_valid = cache_valid.astype(bool)
        cache = KVCache(tuple(past[:layers]), tuple(past[layers:]), key_valid)
        logits, new = apply_decoder(
            params, config, input_ids, positions, key_valid, cache=cache, write_index=write_index
        )
        return (logits, *new.keys, *new.values)

    return step


def step_io_names(layers: int) -> tuple[list[str], list[str]]:
    """The step graph's input and output names: keys of every layer, then values (the `past`/`present` order)."""
    kv = [f"{i}.{part}" for part in ("key", "value") for i in range(layers)]
    inputs = ["input_ids", "positions", "cache_valid", "write_index"] + [f"past.{n}" for n in kv]
    return inputs, ["logits"] + [f"present.{n}" for n in kv]


def _greedy_with_step(session, model: Model, prompt: np.ndarray, steps: int, cache_len: int):
    """Prefill + `steps` greedy steps through the exported step graph: (new tokens, last logits)."""
    config = model.config
    b, t = prompt.shape
    inputs, _ = step_io_names(config.num_layers)
    (kh, kd), (vh, vd) = entry_shapes(config)
    past = [np.zeros((b, cache_len, kh, kd), np.float32)] * config.num_layers
    past += [np.zeros((b, cache_len, vh, vd), np.float32)] * config.num_layers
    cache_valid = np.zeros((b, cache_len), np.int32)
    cache_valid[:, :t] = 1
    positions = np.tile(np.arange(t, dtype=np.int32), (b, 1))
    feed = [prompt, positions, cache_valid, np.asarray(0, np.int32)]
    out = session.run(None, dict(zip(inputs, feed + past, strict=True)))
    tokens = []
    for i in range(steps):
        token = out[0][:, -1].argmax(-1).astype(np.int32)
        tokens.append(token)
        cache_valid[:, t + i] = 1
        feed = [token[:, None], np.full((b, 1), t + i, np.int32), cache_valid, np.asarray(t + i, np.int32)]
        out = session.run(None, dict(zip(inputs, feed + list(out[1:]), strict=True)))
    return np.stack(tokens, axis=1), out[0][:, -1]


def export_onnx_step(
    model: Model, out: str | Path, *, cache_len: int, batch: int | None = None, force: bool = False
) -> dict:
    """Write one KV-cached step as ONNX (prefill with t = prompt length, decode with t = 1): inputs input_ids and
    positions [batch, t], cache_valid [batch, cache_len] int32 (1 = slot holds a token, this call's included),
    write_index [] int32, past.{i}.key/value [batch, cache_len, kv_heads, head_dim]; outputs logits [batch, t,
    vocab] and present.{i}.key/value. Batch and t are symbolic (t <= cache_len), cache_len fixed. Every layer
    keeps a full-length cache (no ring buffers). Checked by greedy decoding in onnxruntime against `generate`."""
    out = Path(out)
    check_replaceable(out, force, recognise_onnx)
    config = model.config
    if cache_len < 4:
        raise UsageError(f"--cache-len must be at least 4, got {cache_len}")
    (b, t) = jax.export.symbolic_shape("batch, t", constraints=[f"t <= {cache_len}"])
    b = batch or b
    (kh, kd), (vh, vd) = entry_shapes(config)
    keys = jax.ShapeDtypeStruct((b, cache_len, kh, kd), jnp.float32)
    values = jax.ShapeDtypeStruct((b, cache_len, vh, vd), jnp.float32)
    shapes = (
        [
            jax.ShapeDtypeStruct((b, t), jnp.int32),
            jax.ShapeDtypeStruct((b, t), jnp.int32),
            jax.ShapeDtypeStruct((b, cache_len), jnp.int32),
            jax.ShapeDtypeStruct((), jnp.int32),
        ]
        + [keys] * config.num_layers
        + [values] * config.num_layers
    )
    inputs, outputs = step_io_names(config.num_layers)
    with staged_files(out, force, recognise_onnx) as folder:
        staging = folder / out.name
        to_onnx_file(step_fn(model), shapes, staging, input_names=inputs, output_names=outputs)
        import onnxruntime

        session = onnxruntime.InferenceSession(str(staging), providers=["CPUExecutionProvider"])
        prompt_len, steps = min(5, cache_len // 2), min(6, cache_len // 2)
        prompt = verify_inputs(config.vocab_size, batch, prompt_len)[0]
        tokens, _ = _greedy_with_step(session, model, prompt, steps, cache_len)
        expected = generate(model.params, config, prompt, max_new_tokens=steps).tokens
        if not np.array_equal(tokens, expected):
            raise ExportError("greedy decoding through the exported step differs from jaxlora's generate")
    return {"path": str(out), "greedy_steps_checked": steps}


def export_stablehlo(
    model: Model, out: str | Path, *, batch: int | None = None, seq_len: int | None = None, force: bool = False
) -> dict:
    """Serialize the forward pass with `jax.export` (reload: `jax.export.deserialize(bytes).call(ids, mask)`),
    for the platform this process runs on. The file is checked by deserializing and calling it."""
    out = Path(out)
    check_replaceable(out, force, recognise_stablehlo)
    fn = forward_fn(model)
    exported = jax.export.export(jax.jit(fn))(*input_shapes(batch, seq_len))
    with staged(out, force, folder=False, recognise=recognise_stablehlo) as staging:
        staging.write_bytes(exported.serialize())
        ids, mask = verify_inputs(model.config.vocab_size, batch, seq_len)
        reloaded = jax.export.deserialize(bytearray(staging.read_bytes()))
        diff = _max_relative_diff(np.asarray(reloaded.call(ids, mask)), np.asarray(jax.jit(fn)(ids, mask)), mask)
        # Symbolic shapes may compile to other fusions than the fixed ones: equal to float32 rounding.
        if not diff <= 1e-5:
            raise ExportError(f"the reloaded StableHLO differs from jaxlora by {diff:.2e} (relative)")
    return {"path": str(out), "max_relative_diff": diff, "platforms": list(exported.platforms)}


def hf_tensor_shapes(hf_config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of the transformers model for this config, by name, from a model built on the meta device."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        raise UsageError("HF export needs PyTorch (to lay out transformers' tensors): pip install torch") from None
    fields = {k: v for k, v in hf_config.items() if k != "model_type"}
    config = AutoConfig.for_model(hf_config["model_type"], **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def hf_tensors(model: Model, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The params as transformers' tensors: each family table row run backwards. A fused HF tensor is rebuilt by
    running the family's splitter on the tensor's own element indices, which says where each part came from."""
    model = model.per_layer()
    config = model.config
    params = jax.tree.map(lambda a: to_host(a).astype(np.float32), model.params)
    tensors: dict[str, np.ndarray] = {}
    fused: dict[str, list] = {}
    for item in tensor_plan(config):
        value = get_path(params, item.param_path)
        if isinstance(item.transform, Split):
            fused.setdefault(item.hf_names[0], []).append((item.transform, value))
            continue
        # None and TRANSPOSE are their own inverses.
        for e, name in enumerate(item.hf_names):
            tensors[name] = apply_transform(item.transform, value[e] if item.stacked else value, config)
    # transformers' names seen through the family's renames, as conversion reads them.
    canonical = {canonical_name(config, n): n for n in shapes}
    for name, parts in fused.items():
        if canonical.get(name) not in shapes:
            raise ExportError(f"transformers' {config.family} model has no tensor {name}")
        shape = shapes[canonical[name]]
        index = np.arange(math.prod(shape), dtype=np.float64).reshape(shape)
        tensor = np.full(math.prod(shape), np.nan, np.float32)
        for split, value in parts:
            where = apply_transform(split, index, config).astype(np.int64)
            tensor[where.ravel()] = value.ravel()
        if np.isnan(tensor).any():
            raise ExportError(f"the params do not fill all of {name}")
        tensors[name] = tensor.reshape(shape)
    skip = ignored_pattern(config)
    missing = sorted(n for c, n in canonical.items() if c not in tensors and not skip.fullmatch(c))
    if missing:
        raise ExportError(f"no param fills transformers' {', '.join(missing[:3])}")
    out = {}
    for name, tensor in tensors.items():
        hf_name = canonical.get(name, name)
        if hf_name in shapes and tuple(tensor.shape) != shapes[hf_name]:
            raise ExportError(f"{hf_name}: shape {tensor.shape}, transformers expects {shapes[hf_name]}")
        out[hf_name] = np.ascontiguousarray(tensor, np.float32)
    return out


def export_hf(model: Model, out: str | Path, *, force: bool = False) -> dict:
    """Write an HF checkpoint folder (model.safetensors in float32, config.json, generation_config.json, the
    tokenizer files) that `AutoModelForCausalLM.from_pretrained` loads."""
    from safetensors.numpy import save_file

    if model.path is None or not (Path(model.path) / "hf_config.json").is_file():
        raise UsageError("HF export needs a converted checkpoint folder with its hf_config.json")
    hf_config = json.loads((Path(model.path) / "hf_config.json").read_text())
    tensors = hf_tensors(model, hf_tensor_shapes(hf_config))
    with staged(out, force) as staging:
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        config = {**hf_config, "torch_dtype": "float32"}
        config.pop("dtype", None)
        if not config.get("architectures"):  # a GGUF source's config has none; loaders that go by it need one
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

            config["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config["model_type"]]]
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        generation = Path(model.path) / "generation_config.json"
        if generation.is_file():
            shutil.copy2(generation, staging / "generation_config.json")
        tokenizer = Path(model.path) / "tokenizer"
        if tokenizer.is_dir():
            for file in tokenizer.iterdir():
                shutil.copy2(file, staging / file.name)
    return {"path": str(out), "tensors": len(tensors)}


FORMATS = ("onnx", "stablehlo", "hf")


def parse_seq_len(value: str) -> int | None:
    """--seq-len: a number of tokens, or "dynamic" (None)."""
    if value == "dynamic":
        return None
    try:
        number = int(value)
    except ValueError:
        raise UsageError(f"--seq-len must be a number or 'dynamic', got {value!r}") from None
    if number < 1:
        raise UsageError(f"--seq-len must be at least 1, got {number}")
    return number


RECOGNISERS = {"onnx": recognise_onnx, "stablehlo": recognise_stablehlo, "hf": None}


def check_out(fmt: str, out: str | Path, force: bool = False) -> None:
    """Refuse a format or an output path before anything is loaded (the same checks the writers repeat)."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    check_destination(Path(out))
    check_replaceable(Path(out), force, RECOGNISERS[fmt])


def run(
    fmt: str,
    model: Model,
    out: str | Path,
    *,
    batch: int | None = None,
    seq_len: int | None = None,
    decode_step: bool = False,
    cache_len: int | None = None,
    force: bool = False,
) -> str:
    """Export `model` in format `fmt` (one of FORMATS); returns a one-line summary of what was written and checked.

    Quantized weights are dequantized first: none of the formats carries jaxlora's quantized layout."""
    if batch is not None and batch < 1:
        raise UsageError(f"--batch must be at least 1, got {batch}")
    if fmt in FORMATS and quant.formats_of(model.params):
        model = dataclasses.replace(model, params=jax.tree.map(np.asarray, quant.dequantize_params(model.params)))
        summary = run(
            fmt, model, out, batch=batch, seq_len=seq_len, decode_step=decode_step, cache_len=cache_len, force=force
        )
        return f"{summary} (quantized weights dequantized to float32)"
    if fmt == "onnx" and decode_step:
        if cache_len is None:
            raise UsageError("--decode-step needs --cache-len N (the KV cache's slots)")
        report = export_onnx_step(model, out, cache_len=cache_len, batch=batch, force=force)
        return f"wrote {out}; {report['greedy_steps_checked']} greedy steps in onnxruntime match jaxlora"
    if fmt == "onnx":
        report = export_onnx(model, out, batch=batch, seq_len=seq_len, force=force)
        return f"wrote {out}; onnxruntime matches jaxlora within {report['max_relative_diff']:.1e} (relative)"
    if fmt == "stablehlo":
        report = export_stablehlo(model, out, batch=batch, seq_len=seq_len, force=force)
        return f"wrote {out} for {', '.join(report['platforms'])}; reloaded and checked"
    if fmt == "hf":
        report = export_hf(model, out, force=force)
        return f"wrote {out} ({report['tensors']} tensors, float32)"
    raise UsageError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
