"""GGUF quantized blocks re-laid, exactly, into jaxlora's quantized weights (`jaxlora.quant`), never through float.

Each llama.cpp block type is integers plus float16 scales; every one maps onto values (int8, or 4-bit nibbles)
with a float32 scale per group and, for the asymmetric types, a float32 minimum:

    Q8_0  w = d * q                 q int8          -> int8:32
    Q4_0  w = d * (q - 8)           q 0..15         -> int4:32       (signed nibbles q - 8)
    Q4_1  w = d * q + m             q 0..15         -> int4:32:min
    Q5_0  w = d * (q - 16)          q 0..31         -> int8:32       (values q - 16)
    Q5_1  w = d * q + m             q 0..31         -> int8:32:min
    Q4_K  w = (d sc_j) q - dmin m_j q 0..15, 6-bit sc_j, m_j per 32 of a 256 super-block -> int4:32:min
    Q5_K  as Q4_K with 5-bit q                      -> int8:32:min
    Q6_K  w = (d sc_j) (q - 32)     q 0..63, int8 sc_j per 16 -> int8:16

A float16 d times a small integer is exact in float32, so the scales and minimums above hold exactly the numbers
llama.cpp multiplies by, and `jaxlora.quant.dequantize` repeats GGUF's own float32 operations: the weights it
gives equal `gguf.quants.dequantize` bit for bit (tested per type).
"""

from __future__ import annotations

import numpy as np

from jaxlora.quant import pack_nibbles

SUPER = 256  # elements of a K-quant super-block


def _f16(raw: np.ndarray) -> np.ndarray:
    """[n, 2] uint8 -> [n, 1] float32 (a block's float16 field)."""
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _nibbles_halves(qs: np.ndarray) -> np.ndarray:
    """[n, 16] bytes of a 32-element block (element j in byte j's low nibble, j + 16 in its high) -> [n, 32]."""
    return np.concatenate([qs & 15, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray, count: int) -> np.ndarray:
    """[n, 4] bytes holding one bit per element (a little-endian uint32) -> [n, count] of 0/1."""
    bits = np.ascontiguousarray(qh).view("<u4")  # [n, 1]
    return ((bits >> np.arange(count, dtype=np.uint32)) & 1).astype(np.uint8)


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A K-quant's 12 scale bytes -> 8 six-bit scales and 8 six-bit minimums per super-block (llama.cpp's
    get_scale_min_k4: the first four of each in the low 6 bits of bytes 0-3 / 4-7, the last four split between the
    nibbles of bytes 8-11 and the top 2 bits of bytes 0-3 / 4-7)."""
    low_sc, low_m, mixed = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([low_sc & 63, (mixed & 15) | ((low_sc >> 6) << 4)], axis=-1)
    m = np.concatenate([low_m & 63, (mixed >> 4) | ((low_m >> 6) << 4)], axis=-1)
    return sc, m


def q8_0(b):
    return {"values": b[:, 2:].view(np.int8), "scale": _f16(b[:, :2])}


def q4_0(b):
    # Signed nibbles rather than a minimum of -8 d: d * (q - 8) keeps the sign of a zero as GGUF's does.
    return {"values": _nibbles_halves(b[:, 2:]).astype(np.int8) - 8, "scale": _f16(b[:, :2])}


def q4_1(b):
    return {"values": _nibbles_halves(b[:, 4:]), "scale": _f16(b[:, :2]), "min": _f16(b[:, 2:4])}


def _q5(b, low_at: int) -> np.ndarray:
    return _nibbles_halves(b[:, low_at:]) | (_high_bits(b[:, low_at - 4 : low_at], 32) << 4)


def q5_0(b):
    return {"values": (_q5(b, 6).astype(np.int16) - 16).astype(np.int8), "scale": _f16(b[:, :2])}


def q5_1(b):
    return {"values": _q5(b, 8).astype(np.int8), "scale": _f16(b[:, :2]), "min": _f16(b[:, 2:4])}


def _k_low_nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, 128] bytes -> [n, 256]: 32-byte chunk c holds sub-block 2c in its low nibbles, 2c + 1 in its high."""
    chunks = qs.reshape(len(qs), 4, 32)
    return np.stack([chunks & 15, chunks >> 4], axis=2).reshape(len(qs), SUPER)


def _k_scale_min(b):
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, m = _k_scales(b[:, 4:16])
    return d * sc.astype(np.float32), -(dmin * m.astype(np.float32))


def q4_k(b):
    scale, minimum = _k_scale_min(b)
    return {"values": _k_low_nibbles(b[:, 16:144]), "scale": scale, "min": minimum}


def q5_k(b):
    scale, minimum = _k_scale_min(b)
    qh = b[:, 16:48]  # [n, 32]: bit s of byte i is element i of sub-block s
    high = ((qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1).reshape(len(b), SUPER)
    values = _k_low_nibbles(b[:, 48:176]) | (high << 4)
    return {"values": values.astype(np.int8), "scale": scale, "min": minimum}


def q6_k(b):
    n = len(b)
    ql, qh, sc, d = b[:, :128], b[:, 128:192], b[:, 192:208].view(np.int8), _f16(b[:, 208:210])
    # Two halves of 128 elements: 64 bytes of low nibbles (elements 0-63 low, 64-127 high nibbles of the same
    # bytes) and 32 bytes of 2-bit highs (element 32 k + i in bits 2k of byte i).
    low = ql.reshape(n, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    low = (low & 15).reshape(n, 2, 4, 32)
    high = (qh.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
    q = (low | (high << 4)).reshape(n, SUPER)
    return {"values": (q.astype(np.int16) - 32).astype(np.int8), "scale": d * sc.astype(np.float32)}


# GGML type name -> (elements per block, bytes per block, re-layout of [n, bytes] blocks, bits kept per value)
BLOCKS = {
    "Q8_0": (32, 34, q8_0, 8),
    "Q4_0": (32, 18, q4_0, 4),
    "Q4_1": (32, 20, q4_1, 4),
    "Q5_0": (32, 22, q5_0, 8),
    "Q5_1": (32, 24, q5_1, 8),
    "Q4_K": (SUPER, 144, q4_k, 4),
    "Q5_K": (SUPER, 176, q5_k, 8),
    "Q6_K": (SUPER, 210, q6_k, 8),
}


def relayout(data: np.ndarray, type_name: str, rows: int, cols: int) -> dict | None:
    """A GGUF tensor's raw bytes (a [rows, cols] weight, blocks along cols) -> jaxlora's quantized arrays
    {"values": [rows, cols] int8 | [rows, cols / 2] uint8, "scale": [rows, groups], ("min")}; None for a type
    that is not kept (floats, and the rarer quantizations)."""
    if type_name not in BLOCKS:
        return None
    elements, size, unpack, bits = BLOCKS[type_name]
    blocks = np.ascontiguousarray(data, dtype=np.uint8).reshape(rows * (cols // elements), size)
    parts = unpack(blocks)
    values = parts["values"].reshape(rows, cols)
    out = {"values": pack_nibbles(values) if bits == 4 else values}
    for name in ("scale", "min"):
        if name in parts:
            out[name] = np.ascontiguousarray(parts[name].reshape(rows, -1), dtype=np.float32)
    return out
