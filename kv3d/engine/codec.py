"""The session delta codec: a llama.cpp sequence state with its f16 K/V stored in fewer bits.

Scheme: symmetric int8, one f16 scale per token (cell) and per group of `group` channels:
    scale = f16(max|x| / 127);  q = clip(rint(x / scale), -127, 127);  x' = f16(q * scale)
computed in f32 (round half to even). Tensors that are not f16 (a q8_0 cache) and every
non-tensor byte of the blob are kept verbatim, so decoding rebuilds a blob llama.cpp reads.
Mode `f16` keeps the whole blob (exact). The NumPy path is the reference; the CuPy backend
(`kv3d.engine.codec_gpu`, chosen automatically when a GPU is present) produces the same bytes.

Container, format version 1 (little-endian):
    magic "KV3DDLT1" | u16 version | u8 mode | u8 reserved | u16 group | u16 reserved
    | u32 n_tensors | u32 payload_crc32 | u64 blob_bytes | u64 payload_bytes | payload
    payload: tensor table (u64 offset, u32 cells, u32 channels, u8 transposed, 7 pad)[n]
             | the blob's other bytes in order | per tensor: f16 scales[cells, channels/group]
             then int8 q[cells, channels]

Low-bit modes (`int4`, `k4v2`, `int2`: key and value bits) write format version 2, KIVI-style
(arithmetic in `kv3d.engine.lowbit`): K per channel in groups of `key_group_tokens` cells, V per
cell in groups of `value_group_channels` channels, and the last `window_tokens` cells of every
tensor (the newest, in the order llama.cpp exports a sequence's cells) kept exact in f16.
V tensors whose channels do not split into whole groups are kept verbatim. NumPy only.

Container, format version 2 (little-endian):
    magic "KV3DDLT1" | u16 version | u8 mode | u8 flags | u8 key_bits | u8 value_bits
    | u16 key_group_tokens | u16 value_group_channels | u16 window_tokens | u16 reserved
    | u32 n_tensors | u32 crc32 of the stored payload | u64 blob_bytes | u64 stored_bytes
    | u64 payload_bytes | stored payload (flags bit 0: zlib-deflated payload, else the payload)
    payload: tensor table (u64 offset, u32 cells, u32 channels, u8 transposed, u8 role
             (0 K, 1 V), 6 pad)[n] | the blob's other bytes in order | per tensor, with
             exact = min(window_tokens, cells) and coded = cells - exact:
             f16 exact rows[exact, channels] | f16 mins[g] | f16 steps[g] | packed codes
             (g: K key_groups(coded) x channels, V coded x channels / value_group_channels)

Mode 4 (`int4r`; `LowBitSpec.rotation` > 0) is the same container with mode byte 4, the header's
u16 after window_tokens holding the rotation block (a power of two; 0 in mode 3), and the
table entry's first pad byte saying whether a V tensor is rotated (1) or not (0; always 0 for K
and in mode 3). Arithmetic in `kv3d.engine.lowbit`. Per tensor:
    K: f16 exact rows | f16 cmin[channels] | f16 cmax[channels] | u8 lo[g] | u8 hi[g] | codes
       (the last four only when coded > 0; g = key_groups(coded) x channels)
    V: as in mode 3; when rotated, the codes stand for the rotated cells (blocks of `rotation`
       channels), and every (min, step) decodes within lowbit.rotation_limit(rotation).
The encoder rotates a V tensor whose channels split into whole blocks and whose rotated codes
stay within that limit; otherwise it codes it unrotated.

Mode 6 (`int4p`; `LowBitSpec.prerope`) is mode 4 with two changes, window_tokens 0:
- keys get their bits per channel (0-8, `lowbit.allocate_bits`: more for channels that vary
  more, averaging `key_mean_bits`) and, where the encoder was given the model's RoPE
  (`kv3d.engine.rope`), are coded before RoPE: turned back by each cell's angles, coded, and
  turned forward again when decoded (a key's table entry's rotated byte says it was turned);
- cells at positions below `sink_tokens` (the sequence's first tokens, which most heads attend
  to the most) are kept exact; their rows in the coded cells are the first other cell's.
Payload: tensor table | preamble (u16 sink_tokens, u16 head_dim, u16 n_rot, u8 layout (0: no
RoPE), u8 n_bases, f32 freq_scale, f32 bases[n_bases]: one per cache section) | the blob's
other bytes | per tensor, with sink = its cells at positions below sink_tokens:
    K: f16 sink rows | u8 bits[channels] | f16 cmin[channels] | f16 cmax[channels]
       | u8 lo[g, coded] | u8 hi[g, coded] | packed planes of 1, 2, 4 and 8 bits
       (coded: the channels of more than 0 bits; g = key_groups(cells); `lowbit.plane_layout`
       says which channels' bits each plane holds, channel by channel, all cells each)
    V: f16 sink rows | as in mode 4 over all cells.
Sizes depend on the bits and the cells' positions, which the decoder reads before using them.
"""

from __future__ import annotations

import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from kv3d.engine import f16, lowbit, rope
from kv3d.engine.rope import RopeSpec
from kv3d.engine.statefmt import (
    LayerTensor,
    SeqState,
    StateFormatError,
    byte_view,
    parse_seq_state,
)

MAGIC = b"KV3DDLT1"
VERSION = 1
GGML_TYPE_F16 = 1
_HEADER = struct.Struct("<8sHBBHHIIQQ")
_ENTRY = np.dtype(
    [("offset", "<u8"), ("cells", "<u4"), ("channels", "<u4"), ("transposed", "u1"), ("pad", "V7")]
)
MODES = {"int8": 1, "f16": 2}
_MAX_SCALE = np.float16(np.finfo(np.float16).max / 127.0)  # the largest scale f16 input gives
LOWBIT_VERSION = 2
LOWBIT_MODE = 3
ROTATED_MODE = 4  # format version 2, mode 4: one-byte key group bounds, rotated values
PREROPE_MODE = 6  # mode 4 with keys' bits per channel, coded before RoPE, and exact sink cells
# Mode 5 was int4p's first layout (one code stream per key width), written by one development
# build only: refused as unknown, so that such a delta is recomputed, never misread.
_PREAMBLE = struct.Struct("<HHHBBf")
_HEADER_V2 = struct.Struct("<8sHBBBBHHHHIIQQQ")
_ENTRY_V2 = np.dtype(
    [
        ("offset", "<u8"),
        ("cells", "<u4"),
        ("channels", "<u4"),
        ("transposed", "u1"),
        ("role", "u1"),
        ("rotated", "u1"),
        ("pad", "V5"),
    ]
)
_FLAG_DEFLATED = 1
KEY, VALUE = 0, 1
Mode = Literal["int8", "f16", "int4", "k4v2", "int2", "int4r", "int4p"]


@dataclass(frozen=True, slots=True)
class LowBitSpec:
    """How a low-bit mode codes a delta. Invariant: bits among `lowbit.BITS`, groups and window
    fit their u16 header fields; the container records every field (deflate as a flag, set only
    where it paid), so that a decoder needs no settings of its own."""

    key_bits: int
    value_bits: int
    key_group_tokens: int = 32
    value_group_channels: int = 32
    window_tokens: int = 32
    deflate: bool = False  # zlib over the payload, kept only when it saves bytes
    # > 0: format mode 4, values rotated over blocks of this many channels and key groups
    # with one-byte bounds; 0: mode 3.
    rotation: int = 0
    # Mode 6 (needs a rotation and no window): keys' bits allocated per channel, averaging
    # key_mean_bits (0: key_bits), coded before RoPE; cells at positions < sink_tokens exact.
    prerope: bool = False
    key_mean_bits: float = 0.0
    sink_tokens: int = 0

    def __post_init__(self) -> None:
        if self.key_bits not in lowbit.BITS or self.value_bits not in lowbit.BITS:
            raise ValueError(f"bits must be among {lowbit.BITS}")
        groups = (self.key_group_tokens, self.value_group_channels)
        if not all(0 < g < 1 << 16 for g in groups) or not 0 <= self.window_tokens < 1 << 16:
            raise ValueError("groups must be 1..65535 and the window 0..65535")
        if self.rotation and not lowbit.is_block(self.rotation):
            raise ValueError(f"rotation must be 0 or a power of two up to {lowbit.MAX_BLOCK}")
        if self.prerope and (not self.rotation or self.window_tokens):
            raise ValueError("mode 6 (prerope) needs a rotation and no exact window")
        if not self.prerope and (self.sink_tokens or self.key_mean_bits):
            raise ValueError("sink_tokens and key_mean_bits are mode 6 (prerope) settings")
        if not 0 <= self.sink_tokens < 1 << 16 or not 0 <= self.key_mean_bits <= 8:
            raise ValueError("sink_tokens must be 0..65535 and key_mean_bits 0..8")

    @property
    def mode(self) -> int:
        if self.prerope:
            return PREROPE_MODE
        return ROTATED_MODE if self.rotation else LOWBIT_MODE

    @property
    def mean_key_bits(self) -> float:
        return self.key_mean_bits or float(self.key_bits)


LOWBIT_MODES = {
    "int4": LowBitSpec(4, 4),
    "k4v2": LowBitSpec(4, 2),
    "int2": LowBitSpec(2, 2),
    # Keys as int4 with one-byte group bounds, values rotated (Hadamard over 64 channels) in
    # groups of 64 channels, no exact window: ~4.5 bits a value, 3.5x fewer bytes than f16.
    "int4r": LowBitSpec(4, 4, 32, 64, window_tokens=0, rotation=64),
    # int4r's values; keys before RoPE with 0-8 bits a channel (3.9 on average), and the
    # first cell of a sequence exact: ~4.55 bits a value, 3.5x fewer bytes than f16.
    "int4p": LowBitSpec(
        4,
        4,
        32,
        64,
        window_tokens=0,
        rotation=64,
        prerope=True,
        key_mean_bits=3.9,
        sink_tokens=1,
    ),
}

_POOL_WORKERS = max(1, min(8, os.cpu_count() or 1))
_pool = ThreadPoolExecutor(max_workers=_POOL_WORKERS, thread_name_prefix="kv3d-codec")


class DeltaError(ValueError):
    """An encoded delta that must not be applied (corrupt, truncated, other version)."""


@dataclass(frozen=True, slots=True)
class _Tensor:
    offset: int
    cells: int
    channels: int
    transposed: bool
    role: int = KEY  # format version 1 does not tell K from V: all of its tensors say KEY

    @property
    def nbytes(self) -> int:
        """Its f16 bytes in the blob."""
        return 2 * self.cells * self.channels


def _layer_tensors(blob: memoryview, *, roles: bool = True, state=None) -> list[_Tensor]:
    """Every f16 K/V tensor of `blob` (statefmt tells K layers from V layers; `roles` False:
    every tensor says KEY, as format version 1 does), in blob order."""
    placed = _placed_tensors(blob, roles=roles, state=state)
    return sorted((t for t, _, _ in placed), key=lambda t: t.offset)


def _placed_tensors(blob: memoryview, *, roles: bool = True, state: SeqState | None = None):
    """(tensor, cache section index, its cells' positions) for every f16 K/V tensor (`state`:
    `blob` already parsed)."""
    state = state if state is not None else parse_seq_state(blob)
    base = np.frombuffer(blob, dtype=np.uint8).__array_interface__["data"][0]
    for index, section in enumerate(state.sections):
        for stream in section.streams:
            for role, layers in ((KEY, stream.k_layers), (VALUE, stream.v_layers)):
                for layer in layers:
                    t = _describe(layer, stream.n_cells, base, role if roles else KEY)
                    if t is not None:
                        yield t, index, stream.cell_positions


def _lowbit_placed(blob: memoryview, value_group: int, state: SeqState | None = None) -> list:
    """`_lowbit_tensors`' tensors with their cache section index and cells' positions, from
    one parse of the blob: (tensor, section, positions), in blob order."""
    placed = [
        p
        for p in _placed_tensors(blob, state=state)
        if p[0].role == KEY or p[0].channels % value_group == 0
    ]
    return sorted(placed, key=lambda p: p[0].offset)


def _f16_tensors(blob: memoryview, group: int, state: SeqState | None = None) -> list[_Tensor]:
    """Where the f16 K/V tensors of `blob` sit whose channels split into whole groups (v1)."""
    return [t for t in _layer_tensors(blob, roles=False, state=state) if t.channels % group == 0]


def _lowbit_tensors(
    blob: memoryview, value_group: int, state: SeqState | None = None
) -> list[_Tensor]:
    """The tensors a low-bit delta codes: every f16 K, and f16 V of whole channel groups."""
    return [t for t, _, _ in _lowbit_placed(blob, value_group, state)]


def _describe(layer: LayerTensor, n_cells: int, base: int, role: int) -> _Tensor | None:
    if layer.type_id != GGML_TYPE_F16 or n_cells == 0:
        return None
    odd = layer.el_size != 2 if layer.transposed else layer.row_bytes % 2 != 0
    if odd:
        return None  # not laid out as f16 elements whatever its type says: kept verbatim
    offset = layer.data.__array_interface__["data"][0] - base
    if layer.transposed:
        return _Tensor(offset, n_cells, layer.n_embd_v_gqa, True, role)
    return _Tensor(offset, n_cells, layer.row_bytes // 2, False, role)


def _as_cells(raw: np.ndarray, t: _Tensor) -> np.ndarray:
    """The tensor as (cells, channels) f16, whatever its layout in the blob."""
    if t.transposed:
        return raw.view(np.float16).reshape(t.channels, t.cells).T
    return raw.view(np.float16).reshape(t.cells, t.channels)


class NumpyCodec:
    """The reference backend: the arithmetic every backend must reproduce byte for byte."""

    def quantize(self, x16: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
        return _quantize(x16, group)

    def dequantize(self, scales: np.ndarray, q: np.ndarray, group: int) -> np.ndarray:
        out = np.empty(q.shape, dtype=np.float16)
        _dequantize_into(out, scales, q, group)
        return out


def select_backend(name: str | None = None):
    """`numpy`, `cupy`, or `auto` (CuPy when a GPU is present); env `KV3D_CODEC_BACKEND`."""
    name = name or os.environ.get("KV3D_CODEC_BACKEND", "auto")
    if name == "numpy":
        return NumpyCodec()
    from kv3d.engine.codec_gpu import CupyCodec, gpu_available

    if name == "cupy" or (name == "auto" and gpu_available()):
        return CupyCodec()
    return NumpyCodec()


_backend = None


def backend():
    global _backend
    if _backend is None:
        _backend = select_backend()
    return _backend


def _quantize(x16: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    cells, channels = x16.shape
    x = f16.as_f32(x16).reshape(cells, channels // group, group)
    scales = (np.abs(x).max(axis=2) / 127.0).astype(np.float16)
    s = scales.astype(np.float32)
    inv = np.divide(1.0, s, out=np.zeros_like(s), where=s > 0)
    x *= inv[:, :, None]
    np.rint(x, out=x)
    np.clip(x, -127, 127, out=x)
    return scales, x.astype(np.int8).reshape(cells, channels)


def _dequantize_share(jobs: list) -> None:
    for dest, coded in jobs:
        _dequantize_into(dest, *coded.checked())


def _dequantize_into(out16: np.ndarray, scales: np.ndarray, q: np.ndarray, group: int) -> None:
    cells, channels = q.shape
    x = q.reshape(cells, channels // group, group).astype(np.float32)
    x *= scales.astype(np.float32)[:, :, None]
    f16.store_f16(out16, x.reshape(cells, channels))


def encode_delta(
    blob,
    mode: Mode = "int8",
    group: int = 32,
    *,
    spec: LowBitSpec | None = None,
    rope: RopeSpec | None = None,
) -> bytes:
    """Encode a sequence-state blob (any bytes-like object). `group`: channels per int8 scale;
    `spec`: a low-bit mode's settings other than its preset (`LOWBIT_MODES`); `rope`: the
    model's RoPE, which mode 6 codes keys before (without it, after)."""
    view = memoryview(blob).cast("B")
    if mode in LOWBIT_MODES:
        return _encode_lowbit(view, spec or LOWBIT_MODES[mode], rope)
    if mode == "f16":
        return _pack(MODES["f16"], group, 0, len(view), [bytes(view)])
    tensors = _f16_tensors(view, group)
    raw = np.frombuffer(view, dtype=np.uint8)
    table = np.zeros(len(tensors), dtype=_ENTRY)
    for i, t in enumerate(tensors):
        table[i] = (t.offset, t.cells, t.channels, t.transposed, b"")

    def one(t: _Tensor) -> tuple[bytes, bytes]:
        nbytes = 2 * t.cells * t.channels
        scales, q = backend().quantize(_as_cells(raw[t.offset : t.offset + nbytes], t), group)
        return scales.tobytes(), q.tobytes()

    coded = list(_pool.map(one, tensors))
    parts = [table.tobytes(), *_gaps(raw, tensors)]
    for scales, q in coded:
        parts += [scales, q]
    return _pack(MODES["int8"], group, len(tensors), len(view), parts)


def _pack(mode: int, group: int, n_tensors: int, blob_bytes: int, parts: list) -> bytes:
    payload = b"".join(parts)
    header = _HEADER.pack(
        MAGIC, VERSION, mode, 0, group, 0, n_tensors, zlib.crc32(payload), blob_bytes, len(payload)
    )
    return header + payload


def decode_delta(buf) -> bytearray:
    """Rebuild the sequence-state blob an encoded delta stands for. Every field is checked
    before use, and the blob it rebuilds must parse as the state the tensor table describes:
    anything off raises `DeltaError` (and only that)."""
    view = byte_view(buf, DeltaError, "a delta")
    if len(view) >= _HEADER.size and _HEADER.unpack_from(view)[:2] == (MAGIC, LOWBIT_VERSION):
        return _decode_lowbit(view)
    opened = open_delta(view)
    raw = np.frombuffer(opened.skeleton, dtype=np.uint8)
    dequantize_into(
        [(_as_cells(raw[t.offset : t.offset + t.nbytes], t), coded) for t, coded in opened.coded]
    )
    return opened.skeleton


@dataclass(slots=True)
class CodedTensor:
    """One int8-coded tensor of a delta: what `dequantize_into` turns into f16 cells."""

    scales: np.ndarray  # (cells, channels / group) f16, checked when read (`checked`)
    q: np.ndarray  # (cells, channels) int8
    group: int

    def checked(self) -> tuple[np.ndarray, np.ndarray, int]:
        """What a dequantizer reads, its scales checked first: a scale no encoder writes
        (negative, too large, NaN) raises `DeltaError` before this tensor is written (on the
        codec's workers, where the check costs no serial time; the blob is then dropped)."""
        if not ((self.scales >= 0) & (self.scales <= _MAX_SCALE)).all():  # NaN fails both
            raise DeltaError("delta has a scale no encoder writes (negative, too large, NaN)")
        return self.scales, self.q, self.group


@dataclass(slots=True)
class OpenedDelta:
    """A checked int8 or f16 delta before its tensors are dequantized.

    Invariant: `skeleton` parses as the sequence state the delta stands for, with the bytes of
    every tensor in `coded` not written yet (zero, or undefined when opened as `scratch`; an
    f16 delta: the whole blob, nothing coded); each entry of `coded` names its place in
    `skeleton` by the `_Tensor` the table gave."""

    skeleton: bytearray | np.ndarray
    coded: list  # [(_Tensor, CodedTensor)], in blob order
    state: SeqState  # `skeleton` parsed (its tensors are views of it)


def open_delta(buf, *, scratch: bool = False) -> OpenedDelta:
    """Check an int8 or f16 delta and lay out its blob, leaving the coded tensors to the
    caller (who may dequantize them somewhere else: `blockstore.decode_parts` writes parts
    straight into the joined blob). Raises `DeltaError` for anything off, and for low-bit
    deltas (whose decoders need the whole tensor).

    `scratch`: the skeleton is only read (its metadata and verbatim tensors), never handed to
    llama.cpp: it is laid out in memory that is not zeroed first (the coded tensors' pages are
    then never touched) or, for an f16 delta, is a read-only view of `buf`."""
    view = byte_view(buf, DeltaError, "a delta")
    if len(view) < _HEADER.size:
        raise DeltaError("delta shorter than its header")
    magic, version, mode, _, group, _, n, crc, blob_bytes, payload_bytes = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise DeltaError("not a KV3D delta (bad magic)")
    if version != VERSION:
        raise DeltaError(
            f"delta format version {version}; this build reads {VERSION} and {LOWBIT_VERSION}"
            if version != LOWBIT_VERSION
            else "a low-bit delta is decoded whole (decode_delta)"
        )
    payload = view[_HEADER.size :]
    if len(payload) != payload_bytes:
        raise DeltaError(f"delta payload is {len(payload)} bytes, header says {payload_bytes}")
    if zlib.crc32(payload) != crc:
        raise DeltaError("delta fails its checksum")
    if mode == MODES["f16"]:
        if n != 0 or blob_bytes != len(payload):
            raise DeltaError("an f16 delta holds its blob verbatim and no tensor table")
        out = np.frombuffer(payload, np.uint8) if scratch else bytearray(payload)
        return OpenedDelta(out, [], _check_rebuilt(out, []))
    if mode != MODES["int8"]:
        raise DeltaError(f"unknown delta mode {mode}")
    if group == 0:
        raise DeltaError("int8 delta with a group of 0 channels")
    return _open_int8(payload, n, group, blob_bytes, scratch)


def dequantize_into(jobs: list) -> None:
    """Write each (destination f16 (cells, channels) view, `CodedTensor`) of `jobs`, on the
    codec's thread pool (NumPy) or its device (CuPy)."""
    codec = backend()
    if isinstance(codec, NumpyCodec):
        # One task per worker, not per tensor: a session in parts has hundreds of small
        # tensors, and a task's hand-off costs about what dequantizing a small one does.
        shares = [jobs[i::_POOL_WORKERS] for i in range(min(_POOL_WORKERS, len(jobs)))]
        list(_pool.map(_dequantize_share, shares))
    else:
        for dest, c in jobs:
            dest[...] = codec.dequantize(*c.checked())


def _read_table(payload: memoryview, n: int, group: int, blob_bytes: int) -> list[_Tensor]:
    """The tensor table, checked: entries in blob order, inside the blob, whole groups, and
    exactly as many payload bytes as they and the verbatim bytes take."""
    if n * _ENTRY.itemsize > len(payload):
        raise DeltaError(f"delta tensor table of {n} entries exceeds its payload")
    tensors, pos, coded = [], 0, 0
    for offset, cells, channels, transposed, pad in np.frombuffer(
        payload, dtype=_ENTRY, count=n
    ).tolist():
        if transposed > 1 or any(pad):
            raise DeltaError(f"delta tensor {len(tensors)} has a malformed table entry")
        pos = _check_span(len(tensors), offset, cells, channels, group, pos, blob_bytes)
        coded += 2 * cells * (channels // group) + cells * channels
        tensors.append(_Tensor(offset, cells, channels, bool(transposed)))
    _check_payload_size(payload, n * _ENTRY.itemsize, tensors, coded, blob_bytes)
    return tensors


def _check_span(
    index: int, offset: int, cells: int, channels: int, group: int, pos: int, blob_bytes: int
) -> int:
    """One table entry's tensor: non-empty, whole `group`s of channels (1: any), after the
    previous one (which ended at `pos`) and inside the blob; returns where it ends."""
    if cells == 0 or channels == 0 or channels % group:
        raise DeltaError(
            f"delta tensor {index} is {cells} cells x {channels} channels, "
            f"not whole groups of {group}"
        )
    if offset < pos:
        raise DeltaError("delta tensor table overlaps or is out of order")
    end = offset + 2 * cells * channels
    if end > blob_bytes:
        raise DeltaError(f"delta tensor {index} lies outside its {blob_bytes}-byte blob")
    return end


def _check_payload_size(
    payload: memoryview, table_bytes: int, tensors: list, coded: int, blob_bytes: int
) -> None:
    """The payload holds exactly the table, the blob's verbatim bytes and the coded tensors."""
    verbatim = blob_bytes - sum(2 * t.cells * t.channels for t in tensors)
    expected = table_bytes + verbatim + coded
    if expected != len(payload):
        raise DeltaError(f"delta payload is {len(payload)} bytes; its tensor table says {expected}")


def _check_rebuilt(blob: bytearray, tensors: list[_Tensor], find=None) -> SeqState:
    """The rebuilt bytes must be a sequence state whose coded tensors, as `find(blob, state)`
    (the encoder's own choice) sees them, are exactly `tensors`; `find` None: no tensors.
    Returns the state, parsed once here (its tensors are views of `blob`)."""
    try:
        state = parse_seq_state(blob)
    except StateFormatError as exc:
        raise DeltaError(f"delta does not rebuild a sequence state: {exc}") from None
    found = find(memoryview(blob), state) if find is not None else []
    if found != tensors:
        raise DeltaError("delta tensor table disagrees with the state it rebuilds")
    return state


def _fill_verbatim(out_raw: np.ndarray, src: np.ndarray, at: int, tensors: list[_Tensor]) -> int:
    """Copy the blob's bytes between tensors (read from `src` at `at`, in order) into
    `out_raw`; returns where the coded tensors start in `src`."""
    pos = 0
    for t in tensors:
        gap = t.offset - pos
        out_raw[pos : t.offset] = src[at : at + gap]
        at += gap
        pos = t.offset + 2 * t.cells * t.channels
    tail = len(out_raw) - pos
    out_raw[pos:] = src[at : at + tail]
    return at + tail


def _gaps(raw: np.ndarray, tensors: list[_Tensor]) -> list[bytes]:
    """The blob's bytes between (and around) `tensors`, in order: what `_fill_verbatim` reads."""
    gaps, at = [], 0
    for t in tensors:
        gaps.append(raw[at : t.offset].tobytes())
        at = t.offset + 2 * t.cells * t.channels
    gaps.append(raw[at:].tobytes())
    return gaps


def _open_int8(
    payload: memoryview, n: int, group: int, blob_bytes: int, scratch: bool
) -> OpenedDelta:
    tensors = _read_table(payload, n, group, blob_bytes)  # bounds blob_bytes by the payload
    at = n * _ENTRY.itemsize
    out = np.empty(blob_bytes, np.uint8) if scratch else bytearray(blob_bytes)
    out_raw = np.frombuffer(out, dtype=np.uint8)
    src = np.frombuffer(payload, dtype=np.uint8)
    at = _fill_verbatim(out_raw, src, at, tensors)
    state = _check_rebuilt(out, tensors, lambda b, st: _f16_tensors(b, group, st))
    coded = []
    for t in tensors:
        n_scales = t.cells * (t.channels // group)
        scales = src[at : at + 2 * n_scales].view(np.float16).reshape(t.cells, -1)
        at += 2 * n_scales
        q = src[at : at + t.cells * t.channels].view(np.int8).reshape(t.cells, t.channels)
        at += t.cells * t.channels
        coded.append((t, CodedTensor(scales, q, group)))
    return OpenedDelta(out, coded, state)


# --- format version 2: low-bit modes ---------------------------------------------------------
def _coded_cells(t: _Tensor, spec: LowBitSpec) -> tuple[int, int]:
    """(cells coded in low bits, newest cells kept exact) of a tensor."""
    exact = min(spec.window_tokens, t.cells)
    return t.cells - exact, exact


def _bits(t: _Tensor, spec: LowBitSpec) -> int:
    return spec.key_bits if t.role == KEY else spec.value_bits


def _n_params(t: _Tensor, spec: LowBitSpec, coded: int) -> int:
    """How many (min, step) pairs a tensor's coded cells carry."""
    if t.role == KEY:
        return lowbit.key_groups(coded, spec.key_group_tokens) * t.channels
    return coded * (t.channels // spec.value_group_channels)


def _lowbit_tensor_bytes(t: _Tensor, spec: LowBitSpec) -> int:
    coded, exact = _coded_cells(t, spec)
    if spec.rotation and t.role == KEY:  # mode 4: channel ranges and one-byte group bounds
        params = (4 * t.channels if coded else 0) + 2 * _n_params(t, spec, coded)
    else:
        params = 4 * _n_params(t, spec, coded)
    return 2 * exact * t.channels + params + lowbit.packed_bytes(coded * t.channels, _bits(t, spec))


def _encode_lowbit(view: memoryview, spec: LowBitSpec, rope_spec: RopeSpec | None) -> bytes:
    placed = _lowbit_placed(view, spec.value_group_channels)
    tensors = [t for t, _, _ in placed]
    raw = np.frombuffer(view, dtype=np.uint8)
    preamble = []
    if spec.prerope:
        places = {t.offset: (section, pos) for t, section, pos in placed}
        keys = [t for t in tensors if t.role == KEY]
        if rope_spec is not None and any(t.channels % rope_spec.head_dim for t in keys):
            rope_spec = None  # not the model these keys came from: coded after RoPE
        preamble.append(_preamble(spec, rope_spec))

        def work(t: _Tensor) -> tuple[bytes, bool]:
            return _encode_prerope_tensor(raw, t, spec, rope_spec, *places[t.offset])
    else:

        def work(t: _Tensor) -> tuple[bytes, bool]:
            return _encode_lowbit_tensor(raw, t, spec)

    results = list(_pool.map(work, tensors))
    table = np.zeros(len(tensors), dtype=_ENTRY_V2)
    for i, (t, (_, rotated)) in enumerate(zip(tensors, results, strict=True)):
        table[i] = (t.offset, t.cells, t.channels, t.transposed, t.role, rotated, b"")
    coded = [part for part, _ in results]
    payload = b"".join([table.tobytes(), *preamble, *_gaps(raw, tensors), *coded])
    flags, stored = 0, payload
    if spec.deflate:
        # Level 1: codes are near-random; only the exact window and the verbatim bytes shrink,
        # and a higher level costs encode time for little more.
        deflated = zlib.compress(payload, 1)
        if len(deflated) < len(payload):
            flags, stored = _FLAG_DEFLATED, deflated
    header = _HEADER_V2.pack(
        MAGIC,
        LOWBIT_VERSION,
        spec.mode,
        flags,
        spec.key_bits,
        spec.value_bits,
        spec.key_group_tokens,
        spec.value_group_channels,
        spec.window_tokens,
        spec.rotation,
        len(tensors),
        zlib.crc32(stored),
        len(view),
        len(stored),
        len(payload),
    )
    return header + stored


def _encode_lowbit_tensor(raw: np.ndarray, t: _Tensor, spec: LowBitSpec) -> tuple[bytes, bool]:
    """The tensor's coded bytes, and whether they stand for its rotated cells (mode 4 V)."""
    x = _as_cells(raw[t.offset : t.offset + 2 * t.cells * t.channels], t)
    coded, _ = _coded_cells(t, spec)
    parts = [np.ascontiguousarray(x[coded:]).tobytes()]
    if coded and spec.rotation:
        rotated = _encode_mode4(parts, x[:coded], t, spec)
        return b"".join(parts), rotated
    if coded:
        if t.role == KEY:
            mins, steps, codes = lowbit.quantize_keys(
                x[:coded], spec.key_bits, spec.key_group_tokens
            )
        else:
            mins, steps, codes = lowbit.quantize_values(
                x[:coded], spec.value_bits, spec.value_group_channels
            )
        parts += [mins.tobytes(), steps.tobytes(), lowbit.pack(codes, _bits(t, spec)).tobytes()]
    return b"".join(parts), False


def _encode_mode4(parts: list, x16: np.ndarray, t: _Tensor, spec: LowBitSpec) -> bool:
    """Append a mode-4 tensor's coded cells to `parts`; whether they are rotated."""
    bits = _bits(t, spec)
    if t.role == KEY:
        cmin, cmax, lo, hi, codes = lowbit.quantize_keys_u8(x16, bits, spec.key_group_tokens)
        parts += [cmin.tobytes(), cmax.tobytes(), lo.tobytes(), hi.tobytes()]
        parts.append(lowbit.pack(codes, bits).tobytes())
        return False
    group = spec.value_group_channels
    if t.channels % spec.rotation == 0:
        y = lowbit.rotate(x16, spec.rotation)
        with np.errstate(over="ignore"):  # past the f16 range: refused below, coded unrotated
            mins, steps, codes = lowbit.quantize_values(y, bits, group)
        if lowbit.params_ok(mins, steps, bits, lowbit.rotation_limit(spec.rotation)):
            parts += [mins.tobytes(), steps.tobytes(), lowbit.pack(codes, bits).tobytes()]
            return True
    mins, steps, codes = lowbit.quantize_values(x16, bits, group)
    parts += [mins.tobytes(), steps.tobytes(), lowbit.pack(codes, bits).tobytes()]
    return False


def _preamble(spec: LowBitSpec, rope_spec: RopeSpec | None) -> bytes:
    if rope_spec is None:
        return _PREAMBLE.pack(spec.sink_tokens, 0, 0, 0, 0, 0.0)
    head = _PREAMBLE.pack(
        spec.sink_tokens,
        rope_spec.head_dim,
        rope_spec.n_rot,
        rope_spec.layout,
        len(rope_spec.bases),
        rope_spec.freq_scale,
    )
    return head + np.array(rope_spec.bases, dtype="<f4").tobytes()


def _sink_rows(x16: np.ndarray, positions: np.ndarray, sink_tokens: int):
    """(indices of the cells kept exact, the cells to code: those rows replaced by the first
    other cell's, so that they widen no key group and steer no bit allocation)."""
    sink = np.flatnonzero(positions < sink_tokens)
    if not sink.size or sink.size == len(positions):
        return sink, x16
    body = np.array(x16)
    body[sink] = x16[np.flatnonzero(positions >= sink_tokens)[0]]
    return sink, body


def _encode_prerope_tensor(
    raw: np.ndarray,
    t: _Tensor,
    spec: LowBitSpec,
    rope_spec: RopeSpec | None,
    section: int,
    positions: np.ndarray,
) -> tuple[bytes, bool]:
    """A mode-6 tensor's bytes, and whether they stand for its cells turned back (K) or
    rotated (V)."""
    x = _as_cells(raw[t.offset : t.offset + 2 * t.cells * t.channels], t)
    sink, body = _sink_rows(x, positions, spec.sink_tokens)
    parts = [np.ascontiguousarray(x[sink]).tobytes()]
    if t.role == VALUE:
        rotated = _encode_mode4(parts, body, t, spec)
        return b"".join(parts), rotated
    turned, x32 = False, None
    if rope_spec is not None:
        base = rope_spec.base_for(section)
        back = rope.turn(body, positions, rope_spec, base, back=True, in_place=False)
        limit = lowbit.PRE_ROPE_LIMIT
        if back.max() <= limit and back.min() >= -limit:  # NaN fails
            x32, turned = f16.as_f32(f16.as_f16(back)), True
    if x32 is None:
        x32 = f16.as_f32(body)
    bits = lowbit.allocate_bits(x32.var(axis=0), spec.mean_key_bits)
    cmin, cmax, lo, hi, packed = lowbit.quantize_keys_alloc(x32, bits, spec.key_group_tokens)
    parts += [bits.tobytes(), cmin.tobytes(), cmax.tobytes(), lo.tobytes(), hi.tobytes()]
    parts += [p.tobytes() for p in packed]
    return b"".join(parts), turned


def _decode_lowbit(view: memoryview) -> bytearray:
    if len(view) < _HEADER_V2.size:
        raise DeltaError("delta shorter than its header")
    (_, _, mode, flags, kb, vb, kg, vg, window, reserved, n, crc, blob_bytes, stored_bytes,
     payload_bytes) = _HEADER_V2.unpack_from(view)  # fmt: skip
    if mode not in (LOWBIT_MODE, ROTATED_MODE, PREROPE_MODE):
        raise DeltaError(f"unknown delta mode {mode}")
    if flags & ~_FLAG_DEFLATED or (mode == LOWBIT_MODE and reserved):
        raise DeltaError("low-bit delta has flags or reserved bits this build does not know")
    if mode != LOWBIT_MODE and not lowbit.is_block(reserved):
        raise DeltaError(f"rotated low-bit delta with a rotation block of {reserved}")
    try:
        spec = LowBitSpec(kb, vb, kg, vg, window, rotation=reserved, prerope=mode == PREROPE_MODE)
    except ValueError as exc:
        raise DeltaError(f"low-bit delta with impossible settings: {exc}") from None
    stored = view[_HEADER_V2.size :]
    if len(stored) != stored_bytes:
        raise DeltaError(f"delta payload is {len(stored)} bytes, header says {stored_bytes}")
    if zlib.crc32(stored) != crc:
        raise DeltaError("delta fails its checksum")
    if flags & _FLAG_DEFLATED:
        payload = _inflate(stored, payload_bytes)
    elif payload_bytes != stored_bytes:
        raise DeltaError("an undeflated delta payload must be stored as it is")
    else:
        payload = stored
    if spec.prerope:
        return _decode_prerope(payload, n, spec, blob_bytes)
    tensors, rotations = _read_table_v2(payload, n, spec, blob_bytes)  # bounds blob_bytes
    out = bytearray(blob_bytes)
    out_raw = np.frombuffer(out, dtype=np.uint8)
    src = np.frombuffer(payload, dtype=np.uint8)
    at = _fill_verbatim(out_raw, src, n * _ENTRY_V2.itemsize, tensors)
    _check_rebuilt(out, tensors, lambda b, st: _lowbit_tensors(b, spec.value_group_channels, st))
    jobs = []
    for t, rotated in zip(tensors, rotations, strict=True):
        size = _lowbit_tensor_bytes(t, spec)
        jobs.append((t, src[at : at + size], out_raw, rotated))
        at += size
    list(_pool.map(lambda job: _decode_lowbit_tensor(*job, spec), jobs))
    return out


def _inflate(stored: memoryview, payload_bytes: int) -> memoryview:
    # Deflate expands at most ~1032:1: a larger claim is refused before anything is inflated.
    if payload_bytes > 1032 * len(stored) + 64:
        raise DeltaError(f"a {len(stored)}-byte deflated payload cannot hold {payload_bytes}")
    inflater = zlib.decompressobj()
    try:
        payload = inflater.decompress(stored, payload_bytes)
    except zlib.error as exc:
        raise DeltaError(f"delta payload does not inflate: {exc}") from None
    if len(payload) != payload_bytes or not inflater.eof or inflater.unconsumed_tail:
        raise DeltaError(f"delta payload does not inflate to the {payload_bytes} bytes it states")
    return memoryview(payload)


def _read_table_v2(
    payload: memoryview, n: int, spec: LowBitSpec, blob_bytes: int
) -> tuple[list[_Tensor], list[bool]]:
    """The tensor table, checked as in version 1, plus roles, rotations and (but in mode 6,
    whose sizes depend on what its tensors hold) the low-bit sizes; returns the tensors (as
    `_lowbit_tensors` finds them) and whether each is rotated (turned back, for mode-6 K)."""
    if n * _ENTRY_V2.itemsize > len(payload):
        raise DeltaError(f"delta tensor table of {n} entries exceeds its payload")
    tensors, rotations, pos, coded = [], [], 0, 0
    for offset, cells, channels, transposed, role, rotated, pad in np.frombuffer(
        payload, dtype=_ENTRY_V2, count=n
    ).tolist():
        if transposed > 1 or role > 1 or rotated > 1 or any(pad):
            raise DeltaError(f"delta tensor {len(tensors)} has a malformed table entry")
        if rotated and not _can_rotate(role, channels, spec):
            raise DeltaError(f"delta tensor {len(tensors)} cannot be rotated")
        group = spec.value_group_channels if role == VALUE else 1
        pos = _check_span(len(tensors), offset, cells, channels, group, pos, blob_bytes)
        t = _Tensor(offset, cells, channels, bool(transposed), role)
        if not spec.prerope:
            coded += _lowbit_tensor_bytes(t, spec)
        tensors.append(t)
        rotations.append(bool(rotated))
    if not spec.prerope:
        _check_payload_size(payload, n * _ENTRY_V2.itemsize, tensors, coded, blob_bytes)
    return tensors, rotations


def _can_rotate(role: int, channels: int, spec: LowBitSpec) -> bool:
    """Whether a table entry may say rotated: a V tensor of whole blocks, or a mode-6 K."""
    if not spec.rotation:
        return False
    return spec.prerope if role == KEY else channels % spec.rotation == 0


def _decode_lowbit_tensor(
    t: _Tensor, src: np.ndarray, out_raw: np.ndarray, rotated: bool, spec: LowBitSpec
) -> None:
    """Dequantise one tensor's coded bytes (`src`, exactly its size) into the rebuilt blob."""
    coded, exact = _coded_cells(t, spec)
    dest = _as_cells(out_raw[t.offset : t.offset + 2 * t.cells * t.channels], t)
    at = 2 * exact * t.channels
    dest[coded:] = src[:at].view(np.float16).reshape(exact, t.channels)
    if not coded:
        return
    if spec.rotation and t.role == KEY:
        _decode_keys_u8(t, src[at:], dest[:coded], coded, spec)
        return
    n_params = _n_params(t, spec, coded)
    mins = src[at : at + 2 * n_params].view(np.float16)
    steps = src[at + 2 * n_params : at + 4 * n_params].view(np.float16)
    packed = src[at + 4 * n_params :]
    bits = _bits(t, spec)
    limit = lowbit.rotation_limit(spec.rotation) if rotated else lowbit.F16_MAX
    if not lowbit.params_ok(mins, steps, bits, limit):
        raise DeltaError("delta has a min or step no encoder writes (NaN, negative, too large)")
    if not lowbit.padding_is_zero(packed, coded * t.channels, bits):
        raise DeltaError("delta has bits after its last code")
    codes = lowbit.unpack(packed, coded * t.channels, bits).reshape(coded, t.channels)
    if t.role == KEY:
        shape = (-1, t.channels)
        lowbit.dequantize_keys_into(
            dest[:coded], mins.reshape(shape), steps.reshape(shape), codes, spec.key_group_tokens
        )
    elif rotated:
        y = lowbit.dequantize_values(
            mins.reshape(coded, -1), steps.reshape(coded, -1), codes, spec.value_group_channels
        )
        f16.store_f16(dest[:coded], lowbit.unrotate(y, spec.rotation))
    else:
        shape = (coded, -1)
        lowbit.dequantize_values_into(
            dest[:coded],
            mins.reshape(shape),
            steps.reshape(shape),
            codes,
            spec.value_group_channels,
        )


def _decode_keys_u8(
    t: _Tensor, src: np.ndarray, dest: np.ndarray, coded: int, spec: LowBitSpec
) -> None:
    """A mode-4 K tensor's coded cells: channel ranges, one-byte group bounds, codes."""
    ch = t.channels
    groups = lowbit.key_groups(coded, spec.key_group_tokens)
    cmin = src[: 2 * ch].view(np.float16)
    cmax = src[2 * ch : 4 * ch].view(np.float16)
    at = 4 * ch
    lo = src[at : at + groups * ch].reshape(groups, ch)
    hi = src[at + groups * ch : at + 2 * groups * ch].reshape(groups, ch)
    packed = src[at + 2 * groups * ch :]
    if not lowbit.bounds_ok(cmin, cmax, lo, hi):
        raise DeltaError("delta has a key range or group bound no encoder writes")
    if not lowbit.padding_is_zero(packed, coded * ch, spec.key_bits):
        raise DeltaError("delta has bits after its last code")
    codes = lowbit.unpack(packed, coded * ch, spec.key_bits).reshape(coded, ch)
    lowbit.dequantize_keys_u8_into(
        dest, cmin, cmax, lo, hi, codes, spec.key_bits, spec.key_group_tokens
    )


# --- mode 6 -----------------------------------------------------------------------------------
def _read_preamble(payload: memoryview, at: int) -> tuple[int, RopeSpec | None, int]:
    """(sink_tokens, the RoPE keys were turned back by or None, where the preamble ends)."""
    if at + _PREAMBLE.size > len(payload):
        raise DeltaError("mode-6 delta shorter than its preamble")
    sink, head_dim, n_rot, layout, n_bases, scale = _PREAMBLE.unpack_from(payload, at)
    at += _PREAMBLE.size
    if layout == 0:
        if head_dim or n_rot or n_bases or scale:
            raise DeltaError("mode-6 delta without RoPE has RoPE settings")
        return sink, None, at
    if at + 4 * n_bases > len(payload):
        raise DeltaError("mode-6 delta shorter than its RoPE bases")
    bases = np.frombuffer(payload, dtype="<f4", count=n_bases, offset=at)
    try:
        spec = RopeSpec(layout, head_dim, n_rot, float(scale), tuple(float(b) for b in bases))
    except ValueError as exc:
        raise DeltaError(f"mode-6 delta with an impossible RoPE: {exc}") from None
    return sink, spec, at + 4 * n_bases


def _decode_prerope(payload: memoryview, n: int, spec: LowBitSpec, blob_bytes: int) -> bytearray:
    tensors, flags = _read_table_v2(payload, n, spec, blob_bytes)  # bounds blob_bytes
    sink_tokens, rope_spec, at = _read_preamble(payload, n * _ENTRY_V2.itemsize)
    spec = replace(spec, sink_tokens=sink_tokens)
    for t, flag in zip(tensors, flags, strict=True):
        if flag and t.role == KEY and (rope_spec is None or t.channels % rope_spec.head_dim):
            raise DeltaError("mode-6 delta has a key turned back by a RoPE it does not state")
    verbatim = blob_bytes - sum(2 * t.cells * t.channels for t in tensors)
    if at + verbatim > len(payload):
        raise DeltaError("mode-6 delta payload is shorter than the blob's other bytes")
    out = bytearray(blob_bytes)
    out_raw = np.frombuffer(out, dtype=np.uint8)
    src = np.frombuffer(payload, dtype=np.uint8)
    at = _fill_verbatim(out_raw, src, at, tensors)
    placed: list = []

    def find(blob: memoryview, state: SeqState) -> list[_Tensor]:  # the check and the places
        placed.extend(_lowbit_placed(blob, spec.value_group_channels, state))
        return [t for t, _, _ in placed]

    _check_rebuilt(out, tensors, find)
    places = {t.offset: (section, pos) for t, section, pos in placed}
    jobs = []
    for t, flag in zip(tensors, flags, strict=True):
        section, positions = places[t.offset]
        sink = np.flatnonzero(positions < sink_tokens)
        size = _prerope_tensor_bytes(t, src, at, sink.size, spec)
        jobs.append((t, src[at : at + size], out_raw, flag, sink, section, positions))
        at += size
    if at != len(payload):
        raise DeltaError(f"delta payload is {len(payload)} bytes; its tensors take {at}")

    def one(job) -> None:
        t, part, out_raw, flag, sink, section, positions = job
        dest = _as_cells(out_raw[t.offset : t.offset + 2 * t.cells * t.channels], t)
        exact = part[: 2 * sink.size * t.channels].view(np.float16).reshape(-1, t.channels)
        body = part[2 * sink.size * t.channels :]
        if t.role == VALUE:
            _decode_lowbit_tensor(t, body, out_raw, flag, spec)
        else:
            turn_by = (rope_spec, rope_spec.base_for(section), positions) if flag else None
            _decode_prerope_keys(t, body, dest, spec, turn_by)
        dest[sink] = exact

    list(_pool.map(one, jobs))
    return out


def _prerope_tensor_bytes(t: _Tensor, src: np.ndarray, at: int, n_sink: int, spec) -> int:
    """A mode-6 tensor's size, read from its bits (K) where they lie inside `src`."""
    ch = t.channels
    sink_bytes = 2 * n_sink * ch
    if t.role == VALUE:
        params = 4 * t.cells * (ch // spec.value_group_channels)
        return sink_bytes + params + lowbit.packed_bytes(t.cells * ch, spec.value_bits)
    start = at + sink_bytes
    if start + ch > len(src):
        raise DeltaError("mode-6 delta ends inside a key tensor's bits")
    bits = src[start : start + ch]
    if int(bits.max()) > lowbit.MAX_KEY_BITS:
        raise DeltaError("delta has a key channel wider than any encoder writes")
    groups = lowbit.key_groups(t.cells, spec.key_group_tokens)
    size = sink_bytes + 5 * ch + 2 * groups * int(np.count_nonzero(bits))
    size += lowbit.plane_bytes(bits, t.cells)
    if at + size > len(src):
        raise DeltaError("mode-6 delta ends inside a key tensor")
    return size


def _decode_prerope_keys(t: _Tensor, src: np.ndarray, dest: np.ndarray, spec, turn_by) -> None:
    """A mode-6 K tensor's coded cells (`src`: from its bits on) into `dest`, turned forward
    by `turn_by` (RoPE spec, base, positions) when it was coded before RoPE."""
    ch, cells = t.channels, t.cells
    groups = lowbit.key_groups(cells, spec.key_group_tokens)
    bits = src[:ch]
    cmin = src[ch : 3 * ch].view(np.float16)
    cmax = src[3 * ch : 5 * ch].view(np.float16)
    n_coded = int(np.count_nonzero(bits))
    at = 5 * ch
    lo = src[at : at + groups * n_coded].reshape(groups, n_coded)
    hi = src[at + groups * n_coded : at + 2 * groups * n_coded].reshape(groups, n_coded)
    at += 2 * groups * n_coded
    if not lowbit.alloc_bounds_ok(cmin, cmax, lo, hi, bits):
        raise DeltaError("delta has a key range, bound or width no encoder writes")
    limit = lowbit.PRE_ROPE_LIMIT if turn_by else lowbit.F16_MAX
    reach = max(-float(cmin.astype(np.float32).min()), float(cmax.astype(np.float32).max()))
    if reach > limit:  # bounds_ok: cmin <= cmax, so these are the extremes
        raise DeltaError("delta has a key turned back past what turns forward to an f16")
    planes, layout = [], lowbit.plane_layout(bits)
    for width, channels_of, _ in layout:
        size = lowbit.packed_bytes(cells * channels_of.size, width)
        packed = src[at : at + size]
        if not lowbit.padding_is_zero(packed, cells * channels_of.size, width):
            raise DeltaError("delta has bits after its last code")
        planes.append(packed)
        at += size
    codes = lowbit.unpack_planes(planes, bits, cells, layout)
    body = np.empty((cells, ch), np.float32)
    group = spec.key_group_tokens
    lowbit.dequantize_keys_alloc_into(body, cmin, cmax, lo, hi, codes, bits, group)
    if turn_by is not None:
        rope_spec, base, positions = turn_by
        body = rope.turn(body, positions, rope_spec, base, back=False, in_place=True)
    f16.store_f16(dest, body)
