"""Warm and cold session tiers on synthetic sequence states and a real temporary folder."""

from __future__ import annotations

import os

import pytest

from kv3d.engine.tiers import (
    SUFFIX,
    ColdTier,
    SessionRecord,
    SessionRecordError,
    SessionStore,
    decode_record,
    encode_record,
)
from tests.unit.test_codec import make_state

FP = b"f" * 16


def record(sid: str, n: int = 5) -> SessionRecord:
    return SessionRecord(sid, FP, tuple(range(n)), 2, b"delta-bytes" * 10)


def test_cold_files_are_atomic_and_found_after_a_restart(tmp_path):
    cold = ColdTier(tmp_path)
    cold.put(record("alice"))
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    assert cold.exists("alice") and cold.totals()[0] == 1
    again = ColdTier(tmp_path)  # a restarted server finds what was on disk
    assert again.exists("alice")
    assert again.take("alice") == record("alice")
    # The file stays the session's copy until a newer turn replaces it: a request that fails
    # after taking it loses nothing.
    assert again.exists("alice") and again.take("alice") == record("alice")
    again.put(SessionRecord("alice", FP, tuple(range(9)), 2, b"newer"))
    assert again.take("alice").tokens == tuple(range(9)) and again.totals()[0] == 1


def test_replicas_sharing_a_folder_see_each_others_sessions_at_once(tmp_path):
    one, two = ColdTier(tmp_path), ColdTier(tmp_path)  # both started on an empty folder
    one.put(record("from-one"))
    assert two.exists("from-one") and two.take("from-one") == record("from-one")
    two.put(record("from-two"))
    assert one.exists("from-two") and one.totals()[0] == 2


def test_the_cold_folder_keeps_to_its_budget_least_recently_written_first(tmp_path):
    size = len(encode_record(record("s00")))
    cold = ColdTier(tmp_path, budget_bytes=10 * size)
    for i in range(40):
        cold.put(record(f"s{i:02d}"))
        os.utime(cold._path(f"s{i:02d}"), (1000 + i, 1000 + i))  # distinct write times
    used = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert used <= 10 * size
    assert cold.exists("s39") and cold.exists("s30") and not cold.exists("s29")
    assert cold.evictions_total == 30
    # Over the budget on its own, the file just written still stays.
    alone = ColdTier(tmp_path / "tiny", budget_bytes=1)
    alone.put(record("big"))
    alone.put(record("bigger"))
    assert alone.exists("bigger") and not alone.exists("big")


def test_temp_files_of_crashed_writes_are_removed_at_start(tmp_path):
    dead_pid = 2**22 + 12345  # above Linux's pid_max default: no such process
    crashed = tmp_path / f".abc{SUFFIX}.{dead_pid}.1.tmp"
    writing = tmp_path / f".def{SUFFIX}.{os.getpid()}.1.tmp"  # a neighbour mid-write
    junk = tmp_path / ".garbled.tmp"
    for p in (crashed, writing, junk):
        p.write_bytes(b"partial")
    ColdTier(tmp_path)
    assert not crashed.exists() and not junk.exists() and writing.exists()


def test_cold_tier_does_not_follow_links_or_trust_damaged_files(tmp_path):
    outside = tmp_path / "outside.kv3d"
    outside.write_bytes(b"secret")
    folder = tmp_path / "cold"
    cold = ColdTier(folder)
    os.symlink(outside, cold._path("mallory"))
    assert not ColdTier(folder).exists("mallory")  # links are not indexed
    cold.put(record("bob"))
    path = cold._path("bob")
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(SessionRecordError):
        cold.take("bob")
    with pytest.raises(SessionRecordError):
        decode_record(b"short")


def test_warm_budget_demotes_least_recently_used_to_cold(tmp_path):
    blob = make_state(cells=40, channels=64)
    store = SessionStore(warm_budget_bytes=1, cold_dir=str(tmp_path))  # nothing stays warm
    store.park("s1", FP, tuple(range(40)), 0, blob)
    store.flush()
    stats = store.stats()
    assert (stats["sessions_warm"], stats["sessions_cold"]) == (0, 1)
    resumed = store.take("s1").result()
    assert resumed.tier == "cold" and bytes(resumed.blob)[:8] == blob[:8]
    assert store.take("s1").result().tier == "cold"  # the disk copy stays until replaced

    roomy = SessionStore(warm_budget_bytes=10**9)
    roomy.park("s2", FP, tuple(range(40)), 0, blob)
    roomy.flush()
    assert roomy.holds("s2") and roomy.take("s2").result().tier == "warm"
    assert 1.8 < roomy.stats()["delta_compression_ratio"] < 2.0


class DictShare:
    """An in-memory stand-in for the registry-backed shared tier: records by id, their parts
    once by key."""

    def __init__(self):
        self.records: dict[str, bytes] = {}
        self.parts: dict[int, bytes] = {}
        self.part_keys: dict[str, tuple[int, ...]] = {}

    def publish(self, session_id: str, record: bytes, parts: dict[int, bytes]) -> None:
        self.records[session_id] = record
        self.part_keys[session_id] = tuple(parts)
        self.parts.update(parts)

    def fetch(self, session_id: str) -> tuple[bytes, dict[int, bytes]] | None:
        if session_id not in self.records:
            return None
        keys = self.part_keys.get(session_id, ())
        if any(k not in self.parts for k in keys):
            return None
        return self.records[session_id], {k: self.parts[k] for k in keys}

    def flush(self) -> None:
        pass


def test_every_encoded_session_is_shared_and_another_store_resumes_it():
    blob = make_state(cells=40, channels=64)
    share = DictShare()
    here = SessionStore(warm_budget_bytes=10**9, shared=share)
    here.park("parked", FP, tuple(range(40)), 0, blob)  # idle here: warm + shared
    here.park("hot", FP, tuple(range(40)), 0, blob, local=False)  # hot here: shared only
    here.flush()
    assert set(share.records) == {"parked", "hot"}
    assert here.holds("parked") and not here.holds("hot")
    assert here.stats()["session_shares_total"] == 2

    elsewhere = SessionStore(warm_budget_bytes=10**9, shared=share)  # another replica
    resumed = elsewhere.take("hot").result()
    assert resumed.tier == "shared" and bytes(resumed.blob)[:8] == blob[:8]
    assert elsewhere.take("nobody").result() is None


def test_a_shared_record_under_the_wrong_id_or_damaged_is_not_resumed():
    blob = make_state(cells=8, channels=64)
    share = DictShare()
    origin = SessionStore(10**9, shared=share)
    origin.park("a", FP, tuple(range(8)), 0, blob, local=False)
    origin.flush()
    store = SessionStore(10**9, shared=share)
    share.records["b"] = share.records["a"]  # names session "a"
    share.records["c"] = share.records["a"][:-5]
    assert store.take("b").result() is None and store.take("c").result() is None
    assert store.stats()["session_rejects_total"] == 2


def test_closing_a_store_writes_its_warm_sessions_to_the_cold_tier(tmp_path):
    blob = make_state(cells=8, channels=64)
    store = SessionStore(warm_budget_bytes=10**9, cold_dir=str(tmp_path))
    store.park("s", FP, tuple(range(8)), 0, blob)
    store.close()
    assert SessionStore(10**9, cold_dir=str(tmp_path)).take("s").result().tier == "cold"


def test_with_a_cold_tier_every_park_is_written_behind_to_disk(tmp_path):
    """A replica killed without closing its store (kill -9) loses no session: what it parked,
    warm or still hot, is on disk already."""
    blob = make_state(cells=8, channels=64)
    store = SessionStore(warm_budget_bytes=10**9, cold_dir=str(tmp_path))
    store.park("idle", FP, tuple(range(8)), 0, blob)  # warm here, and on disk
    store.park("hot", FP, tuple(range(8)), 0, blob, local=False)  # hot here: only on disk
    store.flush()  # no close(): as if killed now
    assert store.stats()["sessions_warm"] == 1
    restarted = SessionStore(10**9, cold_dir=str(tmp_path))
    assert restarted.take("idle").result().tier == "cold"
    assert restarted.take("hot").result().tier == "cold"


def test_a_damaged_cold_file_is_dropped_after_its_failed_read(tmp_path):
    store = SessionStore(warm_budget_bytes=1, cold_dir=str(tmp_path))
    store.park("s", FP, tuple(range(8)), 0, make_state(cells=8, channels=64))
    store.flush()
    path = store.cold._path("s")
    path.write_bytes(path.read_bytes()[:-3])
    assert store.take("s").result() is None and not path.exists()
    assert store.stats()["session_rejects_total"] == 1


def test_the_configured_codec_codes_every_tier_and_any_stored_mode_still_resumes(tmp_path):
    blob = make_state(cells=200, channels=64)
    int8 = SessionStore(10**9, cold_dir=str(tmp_path))
    int8.park("old", FP, tuple(range(200)), 0, blob)  # written before the codec changed
    int8.flush()
    share = DictShare()
    store = SessionStore(10**9, cold_dir=str(tmp_path), shared=share, codec="int4")
    store.park("new", FP, tuple(range(200)), 0, blob)
    store.flush()
    for delta in (store._warm["new"].delta, decode_record(share.records["new"]).delta):
        assert delta[8:10] == b"\x02\x00"  # format version 2: low-bit
    assert store.stats()["delta_compression_ratio"] > 2.1  # int8: ~1.9
    assert store.take("new").result().tier == "warm"
    old = store.take("old").result()
    assert old.tier == "cold" and old.record.delta[8:10] == b"\x01\x00"
    assert len(old.blob) == len(blob)
