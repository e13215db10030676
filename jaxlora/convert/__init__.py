"""Conversion of an HF checkpoint (safetensors, sharded, .bin, .pth + config, GGUF, hub id) to a jaxlora one.

The output folder holds `config.json` (ours), `hf_config.json` (the source's), `generation_config.json`,
`tokenizer/`, and `params/` (an orbax checkpoint). It is written under a temporary name beside DST and renamed
at the end, so a failed or interrupted conversion never leaves a half checkpoint at DST.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from jaxlora import quant
from jaxlora.checkpoint import DTYPES, save_param_group, write_config
from jaxlora.config import ModelConfig
from jaxlora.convert.gguf import GGUFFile
from jaxlora.convert.readers import (
    MXFP4Experts,
    SafetensorsReader,
    TensorReader,
    TorchPickleReader,
    shard_files,
)
from jaxlora.errors import ConversionError, UsageError
from jaxlora.families import (
    canonical_name,
    config_from_hf,
    family_for,
    ignored_pattern,
    param_from_hf,
    tensor_plan,
)
from jaxlora.families.table import TRANSPOSE
from jaxlora.model import flat_param_shapes, set_path
from jaxlora.staging import check_destination, check_replaceable, staged

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
DEFAULT_CHECKPOINTS = Path("checkpoints")
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "merges.txt", "*.jinja"]


@dataclass
class Source:
    """What a conversion reads: the HF config, how to open the tensors, and how to obtain the tokenizer.

    The tensors open only after the config is accepted, so an unsupported model fails before any heavy I/O.
    """

    hf_config: dict[str, Any]
    open_reader: Callable[[], TensorReader]
    tokenizer_files: list[Path] = field(default_factory=list)
    write_tokenizer: Callable[[Path], None] | None = None
    generation_config: dict[str, Any] | None = None


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ConversionError(f"missing {what}: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path} does not hold a JSON object")
    return data


def _weights_reader(folder: Path) -> TensorReader:
    if (folder / "model.safetensors.index.json").is_file():
        return MXFP4Experts(SafetensorsReader(shard_files(folder, "model.safetensors.index.json")))
    if (folder / "model.safetensors").is_file():
        return MXFP4Experts(SafetensorsReader([folder / "model.safetensors"]))
    if (folder / "pytorch_model.bin.index.json").is_file():
        return TorchPickleReader(shard_files(folder, "pytorch_model.bin.index.json"))
    if (folder / "pytorch_model.bin").is_file():
        return TorchPickleReader([folder / "pytorch_model.bin"])
    raise ConversionError(
        f"no weights in {folder} (looked for model.safetensors[.index.json], pytorch_model.bin[.index.json])"
    )


def _folder_source(folder: Path) -> Source:
    hf_config = _read_json(folder / "config.json", "config.json")
    generation = folder / "generation_config.json"
    return Source(
        hf_config=hf_config,
        open_reader=lambda: _weights_reader(folder),
        tokenizer_files=[folder / name for name in TOKENIZER_FILES if (folder / name).is_file()],
        generation_config=_read_json(generation, "generation config") if generation.is_file() else None,
    )


def _gguf_source(path: Path) -> Source:
    gguf = GGUFFile(path)
    hf_config = gguf.hf_config()
    generation = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf_config}
    return Source(hf_config, lambda: gguf, write_tokenizer=gguf.write_tokenizer, generation_config=generation)


def _file_source(path: Path, config_path: str | None) -> Source:
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        return _gguf_source(path)
    readers = {
        ".safetensors": SafetensorsReader,
        ".bin": TorchPickleReader,
        ".pth": TorchPickleReader,
        ".pt": TorchPickleReader,
    }
    if suffix not in readers:
        raise ConversionError(
            f"unrecognized source {path}: expected a model folder, .safetensors, .bin, .pth/.pt or .gguf"
        )
    config_file = Path(config_path) if config_path else path.parent / "config.json"
    if config_path and not config_file.is_file():
        raise ConversionError(f"--config {config_path}: no such file")
    if not config_file.is_file():
        raise ConversionError(f"{path.name} is a bare state dict: pass its HF config.json with --config")
    folder = path.parent
    return Source(
        hf_config=_read_json(config_file, "config"),
        open_reader=lambda: readers[suffix]([path]),
        tokenizer_files=[folder / name for name in TOKENIZER_FILES if (folder / name).is_file()],
    )


def _looks_like_hub_id(src: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", src) is not None and not src.startswith((".", "/"))


def _hub_source(repo_id: str) -> Source:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ConversionError(f"{repo_id} is not a local path (install huggingface_hub to fetch it)") from None
    try:
        folder = snapshot_download(repo_id, allow_patterns=HUB_PATTERNS)
    except Exception as e:  # network and auth failures come in many types
        raise ConversionError(f"{repo_id} is neither a local path nor a reachable hub model ({e})") from None
    return _folder_source(Path(folder))


def open_source(src: str, config_path: str | None = None) -> Source:
    path = Path(src)
    if path.is_dir():
        if config_path:
            raise UsageError("--config is only for a bare state-dict file; a folder brings its config.json")
        return _folder_source(path)
    if path.is_file():
        return _file_source(path, config_path)
    if _looks_like_hub_id(src):
        return _hub_source(src)
    raise ConversionError(f"no such file or folder: {src}")


def _list(names) -> str:
    names = sorted(names)
    shown = ", ".join(names[:6])
    return shown + (f" (and {len(names) - 6} more)" if len(names) > 6 else "")


class CanonicalNames(TensorReader):
    """A reader seen through the family's renames (e.g. GPT-2 checkpoints without the `transformer.` prefix)."""

    def __init__(self, reader: TensorReader, config: ModelConfig, drop: Collection[str] = ()):
        self._reader = reader
        self._source = {canonical_name(config, n): n for n in reader.names()}
        for name in drop:
            del self._source[name]

    def names(self) -> list[str]:
        return list(self._source)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._reader.shape(self._source[name])

    def get(self, name: str) -> np.ndarray:
        return self._reader.get(self._source[name])

    def get_kept(self, name: str) -> dict | None:
        get_kept = getattr(self._reader, "get_kept", None)
        return None if get_kept is None else get_kept(self._source[name])

    def type_name(self, name: str) -> str:
        return getattr(self._reader, "type_name", lambda _: "float")(self._source[name])

    def close(self) -> None:
        self._reader.close()


def extra_layer_tensors(names: list[str], config: ModelConfig) -> dict[str, int]:
    """{tensor name: its layer} for the tensors of layers past num_layers that the family drops (DeepSeek-V3's
    multi-token prediction); none for families that refuse them."""
    if not family_for(config.family).extra_layers_note:
        return {}
    layer_of = {n: int(m.group(1)) for n in names if (m := re.match(r"model\.layers\.(\d+)\.", n))}
    return {n: layer for n, layer in layer_of.items() if layer >= config.num_layers}


def check_sizes(reader: TensorReader, config: ModelConfig) -> None:
    """The config's layer count and embedding size against the tensors actually present (from the headers, before
    anything is planned or read): an edited or hostile config fails here instead of allocating what it claims."""
    layers = {int(m.group(1)) for n in reader.names() if (m := re.search(r"\.(\d+)\.", n))}
    if layers != set(range(config.num_layers)):
        raise ConversionError(
            f"the config says {config.num_layers} layers but the checkpoint has tensors for {len(layers)}"
        )
    embedding = next(item for item in tensor_plan(config) if item.param_path == ("embed", "embedding"))
    name = embedding.hf_names[0]
    if name in reader.names():
        want, got = (config.vocab_size, config.hidden_size), reader.shape(name)
        if got != want:
            raise ConversionError(f"tensor {name} is {got}, but the config implies (vocab, hidden) = {want}")


def check_names(reader: TensorReader, config: ModelConfig) -> None:
    """Every tensor the config needs is there, and nothing else is (before any tensor is read)."""
    names = reader.names()
    needed = list(dict.fromkeys(n for item in tensor_plan(config, set(names)) for n in item.hf_names))
    ignored = ignored_pattern(config)
    present = set(names)
    missing = [n for n in needed if n not in present]
    unexpected = [n for n in names if n not in set(needed) and not ignored.fullmatch(n)]
    if missing:
        raise ConversionError(f"checkpoint is missing {len(missing)} tensor(s): {_list(missing)}")
    if unexpected:
        raise ConversionError(f"checkpoint has {len(unexpected)} unexpected tensor(s): {_list(unexpected)}")


KEEP = "keep"


def kept_blocks(reader: TensorReader, item, layout: str | None) -> dict | None:
    """A GGUF tensor's blocks re-laid as the quantized param (`--quantize keep`), or None where it cannot be kept:
    a reader without blocks, a float or rare tensor type, or a param that is more than its tensor transposed."""
    get_kept = getattr(reader, "get_kept", None)
    plain = (layout == quant.KERNEL and item.transform == TRANSPOSE) or (
        layout == quant.EMBEDDING and not item.transform
    )
    if get_kept is None or not plain or item.stacked or len(item.hf_names) != 1:
        return None
    return get_kept(item.hf_names[0])


def convert_groups(
    reader: TensorReader,
    config: ModelConfig,
    dtype: str,
    progress: bool = False,
    quantize: str | None = None,
    notes: list[str] | None = None,
) -> Iterator[tuple[str, dict]]:
    """Read, place, check and cast the tensors one param group at a time (embed, layers_0, ..., lm_head).

    Yields (group name, subtree of numpy arrays), so the caller can write each group and let it go: memory
    holds one group, not the model. quantize: a format ("int8", "int4:64", see `jaxlora.quant.parse_format`)
    for the linear weights and embeddings, or "keep" for a GGUF source's quantized blocks as they are; the
    tensors left in float are named in `notes`.
    """
    fmt = None if quantize in (None, KEEP) else quant.parse_format(quantize)
    notes = [] if notes is None else notes
    check_sizes(reader, config)
    check_names(reader, config)
    plan = tensor_plan(config, set(reader.names()))
    shapes = flat_param_shapes(config)
    assert sorted(p.param_path for p in plan) == sorted(shapes), "family table and decoder disagree"
    target = DTYPES[dtype]
    by_group: dict[str, list] = {}
    for item in plan:
        by_group.setdefault(item.param_path[0], []).append(item)
    last_name, last_array = None, None  # a fused tensor feeds consecutive params: read it once
    with tqdm(total=len(plan), desc="converting", unit="tensor", disable=not progress) as bar:
        for group, items in by_group.items():
            subtree: dict = {}
            for item in items:
                expected = shapes[item.param_path]
                layout = quant.layout_of(item.param_path, expected)
                if quantize == KEEP and layout is not None:
                    kept = kept_blocks(reader, item, layout)
                    if kept is not None:
                        want = quant.stored_shapes(expected, layout, quant.format_of(kept))
                        if {k: v.shape for k, v in kept.items()} != {k: v.shape for k, v in want.items()}:
                            raise ConversionError(f"tensor {item.hf_names[0]} does not fit {'/'.join(item.param_path)}")
                        set_path(subtree, item.param_path[1:], kept)
                        bar.update()
                        continue
                    type_name = getattr(reader, "type_name", lambda _: "float")(item.hf_names[0])
                    notes.append(f"{item.hf_names[0]} ({type_name}) converted to {dtype}")
                parts = []
                for name in item.hf_names:
                    if name != last_name:
                        last_name, last_array = name, reader.get(name)
                    parts.append(param_from_hf(item, last_array, config))
                array = np.stack(parts) if item.stacked else parts[0]
                if array.shape != expected:
                    raise ConversionError(
                        f"tensor {item.hf_names[0]} gives {'/'.join(item.param_path)} the shape {tuple(array.shape)} "
                        f"but the config implies {expected}"
                    )
                own = None if fmt is None or layout is None else quant.format_for(item.param_path, layout, fmt)
                if own is not None and quant.fits(own, quant.rows_cols(array.shape, layout)[1]):
                    set_path(subtree, item.param_path[1:], quant.quantize_rows(quant.to_rows(array, layout), own))
                else:
                    if fmt is not None and layout is not None:
                        notes.append(
                            f"{'/'.join(item.param_path)} kept in {dtype} (its inputs do not split into {fmt.name})"
                        )
                    set_path(subtree, item.param_path[1:], np.ascontiguousarray(array.astype(target)))
                bar.update()
            yield group, subtree


def default_dst(src: str) -> Path:
    """Where `jaxlora convert SRC` writes without a DST: checkpoints/<SRC's name without its extension>."""
    name = Path(src.rstrip("/")).name
    for suffix in (".gguf", ".safetensors", ".bin", ".pth", ".pt"):
        name = name.removesuffix(suffix)
    return DEFAULT_CHECKPOINTS / name


def convert(
    src: str,
    dst: str | os.PathLike,
    *,
    dtype: str = "float32",
    config_path: str | None = None,
    force: bool = False,
    progress: bool = False,
    quantize: str | None = None,
    report: Callable[[str], None] | None = None,
) -> Path:
    """Convert SRC into a jaxlora checkpoint folder DST; returns DST.

    quantize: "int8", "int4[:GROUP]" (`jaxlora.quant`), or "keep" for a GGUF source's quantized blocks as they
    are; report(line) hears which tensors stayed in float."""
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if quantize not in (None, KEEP):
        quant.parse_format(quantize)
    if quantize == KEEP and not str(src).lower().endswith(".gguf"):
        raise UsageError("--quantize keep keeps a GGUF file's quantized blocks: SRC must be a .gguf file")
    dst = Path(dst)
    check_destination(dst)
    check_replaceable(dst, force)  # before any heavy reading
    source = open_source(src, config_path)
    config = config_from_hf(source.hf_config)
    notes: list[str] = []
    reader = CanonicalNames(source.open_reader(), config)
    extra = extra_layer_tensors(reader.names(), config)
    if extra:
        layers = sorted({layer for layer in extra.values()})
        notes.append(family_for(config.family).extra_layers_note.format(layers=layers, count=len(extra)))
        reader = CanonicalNames(reader, config, drop=extra)
    quantization: dict[str, str] = {}
    try:
        with staged(dst, force) as staging:
            for group, subtree in convert_groups(reader, config, dtype, progress, quantize, notes):
                quantization.update(quant.formats_of({group: subtree}))
                save_param_group(staging, group, subtree)
            reader.close()
            tokenizer_dir = staging / "tokenizer"
            tokenizer_dir.mkdir()
            for file in source.tokenizer_files:
                shutil.copy2(file, tokenizer_dir / file.name)
            if source.write_tokenizer is not None:
                source.write_tokenizer(tokenizer_dir)
            (staging / "hf_config.json").write_text(json.dumps(source.hf_config, indent=2))
            if source.generation_config is not None:
                (staging / "generation_config.json").write_text(json.dumps(source.generation_config, indent=2))
            write_config(staging, config, dtype=dtype, source=str(src), quantization=quantization)
    finally:
        reader.close()
    if report is not None:
        if quantization:
            kinds = sorted(set(quantization.values()))
            report(f"quantized {len(quantization)} weights ({', '.join(kinds)})")
        for line in notes:
            report(line)
    return dst
