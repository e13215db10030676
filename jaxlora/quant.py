"""Quantized weights that stay quantized: integer values plus per-group scales (and minimums), as a plain dict.

A quantized weight is a dict in the param tree where a float array would be:

    {"values": int8 [rows, cols] | uint8 [rows, cols // 2] (two 4-bit values a byte, low nibble first),
     "scale":  float32 [rows, groups],
     "min":    float32 [rows, groups]}     (asymmetric formats only)

and stands for w[r, c] = values[r, c] * scale[r, c // group] (+ min[r, c // group]). Rows are output channels
and cols the contraction axis, for every quantized weight: a linear kernel [in, out] is stored transposed
([out, in], the HF and GGUF layout) and an embedding table [vocab, hidden] as it is, so a tied embedding serves
the lookup (rows) and the head (x @ w.T) from the same numbers. Everything about the format (bits, group, offset)
is in the dtypes and shapes, so jit, sharding, orbax and `jax.tree` treat the dict like any other params.

The weight is dequantized inside the jitted computation (`matmul`, `take_rows`), never stored in float (a
decode loop over several sequences holds a float copy while it runs: `for_decode_loop`).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.errors import UsageError

INT4_DEFAULT_GROUP = 64


@dataclass(frozen=True)
class QuantFormat:
    """bits: 8 (int8 values) or 4 (nibbles, packed two a byte: unsigned 0..15 with an offset, else signed
    -8..7); group: contraction elements per scale (None: one scale per row, i.e. per output channel); offset: a
    per-group minimum is added after scaling."""

    bits: int
    group: int | None
    offset: bool

    @property
    def name(self) -> str:
        return f"int{self.bits}" + (f":{self.group}" if self.group else "") + (":min" if self.offset else "")


FORMAT_PATTERN = re.compile(r"int(8|4)(?::(\d+))?(:min)?")


def parse_format(text: str) -> QuantFormat:
    """ "int8" (symmetric, per output channel), "int8:GROUP", "int4" / "int4:GROUP" (asymmetric, scale and min per
    group of GROUP inputs, 64 by default); the stored names add ":min" where a minimum is kept."""
    match = FORMAT_PATTERN.fullmatch(text.strip())
    if not match:
        raise UsageError(f"unknown quantization {text!r}: use int8, int8:GROUP, int4 or int4:GROUP")
    bits = int(match.group(1))
    group = int(match.group(2)) if match.group(2) else (INT4_DEFAULT_GROUP if bits == 4 else None)
    if group is not None and (group < 2 or group % 2):
        raise UsageError(f"quantization group {group} must be an even number of at least 2")
    return QuantFormat(bits, group, offset=bits == 4 or bool(match.group(3)))


def is_quantized(x) -> bool:
    return isinstance(x, Mapping) and "values" in x and "scale" in x  # flax hands params over as FrozenDicts


def format_of(q: dict) -> QuantFormat:
    """The format a quantized weight's arrays imply."""
    bits = 4 if q["values"].dtype == jnp.uint8 else 8
    groups = q["scale"].shape[-1]
    return QuantFormat(bits, None if groups == 1 else columns(q) // groups, "min" in q)


def columns(q: dict) -> int:
    """The contraction length of a quantized weight (its float shape's last axis, in the stored layout)."""
    return q["values"].shape[-1] * (2 if q["values"].dtype == jnp.uint8 else 1)


# Which params may be quantized, and how their float layout maps onto rows x cols.
KERNEL, EMBEDDING, EXPERTS = "kernel", "embedding", "experts"


def layout_of(path: tuple[str, ...], shape: tuple[int, ...]) -> str | None:
    """KERNEL for a linear kernel [in, out] (stored transposed), EMBEDDING for the token embedding table, EXPERTS
    for a mixture's stacked expert kernels [experts, in, out] (each stored transposed), None for params that stay
    float (norms, biases, position tables, the MoE router)."""
    if path == ("embed", "embedding"):
        return EMBEDDING
    if "moe" in path and path[-1] in ("gate", "up", "down") and len(shape) == 3:
        return EXPERTS
    if path[-1] == "kernel" and len(shape) == 2 and "router" not in path:
        return KERNEL
    return None


def format_for(path: tuple[str, ...], layout: str, fmt: QuantFormat) -> QuantFormat:
    """The format a weight takes when a model is quantized to `fmt`: the token embedding and the LM head stay
    int8 under a 4-bit format (as llama.cpp's 4-bit files keep them at 6 or 8 bits): every logit and every input
    passes through them, and 4 bits there costs far more quality than it saves bytes."""
    if fmt.bits == 4 and (layout == EMBEDDING or path[0] == "lm_head"):
        return QuantFormat(8, None, False)
    return fmt


def fits(fmt: QuantFormat, cols: int) -> bool:
    """Whether a weight with `cols` contraction elements can take this format (whole groups, whole bytes)."""
    if fmt.group is not None and cols % fmt.group:
        return False
    return fmt.bits == 8 or cols % 2 == 0


def rows_cols(shape: tuple[int, ...], layout: str) -> tuple[int, int]:
    """(output channels, contraction length) of a float param of `shape`."""
    return (shape[-2], shape[-1]) if layout == EMBEDDING else (shape[-1], shape[-2])


def stored_shapes(shape: tuple[int, ...], layout: str, fmt: QuantFormat) -> dict:
    """The arrays (ShapeDtypeStruct) a float param of `shape` is stored as in format `fmt`."""
    rows, cols = rows_cols(shape, layout)
    lead = tuple(shape[:-2])  # the experts of a stacked kernel
    groups = 1 if fmt.group is None else cols // fmt.group
    values = (
        jax.ShapeDtypeStruct((*lead, rows, cols), jnp.int8)
        if fmt.bits == 8
        else jax.ShapeDtypeStruct((*lead, rows, cols // 2), jnp.uint8)
    )
    parts = {"values": values, "scale": jax.ShapeDtypeStruct((*lead, rows, groups), jnp.float32)}
    if fmt.offset:
        parts["min"] = jax.ShapeDtypeStruct((*lead, rows, groups), jnp.float32)
    return parts


def stored_leaf_shapes(_path, leaf, layout: str, fmt: QuantFormat) -> dict:
    """`stored_shapes` for `with_stored`: the float leaf's own shape, the parts in its float dtype's place."""
    return stored_shapes(leaf.shape, layout, fmt)


def stored_axes(axes: tuple, layout: str, fmt: QuantFormat) -> dict:
    """The logical axes of each stored array: the float param's, in rows x cols order (scales follow their rows
    and their groups along the cols)."""
    rows_cols = tuple(axes) if layout == EMBEDDING else (*axes[:-2], axes[-1], axes[-2])
    parts = {"values": rows_cols, "scale": rows_cols}
    if fmt.offset:
        parts["min"] = rows_cols
    return parts


# --- quantizing (numpy, one tensor at a time: conversion streams) ---


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """[..., cols] values 0..15 (or -8..7, as two's complement) -> [..., cols // 2] uint8, element 2k in the low
    nibble, 2k + 1 in the high."""
    q = q.astype(np.uint8) & np.uint8(15)
    return q[..., 0::2] | (q[..., 1::2] << np.uint8(4))


def unpack_nibbles(packed, signed: bool = False):
    """The inverse of `pack_nibbles` (numpy or jax): uint8 0..15, or int8 -8..7 when signed."""
    xp = jnp if isinstance(packed, jax.Array) else np
    low, high = packed & 15, packed >> 4
    values = xp.stack([low, high], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    if signed:
        values = values.astype(xp.int8)
        values = xp.where(values > 7, values - 16, values).astype(xp.int8)
    return values


def quantize_rows(w: np.ndarray, fmt: QuantFormat) -> dict:
    """A float [..., rows, cols] weight (rows: output channels) -> its quantized arrays.

    int8: symmetric, scale = max|w| / 127 per group. int4: asymmetric, scale = (max - min) / 15 and min per group.
    Each element is within scale / 2 of its original (plus float rounding).
    """
    if w.ndim > 2:  # stacked experts: quantize as one tall matrix, then give back the leading axes
        flat = quantize_rows(w.reshape(-1, w.shape[-1]), fmt)
        return {k: v.reshape(*w.shape[:-2], w.shape[-2], v.shape[-1]) for k, v in flat.items()}
    rows, cols = w.shape
    group = cols if fmt.group is None else fmt.group
    g = np.asarray(w, np.float32).reshape(rows, cols // group, group)
    if fmt.bits == 8 and not fmt.offset:
        scale = np.abs(g).max(axis=-1) / np.float32(127)
        safe = np.where(scale == 0, np.float32(1), scale)
        values = np.clip(np.round(g / safe[..., None]), -127, 127).astype(np.int8).reshape(rows, cols)
        return {"values": values, "scale": scale.astype(np.float32)}
    if fmt.bits == 4 and fmt.offset:
        low, high = g.min(axis=-1), g.max(axis=-1)
        scale = (high - low) / np.float32(15)
        safe = np.where(scale == 0, np.float32(1), scale)
        q = np.clip(np.round((g - low[..., None]) / safe[..., None]), 0, 15).reshape(rows, cols)
        return {"values": pack_nibbles(q), "scale": scale.astype(np.float32), "min": low.astype(np.float32)}
    raise UsageError(f"jaxlora quantizes to int8 (symmetric) or int4 (with a minimum), not {fmt.name}")


def to_rows(array: np.ndarray, layout: str) -> np.ndarray:
    """A float param in its own layout -> rows x cols (a kernel [..., in, out] transposed on its last two axes)."""
    return array if layout == EMBEDDING else array.swapaxes(-1, -2)


def from_rows(array, layout: str):
    return array if layout == EMBEDDING else array.swapaxes(-1, -2)


# --- computing with them (inside jit) ---


def dequantize(q: dict, dtype=None) -> jax.Array:
    """The float weight [..., rows, cols] a quantized one stands for, in the scales' dtype (or `dtype`).

    Scaling is values * scale (+ min) in the scales' dtype: the same operations, in the same order, as GGUF's own
    dequantization, so a kept GGUF block gives the float32 numbers llama.cpp's converter would.
    """
    values = q["values"]
    if values.dtype == jnp.uint8:
        values = unpack_nibbles(values, signed="min" not in q)
    scale = q["scale"]
    *lead, cols = values.shape
    groups = scale.shape[-1]
    w = values.reshape(*lead, groups, cols // groups).astype(scale.dtype) * scale[..., None]
    if "min" in q:
        w = w + q["min"][..., None]
    w = w.reshape(*lead, cols)
    return w if dtype is None else w.astype(dtype)


def matmul(x: jax.Array, q: dict) -> jax.Array:
    """x [..., cols] @ w.T for a quantized w [rows, cols] -> [..., rows], in x's dtype.

    A single row of x (decoding one sequence) takes `_matvec`, which reads the stored integers (a decode loop
    must keep XLA from lifting their dequantization out of the loop: `held_in_loop`). More rows dequantize the
    weight and multiply (the matmul's own rate bounds them); under `dequantized_in_order` (generation) the
    dequantization waits for x (`_after`): else XLA:CPU schedules every weight's dequantization first, and a
    prefill holds a float copy of all weights at once. Decode loops over several rows dequantize once before the
    loop instead (`for_decode_loop`)."""
    if one_row(x.shape[:-1]) and q["values"].ndim == 2:
        return _matvec(x.reshape(x.shape[-1]), q).reshape(*x.shape[:-1], -1)
    w = dequantize(_after(q, x) if _IN_ORDER.get() else q, x.dtype)
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())))


def one_row(shape) -> bool:
    """Whether an array of `shape` holds one element (one row of activations), known while tracing: symbolic
    dimensions (an export's dynamic batch or length) count as several."""
    return all(isinstance(d, int) for d in shape) and math.prod(shape) == 1


_IN_ORDER = contextvars.ContextVar("jaxlora_dequantized_in_order", default=False)


@contextlib.contextmanager
def dequantized_in_order():
    """While tracing under this, each quantized matmul of several rows dequantizes its weight only once its input
    exists (`_after`). For generation (`model.run_decoder` with a KV cache); not for training, where the same
    dependency made a QLoRA step 1.5x slower and 900 MB larger (XLA then keeps every dequantized weight for the
    backward pass)."""
    token = _IN_ORDER.set(True)
    try:
        yield
    finally:
        _IN_ORDER.reset(token)


def _after(q: dict, x: jax.Array) -> dict:
    """q with a data dependency on x that changes no number: its scales plus min(|x[0]|, 0), which is 0 (or NaN
    where x holds one, and then the product is NaN anyway). XLA folds neither away, and an optimization barrier
    does not order scheduling (XLA:CPU drops barriers before it schedules, measured)."""
    zero = jnp.minimum(jnp.abs(x.reshape(-1)[0]), 0).astype(q["scale"].dtype)
    return {**q, "scale": q["scale"] + zero}


def _matvec(x: jax.Array, q: dict) -> jax.Array:
    """x [cols] @ w.T -> [rows] in a form XLA:CPU compiles to one loop over the stored integers (each row's
    dequantization fused into its dot product, no float copy of the weight): `x @ w.T` with w's dequantization
    in line. Packed 4-bit values take two such products, the low nibbles against x's even elements and the high
    ones against its odd elements (unpacking them into one row costs more than the product); the barrier keeps
    their sum from being fused into one product and undoing that. Measured on a 2-core CPU, 60 SmolLM2-shaped
    matrices: float32 10 ms, int8 4 ms, int4 8 ms (20 ms with the nibbles unpacked in line)."""
    values = q["values"]
    if values.dtype != jnp.uint8:
        return (x[None] @ dequantize(q, x.dtype).T)[0]
    pairs = x.reshape(-1, 2)
    low = pairs[None, :, 0] @ _dequantize_plane(values & 15, q, x.dtype).T
    high = pairs[None, :, 1] @ _dequantize_plane(values >> 4, q, x.dtype).T
    low, high = jax.lax.optimization_barrier((low, high))
    return (low + high)[0]


def _dequantize_plane(nibbles, q: dict, dtype) -> jax.Array:
    """Half of a packed 4-bit weight's columns (its even or its odd ones) [rows, cols // 2], dequantized: each
    group of `group` columns holds `group // 2` of them, under the same scale and minimum."""
    nibbles = nibbles.astype(q["scale"].dtype)
    if "min" not in q:  # signed nibbles, two's complement
        nibbles = jnp.where(nibbles > 7, nibbles - 16, nibbles)
    return dequantize({**q, "values": nibbles}, dtype)


def held_in_loop(params, anchor: jax.Array):
    """`params` with every quantized weight passed through an optimization barrier together with `anchor`, a value
    that changes on every iteration of the loop the caller is traced in (a decode step's positions).

    Without it XLA lifts each weight's dequantization out of the loop as loop-invariant work: the loop then keeps
    a float copy of every weight (float memory), and a one-sequence step multiplies float weights instead of
    reading the stored integers (`_matvec`). The barrier holds until XLA's loop passes have run, which is all
    this needs (it does not order a program's scheduling: see `_after`)."""
    leaves, treedef = jax.tree.flatten(params, is_leaf=is_quantized)
    picked = [i for i, leaf in enumerate(leaves) if is_quantized(leaf)]
    if not picked:
        return params
    held, _ = jax.lax.optimization_barrier(([leaves[i] for i in picked], anchor))
    for i, leaf in zip(picked, held, strict=True):
        leaves[i] = leaf
    return jax.tree.unflatten(treedef, leaves)


def take_rows(q: dict, ids: jax.Array) -> jax.Array:
    """Rows `ids` [...] of a quantized table [rows, cols] -> [..., cols] float, dequantizing only those rows."""
    return dequantize({name: jnp.take(part, ids, axis=0) for name, part in q.items()})


def float_dtype(q: dict):
    """The dtype a quantized weight dequantizes to."""
    return q["scale"].dtype


# --- whole param trees ---


def _paths(tree: dict, prefix=()):
    """(path, leaf) for every leaf, a quantized dict counting as one leaf."""
    for key, value in tree.items():
        path = (*prefix, key)
        if is_quantized(value) or not isinstance(value, dict):
            yield path, value
        else:
            yield from _paths(value, path)


def _map_leaves(fn, tree: dict, prefix=()) -> dict:
    """A new tree with fn(path, leaf) at every leaf of `_paths` (a quantized dict is one leaf)."""
    return {
        key: fn((*prefix, key), value)
        if is_quantized(value) or not isinstance(value, dict)
        else _map_leaves(fn, value, (*prefix, key))
        for key, value in tree.items()
    }


def formats_of(params: dict) -> dict[str, str]:
    """{"layers_0/attn/q_proj/kernel": "int4:32:min", ...} for the quantized weights of a param tree."""
    return {"/".join(path): format_of(leaf).name for path, leaf in _paths(params) if is_quantized(leaf)}


def map_floats(fn, params: dict) -> dict:
    """`fn` over every float array of a param tree, the scales and minimums of quantized weights included; the
    integer values pass through untouched."""
    return jax.tree.map(lambda a: a if jnp.issubdtype(a.dtype, jnp.integer) else fn(a), params)


def for_decode_loop(params: dict, rows: int) -> dict:
    """The params a decode loop stepping `rows` sequences at once reads. One row: as stored (each step multiplies
    the stored integers, `_matvec`, faster than float32 on CPU and without a float copy). Several: dequantized
    once, here, before the loop (a float copy for the loop's duration; dequantizing every weight at every step
    costs more than the step's own matmuls)."""
    if rows == 1 or not any(is_quantized(leaf) for _, leaf in _paths(params)):
        return params
    return dequantize_params(params)


def dequantize_params(params: dict) -> dict:
    """The param tree with every quantized weight back in its float layout (float32, or the scales' dtype)."""

    def one(path, leaf):
        if not is_quantized(leaf):
            return leaf
        return from_rows(dequantize(leaf), EMBEDDING if path[-1] == "embedding" else KERNEL)

    return _map_leaves(one, params)


def with_stored(tree: dict, formats: dict[str, str], make) -> dict:
    """A copy of a float-layout tree (shapes, axes, ...) with the leaf at each quantized path replaced by
    make(path, leaf, layout, format): the same tree for the stored, quantized params."""
    out = jax.tree.map(lambda x: x, tree, is_leaf=lambda x: not isinstance(x, dict))
    for name, fmt_name in formats.items():
        path = tuple(name.split("/"))
        node = out
        for key in path[:-1]:
            node = node[key]
        leaf = node[path[-1]]
        shape = getattr(leaf, "shape", (0, 0))
        node[path[-1]] = make(path, leaf, layout_of(path, shape), parse_stored(fmt_name))
    return out


def parse_stored(name: str) -> QuantFormat:
    """A stored format name ("int4:32:min", "int8") -> its QuantFormat, exactly (no defaults filled in)."""
    match = FORMAT_PATTERN.fullmatch(name)
    if not match:
        raise ValueError(f"unknown stored quantization format {name!r}")
    return QuantFormat(int(match.group(1)), int(match.group(2)) if match.group(2) else None, bool(match.group(3)))


def quantize_tree(params: dict, fmt: QuantFormat) -> tuple[dict, list[str]]:
    """Host (numpy) params -> (params with every quantizable weight in `fmt`, names of those left float because
    their contraction does not split into whole groups)."""
    kept_float = []

    def one(path, leaf):
        layout = layout_of(path, leaf.shape)
        if layout is None:
            return leaf
        own = format_for(path, layout, fmt)
        if not fits(own, rows_cols(leaf.shape, layout)[1]):
            kept_float.append("/".join(path))
            return leaf
        return quantize_rows(to_rows(np.asarray(leaf, np.float32), layout), own)

    return _map_leaves(one, params), kept_float
