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
Format mode 6 (`int4p`) codes keys channel by channel with their own widths, 0 to 8 bits
(`allocate_bits`: reverse water-filling on each channel's variance), as mode 4 does with one
width; a 0-bit channel is its mean. The codes are stored as bit planes of 1, 2, 4 and 8 bits
(`plane_layout`), each holding whole codes per byte, so that any mix of widths decodes with
at most four unpacks.
This module is arrays in, arrays out; the container is `kv3d.engine.codec`.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np

from kv3d.engine import f16

F16_MAX = float(np.finfo(np.float16).max)
BITS = (2, 4)


def levels(bits: int) -> int:
    return (1 << bits) - 1


def packed_bytes(n_codes: int, bits: int) -> int:
    return (n_codes * bits + 7) // 8


def key_groups(cells: int, group_tokens: int) -> int:
    return (cells + group_tokens - 1) // group_tokens


# --- packing ------------------------------------------------------------------------------------
def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes (each < 2**bits; bits 1, 2, 4 or 8), flattened, as bytes: 8 / bits codes a
    byte, the first in its lowest bits; a short last byte is zero-filled."""
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
    if bits == 1:  # the same little-endian order, without a pass per bit
        return np.unpackbits(packed, count=n_codes, bitorder="little")
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
        x = f16.as_f32(x16[first:end]).reshape(-1, size, channels)
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
        f16.store_f16(out16[first:end], x.reshape(end - first, channels))
        g += n


# --- values: per cell, groups along channels ----------------------------------------------------
def quantize_values(
    x16: np.ndarray, bits: int, group_channels: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cells, channels) f16 -> mins, steps (cells, channels / group) f16 and codes."""
    cells, channels = x16.shape
    x = f16.as_f32(x16).reshape(cells, channels // group_channels, group_channels)
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
    f16.store_f16(out16, dequantize_values(mins, steps, codes, group_channels))


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
    return _times(f16.as_f32(x).reshape(-1, block), rotation_matrix(block)).reshape(x.shape)


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
    """(cells, channels) f16 (or f32 holding f16 values) -> cmin, cmax (channels,) f16, lo, hi
    (groups, channels) u8 and codes (cells, channels) u8: per channel, groups of
    `group_tokens` cells."""
    cells, channels = x16.shape
    x = f16.as_f32(x16)  # a copy (codes are computed in place); f32 of f16 values too
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


# --- mode 6: keys with bits allocated per channel -----------------------------------------------
MAX_KEY_BITS = 8
PLANES = (1, 2, 4, 8)
# A key coded before RoPE must decode within this, so that turning a pair of channels (length
# up to sqrt(2) times its largest element) stays a finite f16.
PRE_ROPE_LIMIT = F16_MAX / 2


def allocate_bits(variance: np.ndarray, mean_bits: float) -> np.ndarray:
    """Bits per channel (0..MAX_KEY_BITS, uint8) averaging at most `mean_bits`, by reverse
    water-filling: each channel gets half the log2 of its variance less one level shared by
    all, rounded. Equal error per channel is what spends bits best when errors add up (a
    channel of 4x the variance needs one more bit for the same error); a steady channel gets
    0 bits and is coded as its mean."""
    with np.errstate(divide="ignore"):
        half_log = 0.5 * np.log2(variance.astype(np.float64))

    def bits_at(level: float) -> np.ndarray:
        # Half up, not to even: at the level the search settles on, channels whose log
        # variances differ by whole bits all sit at a half and must round alike.
        return np.clip(np.floor(half_log - level + 0.5), 0, MAX_KEY_BITS)

    low, high = -256.0, 256.0  # the level: bits_at(high) always fits the mean
    for _ in range(40):  # to 5e-10 of a bit
        mid = (low + high) / 2
        if bits_at(mid).mean() > mean_bits:
            low = mid
        else:
            high = mid
    return bits_at(high).astype(np.uint8)


def plane_layout(bits: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """How a mode-6 key tensor's codes are stored: (plane width, its channels, each one's
    shift) for the planes of widths 1, 2, 4 and 8 that some channel has, narrowest first. A
    channel of w bits has the planes of the powers of two in w (5 = 1 + 4; 8 alone), its
    lowest bits in the narrowest; a plane holds its channels' codes channel by channel
    ((channels, cells), so that each channel's codes are one run), and a decoder unpacks at
    most four planes, whatever the widths."""
    b = bits.astype(np.int64)
    layout = []
    for width in PLANES:
        member = b == 8 if width == 8 else (b != 8) & (b & width > 0)
        channels = np.flatnonzero(member)
        if channels.size:
            shifts = (b[channels] & (width - 1)).astype(np.uint8)  # the narrower planes' bits
            layout.append((width, channels, shifts))
    return layout


def plane_bytes(bits: np.ndarray, cells: int) -> int:
    return sum(packed_bytes(cells * ch.size, w) for w, ch, _ in plane_layout(bits))


def quantize_keys_alloc(
    x: np.ndarray, bits: np.ndarray, group_tokens: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
    """(cells, channels) f16 values (as f16, or as f32 holding f16 values: no conversions)
    and bits per channel -> cmin, cmax (channels,) f16, lo, hi (groups, coded channels) u8
    and the packed planes (`plane_layout`). A 0-bit channel is its mean (cmin = cmax); the
    others are coded as `quantize_keys_u8` does, channels of one width together."""
    cells, channels = x.shape
    coded = np.flatnonzero(bits > 0)
    mean = x.mean(axis=0, dtype=np.float32).astype(np.float16)
    cmin, cmax = mean.copy(), mean.copy()
    groups = key_groups(cells, group_tokens)
    lo = np.zeros((groups, coded.size), np.uint8)
    hi = np.zeros((groups, coded.size), np.uint8)
    codes = np.zeros((cells, channels), np.uint8)
    for width in np.unique(bits[coded]):
        of = np.flatnonzero(bits == width)
        at = np.searchsorted(coded, of)
        c_lo, c_hi, g_lo, g_hi, codes[:, of] = quantize_keys_u8(x[:, of], int(width), group_tokens)
        cmin[of], cmax[of] = c_lo, c_hi
        lo[:, at], hi[:, at] = g_lo, g_hi
    by_channel = np.ascontiguousarray(codes.T)
    planes = [
        pack((by_channel[ch] >> shifts[:, None]) & np.uint8(levels(w)), w)
        for w, ch, shifts in plane_layout(bits)
    ]
    return cmin, cmax, lo, hi, planes


def unpack_planes(
    planes: list[np.ndarray], bits: np.ndarray, cells: int, layout: list | None = None
) -> np.ndarray:
    """The (cells, channels) codes that `plane_layout`'s packed planes hold (0-bit: 0), as a
    transposed view: the dequantiser reads it in one pass, cheaper than a transposing copy
    first. `layout`: `plane_layout(bits)` where the caller has it already."""
    by_channel = np.zeros((bits.size, cells), np.uint8)  # whole rows: cheap to pick
    for (w, ch, shifts), packed in zip(layout or plane_layout(bits), planes, strict=True):
        by_channel[ch] |= unpack(packed, cells * ch.size, w).reshape(-1, cells) << shifts[:, None]
    return by_channel.T


def alloc_bounds_ok(
    cmin: np.ndarray, cmax: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: np.ndarray
) -> bool:
    """Whether a mode-6 key tensor's ranges are ones `quantize_keys_alloc` writes: bits within
    MAX_KEY_BITS, finite ranges, a 0-bit channel's range one value."""
    if bits.size and int(bits.max()) > MAX_KEY_BITS:
        return False
    zero = bits == 0
    if not bool((cmin[zero] == cmax[zero]).all()):  # NaN fails
        return False
    return bounds_ok(cmin, cmax, lo, hi)


def dequantize_keys_alloc_into(
    out16: np.ndarray,
    cmin: np.ndarray,
    cmax: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    codes: np.ndarray,
    bits: np.ndarray,
    group_tokens: int,
) -> None:
    """`codes`: (cells, channels), as `unpack_planes` gives them. `out16` f16, or f32 to keep
    the decoded values unrounded for a later step."""
    cells, channels = out16.shape
    groups = key_groups(cells, group_tokens)
    # Every channel's (min, step) side by side, so that one pass decodes them all: as
    # `_group_affine`, for all widths at once; a 0-bit channel has cmin = cmax, so u = 0, its
    # min is cmin and its step 0.
    coded = bits > 0
    first = np.zeros((groups, channels), np.float32)
    last = np.zeros((groups, channels), np.float32)
    first[:, coded], last[:, coded] = lo, hi
    base, u = _bound_grid(cmin, cmax)
    top = np.maximum((1 << bits.astype(np.int32)) - 1, 1).astype(np.float32)
    mins = base + first * u
    steps = (last - first) * u / top
    dequantize_keys_into(out16, mins, steps, codes, group_tokens)
