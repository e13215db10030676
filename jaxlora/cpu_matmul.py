"""Decode's weight products on the CPU: a float32 matmul for few rows over weights stored in column tiles.

A decode step multiplies a few rows (the batch) by every weight. XLA:CPU's dot reads a weight at about half the
memory's pace once it has several rows (SmolLM2's weights, 60 `[M, 576] x [576, 1536]`-sized products and the
head: 23 ms at one row, 42-51 ms at 8, where the memory allows 15), and neither the weight's layout nor XLA's
flags change that. `kernels/tiled_matmul.cc` streams each weight once and keeps every row's sums in registers,
which needs the weight laid out as column tiles, each one contiguous:

    {"tiles": float32 [..., ceil(n / 32), k, 32]}   stands for the kernel [..., k, n], zero columns past n.

`model.decode_params` makes that copy of a model's Linear kernels (and of a tied embedding's head, `HEAD_TILES`)
for the decode loops of `generate`, `stream` and the serving engine, once per param tree (`cached_copy`);
`model.Linear` multiplies a tiled kernel with `matmul`. Prefill, training and everything else use the params as
they are.

The C++ source is built on first use with the machine's C++ compiler for its own vector width (`jaxlora.native`)
and called as an XLA FFI custom call. Where it cannot be (no compiler, another backend, params over several
devices, non-float32 weights, JAXLORA_CPU_KERNEL=off), decoding runs XLA's dot on the params as they are: the same
numbers up to float32 rounding (the sums run in another order).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import native
from jaxlora.executables import stored_jit
from jaxlora.native import SWITCH, cpu_signature, kernels_folder, switched_off  # noqa: F401 (this module's API)

TILE = 32
# Rows one call takes. The kernel runs every 8 rows (2 without AVX-512) against a tile while the tile sits in the
# core's cache, so past a decode batch it still does not read the weight again from memory. SmolLM2's weight chain
# (30 layers of qkv, o, gate/up and down), the kernel against XLA's dot, best of 9, on an AVX-512 host: 16 rows
# 20.9 against 37.4 ms, 32 35.3 against 54.4, 64 66.6-69.2 against 89.9-93.5, 128 129.7-140.3 against 155.1-166.8,
# 256 274 against 316, 512 505 against 570. Without AVX-512 (two rows per pass, unmeasured past a decode batch)
# the limit stays at 16 (earlier: 30-45 ms against XLA's 70-77 at 16 rows, 20-37 against 42-70 at 8). A decode
# loop tiles the weights for at most MAX_ROWS sequences (`serves`); a prompt's prefill runs on an existing tiled
# copy up to `max_rows()` tokens in all (`model.prefill_params`).
MAX_ROWS = 16
MAX_ROWS_AVX512 = 256
HEAD_TILES = "head_tiles"  # the tied embedding's head, tiled, beside the param tree's own entries
TARGET = "jaxlora_tiled_matmul"


def is_tiled(x) -> bool:
    return isinstance(x, Mapping) and "tiles" in x


def tile(kernel: jax.Array) -> dict:
    """kernel [..., k, n] -> {"tiles": [..., ceil(n / 32), k, 32]}, zero columns past n."""
    *lead, k, n = kernel.shape
    padded = -(-n // TILE) * TILE
    if padded != n:
        kernel = jnp.pad(kernel, [(0, 0)] * len(lead) + [(0, 0), (0, padded - n)])
    tiles = kernel.reshape(*lead, k, padded // TILE, TILE)
    return {"tiles": jnp.swapaxes(tiles, -3, -2)}


def untile(tiled: dict, n: int) -> jax.Array:
    """The kernel [..., k, n] a tiled one stands for."""
    tiles = tiled["tiles"]
    *lead, count, k, _ = tiles.shape
    return jnp.swapaxes(tiles, -3, -2).reshape(*lead, k, count * TILE)[..., :n]


def matmul(x: jax.Array, tiled: dict, n: int) -> jax.Array:
    """x [..., k] @ kernel -> [..., n] float32 for a tiled kernel (one layer's: tiles [count, k, 32]). Up to
    `max_rows()` rows run the kernel; more (a long prefill handed tiled params), or where it is not built, multiply
    the untiled kernel."""
    tiles = tiled["tiles"]
    rows = int(np.prod(x.shape[:-1]))
    if rows > max_rows() or x.dtype != jnp.float32 or not _registered():
        return jnp.dot(x, untile(tiled, n).astype(x.dtype))
    count = tiles.shape[0]
    # Under a caller's vmap each mapped call runs by itself (`sequential`): the handler takes one x and one weight.
    out = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((rows, count * TILE), jnp.float32), vmap_method="sequential")(
        x.reshape(rows, x.shape[-1]), tiles
    )
    return out[:, :n].reshape(*x.shape[:-1], n)


@functools.cache
def max_rows() -> int:
    """The most rows a product runs the kernel for on this CPU (see `MAX_ROWS`)."""
    return MAX_ROWS_AVX512 if " avx512f" in cpu_signature() else MAX_ROWS


# Build (once per machine) and load the kernel, and register it with XLA, once per process (`jaxlora.native`);
# False, with a warning, where it cannot be.
_registered = native.declare(
    "tiled_matmul", "JaxloraTiledMatmul", TARGET, "CPU decode kernel", "decoding uses XLA's dot"
)


# The decode loop over tiled weights compiles with YNNPACK's fusions off: the weight products are the kernel's, and
# what XLA still computes there (attention over the cache, norms, the sampler) ran slower through YNNPACK's per-call
# setup. SmolLM2 decode, fresh processes: batch 8 191 -> 227-243 tok/s, batch 1 44 -> 52. Elsewhere (prefill,
# XLA's own weight products) YNNPACK stays: with it off a plain decode fell from 148 to 96 tok/s.
LOOP_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


LOOP_OPTIONS_SINCE = (0, 10, 2)  # the jaxlib this was measured with; an XLA without the option refuses it


def loop_compiler_options() -> dict:
    """`LOOP_COMPILER_OPTIONS` from jaxlib `LOOP_OPTIONS_SINCE` on, else none (the loop compiles as any program)."""
    import jaxlib

    version = tuple(int(part) for part in jaxlib.__version__.split(".")[:3] if part.isdigit())
    return dict(LOOP_COMPILER_OPTIONS) if version >= LOOP_OPTIONS_SINCE else {}


def on_one_cpu(params) -> bool:
    """Whether every array of the tree lies on the same single CPU device."""
    devices = set()
    for leaf in jax.tree.leaves(params):
        if not isinstance(leaf, jax.Array) or isinstance(leaf, jax.core.Tracer):  # inside a caller's jit
            return False
        devices |= leaf.sharding.device_set
    return len(devices) == 1 and next(iter(devices)).platform == "cpu"


def serves(params, rows: int) -> bool:
    """Whether a decode loop over `rows` sequences with `params` runs the kernel: few rows, on one CPU device,
    not switched off, and the kernel built and registered."""
    if rows > MAX_ROWS or switched_off() or jax.default_backend() != "cpu":
        return False
    return on_one_cpu(params) and _registered()


@stored_jit  # a later process reads it, as it reads the decode loop's (`jaxlora.executables`)
def tiled(kernels: list, tables: list) -> list:
    """Each kernel [..., k, n] tiled (`tile`), then each table [n, k] as a head (its transpose), in one program."""
    return [tile(kernel) for kernel in kernels] + [tile(table.T) for table in tables]


class _Copies:
    """The tiled copy of the last param tree asked for, kept while that tree's arrays live (a weak reference to
    one of them, and the ids of all). One copy at a time: it doubles the memory of the weights it holds. The entry
    (ids, reference, copy) is replaced whole, so a thread reading it while another makes a new copy gets either
    the old tree's copy or none, never one tree's copy for another tree."""

    def __init__(self):
        self.entry: tuple | None = None

    def held(self, params):
        """The copy made for this very param tree, or None."""
        entry, leaves = self.entry, jax.tree.leaves(params)
        if entry is None or not leaves:
            return None
        ids, anchor, copy = entry
        return copy if ids == tuple(map(id, leaves)) and anchor() is leaves[0] else None

    def get(self, params, make):
        held = self.held(params)
        if held is not None:
            return held
        leaves = jax.tree.leaves(params)
        self.entry = None  # let the old copy go before the new one is made
        copy = make()
        self.entry = (tuple(map(id, leaves)), weakref.ref(leaves[0]), copy)
        return copy


_COPIES = _Copies()


def cached_copy(params, make):
    """make(), or what it returned for this very param tree the last time (see `_Copies`)."""
    return _COPIES.get(params, make)


def held_copy(params):
    """What `cached_copy` last made for this very param tree, or None (nothing is made)."""
    return _COPIES.held(params)
