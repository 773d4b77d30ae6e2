"""Collaborative blocks: idle sessions' deltas cut into parts, parts held by several sessions
stored once (synthetic sequence states; the real model's in tests/integration)."""

from __future__ import annotations

import struct
import threading
import zlib

import numpy as np
import pytest

from kv3d.engine.blockstore import SharedParts, decode_parts, join_states, part_ends, part_keys
from kv3d.engine.codec import DeltaError, decode_delta, encode_delta
from kv3d.engine.statefmt import (
    CacheSection,
    SeqState,
    StateFormatError,
    StreamState,
    build_seq_state,
    cells_from,
    join_cells,
    parse_seq_state,
)
from kv3d.engine.tiers import (
    ColdTier,
    KeyedPart,
    SessionRecord,
    SessionRecordError,
    SessionStore,
    decode_record,
    encode_record,
)
from tests.unit.test_codec import f16_layer
from tests.unit.test_tiers import DictShare

FP = b"f" * 16
CHANNELS = 64


def cell_values(start: int, n: int, branch: int, fork: int = 40) -> np.ndarray:
    """(n, CHANNELS) values of the cells at positions [start, start + n): the same for every
    branch below position `fork`, the branch's own from it."""
    rows = []
    for pos in range(start, start + n):
        seed = pos if pos < fork or branch == 0 else 1000 * (branch + 1) + pos
        rows.append(np.random.default_rng(seed).normal(0, 2, CHANNELS))
    return np.array(rows)


def state(
    start: int, n: int, branch: int = 0, v_trans: bool = False, sections: int = 1, fork: int = 40
):
    values = cell_values(start, n, branch, fork)
    stream = StreamState(
        cell_positions=np.arange(start, start + n, dtype=np.int32),
        cell_seq_ids=tuple((branch,) for _ in range(n)),
        cell_ext=None,
        v_trans=v_trans,
        k_layers=tuple(f16_layer(values * (i + 1)) for i in range(2)),
        v_layers=tuple(f16_layer(values / (i + 1), transposed=v_trans) for i in range(2)),
    )
    return SeqState(branch, tuple(CacheSection((stream,)) for _ in range(sections)))


@pytest.mark.parametrize("v_trans", [False, True])
@pytest.mark.parametrize("sections", [1, 2])
def test_joining_cut_cells_gives_back_the_state(v_trans, sections):
    whole = state(8, 50, v_trans=v_trans, sections=sections)
    cuts = [cells_from(whole, a, b) for a, b in [(8, 24), (24, 40), (40, None)]]
    assert build_seq_state(join_cells(cuts)) == build_seq_state(whole)


def with_verbatim_layer(whole: SeqState) -> SeqState:
    """`whole` with a K layer 40 channels wide, not whole groups of 32: the int8 codec keeps
    it verbatim, so the parts carry coded and verbatim tensors side by side."""
    rng = np.random.default_rng(7)

    def add(stream: StreamState) -> StreamState:
        odd = f16_layer(rng.normal(0, 1, (stream.n_cells, 40)))
        return StreamState(
            stream.cell_positions,
            stream.cell_seq_ids,
            None,
            stream.v_trans,
            stream.k_layers + (odd,),
            stream.v_layers + (stream.v_layers[0],),
        )

    return SeqState(
        whole.seq_id,
        tuple(CacheSection(tuple(add(s) for s in sec.streams)) for sec in whole.sections),
    )


@pytest.mark.parametrize("mode", ["int8", "f16"])
@pytest.mark.parametrize("v_trans", [False, True])
@pytest.mark.parametrize("sections", [1, 2])
def test_parts_decode_in_place_to_what_the_whole_delta_decodes_to(mode, v_trans, sections):
    whole = with_verbatim_layer(state(8, 50, v_trans=v_trans, sections=sections))
    cuts = [cells_from(whole, a, b) for a, b in [(8, 24), (24, 40), (40, None)]]
    parts = [encode_delta(build_seq_state(c), mode) for c in cuts]
    expected = decode_delta(encode_delta(build_seq_state(whole), mode))
    assert bytes(decode_parts(parts)) == bytes(expected)
    decoded = [parse_seq_state(decode_delta(p)) for p in parts]
    assert bytes(join_states(decoded)) == bytes(expected)  # the path that joins parsed parts


def test_a_damaged_part_fails_the_whole_decode():
    whole = state(8, 50)
    cuts = [cells_from(whole, a, b) for a, b in [(8, 30), (30, None)]]
    parts = [encode_delta(build_seq_state(c)) for c in cuts]
    damaged = bytearray(parts[0])
    damaged[-3] ^= 0x40
    with pytest.raises(DeltaError):
        decode_parts([bytes(damaged), parts[1]])
    with pytest.raises(StateFormatError):
        decode_parts([parts[0], encode_delta(build_seq_state(state(30, 8, v_trans=True)))])


def test_parts_of_another_layout_do_not_join():
    with pytest.raises(StateFormatError):
        join_cells([state(0, 4, v_trans=False), state(4, 4, v_trans=True)])
    with pytest.raises(StateFormatError):
        join_cells([state(0, 4), state(4, 4, sections=2)])


def test_parts_end_every_part_and_leave_the_newest_cells_to_the_last():
    assert part_ends(10, 80, 32) == [42, 74]
    assert part_ends(10, 74, 32) == [42]  # a whole last part is still the session's own
    assert part_ends(10, 42, 32) == []
    assert part_ends(10, 500, 0) == []


def test_a_part_key_names_every_token_before_it_and_where_it_starts():
    tokens = list(range(100, 200))
    keys = part_keys(FP, 10, 32, tokens, [42, 74])
    assert keys == part_keys(FP, 10, 32, tokens + [7, 8], [42, 74])  # later tokens: same
    edited = tokens.copy()
    edited[50] = 5  # in the second part only
    edited_keys = part_keys(FP, 10, 32, edited, [42, 74])
    assert edited_keys[0] == keys[0] and edited_keys[1] != keys[1]
    earlier = tokens.copy()
    earlier[3] = 5  # inside the family prefix: every part differs
    assert not set(part_keys(FP, 10, 32, earlier, [42, 74])) & set(keys)
    assert part_keys(FP, 11, 32, tokens, [43, 75])[0] != keys[0]  # another family prefix
    assert part_keys(FP, 10, 16, tokens, [26, 42])[1] != keys[0]  # same end, other part size
    assert part_keys(b"g" * 16, 10, 32, tokens, [42, 74])[0] != keys[0]  # another model


def test_shared_parts_are_held_while_a_record_uses_them():
    parts = SharedParts()
    assert parts.acquire(1, b"x" * 10) == 10
    assert parts.acquire(1, b"x" * 10) == 0 and parts.saved_bytes == 10
    assert parts.release(1) == 0 and parts.get(1) == b"x" * 10
    assert parts.release(1) == 10 and parts.get(1) is None
    assert parts.nbytes == 0 and parts.saved_bytes == 0 and parts.release(1) == 0


def park(
    store: SessionStore,
    sid: str,
    branch: int,
    n: int = 90,
    prefix: int = 8,
    scope=b"",
    fork: int = 40,
) -> bytes:
    """Park a session whose tokens and cells are branch 0's below `fork`, its own from it."""
    blob = build_seq_state(state(prefix, n - prefix, branch, fork=fork))
    tokens = tuple(range(n)) if branch == 0 else tuple(range(fork)) + (branch,) * (n - fork)
    store.park(sid, FP, tokens, prefix, blob, scope=scope)
    store.flush()
    return blob


def test_branches_of_a_conversation_share_the_parts_they_hold_alike():
    store = SessionStore(1 << 30, part_tokens=16)
    blobs = {"a": park(store, "a", 0)}
    assert not store._warm["a"].parts  # nothing shared yet: one delta, no part to decode
    blobs |= {sid: park(store, sid, b) for sid, b in [("b", 1), ("c", 2)]}
    # Cells [8, 40) are the same tokens in all three: two parts of 16, stored once; "a" was
    # cut there when "b" came; the rest of each is one delta of its own.
    assert store.counters["session_parts_cuts_total"] == 1
    assert store.counters["session_parts_reused_total"] == 4
    assert all(len(r.parts) == 2 for r in store._warm.values())
    stats = store.stats()
    assert stats["warm_shared_parts"] == 2
    assert stats["warm_bytes_saved"] == 2 * sum(len(p.delta) for p in store._warm["a"].parts[:2])
    assert store.warm_bytes + stats["warm_bytes_saved"] == sum(
        r.nbytes for r in store._warm.values()
    )
    for sid, blob in blobs.items():
        resumed = store.take(sid).result()
        assert resumed is not None
        # Parts decode to what one delta decodes to: int8 codes each cell on its own.
        assert bytes(resumed.blob) == bytes(decode_delta(encode_delta(blob)))
    assert store.warm_bytes == 0 and store.stats()["warm_shared_parts"] == 0


def test_a_session_that_shares_nothing_stays_one_delta_turn_after_turn():
    store = SessionStore(1 << 30, part_tokens=16)
    park(store, "a", 0, n=60)
    park(store, "a", 0, n=90)  # the same conversation, one turn on
    assert not store._warm["a"].parts and store.counters["session_parts_cuts_total"] == 0
    park(store, "b", 1)  # a branch: "a" is cut at 40, "b" takes [8, 40) from it
    park(store, "a", 0, n=100)  # a's next turn takes its parts again, codes the rest anew
    assert store.counters["session_parts_reused_total"] == 2 + 2
    assert [len(store._warm[s].parts) for s in "ab"] == [2, 2]
    assert store.stats()["sessions_warm"] == 2 and store.stats()["warm_shared_parts"] == 2


def test_a_later_branch_that_shares_more_cuts_the_first_session_further():
    store = SessionStore(1 << 30, part_tokens=16)
    blob_a = park(store, "a", 0)
    park(store, "b", 1)  # shares [8, 40): a is cut at 40
    park(store, "c", 2, fork=72)  # shares [8, 72) with a: a is cut again, at 72
    assert [len(store._warm[s].parts) for s in "abc"] == [4, 2, 4]
    assert store.counters["session_parts_cuts_total"] == 2
    assert store.counters["session_parts_reused_total"] == 2 + 4
    assert store.stats()["warm_shared_parts"] == 4
    assert bytes(store.take("a").result().blob) == bytes(decode_delta(encode_delta(blob_a)))


def test_sessions_under_other_scopes_share_no_part():
    store = SessionStore(1 << 30, part_tokens=16)
    park(store, "a", 0, scope=b"salt-1")
    park(store, "b", 1, scope=b"salt-2")
    assert store.counters["session_parts_reused_total"] == 0
    assert not store._warm["a"].parts and not store._warm["b"].parts
    park(store, "c", 2, scope=b"salt-2")  # c finds b, under its own salt: both cut now
    assert store.counters["session_parts_reused_total"] == 2
    assert store._warm["b"].parts and not store._warm["a"].parts


def test_the_warm_budget_counts_a_shared_part_once(tmp_path):
    one = SessionStore(1 << 30, part_tokens=16)
    park(one, "a", 0)
    budget = one.warm_bytes * 2  # room for a second branch only if [8, 40) is not paid twice
    store = SessionStore(budget, str(tmp_path), part_tokens=16)
    park(store, "a", 0)
    park(store, "b", 1)
    assert store.stats()["sessions_warm"] == 2 and store.warm_bytes <= budget


def test_a_session_in_parts_comes_back_from_the_cold_folder_after_a_restart(tmp_path):
    store = SessionStore(1 << 30, str(tmp_path), part_tokens=16)
    park(store, "a", 0)
    blob = park(store, "b", 1)
    cold = ColdTier(tmp_path).take("b")
    assert len(cold.parts) == 2 and all(p.delta for p in cold.parts)  # [8, 24), [24, 40)
    fresh = SessionStore(1 << 30, str(tmp_path), part_tokens=16)  # after a restart
    assert bytes(fresh.take("b").result().blob) == bytes(decode_delta(encode_delta(blob)))


def test_the_cold_folder_keeps_a_part_once_and_a_record_without_its_part_is_a_miss(tmp_path):
    store = SessionStore(1 << 30, str(tmp_path), part_tokens=16)
    park(store, "a", 0)
    park(store, "b", 1)
    park(store, "c", 2)
    part_files = sorted(tmp_path.glob("*.kv3dpart"))
    assert len(part_files) == 2  # [8, 24) and [24, 40), written by b, named again by c
    assert store.cold.totals()[0] == 3  # sessions, not part files
    # a's file was written whole, then again when b's arrival cut it: all three name parts.
    assert {p.read_bytes()[8:10] for p in tmp_path.glob("*.kv3d")} == {b"\x03\x00"}
    fresh = SessionStore(1 << 30, str(tmp_path), part_tokens=16)
    assert fresh.take("c").result().tier == "cold"
    part_files[0].write_bytes(part_files[0].read_bytes()[:-1] + b"?")  # damaged
    assert fresh.take("b").result() is None  # a miss: recomputed, never wrong
    assert not part_files[0].exists() and not fresh.cold.exists("b")


def test_the_cold_budget_removes_records_before_the_parts_they_name(tmp_path):
    store = SessionStore(1 << 30, str(tmp_path), part_tokens=16)
    park(store, "a", 0)
    park(store, "b", 1)
    one_record = max(p.stat().st_size for p in tmp_path.glob("*.kv3d"))
    parts = sum(p.stat().st_size for p in tmp_path.glob("*.kv3dpart"))
    store.cold.budget_bytes = 2 * one_record + parts + 1
    park(store, "c", 2)  # one record too many: the oldest record goes, not a part
    assert len(list(tmp_path.glob("*.kv3dpart"))) == 2
    assert store.cold.totals()[0] == 2
    assert store.take("c").result() is not None


@pytest.mark.parametrize("codec", ["int4", "int4p"])
def test_low_bit_codecs_are_not_cut_into_parts(codec):
    store = SessionStore(1 << 30, codec=codec, part_tokens=16)
    park(store, "a", 0)
    park(store, "b", 1)
    assert store.part_tokens == 0 and not store._warm["b"].parts


def test_a_record_of_parts_is_read_back_and_its_damage_is_refused():
    record = SessionRecord(
        "s", FP, tuple(range(9)), 2, b"last", (KeyedPart(7, b"one"), KeyedPart(8, b"two"))
    )
    data = encode_record(record)
    assert data[8:10] == b"\x02\x00" and decode_record(data) == record
    plain = SessionRecord("s", FP, tuple(range(9)), 2, b"last")
    assert encode_record(plain)[8:10] == b"\x01\x00"  # a record of one delta: as before
    assert decode_record(encode_record(plain)) == plain
    with pytest.raises(SessionRecordError):
        decode_record(data[:-1])
    # A part table that overruns the record, with a checksum that agrees with it.
    head = 8 + 2 + 2 + 16 + 4 * 3 + 8 + 4
    body = bytearray(data[head:])
    table_at = 1 + 4 * 9  # id, tokens
    struct.pack_into("<Q", body, table_at + 4 + 16, 1 << 40)
    bad = bytearray(data[:head]) + body
    struct.pack_into("<I", bad, head - 4, zlib.crc32(bytes(body)))
    with pytest.raises(SessionRecordError):
        decode_record(bytes(bad))


def test_parts_that_do_not_join_are_a_miss_not_a_crash():
    store = SessionStore(1 << 30)
    a = encode_delta(build_seq_state(state(8, 16, v_trans=False)))
    b = encode_delta(build_seq_state(state(24, 16, v_trans=True)))
    store._warm["s"] = SessionRecord("s", FP, tuple(range(40)), 8, b, (KeyedPart(1, a),))
    assert store.take("s").result() is None
    assert store.counters["session_rejects_total"] == 1
    assert parse_seq_state(decode_delta(a)).n_cells == 16


def test_the_shared_tier_keeps_a_part_once_and_another_replica_resumes_both_branches():
    share = DictShare()
    here = SessionStore(1 << 30, part_tokens=16, shared=share)
    blobs = {"a": park(here, "a", 0), "b": park(here, "b", 1)}
    # "a" was published whole, then "b" came: "b" went out as a record of 2 parts by key.
    assert decode_record(share.records["b"], share.parts).parts
    assert len(share.parts) == 2
    here.park("a", FP, tuple(range(90)), 8, build_seq_state(state(8, 82)))  # a's next turn
    here.flush()
    assert len(share.parts) == 2  # a's record now names the same two parts
    with pytest.raises(SessionRecordError):
        decode_record(share.records["b"])  # stored without its parts: never read alone
    elsewhere = SessionStore(1 << 30, part_tokens=16, shared=share)
    for sid, blob in blobs.items():
        resumed = elsewhere.take(sid).result()
        assert resumed.tier == "shared"
        assert bytes(resumed.blob) == bytes(decode_delta(encode_delta(blob)))
    del share.parts[next(iter(share.parts))]  # a part gone: the session is a miss
    assert elsewhere.take("b").result() is None


def test_a_new_conversation_takes_the_parts_warm_sessions_hold_of_its_prompt():
    store = SessionStore(1 << 30, part_tokens=16)
    park(store, "a", 0)
    park(store, "b", 1)  # [8, 24) and [24, 40) are now parts
    prompt = tuple(range(40)) + (7,) * 20  # a third branch: the same 40 tokens, then its own
    resumed = store.take_parts(FP, b"", prompt, 8).result()
    assert resumed.tier == "parts" and resumed.record.tokens == prompt[:40]
    expected = decode_delta(encode_delta(build_seq_state(cells_from(state(8, 82), 8, 40))))
    assert parse_seq_state(resumed.blob).n_cells == 32
    assert bytes(resumed.blob)[8:] == bytes(expected)[8:]  # the cells; seq ids aside
    assert store.stats()["warm_shared_parts"] == 2  # taken from, not taken away
    assert store.take_parts(FP, b"other scope", prompt, 8) is None
    assert store.take_parts(FP, b"", (5,) + prompt[1:], 8) is None  # differs in the prefix
    assert store.take_parts(FP, b"", prompt[:30], 8).result().record.tokens == prompt[:24]
    assert store.take_parts(FP, b"", prompt[:24], 8) is None  # its last token is computed


def test_parts_on_disk_start_a_new_conversation_on_another_replica(tmp_path):
    here = SessionStore(1 << 30, str(tmp_path), part_tokens=16)
    park(here, "a", 0)
    park(here, "b", 1)  # the parts of [8, 40) are files now
    there = SessionStore(1 << 30, str(tmp_path), part_tokens=16)  # nothing warm of its own
    prompt = tuple(range(40)) + (7,) * 20
    resumed = there.take_parts(FP, b"", prompt, 8).result()
    assert resumed.tier == "parts" and resumed.record.tokens == prompt[:40]
    assert there.take_parts(FP, b"", (5,) + prompt[1:], 8) is None


def test_a_new_conversation_takes_cells_from_a_sibling_kept_whole_without_cutting_it():
    store = SessionStore(1 << 30, part_tokens=16)
    blob_a = park(store, "a", 0)
    prompt = tuple(range(40)) + (7,) * 20
    resumed = store.take_parts(FP, b"", prompt, 8).result()
    assert resumed.tier == "parts" and resumed.record.tokens == prompt[:40]
    whole = parse_seq_state(decode_delta(encode_delta(blob_a)))
    expected = build_seq_state(cells_from(whole, 8, 40))
    assert bytes(resumed.blob) == expected
    assert not store._warm["a"].parts  # cut for storage only when the new session is parked


def test_a_new_conversation_waits_for_a_sibling_still_being_parked():
    store = SessionStore(1 << 30, part_tokens=16)
    gate = threading.Event()
    store._pool.submit(gate.wait, 10)  # the store's worker is busy: a's park stays queued
    park_blob = build_seq_state(state(8, 82))
    store.park("a", FP, tuple(range(90)), 8, park_blob)
    prompt = tuple(range(40)) + (7,) * 20
    future = store.take_parts(FP, b"", prompt, 8)
    assert future is not None and not future.done()  # it runs after a's park, not before
    gate.set()
    resumed = future.result(timeout=10)
    assert resumed.tier == "parts" and resumed.record.tokens == prompt[:40]
    assert not store._parking  # every queued park counted out
