"""kv3d.engine.statefmt on hand-written blobs.

The blobs come from `Writer` below, a deliberately naive struct.pack transcription of
llama.cpp's `state_write` (llama-kv-cache.cpp), so the parser is checked against the format
rather than against the module's own builder.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np
import pytest

from kv3d.engine.statefmt import (
    STATE_MAGIC,
    CacheSection,
    LayerTensor,
    SeqState,
    StateFormatError,
    StreamState,
    build_seq_state,
    parse_seq_state,
    with_seq_id,
)

F16 = 1  # ggml type id of f16


@dataclass
class Stream:
    """One stream to write: cells as (pos, seq_ids[, ext]) and per-layer payloads."""

    cells: list[tuple]
    n_layer: int = 2
    v_trans: bool = False
    row_bytes: int = 8
    el_size: int = 2
    n_embd_v: int = 4
    has_v: bool = True
    k_data: list[bytes] = field(default_factory=list)
    v_data: list[bytes] = field(default_factory=list)


def payload(n_bytes: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n_bytes, dtype=np.uint8).tobytes()


def write_stream(s: Stream, seed: int) -> bytes:
    out = [struct.pack("<I", len(s.cells))]
    if not s.cells:
        return out[0]
    for pos, ids, *ext in s.cells:
        out.append(struct.pack("<iI", pos, len(ids)))
        if ext:
            out.append(struct.pack("<3i", *ext[0]))
        out.append(struct.pack(f"<{len(ids)}i", *ids))
    n = len(s.cells)
    out.append(struct.pack("<II", int(s.v_trans), s.n_layer))
    for il in range(s.n_layer):
        s.k_data.append(payload(s.row_bytes * n, seed + il))
        out += [struct.pack("<iQ", F16, s.row_bytes), s.k_data[-1]]
    for il in range(s.n_layer if s.has_v else 0):
        if s.v_trans:
            s.v_data.append(payload(s.el_size * s.n_embd_v * n, seed + 100 + il))
            out += [struct.pack("<iII", F16, s.el_size, s.n_embd_v), s.v_data[-1]]
        else:
            s.v_data.append(payload(s.row_bytes * n, seed + 100 + il))
            out += [struct.pack("<iQ", F16, s.row_bytes), s.v_data[-1]]
    return b"".join(out)


def write_blob(sections: list[list[Stream]], seq_id: int = 0) -> bytes:
    out = [struct.pack("<Ii", STATE_MAGIC, seq_id)]
    for i, streams in enumerate(sections):
        out.append(struct.pack("<I", len(streams)))
        out += [write_stream(s, seed=1000 * i + 10 * j) for j, s in enumerate(streams)]
    return b"".join(out)


def cells(n: int, seq_id: int = 0, start: int = 0) -> list[tuple]:
    return [(start + i, (seq_id,)) for i in range(n)]


def assert_round_trip(blob: bytes, **kw) -> SeqState:
    state = parse_seq_state(blob, **kw)
    assert build_seq_state(state) == blob
    assert state.nbytes == len(blob)
    return state


def assert_layers(stream: StreamState, written: Stream) -> None:
    assert [layer.data.tobytes() for layer in stream.k_layers] == written.k_data
    assert [layer.data.tobytes() for layer in stream.v_layers] == written.v_data
    assert all(layer.type_id == F16 for layer in stream.k_layers + stream.v_layers)


# --- parsing what llama.cpp writes ---------------------------------------------------------------
def test_one_stream_row_layout():
    s = Stream(cells(3, seq_id=5), n_layer=2, row_bytes=8)
    blob = write_blob([[s]], seq_id=5)
    state = assert_round_trip(blob)
    assert state.seq_id == 5 and state.n_cells == 3 and len(state.sections) == 1
    (stream,) = state.sections[0].streams
    assert stream.cell_positions.tolist() == [0, 1, 2]
    assert stream.cell_positions.dtype == np.int32
    assert stream.cell_seq_ids == ((5,), (5,), (5,))
    assert stream.cell_ext is None and stream.v_trans is False
    assert len(stream.k_layers) == len(stream.v_layers) == 2
    assert all(layer.row_bytes == 8 and not layer.transposed for layer in stream.k_layers)
    assert_layers(stream, s)
    assert stream.k_layers[1].rows(3).shape == (3, 8)


def test_tensor_data_are_views_into_the_blob():
    blob = write_blob([[Stream(cells(3))]])
    whole = np.frombuffer(blob, np.uint8)
    stream = parse_seq_state(blob).sections[0].streams[0]
    assert all(np.shares_memory(layer.data, whole) for layer in stream.k_layers)


def test_transposed_v():
    s = Stream(cells(3), n_layer=2, v_trans=True, el_size=2, n_embd_v=4)
    stream = assert_round_trip(write_blob([[s]])).sections[0].streams[0]
    assert stream.v_trans is True
    for layer in stream.v_layers:
        assert layer.transposed and layer.row_bytes is None
        assert (layer.el_size, layer.n_embd_v_gqa) == (2, 4)
        assert layer.rows(3).shape == (4, 3 * 2)
    assert all(layer.row_bytes == 8 for layer in stream.k_layers)
    assert_layers(stream, s)


def test_two_sections_like_iswa():
    base = Stream(cells(5), n_layer=1, row_bytes=16)
    swa = Stream(cells(3, start=2), n_layer=3, row_bytes=8)
    state = assert_round_trip(write_blob([[base], [swa]]))
    assert len(state.sections) == 2
    assert state.n_cells == 5  # the base cache's
    assert [sec.n_cells for sec in state.sections] == [5, 3]
    b, w = (sec.streams[0] for sec in state.sections)
    assert b.cell_positions.tolist() == [0, 1, 2, 3, 4]
    assert w.cell_positions.tolist() == [2, 3, 4]
    assert len(b.k_layers) == 1 and len(w.k_layers) == 3
    assert_layers(b, base)
    assert_layers(w, swa)


def test_empty_streams():
    state = assert_round_trip(write_blob([[Stream([])]]))
    (stream,) = state.sections[0].streams
    assert state.n_cells == 0 and stream.n_cells == 0
    assert stream.k_layers == () and stream.v_layers == ()
    # several streams (a non-unified cache), the first empty
    s = Stream(cells(2, seq_id=1))
    state = assert_round_trip(write_blob([[Stream([]), s]]))
    assert [st.n_cells for st in state.sections[0].streams] == [0, 2]
    assert_layers(state.sections[0].streams[1], s)


def test_cells_with_several_seq_ids():
    s = Stream([(0, (0, 1)), (1, (0, 1)), (2, (1,)), (3, ())])
    stream = assert_round_trip(write_blob([[s]])).sections[0].streams[0]
    assert stream.cell_positions.tolist() == [0, 1, 2, 3]
    assert stream.cell_seq_ids == ((0, 1), (0, 1), (1,), ())
    assert_layers(stream, s)


@pytest.mark.parametrize("ids", [[(3,)] * 3, [(3,), (1, 3), (3,)]])
def test_cell_ext(ids):
    exts = [(10, 20, 500), (11, 20, 501), (12, 21, -1)]
    s = Stream([(i, ids[i], exts[i]) for i in range(3)])
    stream = assert_round_trip(write_blob([[s]]), cell_ext=True).sections[0].streams[0]
    assert stream.cell_ext.tolist() == [list(e) for e in exts]
    assert stream.cell_seq_ids == tuple(ids)
    assert_layers(stream, s)


def test_mla_cache_without_v():
    s = Stream(cells(3), has_v=False)
    stream = assert_round_trip(write_blob([[s]]), has_v=False).sections[0].streams[0]
    assert len(stream.k_layers) == 2 and stream.v_layers == ()


def test_seq_id_restamp():
    blob = write_blob([[Stream(cells(3, seq_id=0))]], seq_id=0)
    state = parse_seq_state(blob)
    again = build_seq_state(state, seq_id=7)
    assert again == build_seq_state(with_seq_id(state, 7))
    assert again[:4] == blob[:4] and again[4:8] == struct.pack("<i", 7) and again[8:] == blob[8:]
    assert parse_seq_state(again).seq_id == 7


# --- building from records -----------------------------------------------------------------------
def test_build_from_hand_made_records_matches_writer():
    s = Stream([(4, (2,)), (5, (2,))], n_layer=1, v_trans=True)
    blob = write_blob([[s]], seq_id=2)
    k = LayerTensor(F16, np.frombuffer(s.k_data[0], np.uint8), row_bytes=8)
    v = LayerTensor(F16, np.frombuffer(s.v_data[0], np.uint8), el_size=2, n_embd_v_gqa=4)
    stream = StreamState(np.array([4, 5], np.int32), ((2,), (2,)), None, True, (k,), (v,))
    assert build_seq_state(SeqState(2, (CacheSection((stream,)),))) == blob


def test_records_refuse_inconsistent_fields():
    k = LayerTensor(F16, np.zeros(16, np.uint8), row_bytes=8)
    with pytest.raises(StateFormatError, match="not 3 cells"):
        StreamState(np.arange(3, dtype=np.int32), ((0,),) * 3, None, False, (k,), (k,))
    with pytest.raises(StateFormatError, match="v_trans"):
        StreamState(np.arange(2, dtype=np.int32), ((0,),) * 2, None, True, (k,), (k,))
    with pytest.raises(StateFormatError, match="int32"):
        StreamState(np.arange(2), ((0,),) * 2, None, False, (k,), (k,))
    with pytest.raises(StateFormatError, match="either"):
        LayerTensor(F16, np.zeros(4, np.uint8))
    with pytest.raises(StateFormatError, match="contiguous"):
        LayerTensor(F16, np.zeros(16, np.uint8)[::2], row_bytes=8)


def test_build_refuses_values_that_do_not_fit():
    state = parse_seq_state(write_blob([[Stream(cells(2))]]))
    with pytest.raises(StateFormatError):
        build_seq_state(state, seq_id=2**31)


# --- malformed blobs -----------------------------------------------------------------------------
def test_bad_magic():
    blob = bytearray(write_blob([[Stream(cells(2))]]))
    blob[0] ^= 0xFF
    with pytest.raises(StateFormatError, match="bad magic .* byte 0"):
        parse_seq_state(blob)


BLOBS = {
    "rows": (write_blob([[Stream(cells(3))]]), {}),
    "transposed": (write_blob([[Stream(cells(3), v_trans=True)]]), {}),
    "multi-seq": (write_blob([[Stream([(0, (0, 1)), (1, (1,))])]]), {}),
    "ext": (write_blob([[Stream([(0, (0,), (1, 2, 3))])]]), {"cell_ext": True}),
    "streams": (write_blob([[Stream([]), Stream(cells(2))]]), {}),
    "iswa": (write_blob([[Stream(cells(3))], [Stream(cells(2))]]), {"n_sections": 2}),
}


@pytest.mark.parametrize("name", BLOBS)
def test_every_truncation_raises(name):
    blob, kw = BLOBS[name]
    for cut in range(len(blob)):
        with pytest.raises(StateFormatError):
            parse_seq_state(blob[:cut], **kw)


def test_iswa_cut_at_the_section_boundary_reads_as_one_section():
    # Nothing in the blob says how many sections follow: `n_sections` is what catches this.
    first = write_blob([[Stream(cells(3))]])
    blob = write_blob([[Stream(cells(3))], [Stream(cells(2))]])
    assert blob.startswith(first)
    for cut in range(len(first) + 1, len(blob)):
        with pytest.raises(StateFormatError, match="cache section 1"):
            parse_seq_state(blob[:cut])
    assert len(parse_seq_state(blob[: len(first)]).sections) == 1
    with pytest.raises(StateFormatError, match="after 1 sections"):
        parse_seq_state(blob[: len(first)], n_sections=2)


@pytest.mark.parametrize("garbage", [b"\x07", b"\x00" * 4, b"\xde\xad\xbe\xef" * 3])
def test_trailing_garbage(garbage):
    blob = write_blob([[Stream(cells(3))]])
    with pytest.raises(StateFormatError):
        parse_seq_state(blob + garbage)
    with pytest.raises(
        StateFormatError, match=f"{len(garbage)} trailing bytes at byte {len(blob)}"
    ):
        parse_seq_state(blob + garbage, n_sections=1)


def patched(blob: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(blob)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


N_STREAM_AT, CELL_COUNT_AT = 8, 12
META_END = CELL_COUNT_AT + 4 + 3 * 12  # 3 cells of pos, n_seq_id, one seq id


@pytest.mark.parametrize(
    ("offset", "fmt", "value", "message"),
    [
        (N_STREAM_AT, "<I", 0, "impossible n_stream 0 at byte 8"),
        (N_STREAM_AT, "<I", 2**32 - 1, "impossible n_stream"),
        (CELL_COUNT_AT, "<I", 2**32 - 1, "impossible cell_count 4294967295 at byte 12"),
        (CELL_COUNT_AT, "<I", 40_000, "impossible cell_count"),
        (CELL_COUNT_AT + 4 + 4, "<I", 2**31, "truncated"),  # cell 0 n_seq_id
        (META_END, "<I", 2, "v_trans is 2"),
        (META_END + 4, "<I", 10**6, "impossible n_layer"),
        (META_END + 8 + 4, "<Q", 2**63, "truncated at byte .*: K layer 0"),  # K row_bytes
    ],
)
def test_impossible_counts(offset, fmt, value, message):
    blob = write_blob([[Stream(cells(3))]])
    with pytest.raises(StateFormatError, match=message):
        parse_seq_state(patched(blob, offset, fmt, value))
