"""The jaxlora checkpoint folder: our config.json, the params as an orbax checkpoint, tokenizer files.

DST/config.json            {"format": "jaxlora", "format_version": 1, "model": ModelConfig, "dtype": ...}
DST/hf_config.json         the source's HF config, verbatim
DST/generation_config.json eos/bos/pad ids and sampling defaults from the source, when it had them
DST/tokenizer/             HF tokenizer files
DST/params/<group>/        one orbax checkpoint per top-level param group (embed, layers_0, ..., lm_head)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

from jaxlora.config import ModelConfig
from jaxlora.errors import CheckpointError, ConfigError, UsageError

FORMAT_VERSION = 1
DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}


@dataclass
class Model:
    """A loaded checkpoint: `params` (nested dict of jax arrays), its `config`, and its `tokenizer` (or None)."""

    config: ModelConfig
    params: dict
    tokenizer: Any = None
    generation_config: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

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


def write_config(path: Path, config: ModelConfig, *, dtype: str, source: str = "") -> None:
    meta = {
        "format": "jaxlora",
        "format_version": FORMAT_VERSION,
        "model": config.to_dict(),
        "dtype": dtype,
        "source": source,
    }
    (path / "config.json").write_text(json.dumps(meta, indent=2))


def save_param_group(path: Path, group: str, subtree: dict) -> None:
    """Write one top-level param group (`embed`, `layers_3`, ...) as its own orbax checkpoint params/<group>.

    One checkpoint per group lets conversion stream: only one group is ever in memory, plus orbax's copy of it.
    Uncompressed, since zstd costs another copy during the write and slows every load while float weights
    barely compress.
    """
    import orbax.checkpoint as ocp

    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False))
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
    try:
        return ModelConfig.from_dict(meta["model"]), meta
    except (ConfigError, TypeError, KeyError) as e:
        raise CheckpointError(f"{config_file} holds an invalid model config ({e})") from None


def restore_params(
    path: str | os.PathLike, config: ModelConfig, stored_dtype: str, dtype: str | None = None, mesh=None
):
    """The param tree as jax arrays, cast to `dtype` if given; with a mesh, each device reads only its shards."""
    import orbax.checkpoint as ocp

    from jaxlora.model import param_shapes

    params_dir = _params_dir(Path(path))
    if not params_dir.is_dir():
        raise CheckpointError(f"{path} has no params/ folder")
    # Restore straight into device arrays (a sharding in the target): no host numpy copy on the way.
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, param_shapes(config))
    else:
        from jaxlora.sharding import param_shardings

        shardings = param_shardings(config, mesh)
    target = jax.tree.map(
        lambda s, sharding: jax.ShapeDtypeStruct(s.shape, DTYPES[stored_dtype], sharding=sharding),
        param_shapes(config),
        shardings,
    )
    checkpointer = ocp.StandardCheckpointer()
    params = {}
    for group, subtree in target.items():
        try:
            params[group] = checkpointer.restore(params_dir / group, subtree)
        except Exception as e:  # orbax raises assorted types for damaged or mismatched checkpoints
            raise CheckpointError(f"cannot restore {params_dir / group} ({type(e).__name__}: {e})") from None
    if dtype is None or DTYPES[dtype] == DTYPES[stored_dtype]:
        return params
    return jax.tree.map(lambda a: a.astype(DTYPES[dtype]), params)


def load_tokenizer(path: Path):
    tokenizer_dir = path / "tokenizer"
    if not tokenizer_dir.is_dir() or not any(tokenizer_dir.iterdir()):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def load(path: str | os.PathLike, dtype: str | None = None, mesh=None, attention: str = "auto") -> Model:
    """Load a converted checkpoint folder. dtype: cast params ("float32", "bfloat16", "float16"); None keeps.

    mesh: a `jax.sharding.Mesh` (see `jaxlora.sharding.make_mesh`) to restore the params directly into their
    shardings, each device reading only its own shard. attention: the attention implementation the returned
    config selects ("auto", "xla", "chunked", "cudnn", "splash"; see `jaxlora.attention`).
    """
    from jaxlora.attention import check_impl

    if dtype is not None and dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    check_impl(attention)
    path = Path(path)
    config, meta = read_config(path)
    config = config.with_attention(attention)
    params = restore_params(path, config, meta["dtype"], dtype, mesh)
    generation_file = path / "generation_config.json"
    generation = json.loads(generation_file.read_text()) if generation_file.is_file() else {}
    return Model(config, params, load_tokenizer(path), generation, path)
