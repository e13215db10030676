"""The folders jaxlora reads and writes: checkpoints (config, params, tokenizer) and LoRA adapters.

DST/config.json            {"format": "jaxlora", "format_version": 1, "model": ModelConfig, "dtype": ...}
DST/hf_config.json         the source's HF config, verbatim
DST/generation_config.json eos/bos/pad ids and sampling defaults from the source, when it had them
DST/tokenizer/             HF tokenizer files
DST/params/<group>/        one orbax checkpoint per top-level param group (embed, layers_0, ..., lm_head)

ADAPTERS/lora_config.json  LoraConfig fields and the base checkpoint ("base")
ADAPTERS/adapters/         the adapters' weights (orbax), as host arrays
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp

from jaxlora import compile_cache as xla_cache
from jaxlora import quant, stacking
from jaxlora.attention import check_impl
from jaxlora.config import DTYPE_NAMES, MOE_IMPLS, LoraConfig, ModelConfig
from jaxlora.errors import CheckpointError, ConfigError, UsageError, one_line
from jaxlora.lora import Adapters, adapter_shapes, merge
from jaxlora.model import flat_param_shapes, num_params, param_shapes
from jaxlora.peft import export_peft, import_peft
from jaxlora.sharding import param_shardings, put, to_host
from jaxlora.staging import staged, uninterrupted
from jaxlora.stored_arrays import read_group

log = logging.getLogger("jaxlora.checkpoint")

FORMAT_VERSION = 1
DTYPES = dict(zip(DTYPE_NAMES, map(np.dtype, (np.float32, ml_dtypes.bfloat16, np.float16)), strict=True))


@dataclass(frozen=True)
class TokenizerFolder:
    """A checkpoint's tokenizer not read yet: `Model.tokenizer` reads it the first time it is asked for."""

    path: Path


@dataclass
class Model:
    """A loaded checkpoint: `params` (nested dict of jax arrays), its `config`, and its `tokenizer` (or None).

    `load` leaves the tokenizer on disk until `tokenizer` is first asked for: reading it imports transformers
    (and PyTorch, where it is installed), which took 2.4 of the 3.7 s a SmolLM2 load took on a 2-core CPU, and
    code that generates from token ids never needs it. A damaged tokenizer raises `CheckpointError` there."""

    config: ModelConfig
    params: dict
    stored_tokenizer: Any = None  # the tokenizer, None (the checkpoint has none) or a TokenizerFolder
    generation_config: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def tokenizer(self):
        """The HF tokenizer (None when the checkpoint has none), read from the checkpoint on first use."""
        if isinstance(self.stored_tokenizer, TokenizerFolder):
            self.stored_tokenizer = read_tokenizer(self.stored_tokenizer.path)
        return self.stored_tokenizer

    def per_layer(self) -> Model:
        """This model with its params in the per-layer layout (each layer's slice, when they are stacked)."""
        if not self.config.scan_layers:
            return self
        params = stacking.unstack_tree(self.params, stacking.layer_stacks(self.config))
        return dataclasses.replace(self, config=self.config.with_scan(False), params=params)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self.generation_config.get("eos_token_id")
        if eos is None and self.tokenizer is not None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            return ()
        return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _params_dir(path: Path) -> Path:
    return (path / "params").absolute()


def write_config(
    path: Path, config: ModelConfig, *, dtype: str, source: str = "", quantization: dict[str, str] | None = None
) -> None:
    """quantization: {param path: stored format} of the weights kept quantized (`jaxlora.quant`); dtype is the
    float params' (quantized weights keep float32 scales)."""
    meta = {
        "format": "jaxlora",
        "format_version": FORMAT_VERSION,
        "model": config.to_dict(),
        "dtype": dtype,
        "source": source,
    }
    if quantization:
        meta["quantization"] = dict(sorted(quantization.items()))
    (path / "config.json").write_text(json.dumps(meta, indent=2))


def save_param_group(path: Path, group: str, subtree: dict) -> None:
    """Write one top-level param group (`embed`, `layers_3`, ...) as its own orbax checkpoint params/<group>.

    One checkpoint per group lets conversion stream: only one group is ever in memory, plus orbax's copy of it.
    Uncompressed, since zstd costs another copy during the write and slows every load while float weights
    barely compress.
    """
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False))
    with uninterrupted():
        checkpointer.save(_params_dir(path) / group, args=ocp.args.PyTreeSave(subtree))


def read_config(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any]]:
    """The ModelConfig and the raw metadata of a jaxlora checkpoint folder."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} is not a jaxlora checkpoint (no config.json; convert it first)")
    try:
        meta = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != "jaxlora":
        raise CheckpointError(f"{path} is not a jaxlora checkpoint (an HF folder? run `jaxlora convert` first)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {meta.get('format_version')}, expected {FORMAT_VERSION}")
    if meta.get("dtype") not in DTYPES:
        raise CheckpointError(f"{config_file} names an unknown dtype {meta.get('dtype')!r} ({', '.join(DTYPES)})")
    try:
        config = ModelConfig.from_dict(meta["model"])
    except (ConfigError, TypeError, KeyError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{config_file} holds an invalid model config ({one_line(e)})") from None
    check_quantization(config_file, config, meta.get("quantization", {}))
    return config, meta


def check_quantization(config_file: Path, config: ModelConfig, formats) -> None:
    """config.json's quantization table names quantizable params of this model, in formats that fit them."""
    if not isinstance(formats, dict):
        raise CheckpointError(f"{config_file}: quantization must map param paths to formats")
    if not formats:
        return
    shapes = {"/".join(path): shape for path, shape in flat_param_shapes(config).items()}
    for name, fmt_name in formats.items():
        try:
            fmt = quant.parse_stored(fmt_name)
        except (ValueError, TypeError):
            raise CheckpointError(f"{config_file}: {name} has an unknown quantization format {fmt_name!r}") from None
        shape = shapes.get(name)
        layout = None if shape is None else quant.layout_of(tuple(name.split("/")), shape)
        if layout is None:
            raise CheckpointError(f"{config_file}: {name} is not a quantizable param of this model")
        if not quant.fits(fmt, quant.rows_cols(shape, layout)[1]):
            raise CheckpointError(f"{config_file}: {name} {tuple(shape)} cannot be stored as {fmt_name}")


def check_stored_group(folder: Path, expected: dict, dtype: np.dtype | None = None, own_dtypes: bool = False) -> None:
    """The arrays orbax recorded in a param group's metadata are exactly the ones the config implies (names,
    shapes, dtype: `dtype` for all, or with own_dtypes each expected leaf's), before any is read: an edited config
    or a damaged folder fails here, on one line."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is missing")
    if not (folder / "_METADATA").is_file():
        raise CheckpointError(f"{folder} has no _METADATA (a damaged or incomplete save)")
    try:
        stored = ocp.StandardCheckpointer().metadata(folder.absolute()).item_metadata.tree
    except Exception as e:  # noqa: BLE001 (orbax raises assorted types for a damaged folder)
        raise CheckpointError(f"cannot read {folder} ({type(e).__name__}: {one_line(e)})") from None
    stored_leaves = {
        "/".join(str(k.key) for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(stored, is_leaf=lambda x: hasattr(x, "shape"))[0]
    }
    expected_leaves = {
        "/".join(str(k.key) for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]
    }
    if set(stored_leaves) != set(expected_leaves):
        odd = sorted(set(stored_leaves) ^ set(expected_leaves))[0]
        raise CheckpointError(f"{folder} does not hold the params its config describes (first difference: {odd})")
    for name, leaf in stored_leaves.items():
        if tuple(leaf.shape) != tuple(expected_leaves[name].shape):
            raise CheckpointError(
                f"{folder}: {name} is stored as {tuple(leaf.shape)} but the config implies "
                f"{tuple(expected_leaves[name].shape)}"
            )
        want = np.dtype(expected_leaves[name].dtype) if own_dtypes else dtype
        if want is not None and np.dtype(leaf.dtype) != want:
            raise CheckpointError(f"{folder}: {name} is stored as {np.dtype(leaf.dtype)}, config.json says {want}")


def restore_params(
    path: str | os.PathLike,
    config: ModelConfig,
    stored_dtype: str,
    dtype: str | None = None,
    mesh=None,
    quantization: dict[str, str] | None = None,
    quantize: quant.QuantFormat | None = None,
) -> dict:
    """The param tree as jax arrays, cast to `dtype` if given; with a mesh, each device reads only its shards.

    quantization: the checkpoint's quantized weights ({path: stored format}, from config.json); quantize: a format
    the float weights are quantized into as each param group is read (only one group is ever held in float).
    """
    return dict(restored_groups(path, config, stored_dtype, dtype, mesh, quantization, quantize))


def restored_groups(
    path: str | os.PathLike,
    config: ModelConfig,
    stored_dtype: str,
    dtype: str | None = None,
    mesh=None,
    quantization: dict[str, str] | None = None,
    quantize: quant.QuantFormat | None = None,
) -> Iterator[tuple[str, dict]]:
    """`restore_params` one param group at a time ("embed", "layers_0", ..., in that order): (group, subtree)."""
    params_dir = _params_dir(Path(path))
    if not params_dir.is_dir():
        raise CheckpointError(f"{path} has no params/ folder")
    quantization = quantization or {}
    stored = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, DTYPES[stored_dtype]), param_shapes(config))
    stored = quant.with_stored(stored, quantization, quant.stored_leaf_shapes)
    # Restore straight into device arrays (a sharding in the target): no host numpy copy on the way.
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, stored)
    else:
        shardings = param_shardings(config, mesh, quantization)
    target = jax.tree.map(
        lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), stored, shardings
    )
    checkpointer = ocp.StandardCheckpointer()
    kept_float = []
    cast = dtype is not None and DTYPES[dtype] != DTYPES[stored_dtype]
    for group, subtree in target.items():
        # One device: read the files directly (`jaxlora.stored_arrays`); a mesh: orbax, each device its shards.
        restored = _read_onto_device(params_dir / group, subtree) if mesh is None else None
        if restored is None:
            restored = _orbax_restored(checkpointer, params_dir / group, subtree)
        if quantize is not None:
            quantized, left = quant.quantize_tree({group: jax.tree.map(to_host, restored)}, quantize)
            kept_float += left
            restored = _placed(quantized, config, mesh)[group]
        if cast:
            restored = quant.map_floats(lambda a: a.astype(DTYPES[dtype]), restored)
        yield group, restored
        del restored
    if kept_float:
        log.info("left in float (their inputs do not split into groups of %s): %s", quantize.group, kept_float)


def _read_onto_device(folder: Path, subtree: dict) -> dict | None:
    """The group read by `jaxlora.stored_arrays` and put on the device of its target's shardings, the host copy
    let go at once; None: orbax restores it."""
    host = read_group(folder, subtree)
    return None if host is None else jax.tree.map(lambda a, s: jax.device_put(a, s.sharding), host, subtree)


def _orbax_restored(checkpointer, folder: Path, subtree: dict) -> dict:
    check_stored_group(folder, subtree, own_dtypes=True)
    try:
        with uninterrupted():  # Ctrl-C waits for orbax's reader threads: no traceback from them at exit
            return checkpointer.restore(folder, subtree)
    except Exception as e:  # noqa: BLE001 (orbax raises assorted types for damaged data)
        raise CheckpointError(f"cannot restore {folder} ({type(e).__name__}: {one_line(e)})") from None


def _placed(host_params: dict, config: ModelConfig, mesh) -> dict:
    """Host arrays (a partial param tree) onto the device, or into their shardings on `mesh`."""
    if mesh is None:
        return jax.tree.map(jax.numpy.asarray, host_params)
    shardings = param_shardings(config, mesh, quant.formats_of(host_params))
    return jax.tree.map(lambda a, s: put(a, s), host_params, {k: shardings[k] for k in host_params})


def describe(path: str | os.PathLike) -> list[tuple[str, Any]]:
    """A checkpoint folder's model as (property, value) rows: what `jaxlora info` prints."""
    config, meta = read_config(path)
    if not Path(path, "params").is_dir():
        raise CheckpointError(f"{path} has no params/ folder")
    size = sum(f.stat().st_size for f in Path(path, "params").rglob("*") if f.is_file())
    rope = config.rope
    rope_text = f"{rope.kind}, theta {rope.theta:g}"
    if rope.kind != "default":
        rope_text += f", factor {rope.factor:g}"
    if rope.original_max_position_embeddings:
        rope_text += f", original context {rope.original_max_position_embeddings}"
    return [
        ("architecture", config.family),
        ("source", meta.get("source", "")),
        ("parameters", f"{num_params(config):,}"),
        ("dtype", meta["dtype"]),
        ("size on disk", f"{size / 2**20:.1f} MiB"),
        ("layers", config.num_layers),
        ("hidden size", config.hidden_size),
        ("heads (q / kv)", f"{config.num_heads} / {config.num_kv_heads}"),
        ("head dim", config.head_dim),
        ("mlp size", config.intermediate_size),
        ("vocab", config.vocab_size),
        ("context", config.context_length or f"unbounded (dynamic NTK from {config.max_position_embeddings})"),
        ("rope", rope_text),
        ("tied embeddings", config.tie_word_embeddings),
        *param_group_rows(config, meta),
    ]


def param_group_rows(config: ModelConfig, meta: dict) -> list[tuple[str, str]]:
    """("params embed", "int8:32 31.9 MiB"), ("params layers (30)", "int4:32:min 72.0 MiB + float32 0.2 MiB"), ...:
    each param group's storage formats and bytes (the layers together), from the config alone."""
    formats = meta.get("quantization", {})
    totals: dict[str, dict[str, int]] = {}
    for keys, shape in flat_param_shapes(config).items():
        group = "layers" if keys[0].startswith("layers_") else keys[0]
        name = "/".join(keys)
        if name in formats:
            fmt = quant.parse_stored(formats[name])
            parts = quant.stored_shapes(shape, quant.layout_of(keys, shape), fmt)
            kind, size = fmt.name, sum(math.prod(p.shape) * np.dtype(p.dtype).itemsize for p in parts.values())
        else:
            kind, size = meta["dtype"], math.prod(shape) * DTYPES[meta["dtype"]].itemsize
        by_kind = totals.setdefault(group, {})
        by_kind[kind] = by_kind.get(kind, 0) + size
    rows = []
    for group, by_kind in totals.items():
        label = f"params {group}" + (f" ({config.num_layers})" if group == "layers" else "")
        rows.append((label, " + ".join(f"{kind} {size / 2**20:.1f} MiB" for kind, size in by_kind.items())))
    return rows


def tokenizer_folder(path: Path) -> TokenizerFolder | None:
    """The checkpoint's tokenizer folder, to be read when first used (None: the checkpoint has no tokenizer)."""
    tokenizer_dir = path / "tokenizer"
    if not tokenizer_dir.is_dir() or not any(tokenizer_dir.iterdir()):
        return None
    return TokenizerFolder(tokenizer_dir)


def read_tokenizer(tokenizer_dir: Path):
    """Read a tokenizer folder with transformers' AutoTokenizer; a damaged one is a `CheckpointError`."""
    from transformers import AutoTokenizer  # transformers is slow to import: only when a tokenizer is there

    try:
        return AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except Exception as e:  # noqa: BLE001 (tokenizers raise assorted types for damaged files)
        raise CheckpointError(
            f"cannot read the tokenizer in {tokenizer_dir} ({type(e).__name__}: {one_line(e)})"
        ) from None


def load(
    path: str | os.PathLike,
    dtype: str | None = None,
    mesh=None,
    attention: str = "auto",
    lora: str | None = None,
    compile_cache: bool | None = None,
    quantize: str | None = None,
    moe: str = "auto",
    scan_layers: bool | str = "auto",
) -> Model:
    """Load a converted checkpoint folder. dtype: cast params ("float32", "bfloat16", "float16"); None keeps.

    mesh: a `jax.sharding.Mesh` (see `jaxlora.sharding.make_mesh`) to restore the params directly into their
    shardings, each device reading only its own shard. attention: the attention implementation the returned
    config selects ("auto", "xla", "chunked", "cudnn", "splash"; see `jaxlora.attention`). lora: a jaxlora or
    PEFT adapter folder merged into the params once (generation then runs at the base model's speed).
    compile_cache: the persistent XLA compile cache (`jaxlora.compile_cache`), so a later process skips the
    compiles this one does: None (the default) turns it on unless JAXLORA_COMPILE_CACHE=off (or names a folder);
    False leaves the process as it is; True turns it on whatever the environment says.
    quantize: "int8" (per output channel) or "int4[:GROUP]" quantizes a float checkpoint's linear weights and
    embeddings as it loads (`jaxlora.quant`); a checkpoint converted with `--quantize` loads quantized as it is.
    moe: how a mixture's experts run ("auto", "dense", "gathered", "blocked", "ragged"; see `jaxlora.moe`).
    scan_layers: True runs the layers as `lax.scan`s over params stacked on load (`jaxlora.stacking`: compile
    time flat in depth), False one by one; "auto": scanned on TPU and for models of
    `jaxlora.stacking.AUTO_SCAN_MIN_LAYERS` layers or more. The returned config says which (`config.scan_layers`).
    """
    if dtype is not None and dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    check_impl(attention)
    if moe not in MOE_IMPLS:
        raise UsageError(f"unknown mixture-of-experts implementation {moe!r}; choose one of {', '.join(MOE_IMPLS)}")
    path = Path(path)
    config, meta = read_config(path)
    config = config.with_attention(attention).with_moe(moe).with_scan(stacking.resolve(scan_layers, config))
    if compile_cache:
        xla_cache.enable_unless_chosen()
    elif compile_cache is None:
        xla_cache.enable_by_default()
    quantization = meta.get("quantization", {})
    fmt = None if quantize is None else quant.parse_format(quantize)
    if fmt is not None and quantization:
        raise UsageError(f"{path} is already quantized ({sorted(set(quantization.values()))[0]}, ...)")
    groups = restored_groups(path, config, meta["dtype"], dtype, mesh, quantization, fmt)
    if lora is not None:
        adapters = load_adapters(lora, config.with_scan(False))
        groups = ((group, merged_group(group, subtree, adapters)) for group, subtree in groups)
    # Scanned: each layer goes into its stack as it is restored (the model is never held twice).
    params = stacking.stack_groups(groups, config) if config.scan_layers else dict(groups)
    generation_file = path / "generation_config.json"
    generation = {}
    if generation_file.is_file():
        try:
            generation = json.loads(generation_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{generation_file} is not valid JSON ({one_line(e)})") from None
        if not isinstance(generation, dict):
            raise CheckpointError(f"{generation_file} does not hold a JSON object")
    return Model(config, params, tokenizer_folder(path), generation, path)


def merged_group(group: str, subtree: dict, adapters: Adapters) -> dict:
    """One param group with the (per-layer) adapters that touch it merged in."""
    if group not in adapters.weights:
        return subtree
    return merge({group: subtree}, adapters.replace(weights={group: adapters.weights[group]}))[group]


def save_adapters(adapters: Adapters, folder: str | os.PathLike, base: str, force: bool = False) -> Path:
    """Write an adapter folder (lora_config.json naming the base checkpoint, adapters/), all or nothing."""
    folder = Path(folder)
    adapters = adapters.per_layer()  # on disk, one group per layer whatever the model's layout
    with staged(folder, force) as staging:
        meta = {**dataclasses.asdict(adapters.config), "base": base}
        (staging / "lora_config.json").write_text(json.dumps(meta, indent=2))
        checkpointer = ocp.StandardCheckpointer()
        # As host arrays: the saved adapters carry no mesh, so any device layout can read them back.
        with uninterrupted():
            checkpointer.save((staging / "adapters").absolute(), jax.tree.map(to_host, adapters.weights))
            checkpointer.wait_until_finished()
    return folder


def read_adapter_meta(folder: str | os.PathLike) -> tuple[LoraConfig, str | None]:
    """A jaxlora adapter folder's LoraConfig and the base checkpoint it names (None if it names none)."""
    meta_file = Path(folder) / "lora_config.json"
    if not meta_file.is_file():
        raise UsageError(f"{folder} is not a jaxlora adapter folder (no lora_config.json)")
    try:
        meta = json.loads(meta_file.read_text())
        config = LoraConfig(
            int(meta["rank"]),
            float(meta["alpha"]),
            tuple(str(t) for t in meta["targets"]),
            bool(meta.get("rslora", False)),
            float(meta.get("dropout", 0.0)),
        )
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # JSONDecodeError is a ValueError
        raise UsageError(f"{meta_file} is not a valid adapter config ({type(e).__name__}: {one_line(e)})") from None
    if config.rank < 1 or not config.targets:
        raise UsageError(f"{meta_file} declares rank {config.rank} and targets {list(config.targets)}")
    return config, meta.get("base") or None


def load_adapters(path: str | os.PathLike, config: ModelConfig) -> Adapters:
    """A jaxlora adapter folder (runs/NAME/final) or a PEFT adapter folder, for a model of `config` (laid out
    as its params are: stacked when it scans its layers)."""
    folder = Path(path)
    if (folder / "adapter_config.json").is_file():
        return import_peft(folder, config).laid_out_for(config)
    if not (folder / "lora_config.json").is_file():
        raise UsageError(f"{folder} holds neither jaxlora adapters (lora_config.json) nor a PEFT adapter")
    lora_config, _ = read_adapter_meta(folder)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    expected = adapter_shapes(lora_config, config)
    # Adapters made for another model, or a rank that disagrees with the arrays, fail here by name.
    check_stored_group(folder / "adapters", expected)
    target = jax.tree.map(lambda t: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=device), expected)
    try:
        with uninterrupted():
            weights = ocp.StandardCheckpointer().restore((folder / "adapters").absolute(), target)
    except Exception as e:  # noqa: BLE001 (orbax raises assorted types for damaged data)
        raise CheckpointError(f"cannot restore {folder / 'adapters'} ({type(e).__name__}: {one_line(e)})") from None
    return Adapters(jax.tree.map(jax.numpy.asarray, weights), lora_config).laid_out_for(config)


def adapters_to_peft(
    folder: str | os.PathLike, out: str | os.PathLike, base: str | None = None, force: bool = False
) -> Path:
    """`jaxlora lora export`: a jaxlora adapter folder -> a PEFT adapter folder. The base checkpoint is the one the
    adapters name, else `base`."""
    _, named = read_adapter_meta(folder)
    base = named or base
    if not base:
        raise UsageError("the adapters do not name their base checkpoint: pass --base CKPT")
    config, _ = read_config(base)
    return export_peft(load_adapters(folder, config), config, out, base_model=base, force=force)


def peft_to_adapters(peft_dir: str | os.PathLike, out: str | os.PathLike, base: str, force: bool = False) -> Path:
    """`jaxlora lora import`: a PEFT adapter folder -> a jaxlora adapter folder for the converted `base`."""
    config, _ = read_config(base)
    return save_adapters(import_peft(peft_dir, config), out, base, force=force)
