"""Low-bit (4- or 2-bit) asymmetric quantisation of K/V tensors, KIVI-style.

Keys are quantised per channel, in groups of `group_tokens` consecutive cells (the last group
may be shorter): RoPE'd keys have a few channels far larger than the rest, so a group that spans
channels would spend all its levels on them. Values have no such channels and are quantised per
cell, in groups of `group_channels` channels. Each group stores an f16 minimum and an f16 step:

    min = f16(min x);  step = f16((max x - min) / L)   with L = 2**bits - 1
    q = clip(rint((x - min) * (1 / step)), 0, L)       (step 0: q = 0)
    x' = f16(q * step + min)

all in f32, round half to even. A step that would carry `L * step + min` past the largest f16
is lowered by one ulp, so that every decoded value is finite (decoders check it). Codes are
packed little end first: a byte holds 8 / bits codes, the first in its lowest bits.
This module is arrays in, arrays out; the container is `kv3d.engine.codec`.
"""

from __future__ import annotations

import numpy as np

F16_MAX = float(np.finfo(np.float16).max)
BITS = (2, 4)


def levels(bits: int) -> int:
    return (1 << bits) - 1


def packed_bytes(n_codes: int, bits: int) -> int:
    per_byte = 8 // bits
    return (n_codes + per_byte - 1) // per_byte


def key_groups(cells: int, group_tokens: int) -> int:
    return (cells + group_tokens - 1) // group_tokens


# --- packing ------------------------------------------------------------------------------------
def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes (each < 2**bits), flattened, as bytes; a short last byte is zero-filled."""
    per_byte = 8 // bits
    flat = codes.reshape(-1)
    n_bytes = packed_bytes(flat.size, bits)
    padded = np.zeros(n_bytes * per_byte, dtype=np.uint8)
    padded[: flat.size] = flat
    lanes = padded.reshape(n_bytes, per_byte)
    out = lanes[:, 0].copy()
    for i in range(1, per_byte):
        out |= lanes[:, i] << np.uint8(i * bits)
    return out


def unpack(packed: np.ndarray, n_codes: int, bits: int) -> np.ndarray:
    """The first `n_codes` codes of `packed` (uint8)."""
    per_byte = 8 // bits
    mask = np.uint8(levels(bits))
    lanes = np.empty((packed.size, per_byte), dtype=np.uint8)
    for i in range(per_byte):
        np.bitwise_and(packed >> np.uint8(i * bits) if i else packed, mask, out=lanes[:, i])
    return lanes.reshape(-1)[:n_codes]


def padding_is_zero(packed: np.ndarray, n_codes: int, bits: int) -> bool:
    """Whether the bits after the last code are zero, as an encoder leaves them."""
    used = n_codes * bits % 8
    return used == 0 or packed.size == 0 or int(packed[-1]) >> used == 0


# --- the affine map -----------------------------------------------------------------------------
def _affine(lo: np.ndarray, hi: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(min, step) in f16 for groups spanning [lo, hi] (f32 arrays)."""
    top = levels(bits)
    mins = lo.astype(np.float16)  # exact: lo is an f16 value
    steps = ((hi - lo) / np.float32(top)).astype(np.float16)
    # Rounding the step up may carry the top code past the largest f16: one ulp lower instead.
    over = mins.astype(np.float32) + steps.astype(np.float32) * top > F16_MAX
    if over.any():
        steps[over] = np.nextafter(steps[over], np.float16(0))
    return mins, steps


def _codes(x: np.ndarray, mins: np.ndarray, steps: np.ndarray, bits: int) -> np.ndarray:
    """x, mins, steps broadcastable f32 (x is overwritten): uint8 codes."""
    inv = np.divide(1.0, steps, out=np.zeros_like(steps), where=steps > 0)
    x -= mins
    x *= inv
    np.rint(x, out=x)
    np.clip(x, 0, levels(bits), out=x)
    return x.astype(np.uint8)


def params_ok(mins: np.ndarray, steps: np.ndarray, bits: int) -> bool:
    """Whether (min, step) pairs are ones `_affine` writes: finite, step >= 0, and every code
    decodes to a finite f16. NaN fails every comparison."""
    m = mins.astype(np.float32)
    s = steps.astype(np.float32)
    return bool(((s >= 0) & (m >= -F16_MAX) & (m + s * levels(bits) <= F16_MAX)).all())


# --- keys: per channel, groups along cells ------------------------------------------------------
def _group_spans(cells: int, group_tokens: int) -> list[tuple[int, int, int]]:
    """(first cell, end cell, cells per group): the whole groups as one span, then the short
    last group, so that each span is a (groups, cells per group, channels) block."""
    whole = cells // group_tokens * group_tokens
    spans = [(0, whole, group_tokens)] if whole else []
    if cells > whole:
        spans.append((whole, cells, cells - whole))
    return spans


def quantize_keys(
    x16: np.ndarray, bits: int, group_tokens: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cells, channels) f16 -> mins, steps (groups, channels) f16 and codes (cells, channels)."""
    cells, channels = x16.shape
    mins, steps, codes = [], [], np.empty((cells, channels), dtype=np.uint8)
    for first, end, size in _group_spans(cells, group_tokens):
        x = x16[first:end].astype(np.float32).reshape(-1, size, channels)
        m, s = _affine(x.min(axis=1), x.max(axis=1), bits)
        f32 = (m.astype(np.float32)[:, None, :], s.astype(np.float32)[:, None, :])
        codes[first:end] = _codes(x, *f32, bits).reshape(end - first, channels)
        mins.append(m)
        steps.append(s)
    return np.concatenate(mins), np.concatenate(steps), codes


def dequantize_keys_into(
    out16: np.ndarray, mins: np.ndarray, steps: np.ndarray, codes: np.ndarray, group_tokens: int
) -> None:
    cells, channels = codes.shape
    g = 0
    for first, end, size in _group_spans(cells, group_tokens):
        n = (end - first) // size
        block = codes[first:end].reshape(n, size, channels)
        x = np.multiply(block, steps[g : g + n, None, :].astype(np.float32), dtype=np.float32)
        x += mins[g : g + n, None, :].astype(np.float32)
        out16[first:end] = x.reshape(end - first, channels)
        g += n


# --- values: per cell, groups along channels ----------------------------------------------------
def quantize_values(
    x16: np.ndarray, bits: int, group_channels: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cells, channels) f16 -> mins, steps (cells, channels / group) f16 and codes."""
    cells, channels = x16.shape
    x = x16.astype(np.float32).reshape(cells, channels // group_channels, group_channels)
    mins, steps = _affine(x.min(axis=2), x.max(axis=2), bits)
    codes = _codes(x, mins.astype(np.float32)[..., None], steps.astype(np.float32)[..., None], bits)
    return mins, steps, codes.reshape(cells, channels)


def dequantize_values_into(
    out16: np.ndarray, mins: np.ndarray, steps: np.ndarray, codes: np.ndarray, group_channels: int
) -> None:
    cells, channels = codes.shape
    grouped = codes.reshape(cells, channels // group_channels, group_channels)
    x = np.multiply(grouped, steps.astype(np.float32)[..., None], dtype=np.float32)
    x += mins.astype(np.float32)[..., None]
    out16[...] = x.reshape(cells, channels)
