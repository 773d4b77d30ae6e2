"""Collaborative blocks: parts of idle sessions' deltas that several sessions hold, stored once.

Sessions of one family often hold the same tokens past the family prefix they share: the
branches of a conversation (an edited last message, a regenerate under a new id, an agent's
parallel tries), few-shot turns written as user/assistant messages, a document pasted into the
first user turn. Each parked session used to store its own copy of that KV.

A session's private cells [prefix, n) are cut into parts of `part_tokens` cells, at positions
prefix + k * part_tokens; every part but the last is keyed by a hash of the model fingerprint,
a scope (the engine's: the session's first block key, salted per `cache_salt` as every block
key is, so that tenants under different salts share nothing), the prefix length, the part size
and every token up to the part's end. One key means the same
tokens at the same positions after the same prefix, hence the same KV up to the engine's own
noise (two sessions may have computed those tokens in other chunks, which moves values as much
as a different batch split does, and no more). The warm tier keeps one copy of a keyed part,
counted by the records that use it; the last part, the session's newest cells, is its own. A
part found stored when a session is parked is not encoded again.

Parts cost decoding time (each is a codec container of its own: ~1.4 ms a part for int8 on 2
cores), so a session is cut only once another warm session holds one of its part keys, and
only as far as the last part they share; until then the rest is one delta, and the store
remembers the keys it could be cut at (`tiers.SessionStore`). The keys also find KV for
computing: a new conversation whose prompt starts with stored parts restores them instead of
prefilling them (`SessionStore.take_parts`).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import numpy as np

from kv3d.engine.codec import (
    LOWBIT_MODES,
    Mode,
    OpenedDelta,
    decode_delta,
    dequantize_into,
    open_delta,
)
from kv3d.engine.statefmt import (
    SeqState,
    build_seq_state,
    cells_from,
    join_cells,
    layout_blob,
    with_cell_seq_ids,
    with_seq_id,
)

# 128 bits: a part is found by its key alone (no tokens to confirm it, unlike a prefix block),
# so a collision must be out of reach, not only rare.
KEY_BYTES = 16
_SEED = struct.Struct("<II")  # prefix tokens, part tokens


def splittable(mode: Mode) -> bool:
    """Whether sessions coded with `mode` are cut into parts: int8 and f16, which code every
    cell on its own. Not the low-bit modes: those with an exact window would keep every part's
    newest tokens exact, and the rotated and pre-RoPE decoders pay ~11-14 ms a part on 2 cores
    (their per-tensor set-up), which would triple a 1k-token session's resume."""
    return mode not in LOWBIT_MODES


def part_ends(prefix_tokens: int, end_cells: int, part_tokens: int) -> list[int]:
    """Where the keyed parts of cells [prefix_tokens, end_cells) end: every `part_tokens`,
    leaving at least one cell to the last, unkeyed part."""
    if part_tokens <= 0:
        return []
    return list(range(prefix_tokens + part_tokens, end_cells, part_tokens))


def part_keys(
    fingerprint: bytes, prefix_tokens: int, part_tokens: int, tokens, ends: list[int]
) -> list[int]:
    """The keys of the parts ending at `ends` (chained over the tokens, so each covers all
    tokens up to its end)."""
    data = np.asarray(tokens, dtype="<i4").tobytes()
    h = hashlib.blake2b(fingerprint + _SEED.pack(prefix_tokens, part_tokens), digest_size=KEY_BYTES)
    h.update(data[: 4 * prefix_tokens])
    keys, start = [], prefix_tokens
    for end in ends:
        h.update(data[4 * start : 4 * end])
        keys.append(int.from_bytes(h.copy().digest(), "little"))
        start = end
    return keys


def end_position(state: SeqState) -> int:
    """One past the last cell position of a state (0 without cells)."""
    ends = [
        int(stream.cell_positions.max()) + 1
        for section in state.sections
        for stream in section.streams
        if stream.n_cells
    ]
    return max(ends, default=0)


def cut(state: SeqState, start: int, end: int | None = None) -> bytes:
    """The blob of a state's cells at positions [start, end)."""
    return build_seq_state(cells_from(state, start, end))


def decode_parts(deltas: list[bytes]) -> bytearray:
    """The sequence-state blob that a session's encoded parts, in position order, stand for.
    Raises `DeltaError` for a part that fails its checks, `StateFormatError` for parts that do
    not join (another model's, or cut from another cache layout).

    Each part's tensors are decoded straight into their place in the joined blob, on one pass
    of the codec's pool: no per-part blob is joined and copied again (~1.5x faster than
    decoding parts one by one and joining them, for 8 parts of a 1k-token session)."""
    if len(deltas) == 1:
        return decode_delta(deltas[0])
    opened = [open_delta(d, scratch=True) for d in deltas]
    states = [o.state for o in opened]
    shape = _stamped(join_cells(states, copy_data=False), states[-1])
    blob, places = layout_blob(shape)
    jobs = []
    for i, section in enumerate(shape.sections):
        for j, joined in enumerate(section.streams):
            start = 0
            for o, state in zip(opened, states, strict=True):
                part = state.sections[i].streams[j]
                if part.n_cells:
                    jobs += _place(o, part, joined, start, places)
                    start += part.n_cells
    dequantize_into(jobs)
    return blob


def _place(opened: OpenedDelta, part, joined, start: int, places) -> list:
    """Copy a part's verbatim layers into the joined blob; its coded ones, as jobs to decode
    into it."""
    base = np.frombuffer(opened.skeleton, np.uint8).__array_interface__["data"][0]
    coded = {t.offset: c for t, c in opened.coded}
    jobs = []
    pairs = zip(joined.k_layers + joined.v_layers, part.k_layers + part.v_layers, strict=True)
    for into, layer in pairs:
        dest = into.cell_rows(joined.n_cells, start, part.n_cells, places[id(into.data)])
        c = coded.get(layer.data.__array_interface__["data"][0] - base)
        if c is None:
            dest[...] = layer.rows(part.n_cells)
        elif layer.transposed:  # (channels, cells x 2 bytes) -> (cells, channels) f16
            jobs.append((dest.view(np.float16).T, c))
        else:
            jobs.append((dest.view(np.float16), c))
    return jobs


def _stamped(joined: SeqState, own: SeqState) -> SeqState:
    """Parts coded from another session's cells carry its seq ids; llama.cpp ignores them on
    restore, but stamped with the last part's own, parts decode to what one delta would."""
    joined = with_seq_id(joined, own.seq_id)
    ids = next((s.cell_seq_ids[0] for sec in own.sections for s in sec.streams if s.n_cells), None)
    return joined if ids is None else with_cell_seq_ids(joined, ids)


def join_states(states: list[SeqState]) -> bytearray:
    """The blob of `states` (cuts of one sequence, in position order) joined, stamped with the
    last state's seq ids (see `_stamped`)."""
    return bytearray(build_seq_state(_stamped(join_cells(states), states[-1])))


@dataclass(slots=True)
class _Stored:
    delta: bytes
    refs: int


class SharedParts:
    """Keyed parts held by warm records, one copy each.

    Invariant: a part is held while at least one record that uses it is warm (`refs` counts
    them), and `nbytes` is the sum of the held parts' bytes. Not thread-safe: the session
    store calls it under its own lock.
    """

    def __init__(self) -> None:
        self._parts: dict[int, _Stored] = {}
        self.nbytes = 0
        self.saved_bytes = 0  # bytes the records' extra references would have held on their own

    def __len__(self) -> int:
        return len(self._parts)

    def get(self, key: int) -> bytes | None:
        stored = self._parts.get(key)
        return stored.delta if stored is not None else None

    def acquire(self, key: int, delta: bytes) -> int:
        """Hold `delta` under `key` for one more record; the bytes this adds to memory."""
        stored = self._parts.get(key)
        if stored is not None:
            stored.refs += 1
            self.saved_bytes += len(stored.delta)
            return 0
        self._parts[key] = _Stored(delta, 1)
        self.nbytes += len(delta)
        return len(delta)

    def release(self, key: int) -> int:
        """Drop one record's hold on a part; the bytes this frees."""
        stored = self._parts.get(key)
        if stored is None:
            return 0
        stored.refs -= 1
        if stored.refs > 0:
            self.saved_bytes -= len(stored.delta)
            return 0
        del self._parts[key]
        self.nbytes -= len(stored.delta)
        return len(stored.delta)
