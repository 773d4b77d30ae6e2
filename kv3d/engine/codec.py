"""The session delta codec: a llama.cpp sequence state with its f16 K/V stored as int8.

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
"""

from __future__ import annotations

import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np

from kv3d.engine.statefmt import LayerTensor, StateFormatError, byte_view, parse_seq_state

MAGIC = b"KV3DDLT1"
VERSION = 1
GGML_TYPE_F16 = 1
_HEADER = struct.Struct("<8sHBBHHIIQQ")
_ENTRY = np.dtype(
    [("offset", "<u8"), ("cells", "<u4"), ("channels", "<u4"), ("transposed", "u1"), ("pad", "V7")]
)
MODES = {"int8": 1, "f16": 2}
_MAX_SCALE = np.float16(np.finfo(np.float16).max / 127.0)  # the largest scale f16 input gives
Mode = Literal["int8", "f16"]

_pool = ThreadPoolExecutor(
    max_workers=max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="kv3d-codec"
)


class DeltaError(ValueError):
    """An encoded delta that must not be applied (corrupt, truncated, other version)."""


@dataclass(frozen=True, slots=True)
class _Tensor:
    offset: int
    cells: int
    channels: int
    transposed: bool


def _f16_tensors(blob: memoryview, group: int) -> list[_Tensor]:
    """Where the f16 K/V tensors of `blob` sit whose channels split into whole groups."""
    state = parse_seq_state(blob)
    base = np.frombuffer(blob, dtype=np.uint8).__array_interface__["data"][0]
    found = []
    for section in state.sections:
        for stream in section.streams:
            for layer in stream.k_layers + stream.v_layers:
                t = _describe(layer, stream.n_cells, base)
                if t is not None and t.channels % group == 0:
                    found.append(t)
    return sorted(found, key=lambda t: t.offset)


def _describe(layer: LayerTensor, n_cells: int, base: int) -> _Tensor | None:
    if layer.type_id != GGML_TYPE_F16 or n_cells == 0:
        return None
    odd = layer.el_size != 2 if layer.transposed else layer.row_bytes % 2 != 0
    if odd:
        return None  # not laid out as f16 elements whatever its type says: kept verbatim
    offset = layer.data.__array_interface__["data"][0] - base
    if layer.transposed:
        return _Tensor(offset, n_cells, layer.n_embd_v_gqa, True)
    return _Tensor(offset, n_cells, layer.row_bytes // 2, False)


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
    x = x16.astype(np.float32).reshape(cells, channels // group, group)
    scales = (np.abs(x).max(axis=2) / 127.0).astype(np.float16)
    s = scales.astype(np.float32)
    inv = np.divide(1.0, s, out=np.zeros_like(s), where=s > 0)
    x *= inv[:, :, None]
    np.rint(x, out=x)
    np.clip(x, -127, 127, out=x)
    return scales, x.astype(np.int8).reshape(cells, channels)


def _dequantize_into(out16: np.ndarray, scales: np.ndarray, q: np.ndarray, group: int) -> None:
    cells, channels = q.shape
    x = q.reshape(cells, channels // group, group).astype(np.float32)
    x *= scales.astype(np.float32)[:, :, None]
    out16[...] = x.reshape(cells, channels)


def encode_delta(blob, mode: Mode = "int8", group: int = 32) -> bytes:
    """Encode a sequence-state blob (any bytes-like object)."""
    view = memoryview(blob).cast("B")
    if mode == "f16":
        return _pack(MODES["f16"], group, 0, len(view), [bytes(view)])
    tensors = _f16_tensors(view, group)
    raw = np.frombuffer(view, dtype=np.uint8)
    table = np.zeros(len(tensors), dtype=_ENTRY)
    gaps, at = [], 0
    for i, t in enumerate(tensors):
        table[i] = (t.offset, t.cells, t.channels, t.transposed, b"")
        gaps.append(raw[at : t.offset])
        at = t.offset + 2 * t.cells * t.channels
    gaps.append(raw[at:])

    def one(t: _Tensor) -> tuple[bytes, bytes]:
        nbytes = 2 * t.cells * t.channels
        scales, q = backend().quantize(_as_cells(raw[t.offset : t.offset + nbytes], t), group)
        return scales.tobytes(), q.tobytes()

    coded = list(_pool.map(one, tensors))
    parts = [table.tobytes(), *(g.tobytes() for g in gaps)]
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
    if len(view) < _HEADER.size:
        raise DeltaError("delta shorter than its header")
    magic, version, mode, _, group, _, n, crc, blob_bytes, payload_bytes = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise DeltaError("not a KV3D delta (bad magic)")
    if version != VERSION:
        raise DeltaError(f"delta format version {version}; this build reads {VERSION}")
    payload = view[_HEADER.size :]
    if len(payload) != payload_bytes:
        raise DeltaError(f"delta payload is {len(payload)} bytes, header says {payload_bytes}")
    if zlib.crc32(payload) != crc:
        raise DeltaError("delta fails its checksum")
    if mode == MODES["f16"]:
        if n != 0 or blob_bytes != len(payload):
            raise DeltaError("an f16 delta holds its blob verbatim and no tensor table")
        out = bytearray(payload)
        _check_rebuilt(out, [], group=0)
        return out
    if mode != MODES["int8"]:
        raise DeltaError(f"unknown delta mode {mode}")
    if group == 0:
        raise DeltaError("int8 delta with a group of 0 channels")
    return _decode_int8(payload, n, group, blob_bytes)


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
        if cells == 0 or channels == 0 or channels % group:
            raise DeltaError(
                f"delta tensor {len(tensors)} is {cells} cells x {channels} channels, "
                f"not whole groups of {group}"
            )
        if offset < pos:
            raise DeltaError("delta tensor table overlaps or is out of order")
        pos = offset + 2 * cells * channels
        if pos > blob_bytes:
            raise DeltaError(f"delta tensor {len(tensors)} lies outside its {blob_bytes}-byte blob")
        coded += 2 * cells * (channels // group) + cells * channels
        tensors.append(_Tensor(offset, cells, channels, bool(transposed)))
    verbatim = blob_bytes - sum(2 * t.cells * t.channels for t in tensors)
    expected = n * _ENTRY.itemsize + verbatim + coded
    if expected != len(payload):
        raise DeltaError(f"delta payload is {len(payload)} bytes; its tensor table says {expected}")
    return tensors


def _check_rebuilt(blob: bytearray, tensors: list[_Tensor], group: int) -> None:
    """The rebuilt bytes must be a sequence state whose f16 tensors (those an encoder with
    `group` codes; none in f16 mode) are exactly `tensors`."""
    try:
        if group:
            found = _f16_tensors(memoryview(blob), group)
        else:
            parse_seq_state(blob)
            found = []
    except StateFormatError as exc:
        raise DeltaError(f"delta does not rebuild a sequence state: {exc}") from None
    if found != tensors:
        raise DeltaError("delta tensor table disagrees with the state it rebuilds")


def _decode_int8(payload: memoryview, n: int, group: int, blob_bytes: int) -> bytearray:
    tensors = _read_table(payload, n, group, blob_bytes)  # bounds blob_bytes by the payload
    at = n * _ENTRY.itemsize
    out = bytearray(blob_bytes)
    out_raw = np.frombuffer(out, dtype=np.uint8)
    src = np.frombuffer(payload, dtype=np.uint8)
    pos = 0
    for t in tensors:  # the bytes between tensors, in order
        gap = t.offset - pos
        out_raw[pos : t.offset] = src[at : at + gap]
        at += gap
        pos = t.offset + 2 * t.cells * t.channels
    tail = blob_bytes - pos
    out_raw[pos:] = src[at : at + tail]
    at += tail
    _check_rebuilt(out, tensors, group)
    jobs = []
    for t in tensors:
        n_scales = t.cells * (t.channels // group)
        scales = src[at : at + 2 * n_scales].view(np.float16).reshape(t.cells, -1)
        at += 2 * n_scales
        q = src[at : at + t.cells * t.channels].view(np.int8).reshape(t.cells, t.channels)
        at += t.cells * t.channels
        if not ((scales >= 0) & (scales <= _MAX_SCALE)).all():  # NaN fails both
            raise DeltaError("delta has a scale no encoder writes (negative, too large, NaN)")
        dest = _as_cells(out_raw[t.offset : t.offset + 2 * t.cells * t.channels], t)
        jobs.append((dest, scales, q))
    codec = backend()
    if isinstance(codec, NumpyCodec):
        list(_pool.map(lambda job: _dequantize_into(job[0], job[1], job[2], group), jobs))
    else:
        for dest, scales, q in jobs:
            dest[...] = codec.dequantize(scales, q, group)
    return out
