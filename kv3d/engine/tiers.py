"""Idle sessions, tiered: warm (int8 deltas in RAM) and cold (files on disk).

A session that finishes a request leaves the KV cache (hot) at once: its private cells are
exported, encoded as an int8 delta in a worker thread and kept warm. When the warm budget is
exceeded, the least recently used deltas are demoted to the cold folder (or dropped without
one). A returning session is taken out of whichever tier holds it and decoded ahead of its
admission. Nothing here can make output wrong: a record that fails a check is dropped and the
session's prompt is recomputed.

Cold file format, version 1 (little-endian), written to a temp file then renamed:
    magic "KV3DSESS" | u16 version | u16 reserved | 16-byte fingerprint | u32 n_tokens
    | u32 prefix_tokens | u32 id_bytes | u64 delta_bytes | u32 crc32 of everything after it
    | session id (utf-8) | i32 tokens[n_tokens] | delta
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import threading
import time
import zlib
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from kv3d.engine.codec import DeltaError, decode_delta, encode_delta

log = logging.getLogger(__name__)

MAGIC = b"KV3DSESS"
VERSION = 1
_HEADER = struct.Struct("<8sHH16sIIIQI")
SUFFIX = ".kv3d"


class SessionRecordError(ValueError):
    """A stored session that must not be resumed (corrupt, truncated, other model)."""


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """An idle session: its token history and the encoded KV of cells [prefix_tokens, n)."""

    session_id: str
    fingerprint: bytes
    tokens: tuple[int, ...]
    prefix_tokens: int  # cells [0, prefix_tokens) come back from the shared family prefix
    delta: bytes

    @property
    def nbytes(self) -> int:
        return len(self.delta) + 4 * len(self.tokens)


@dataclass(frozen=True, slots=True)
class Resumable:
    record: SessionRecord
    blob: bytearray  # the decoded llama.cpp sequence state of the private cells
    tier: str
    decode_s: float


def encode_record(record: SessionRecord) -> bytes:
    sid = record.session_id.encode("utf-8")
    body = sid + np.asarray(record.tokens, dtype="<i4").tobytes() + record.delta
    head = _HEADER.pack(
        MAGIC,
        VERSION,
        0,
        record.fingerprint,
        len(record.tokens),
        record.prefix_tokens,
        len(sid),
        len(record.delta),
        zlib.crc32(body),
    )
    return head + body


def decode_record(data) -> SessionRecord:
    """Parse a stored session record (any bytes-like object). Every field is checked: anything
    off raises `SessionRecordError`, and only that. The delta inside is checked by
    `decode_delta` when the session is resumed."""
    try:
        view = memoryview(data).cast("B")
    except (TypeError, ValueError) as exc:
        raise SessionRecordError(f"a session record must be a byte buffer: {exc}") from None
    if len(view) < _HEADER.size:
        raise SessionRecordError("session file shorter than its header")
    magic, version, reserved, fp, n_tokens, prefix, id_bytes, delta_bytes, crc = (
        _HEADER.unpack_from(view)
    )
    if magic != MAGIC or version != VERSION or reserved != 0:
        raise SessionRecordError("not a KV3D session file of this version")
    body = view[_HEADER.size :]
    if len(body) != id_bytes + 4 * n_tokens + delta_bytes or zlib.crc32(body) != crc:
        raise SessionRecordError("session file is truncated or corrupt")
    if not prefix < n_tokens:
        raise SessionRecordError(
            f"session of {n_tokens} tokens claims a family prefix of {prefix}: it has no cells"
        )
    if id_bytes == 0:
        raise SessionRecordError("session record has no id")
    try:
        sid = bytes(body[:id_bytes]).decode("utf-8")
    except UnicodeDecodeError:
        raise SessionRecordError("session id is not UTF-8") from None
    tokens = np.frombuffer(body, dtype="<i4", count=n_tokens, offset=id_bytes)
    if tokens.min() < 0:
        raise SessionRecordError("session history holds a negative token id")
    delta = bytes(body[id_bytes + 4 * n_tokens :])
    return SessionRecord(sid, bytes(fp), tuple(tokens.tolist()), prefix, delta)


class ColdTier:
    """Session files in one folder. File names are a hash of the session id, never a path the
    client chose; links are not followed; a file's own contents are checked before use."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        # What is on disk, indexed once at start (sessions written before a restart included),
        # so that lookups and figures never scan the folder.
        self._lock = threading.Lock()
        with os.scandir(folder) as it:
            self._sizes = {
                e.name: e.stat(follow_symlinks=False).st_size
                for e in it
                if e.name.endswith(SUFFIX) and e.is_file(follow_symlinks=False)
            }

    def _name(self, session_id: str) -> str:
        return hashlib.sha256(session_id.encode("utf-8")).hexdigest()[:32] + SUFFIX

    def _path(self, session_id: str) -> Path:
        return self.folder / self._name(session_id)

    def put(self, record: SessionRecord) -> int:
        path = self._path(record.session_id)
        data = encode_record(record)
        tmp = path.with_suffix(f".tmp{os.getpid()}.{threading.get_ident()}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic: a reader sees the old file or the new one
        with self._lock:
            self._sizes[path.name] = len(data)
        return len(data)

    def take(self, session_id: str) -> SessionRecord | None:
        path = self._path(session_id)
        with self._lock:
            known = self._sizes.pop(path.name, None) is not None
        if not known or path.is_symlink() or not path.is_file():
            return None
        try:
            data = path.read_bytes()
        finally:
            path.unlink(missing_ok=True)
        record = decode_record(data)
        if record.session_id != session_id:
            raise SessionRecordError("session file holds another session")
        return record

    def exists(self, session_id: str) -> bool:
        with self._lock:
            return self._name(session_id) in self._sizes

    def totals(self) -> tuple[int, int]:
        """(sessions, bytes) on disk."""
        with self._lock:
            return len(self._sizes), sum(self._sizes.values())


class SharedSessions(Protocol):
    """A warm tier every replica reaches (the Ray object store behind the registry actor).

    Both calls run on the store's worker thread and may block briefly; neither raises."""

    def publish(self, session_id: str, record: bytes) -> None: ...

    def fetch(self, session_id: str) -> bytes | None: ...

    def flush(self) -> None: ...


class SessionStore:
    """Warm and cold tiers of idle sessions, plus an optional shared warm tier.

    Invariants: a session id is in at most one local tier; `warm_bytes` is the sum of the warm
    records' bytes and stays within `warm_budget_bytes` once `put` returns (least recently used
    records move to cold, or are dropped without a cold tier). With `shared`, every record this
    store encodes is also published there (newest turn wins), so another replica can resume the
    session when this one is gone; the shared copy is a fallback read only when no local tier
    holds the session. Thread-safe.
    """

    def __init__(
        self,
        warm_budget_bytes: int,
        cold_dir: str = "",
        group: int = 32,
        shared: SharedSessions | None = None,
    ):
        self.warm_budget_bytes = warm_budget_bytes
        self.cold = ColdTier(Path(cold_dir).expanduser()) if cold_dir else None
        self.group = group
        self.shared = shared
        self._warm: OrderedDict[str, SessionRecord] = OrderedDict()
        self.warm_bytes = 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv3d-sessions")
        self.counters = dict(
            session_parks_total=0,
            session_resumes_total=0,
            session_demotions_total=0,
            session_drops_total=0,
            session_rejects_total=0,
            session_shares_total=0,
        )
        self._raw_bytes = 0
        self._coded_bytes = 0
        self._closed = False

    # --- parking (called from the engine's step thread: must not block) ----------------------
    def park(
        self,
        session_id: str,
        fingerprint: bytes,
        tokens: tuple[int, ...],
        prefix_tokens: int,
        blob: bytes,
        *,
        local: bool = True,
    ) -> None:
        """Encode an idle session's delta and keep it warm here (and in the shared tier).
        `local=False`: the session stays hot here, so only publish it (write-behind)."""
        if local or self.shared is not None:
            self._pool.submit(
                self._encode_and_put, session_id, fingerprint, tokens, prefix_tokens, blob, local
            )

    def _encode_and_put(
        self, session_id, fingerprint, tokens, prefix_tokens, blob, local: bool = True
    ) -> None:
        try:
            blob = bytes(blob)  # a lazy cut of the prefix cells happens here, off the step thread
            delta = encode_delta(blob, "int8", self.group)
        except Exception:
            log.exception("could not encode session %s; it will be recomputed", session_id)
            return
        record = SessionRecord(session_id, fingerprint, tokens, prefix_tokens, delta)
        if self.shared is not None:
            self.shared.publish(session_id, encode_record(record))
            self.counters["session_shares_total"] += 1
        if not local:
            return
        with self._lock:
            self._raw_bytes += len(blob)
            self._coded_bytes += len(delta)
            self._discard(session_id)
            self._warm[session_id] = record
            self.warm_bytes += record.nbytes
            self.counters["session_parks_total"] += 1
            demote = self._over_budget()
        for old in demote:
            self._demote(old)

    def _over_budget(self) -> list[SessionRecord]:
        out = []
        while self.warm_bytes > self.warm_budget_bytes and self._warm:
            _, old = self._warm.popitem(last=False)
            self.warm_bytes -= old.nbytes
            out.append(old)
        return out

    def _demote(self, record: SessionRecord) -> None:
        if self.cold is None:
            self.counters["session_drops_total"] += 1
            return
        try:
            self.cold.put(record)
            self.counters["session_demotions_total"] += 1
        except OSError:
            log.exception("could not write session %s to the cold tier", record.session_id)
            self.counters["session_drops_total"] += 1

    def _discard(self, session_id: str) -> None:
        old = self._warm.pop(session_id, None)
        if old is not None:
            self.warm_bytes -= old.nbytes

    # --- resuming -----------------------------------------------------------------------------
    def holds(self, session_id: str) -> bool:
        """Whether a session is stored (a hint: it may be taken or evicted meanwhile)."""
        with self._lock:
            if session_id in self._warm:
                return True
        return self.cold is not None and self.cold.exists(session_id)

    def take(self, session_id: str) -> Future:
        """Start fetching and decoding a session: a Future of `Resumable` or None."""
        return self._pool.submit(self._take_now, session_id)

    def _take_now(self, session_id: str) -> Resumable | None:
        started = time.perf_counter()
        with self._lock:
            record = self._warm.pop(session_id, None)
            if record is not None:
                self.warm_bytes -= record.nbytes
        tier = "warm"
        try:
            if record is None and self.cold is not None:
                record, tier = self.cold.take(session_id), "cold"
            if record is None and self.shared is not None:
                data = self.shared.fetch(session_id)
                record, tier = (decode_record(data) if data is not None else None), "shared"
            if record is None:
                return None
            if record.session_id != session_id:
                raise SessionRecordError(f"record names session {record.session_id!r}")
            blob = decode_delta(record.delta)
        except (SessionRecordError, DeltaError, OSError) as exc:
            self.counters["session_rejects_total"] += 1
            log.warning("session %s not resumable, dropped, recomputing: %s", session_id, exc)
            return None
        except Exception:  # a bug, not bad bytes: still only a miss for the request
            self.counters["session_rejects_total"] += 1
            log.exception("session %s could not be read, dropped, recomputing", session_id)
            return None
        self.counters["session_resumes_total"] += 1
        return Resumable(record, blob, tier, time.perf_counter() - started)

    # --- figures ------------------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        cold_sessions, cold_bytes = self.cold.totals() if self.cold is not None else (0, 0)
        with self._lock:
            ratio = self._raw_bytes / self._coded_bytes if self._coded_bytes else 0.0
            return {
                **self.counters,
                "sessions_warm": len(self._warm),
                "sessions_cold": cold_sessions,
                "warm_bytes": self.warm_bytes,
                "cold_bytes": cold_bytes,
                "delta_compression_ratio": ratio,
            }

    def recent_ids(self, limit: int) -> list[str]:
        """The ids of the `limit` most recently parked warm sessions (newest last)."""
        with self._lock:
            ids = list(self._warm)
        return ids[-limit:] if limit else []

    def flush(self) -> None:
        """Wait until parked sessions are stored (tests, shutdown)."""
        self._pool.submit(lambda: None).result()
        if self.shared is not None:
            self.shared.flush()

    def close(self) -> None:
        """Store what is pending; with a cold tier, write the warm sessions to disk so that
        they survive a restart of the server. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.flush()
        self._pool.shutdown(wait=True)
        if self.cold is None:
            return
        with self._lock:
            records, self._warm = list(self._warm.values()), OrderedDict()
            self.warm_bytes = 0
        for record in records:
            self._demote(record)
