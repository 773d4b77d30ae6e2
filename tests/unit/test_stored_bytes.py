"""Every decoder of stored or received bytes checks them fully and raises only its own error:
session records (`SessionRecordError`), int8 deltas (`DeltaError`), llama.cpp sequence states
(`StateFormatError`) and prefix snapshots (`SnapshotError`).

The crafted cases are malformed yet carry a valid checksum (recomputed here), as a writer's bug
or a hostile peer would produce; the fuzz mutates valid encodings and recomputes checksums, so
that the mutations reach the parsers behind them."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kv3d.engine import codec, snapshot, tiers
from kv3d.engine.codec import DeltaError, decode_delta, encode_delta
from kv3d.engine.prefix import chain_blocks
from kv3d.engine.snapshot import SnapshotError, decode_snapshot, encode_snapshot
from kv3d.engine.statefmt import StateFormatError, parse_seq_state
from kv3d.engine.tiers import SessionRecord, SessionRecordError, decode_record, encode_record
from tests.unit.test_codec import make_state

FP = b"f" * 16
STATE = make_state(cells=5, channels=64, v_trans=True)  # K in rows, V transposed
DELTA = encode_delta(STATE, "int8", 32)
RECORD = encode_record(SessionRecord("chat-1", FP, tuple(range(9)), 4, DELTA))
TOKENS = tuple(range(40))
BLOCKS = tuple(chain_blocks(TOKENS, 16, FP, boundary=40))
SNAPSHOT = encode_snapshot(BLOCKS[-1].key, FP, TOKENS, BLOCKS, STATE)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))


# --- re-sealing: recompute what the checksums and lengths cover ----------------------------------
def reseal_record(data: bytes) -> bytes:
    """Fix a record's crc (over everything after its header)."""
    size = tiers._HEADER.size
    if len(data) < size:
        return data
    head = bytearray(data[:size])
    struct.pack_into("<I", head, size - 4, zlib.crc32(data[size:]))
    return bytes(head) + data[size:]


def record_with(*, sid=b"chat-1", tokens=tuple(range(9)), prefix=4, delta=DELTA, reserved=0):
    body = sid + np.asarray(tokens, dtype="<i4").tobytes() + delta
    head = tiers._HEADER.pack(
        tiers.MAGIC, tiers.VERSION, reserved, FP, len(tokens), prefix, len(sid), len(delta), 0
    )
    return reseal_record(head + body)


def reseal_delta(data: bytes, **fields) -> bytes:
    """Fix a delta's payload crc and length (set any other header field by name)."""
    size = codec._HEADER.size
    if len(data) < size:
        return data
    names = ("magic", "version", "mode", "r1", "group", "r2", "n", "crc", "blob", "payload")
    values = dict(zip(names, codec._HEADER.unpack_from(data), strict=True))
    payload = data[size:]
    values.update(crc=zlib.crc32(payload), payload=len(payload))
    values.update(fields)
    return codec._HEADER.pack(*values.values()) + payload


def delta_table(data: bytes) -> np.ndarray:
    n = codec._HEADER.unpack_from(data)[6]
    return np.frombuffer(data, dtype=codec._ENTRY, count=n, offset=codec._HEADER.size).copy()


def with_table(data: bytes, table: np.ndarray) -> bytes:
    size = codec._HEADER.size
    return reseal_delta(data[:size] + table.tobytes() + data[size + table.nbytes :])


def reseal_snapshot(data: bytes) -> bytes:
    size = snapshot._HEADER.size
    if len(data) < size:
        return data
    head = snapshot._HEADER.unpack_from(data)
    n_tokens, n_blocks = head[5], head[6]
    state = data[size + 4 * n_tokens + snapshot._BLOCK.itemsize * n_blocks :]
    fixed = snapshot._HEADER.pack(*head[:7], zlib.crc32(state), *head[8:])
    return fixed + data[size:]


# --- session records ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "data, message",
    [
        (record_with(sid=b"chat-\xff\xfe"), "not UTF-8"),
        (record_with(sid=b""), "no id"),
        (record_with(prefix=9), "family prefix"),
        (record_with(prefix=12), "family prefix"),
        (record_with(tokens=(1, 2, -7, 4, 5)), "negative token"),
        (record_with(reserved=1), "version"),
        (memoryview(RECORD)[::2], "byte buffer"),
        ("not bytes", "byte buffer"),
    ],
)
def test_malformed_session_records_raise_only_their_error(data, message):
    with pytest.raises(SessionRecordError, match=message):
        decode_record(data)


def test_a_valid_record_still_decodes():
    record = decode_record(RECORD)
    assert record.session_id == "chat-1" and record.prefix_tokens == 4
    assert bytes(decode_delta(record.delta)) != b""


# --- int8 deltas ----------------------------------------------------------------------------------
def test_a_tensor_table_longer_than_its_payload_is_refused():
    # The header is outside the payload's checksum: its count can be anything.
    with pytest.raises(DeltaError, match="exceeds its payload"):
        decode_delta(reseal_delta(DELTA, n=10**6))


def test_a_blob_size_the_payload_cannot_hold_is_refused_without_allocating_it():
    with pytest.raises(DeltaError, match="tensor table says"):
        decode_delta(reseal_delta(DELTA, blob=2**60))
    with pytest.raises(DeltaError, match="tensor table says"):
        decode_delta(reseal_delta(DELTA, blob=len(STATE) + 1))


def edit_entry(i, **fields):
    def edit(table):
        for name, value in fields.items():
            table[i][name] = value
        return table

    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (edit_entry(0, offset=2**62), "outside"),
        (edit_entry(-1, cells=10**6), "outside|tensor table says"),
        (edit_entry(0, channels=48), "whole groups"),
        (edit_entry(0, channels=0), "whole groups"),
        (edit_entry(0, cells=0), "whole groups"),
        (edit_entry(0, transposed=2), "malformed"),
        (edit_entry(0, pad=b"\x01" * 7), "malformed"),
        (edit_entry(1, offset=0), "overlaps"),
        (edit_entry(0, transposed=1), "disagrees"),
        (lambda t: t[::-1].copy(), "overlaps"),
    ],
)
def test_malformed_tensor_tables_are_refused(edit, message):
    with pytest.raises(DeltaError, match=message):
        decode_delta(with_table(DELTA, edit(delta_table(DELTA))))


def test_a_table_that_disagrees_with_the_state_it_rebuilds_is_refused():
    table = delta_table(DELTA)
    # Shift a tensor by one whole row inside the blob: sizes still add up, the layout does not.
    table[0]["offset"] += 2 * 64
    with pytest.raises(DeltaError):
        decode_delta(with_table(DELTA, table))


def test_verbatim_bytes_that_are_not_a_state_are_refused():
    size = codec._HEADER.size + delta_table(DELTA).nbytes
    broken = DELTA[:size] + b"\x00\x00\x00\x00" + DELTA[size + 4 :]  # the state's magic
    with pytest.raises(DeltaError, match="sequence state"):
        decode_delta(reseal_delta(broken))


@pytest.mark.parametrize("scale", [np.nan, np.inf, -1.0, 60000.0])
def test_scales_no_encoder_writes_are_refused(scale):
    n_tensors = len(delta_table(DELTA))
    verbatim = len(STATE) - sum(
        2 * int(t["cells"]) * int(t["channels"]) for t in delta_table(DELTA)
    )
    at = codec._HEADER.size + n_tensors * codec._ENTRY.itemsize + verbatim
    data = bytearray(DELTA)
    data[at : at + 2] = np.float16(scale).tobytes()
    with pytest.raises(DeltaError, match="scale"):
        decode_delta(reseal_delta(bytes(data)))


def test_f16_deltas_are_checked_too():
    exact = encode_delta(STATE, "f16")
    assert bytes(decode_delta(exact)) == STATE
    with pytest.raises(DeltaError, match="verbatim"):
        decode_delta(reseal_delta(exact, n=1))
    with pytest.raises(DeltaError, match="verbatim"):
        decode_delta(reseal_delta(exact, blob=len(STATE) - 1))
    with pytest.raises(DeltaError, match="sequence state"):
        decode_delta(reseal_delta(exact[:-1], blob=len(STATE) - 1))
    with pytest.raises(DeltaError, match="group"):
        decode_delta(reseal_delta(DELTA, group=0))


def test_a_non_contiguous_buffer_is_refused():
    with pytest.raises(DeltaError, match="byte buffer"):
        decode_delta(memoryview(DELTA)[::2])


# --- llama.cpp sequence states and prefix snapshots -----------------------------------------------
def test_a_state_that_is_not_a_contiguous_buffer_is_refused():
    with pytest.raises(StateFormatError, match="byte buffer"):
        parse_seq_state(memoryview(STATE)[::2])


def snapshot_with_blocks(ends) -> bytes:
    blocks = [(b.key, e) for b, e in zip(BLOCKS, ends, strict=True)]
    head = bytearray(SNAPSHOT[: snapshot._HEADER.size])
    at = snapshot._HEADER.size + 4 * len(TOKENS)
    raw = np.array(blocks, dtype=snapshot._BLOCK).tobytes()
    return reseal_snapshot(bytes(head) + SNAPSHOT[snapshot._HEADER.size : at] + raw + STATE)


@pytest.mark.parametrize(
    "data, message",
    [
        (snapshot_with_blocks([32, 16, 40]), "not increasing"),
        (snapshot_with_blocks([0, 32, 40]), "not increasing"),
        (snapshot_with_blocks([16, 16, 40]), "not increasing"),
        (
            reseal_snapshot(
                SNAPSHOT[: snapshot._HEADER.size]
                + struct.pack("<i", -5)
                + SNAPSHOT[snapshot._HEADER.size + 4 :]
            ),
            "negative token",
        ),
        (SNAPSHOT[:8] + b"\x01\x00\x01\x00" + SNAPSHOT[12:], "version"),
        (memoryview(SNAPSHOT)[::2], "byte buffer"),
    ],
)
def test_malformed_snapshots_raise_only_their_error(data, message):
    assert len(BLOCKS) == 3
    with pytest.raises(SnapshotError, match=message):
        decode_snapshot(data, FP)


# --- fuzz: mutated valid encodings, checksums recomputed ------------------------------------------
def mutations(data: bytes, start: int = 0):
    """Byte overwrites, 32-bit field overwrites with extreme values, cuts and insertions."""
    n = len(data)
    overwrite = st.tuples(st.just("byte"), st.integers(start, n - 1), st.integers(0, 255))
    field = st.tuples(
        st.just("u32"),
        st.integers(start, n - 4),
        st.sampled_from([0, 1, 2, 31, 32, 2**31 - 1, 2**31, 2**32 - 1]) | st.integers(0, 2**32 - 1),
    )
    cut = st.tuples(st.just("cut"), st.integers(start, n - 1), st.integers(1, 16))
    insert = st.tuples(st.just("insert"), st.integers(start, n), st.binary(min_size=1, max_size=16))
    return st.lists(overwrite | field | cut | insert, min_size=1, max_size=4)


def mutate(data: bytes, edits) -> bytes:
    out = bytearray(data)
    for kind, at, value in edits:
        at = min(at, len(out))
        if kind == "byte" and at < len(out):
            out[at] = value
        elif kind == "u32" and at + 4 <= len(out):
            out[at : at + 4] = struct.pack("<I", value)
        elif kind == "cut":
            del out[at : at + value]
        elif kind == "insert":
            out[at:at] = value
    return bytes(out)


@FUZZ
@given(edits=mutations(DELTA, start=8))
def test_fuzzed_deltas_raise_only_delta_errors(edits):
    data = reseal_delta(mutate(DELTA, edits))
    try:
        out = decode_delta(data)
    except DeltaError:
        return
    parse_seq_state(out)  # what decodes is a state the parser reads


@FUZZ
@given(edits=mutations(RECORD, start=8))
def test_fuzzed_session_records_raise_only_their_errors(edits):
    """As the store reads a session: the record, then its delta."""
    data = reseal_record(mutate(RECORD, edits))
    try:
        record = decode_record(data)
        decode_delta(record.delta)
    except (SessionRecordError, DeltaError):
        pass


@FUZZ
@given(edits=mutations(STATE, start=4))
def test_fuzzed_states_raise_only_state_format_errors(edits):
    try:
        parse_seq_state(mutate(STATE, edits))
    except StateFormatError:
        pass


@FUZZ
@given(edits=mutations(SNAPSHOT, start=8))
def test_fuzzed_snapshots_raise_only_snapshot_errors(edits):
    try:
        decode_snapshot(reseal_snapshot(mutate(SNAPSHOT, edits)), FP)
    except SnapshotError:
        pass


# --- through the store: a malformed record is a miss, never an error ------------------------------
class OneRecordShare:
    """The shared tier (the registry actor) handing back one record for every id."""

    def __init__(self, data: bytes):
        self.data = data

    def publish(self, session_id: str, record: bytes, parts: dict[int, bytes]) -> None:
        pass

    def fetch(self, session_id: str) -> tuple[bytes, dict[int, bytes]] | None:
        return self.data, {}

    def flush(self) -> None:
        pass


MALFORMED = [
    record_with(sid=b"chat-1\xff"),
    reseal_record(
        encode_record(SessionRecord("chat-1", FP, tuple(range(9)), 4, reseal_delta(DELTA, n=10**6)))
    ),
]


@pytest.mark.parametrize("data", MALFORMED)
def test_a_malformed_cold_record_is_a_miss_and_is_dropped(tmp_path, caplog, data):
    from kv3d.engine.tiers import ColdTier, SessionStore

    path = tmp_path / ColdTier(tmp_path)._name("chat-1")
    path.write_bytes(data)
    store = SessionStore(warm_budget_bytes=1 << 20, cold_dir=str(tmp_path))
    try:
        assert store.take("chat-1").result(timeout=10) is None
        assert store.stats()["session_rejects_total"] == 1
        assert not path.exists()
        assert "not resumable" in caplog.text
    finally:
        store.close()


@pytest.mark.parametrize("data", MALFORMED)
def test_a_malformed_shared_record_is_a_miss(data):
    from kv3d.engine.tiers import SessionStore

    store = SessionStore(warm_budget_bytes=1 << 20, shared=OneRecordShare(data))
    try:
        assert store.take("chat-1").result(timeout=10) is None
        assert store.stats()["session_rejects_total"] == 1
    finally:
        store.close()
