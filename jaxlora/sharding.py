"""Placing a model on a device mesh: a mesh from a spec string, one small table from logical axes to mesh axes.

Params declare their logical axes where the decoder defines them (`model.logical_axes`); nothing else knows
about the mesh. Megatron-style tensor parallelism splits attention heads and the MLP over `tensor`, FSDP splits
the embedding dimension over `fsdp`, a mixture's experts split over `expert` (expert parallelism), and batches
split over `data`. An axis that does not divide evenly (9 query
heads over 4 devices, as in SmolLM2) is replicated instead, with a logged note.
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlora import quant
from jaxlora.cache import entry_shapes
from jaxlora.config import ModelConfig
from jaxlora.errors import UsageError
from jaxlora.model import logical_axes, param_shapes

log = logging.getLogger("jaxlora.sharding")

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# logical axis -> mesh axis (None: replicated)
RULES: dict[str, str | None] = {
    "batch": "data",
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "experts": "expert",
    "head_dim": None,
    "norm": None,
    "positions": None,
    "cache_len": None,
}


def parse_mesh_spec(spec: str, device_count: int) -> dict[str, int]:
    """ "data=2,fsdp=1,tensor=4" -> sizes per mesh axis; one axis may be -1 (the rest); missing axes are 1."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    rest = None
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in sizes or not value.strip().lstrip("-").isdigit():
            raise UsageError(f"bad mesh spec {spec!r}: expected name=size with names {', '.join(MESH_AXES)}")
        size = int(value)
        if size == -1:
            if rest is not None:
                raise UsageError(f"bad mesh spec {spec!r}: only one axis may be -1")
            rest = name
        elif size < 1:
            raise UsageError(f"bad mesh spec {spec!r}: sizes must be >= 1 (or -1 for the rest)")
        else:
            sizes[name] = size
    fixed = math.prod(v for k, v in sizes.items() if k != rest)
    if rest is not None:
        if device_count % fixed:
            raise UsageError(f"mesh {spec!r}: {device_count} devices do not divide by {fixed}")
        sizes[rest] = device_count // fixed
    if math.prod(sizes.values()) != device_count:
        raise UsageError(f"mesh {spec!r} has {math.prod(sizes.values())} devices but {device_count} are available")
    return sizes


def make_mesh(spec: str | dict[str, int], devices=None) -> Mesh:
    """A mesh over `devices` (default: all, across processes) with axes data, fsdp, expert, tensor."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices)) if isinstance(spec, str) else {**dict.fromkeys(MESH_AXES, 1), **spec}
    shape = tuple(sizes[a] for a in MESH_AXES)
    if math.prod(shape) != len(devices):
        raise UsageError(f"mesh {sizes} needs {math.prod(shape)} devices, {len(devices)} given")
    # Auto axes: XLA propagates shardings from the params and inputs (no per-op annotations needed).
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def start_distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """Join a multi-process run (jax.distributed). With no arguments JAX reads the cluster from the environment
    (TPU pods, SLURM, ...). CPU processes talk through gloo (it only concerns the CPU backend)."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    except Exception as e:  # noqa: BLE001 (the cluster probes raise assorted types)
        raise UsageError(f"could not start jax.distributed ({' '.join(str(e).split())})") from None


def is_primary() -> bool:
    """Whether this is process 0 of the run (the one that prints)."""
    return jax.process_index() == 0


def _units(logical: str, size: int, config: ModelConfig) -> int:
    """How many indivisible units a dimension holds: whole heads for a head axis that spans them (a weight's heads x
    head_dim, or the cache's heads), else elements (a quantized weight's packed or grouped head axis among them)."""
    heads = {"heads": config.num_heads, "kv_heads": config.num_kv_heads}.get(logical)
    widths = {1, config.head_dim, config.value_dim, config.head_dim - config.rope_dim + config.value_dim}
    if heads is not None and size in {heads * w for w in widths}:
        return heads
    return size


def spec_for(
    names: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh, config: ModelConfig, where: str = ""
) -> PartitionSpec:
    """Logical names of one array -> its PartitionSpec on `mesh`, replicating axes that do not divide."""
    axes = []
    for name, size in zip(names, shape, strict=True):
        mesh_axis = RULES.get(name) if name else None
        if mesh_axis is None or mesh.shape[mesh_axis] == 1 or mesh_axis in axes:
            axes.append(None)
            continue
        n = mesh.shape[mesh_axis]
        if _units(name, size, config) % n:
            log.info(
                "%s: %s (%d) does not split over %s=%d; replicated",
                where,
                name,
                _units(name, size, config),
                mesh_axis,
                n,
            )
            axes.append(None)
            continue
        axes.append(mesh_axis)
    return PartitionSpec(*axes)


def param_shardings(config: ModelConfig, mesh: Mesh, quantization: dict[str, str] | None = None) -> dict:
    """The NamedSharding of every param (same tree as the params). quantization: {param path: stored format} of the
    quantized weights (`jaxlora.quant.formats_of`): their values, scales and minimums follow the weight's axes."""

    def one(path, names, shape):
        where = "/".join(str(getattr(k, "key", k)) for k in path)
        return NamedSharding(mesh, spec_for(tuple(names), shape.shape, mesh, config, where))

    axes, shapes = logical_axes(config), param_shapes(config)
    if quantization:
        axes = quant.with_stored(
            axes,
            quantization,
            lambda _, names, layout, fmt: {
                k: PartitionSpec(*v) for k, v in quant.stored_axes(names, layout, fmt).items()
            },
        )
        shapes = quant.with_stored(shapes, quantization, quant.stored_leaf_shapes)
    return jax.tree_util.tree_map_with_path(one, axes, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))


def params_mesh(params: dict) -> Mesh | None:
    """The mesh params live on, or None for params on one device."""
    sharding = getattr(jax.tree.leaves(params)[0], "sharding", None)
    return sharding.mesh if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1 else None


class DecodeLayout(NamedTuple):
    """Where generation's arrays live on a mesh (static: part of the compiled functions' identity)."""

    batch: NamedSharding  # [batch, ...] arrays
    cache_kv: NamedSharding  # [batch, max_len, kv_heads, head_dim]
    cache_valid: NamedSharding  # [batch, max_len]
    replicated: NamedSharding


def decode_layout(mesh: Mesh, config: ModelConfig, batch: int) -> DecodeLayout:
    batch_spec = spec_for(("batch",), (batch,), mesh, config, "batch")
    b = batch_spec[0] if len(batch_spec) else None
    (heads, width), _ = entry_shapes(config)  # keys and values have as many heads (one latent's, in MLA)
    kv = spec_for(
        ("batch", "cache_len", "kv_heads", "head_dim"),
        (batch, 1, heads, width),
        mesh,
        config,
        "kv cache",
    )
    return DecodeLayout(
        batch=NamedSharding(mesh, PartitionSpec(b)),
        cache_kv=NamedSharding(mesh, kv),
        cache_valid=NamedSharding(mesh, PartitionSpec(b, None)),
        replicated=NamedSharding(mesh, PartitionSpec()),
    )


def put(value, sharding: NamedSharding) -> jax.Array:
    """A host value (the same on every process) as a global array with `sharding`."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def to_host(x: jax.Array) -> np.ndarray:
    """A (possibly multi-process) array as numpy on every process."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def replicate(tree, mesh: Mesh):
    """Every leaf of a (small) pytree copied to every device of the mesh: LoRA adapters, optimizer state."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: put(x, replicated), tree)


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """A training batch [grad_accum, batch, seq] with its batch axis over `data` (replicated if it does not divide)."""

    def one(x):
        rows = x.shape[1]
        axis = "data" if mesh.shape["data"] > 1 and rows % mesh.shape["data"] == 0 else None
        return put(x, NamedSharding(mesh, PartitionSpec(None, axis)))

    return {k: one(v) for k, v in batch.items()}
