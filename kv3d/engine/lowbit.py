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

Format mode 4 (`int4r`) changes two things. Key groups carry their bounds in one byte each,
against the channel's range over the tensor's coded cells (f16 `cmin`, `cmax`, exact: keys are
f16): with u = (cmax - cmin) / 255, a group spans [cmin + lo u, cmin + hi u], lo = floor and
hi = ceil of its own bounds on that grid, so that step = (hi - lo) u / L; 2 bytes per group
instead of 4. Values may be rotated first, per cell, over blocks of `block` channels by the
orthonormal M = diag(s) H / sqrt(block) (H the Sylvester Hadamard matrix, s the signs that
the bits of SHAKE-256("kv3d lowbit rotation") give, least significant bit of each byte first:
bit i set -> s_i = -1): y = x M, then coded as above, and decoded x' = y' M^T. A rotation
spreads a cell's few large channels over the whole block, so that groups of 64 channels cost
little more error than groups of 32. Every decoded rotated value must stay within
F16_MAX / sqrt(block), so that x' = y' M^T is finite. The products run through the BLAS NumPy
links, so rotated codes may differ in a last bit between machines (a decoder never needs the
encoder's exact arithmetic; mode 3 bytes stay reproducible).
This module is arrays in, arrays out; the container is `kv3d.engine.codec`.
"""

from __future__ import annotations

import functools
import hashlib

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


def params_ok(mins: np.ndarray, steps: np.ndarray, bits: int, limit: float = F16_MAX) -> bool:
    """Whether (min, step) pairs are ones `_affine` writes: finite, step >= 0, and every code
    decodes within [-limit, limit] (F16_MAX: a finite f16). NaN fails every comparison."""
    m = mins.astype(np.float32)
    s = steps.astype(np.float32)
    return bool(((s >= 0) & (m >= -limit) & (m + s * levels(bits) <= limit)).all())


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


def dequantize_values(
    mins: np.ndarray, steps: np.ndarray, codes: np.ndarray, group_channels: int
) -> np.ndarray:
    """The (cells, channels) f32 values that codes stand for."""
    cells, channels = codes.shape
    grouped = codes.reshape(cells, channels // group_channels, group_channels)
    x = np.multiply(grouped, steps.astype(np.float32)[..., None], dtype=np.float32)
    x += mins.astype(np.float32)[..., None]
    return x.reshape(cells, channels)


def dequantize_values_into(
    out16: np.ndarray, mins: np.ndarray, steps: np.ndarray, codes: np.ndarray, group_channels: int
) -> None:
    out16[...] = dequantize_values(mins, steps, codes, group_channels)


# --- mode 4: rotation -----------------------------------------------------------------------------
_SIGN_SEED = b"kv3d lowbit rotation"
MAX_BLOCK = 4096


def is_block(block: int) -> bool:
    """Whether `block` is a rotation size: a power of two from 2 to MAX_BLOCK."""
    return 2 <= block <= MAX_BLOCK and block & (block - 1) == 0


@functools.lru_cache(maxsize=8)
def rotation_matrix(block: int) -> np.ndarray:
    """M = diag(s) H / sqrt(block), f32, read-only: orthonormal, so M^T undoes it."""
    if not is_block(block):
        raise ValueError(f"a rotation block is a power of two from 2 to {MAX_BLOCK}")
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < block:
        h = np.block([[h, h], [h, -h]])
    digest = np.frombuffer(hashlib.shake_256(_SIGN_SEED).digest(max(1, block // 8)), np.uint8)
    signs = 1.0 - 2.0 * np.unpackbits(digest, bitorder="little")[:block].astype(np.float32)
    m = (signs[:, None] * h / np.sqrt(np.float32(block))).astype(np.float32)
    m.setflags(write=False)
    return m


def rotation_limit(block: int) -> float:
    """The largest |y| a rotated value may decode to: then every |x' = y' M^T| <= F16_MAX."""
    return F16_MAX / float(np.sqrt(block))


def rotate(x: np.ndarray, block: int) -> np.ndarray:
    """(cells, channels) -> f32 x M per block of channels (channels a multiple of block)."""
    return _times(x.astype(np.float32).reshape(-1, block), rotation_matrix(block)).reshape(x.shape)


def unrotate(y: np.ndarray, block: int) -> np.ndarray:
    """(cells, channels) f32 -> y M^T per block of channels."""
    rows = np.ascontiguousarray(y, dtype=np.float32).reshape(-1, block)
    return _times(rows, rotation_matrix(block).T).reshape(y.shape)


def _times(rows: np.ndarray, m: np.ndarray) -> np.ndarray:
    """rows @ m, as a stack of products of a few rows each: one large product lets a threaded
    BLAS start its threads, which on a few busy cores made it 20x slower than these."""
    block = m.shape[0]
    chunk = max(4, (1 << 18) // (block * block))
    out = np.empty_like(rows)
    whole = len(rows) // chunk * chunk
    if whole:
        np.matmul(
            rows[:whole].reshape(-1, chunk, block), m, out=out[:whole].reshape(-1, chunk, block)
        )
    if whole < len(rows):
        np.matmul(rows[whole:], m, out=out[whole:])
    return out


# --- mode 4: keys with one-byte group bounds ------------------------------------------------------
BOUND_STEPS = 255


def _bound_grid(cmin: np.ndarray, cmax: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cmin, u) in f32, the grid a channel's group bounds are coded on."""
    lo = cmin.astype(np.float32)
    return lo, (cmax.astype(np.float32) - lo) / np.float32(BOUND_STEPS)


def _group_affine(
    cmin: np.ndarray, cmax: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int
) -> tuple[np.ndarray, np.ndarray]:
    """(min, step) f32 of groups whose bound codes are lo, hi (groups, channels)."""
    base, u = _bound_grid(cmin, cmax)
    first = lo.astype(np.float32)
    mins = base + first * u
    steps = (hi.astype(np.float32) - first) * u / np.float32(levels(bits))
    return mins, steps


def quantize_keys_u8(
    x16: np.ndarray, bits: int, group_tokens: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(cells, channels) f16 -> cmin, cmax (channels,) f16, lo, hi (groups, channels) u8 and
    codes (cells, channels) u8: per channel, groups of `group_tokens` cells."""
    cells, channels = x16.shape
    x = x16.astype(np.float32)
    cmin = x.min(axis=0).astype(np.float16)  # f16 values: exact
    cmax = x.max(axis=0).astype(np.float16)
    base, u = _bound_grid(cmin, cmax)
    inv_u = np.divide(1.0, u, out=np.zeros_like(u), where=u > 0)
    spans = _group_spans(cells, group_tokens)
    blocks = [x[first:end].reshape(-1, size, channels) for first, end, size in spans]
    lo = np.concatenate([b.min(axis=1) for b in blocks])
    hi = np.concatenate([b.max(axis=1) for b in blocks])
    lo = np.floor((lo - base) * inv_u)
    hi = np.ceil((hi - base) * inv_u)
    lo = np.clip(lo, 0, BOUND_STEPS).astype(np.uint8)
    hi = np.clip(hi, 0, BOUND_STEPS).astype(np.uint8)
    mins, steps = _group_affine(cmin, cmax, lo, hi, bits)
    codes = np.empty((cells, channels), dtype=np.uint8)
    g = 0
    for (first, end, _), block in zip(spans, blocks, strict=True):
        n = len(block)
        codes[first:end] = _codes(
            block, mins[g : g + n, None, :], steps[g : g + n, None, :], bits
        ).reshape(end - first, channels)
        g += n
    return cmin, cmax, lo, hi, codes


def bounds_ok(cmin: np.ndarray, cmax: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> bool:
    """Whether channel ranges and group bound codes are ones `quantize_keys_u8` writes: finite
    f16 ranges with cmin <= cmax, and lo <= hi. Then every code decodes within [cmin, cmax]
    (to f32 rounding), a finite f16. NaN fails every comparison."""
    a, b = cmin.astype(np.float32), cmax.astype(np.float32)
    finite = bool(((a >= -F16_MAX) & (b <= F16_MAX) & (a <= b)).all())
    return finite and bool((lo <= hi).all())


def dequantize_keys_u8_into(
    out16: np.ndarray,
    cmin: np.ndarray,
    cmax: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    codes: np.ndarray,
    bits: int,
    group_tokens: int,
) -> None:
    mins, steps = _group_affine(cmin, cmax, lo, hi, bits)
    dequantize_keys_into(out16, mins, steps, codes, group_tokens)
