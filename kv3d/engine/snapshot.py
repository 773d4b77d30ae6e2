"""The prefix snapshot: a hot prefix's KV state in a versioned, self-checking container.

Layout (little-endian), format version 1:
    magic "KV3DSNAP" | u16 version | u16 reserved | 16-byte model fingerprint | u64 key
    | u32 n_tokens | u32 n_blocks | u32 state_crc32 | u64 state_bytes
    | i32 tokens[n_tokens] | (u64 block_key, u32 block_end)[n_blocks] | llama.cpp sequence state
A snapshot is only ever applied after `decode_snapshot` checked every field against the replica
that loads it; anything off raises `SnapshotError` and the request recomputes.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

from kv3d.engine.prefix import Block
from kv3d.engine.statefmt import byte_view

MAGIC = b"KV3DSNAP"
VERSION = 1
_HEADER = struct.Struct("<8sHH16sQIIIQ")
_BLOCK = np.dtype([("key", "<u8"), ("end", "<u4")])


class SnapshotError(ValueError):
    """A snapshot that must not be applied (corrupt, foreign model, other format version)."""


@dataclass(frozen=True, slots=True)
class SnapshotMeta:
    key: int
    fingerprint: bytes
    n_tokens: int
    state_bytes: int
    block_keys: tuple[int, ...]
    # Who the family belongs to (`GenerationRequest.tenant`): told to the registry beside the
    # container, never stored in it ("" in a decoded snapshot).
    tenant: str = ""


@dataclass(frozen=True, slots=True)
class Snapshot:
    meta: SnapshotMeta
    tokens: tuple[int, ...]
    blocks: tuple[Block, ...]
    state: memoryview  # llama.cpp sequence state, a view into the container


def encode_snapshot(
    key: int, fingerprint: bytes, tokens: tuple[int, ...], blocks: tuple[Block, ...], state: bytes
) -> bytes:
    header = _HEADER.pack(
        MAGIC,
        VERSION,
        0,
        fingerprint,
        key,
        len(tokens),
        len(blocks),
        zlib.crc32(state),
        len(state),
    )
    block_arr = np.array([(b.key, b.end_tokens) for b in blocks], dtype=_BLOCK)
    return b"".join((header, np.asarray(tokens, dtype="<i4").tobytes(), block_arr.tobytes(), state))


def decode_snapshot(buf, fingerprint: bytes) -> Snapshot:
    """Parse and verify a container; `buf` is any bytes-like object (an Arrow buffer too).
    Every field is checked: anything off raises `SnapshotError`, and only that. (The state's
    own layout is checked where it is restored.)"""
    view = byte_view(buf, SnapshotError, "a snapshot")
    if len(view) < _HEADER.size:
        raise SnapshotError(f"snapshot of {len(view)} bytes is shorter than its header")
    magic, version, reserved, fp, key, n_tokens, n_blocks, crc, state_bytes = _HEADER.unpack_from(
        view
    )
    if magic != MAGIC:
        raise SnapshotError("not a KV3D snapshot (bad magic)")
    if version != VERSION or reserved != 0:
        raise SnapshotError(f"snapshot format version {version}; this build reads {VERSION}")
    if fp != fingerprint:
        raise SnapshotError("snapshot was made for another model, llama.cpp build or cache type")
    at = _HEADER.size
    expected = at + 4 * n_tokens + _BLOCK.itemsize * n_blocks + state_bytes
    if len(view) != expected:
        raise SnapshotError(f"snapshot is {len(view)} bytes; its header says {expected}")
    raw_tokens = np.frombuffer(view, dtype="<i4", count=n_tokens, offset=at)
    at += 4 * n_tokens
    raw_blocks = np.frombuffer(view, dtype=_BLOCK, count=n_blocks, offset=at)
    at += _BLOCK.itemsize * n_blocks
    state = view[at:]
    if zlib.crc32(state) != crc:
        raise SnapshotError("snapshot state fails its checksum")
    if n_tokens and raw_tokens.min() < 0:
        raise SnapshotError("snapshot tokens hold a negative token id")
    ends = raw_blocks["end"].astype(np.int64)
    if n_blocks and (ends[0] <= 0 or (np.diff(ends) <= 0).any()):
        raise SnapshotError("snapshot block ends are not increasing")
    blocks = tuple(Block(int(k), int(e)) for k, e in raw_blocks.tolist())
    if not blocks or blocks[-1].end_tokens != n_tokens or blocks[-1].key != key:
        raise SnapshotError("snapshot blocks do not end at its key")
    tokens = tuple(raw_tokens.tolist())
    meta = SnapshotMeta(key, bytes(fp), n_tokens, state_bytes, tuple(b.key for b in blocks))
    return Snapshot(meta, tokens, blocks, state)
