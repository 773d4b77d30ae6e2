"""Idle sessions, tiered: warm (coded deltas in RAM) and cold (files on disk).

A session that finishes a request leaves the KV cache (hot) at once: its private cells are
exported, encoded as a delta (int8 by default, `cache.session_codec`) in a worker thread and
kept warm. With a cold folder, every
parked turn is also written behind to disk at once (so a killed replica loses no session), and
the folder is held to its budget by evicting the least recently written files. When the warm
budget is exceeded, the least recently used deltas leave RAM (still on disk with a cold tier,
dropped without one). A returning session is taken from RAM, else disk, else the shared tier,
and decoded ahead of its admission. Nothing here can make output wrong: a record that fails a
check is dropped and the session's prompt is recomputed.

Sessions that hold the same tokens past their family prefix share the parts of their deltas
that cover them, kept once in each tier (`kv3d.engine.blockstore`, `cache.session_part_tokens`).

Session record format (little-endian), the cold tier's files and the shared tier's values,
written to a temp file then renamed:
    magic "KV3DSESS" | u16 version | u16 reserved | 16-byte fingerprint | u32 n_tokens
    | u32 prefix_tokens | u32 id_bytes | u64 delta_bytes | u32 crc32 of everything after it
    | session id (utf-8) | i32 tokens[n_tokens] | delta_bytes of deltas
Version 1: the deltas are one delta, of cells [prefix_tokens, n). Version 2 (a session cut into
parts): u32 n_parts | n_parts x (16-byte key, u64 part_bytes) | the parts' deltas | the last
part's delta. Version 3, the shared and cold tiers' (which keep every part once, by its key,
beside the records): as version 2 without the parts' deltas. All three are read.

Cold part file, version 1, named by its key ("<32 hex digits>.kv3dpart"):
    magic "KV3DPART" | u16 version | u16 reserved | 16-byte key | u64 delta_bytes
    | u32 crc32 of the delta | delta
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import struct
import threading
import time
import zlib
from collections import Counter, OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from kv3d.engine.blockstore import (
    SharedParts,
    cut,
    decode_parts,
    end_position,
    join_states,
    part_ends,
    part_keys,
    splittable,
)
from kv3d.engine.codec import DeltaError, Mode, encode_delta
from kv3d.engine.rope import RopeSpec
from kv3d.engine.statefmt import StateFormatError, byte_view, cells_from, parse_seq_state

log = logging.getLogger(__name__)

MAGIC = b"KV3DSESS"
VERSION = 1  # one delta
PARTS_VERSION = 2  # keyed parts, then the last part
APART_VERSION = 3  # keyed parts by key only (stored apart), then the last part
_HEADER = struct.Struct("<8sHH16sIIIQI")
_PART = struct.Struct("<16sQ")  # key (128 bits), part bytes
_U32 = struct.Struct("<I")
SUFFIX = ".kv3d"
PART_SUFFIX = ".kv3dpart"
TEMP_SUFFIX = ".tmp"
PART_MAGIC = b"KV3DPART"
PART_FILE_VERSION = 1
_PART_FILE_HEADER = struct.Struct("<8sHH16sQI")
# Encode timings kept until the step thread reads them (it does every step).
ENCODE_TIMES_KEPT = 64


class SessionRecordError(ValueError):
    """A stored session that must not be resumed (corrupt, truncated, other model)."""


@dataclass(frozen=True, slots=True)
class KeyedPart:
    """Encoded cells of a session that other sessions may hold too (see `blockstore`)."""

    key: int
    delta: bytes


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """An idle session: its token history and the encoded KV of cells [prefix_tokens, n):
    `parts` (in position order), then `delta`, the session's newest cells."""

    session_id: str
    fingerprint: bytes
    tokens: tuple[int, ...]
    prefix_tokens: int  # cells [0, prefix_tokens) come back from the shared family prefix
    delta: bytes
    parts: tuple[KeyedPart, ...] = ()
    # The keys of the parts `delta` could be cut into, so that another session that holds
    # some of them can find it (never stored: a record read back has none).
    keys: tuple[int, ...] = field(default=(), compare=False, repr=False)

    @property
    def own_bytes(self) -> int:
        """What the record holds that no other session's record may share."""
        return len(self.delta) + 4 * len(self.tokens)

    @property
    def nbytes(self) -> int:
        return self.own_bytes + sum(len(p.delta) for p in self.parts)

    def decode(self) -> bytearray:
        """The sequence-state blob of the session's private cells."""
        return decode_parts([p.delta for p in self.parts] + [self.delta])


PARTS_TIER = "parts"  # a Resumable made of other sessions' parts, not a session of its own


@dataclass(frozen=True, slots=True)
class Resumable:
    record: SessionRecord
    blob: bytearray  # the decoded llama.cpp sequence state of the private cells
    tier: str
    decode_s: float


def encode_record(record: SessionRecord, *, parts_apart: bool = False) -> bytes:
    """The record's bytes; `parts_apart`: without its parts' deltas, which the caller stores
    by key (`decode_record` then needs them back)."""
    sid = record.session_id.encode("utf-8")
    deltas = [record.delta]
    version = VERSION
    if record.parts:
        table = [_U32.pack(len(record.parts))]
        table += [_PART.pack(p.key.to_bytes(16, "little"), len(p.delta)) for p in record.parts]
        inline = [] if parts_apart else [p.delta for p in record.parts]
        deltas = table + inline + deltas
        version = APART_VERSION if parts_apart else PARTS_VERSION
    stored = b"".join(deltas)
    body = sid + np.asarray(record.tokens, dtype="<i4").tobytes() + stored
    head = _HEADER.pack(
        MAGIC,
        version,
        0,
        record.fingerprint,
        len(record.tokens),
        record.prefix_tokens,
        len(sid),
        len(stored),
        zlib.crc32(body),
    )
    return head + body


class PartSource(Protocol):
    """Where the deltas of a record's parts stored apart come from (a dict will do)."""

    def get(self, key: int) -> bytes | None: ...


def _read_parts(
    stored: memoryview, apart: PartSource | None
) -> tuple[tuple[KeyedPart, ...], bytes]:
    """(parts, last delta); `apart`: the parts' deltas by key, for a record stored without them."""
    if len(stored) < _U32.size:
        raise SessionRecordError("session record's part table is truncated")
    (n,) = _U32.unpack_from(stored)
    at = _U32.size + n * _PART.size
    if n == 0 or at > len(stored):
        raise SessionRecordError(f"session record claims {n} parts")
    parts = []
    for i in range(n):
        raw_key, nbytes = _PART.unpack_from(stored, _U32.size + i * _PART.size)
        key = int.from_bytes(raw_key, "little")
        if apart is not None:
            delta = apart.get(key)
            if delta is None or len(delta) != nbytes:
                raise SessionRecordError("a part of the session is missing or of another size")
            parts.append(KeyedPart(key, bytes(delta)))
            continue
        if at + nbytes >= len(stored):  # the last part follows the keyed ones, never empty
            raise SessionRecordError("session record's parts overrun it")
        parts.append(KeyedPart(key, bytes(stored[at : at + nbytes])))
        at += nbytes
    if at >= len(stored):
        raise SessionRecordError("session record has no last part")
    return tuple(parts), bytes(stored[at:])


def decode_record(data, parts: PartSource | None = None) -> SessionRecord:
    """Parse a stored session record (any bytes-like object; `parts`: the deltas of a record
    stored without them, by key). Every field is checked: anything off raises
    `SessionRecordError`, and only that. The deltas inside are checked by
    `SessionRecord.decode` when the session is resumed."""
    view = byte_view(data, SessionRecordError, "a session record")
    if len(view) < _HEADER.size:
        raise SessionRecordError("session file shorter than its header")
    magic, version, reserved, fp, n_tokens, prefix, id_bytes, delta_bytes, crc = (
        _HEADER.unpack_from(view)
    )
    if magic != MAGIC or version not in (VERSION, PARTS_VERSION, APART_VERSION) or reserved != 0:
        raise SessionRecordError("not a KV3D session file of a version this build reads")
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
    stored = body[id_bytes + 4 * n_tokens :]
    if version == VERSION:
        keyed, delta = (), bytes(stored)
    elif version == PARTS_VERSION:
        keyed, delta = _read_parts(stored, None)
    elif parts is None:
        raise SessionRecordError("session record stored without its parts, none given")
    else:
        keyed, delta = _read_parts(stored, parts)
    return SessionRecord(sid, bytes(fp), tuple(tokens.tolist()), prefix, delta, keyed)


class ColdTier:
    """Session files in one folder, which every replica on the node may share.

    Invariants: a file is named by a hash of its session id (never a path a client chose) and
    appears whole or not at all (written to a temp file, then renamed); links are not followed
    and a file's own contents are checked before use; after every `put` the folder holds at most
    `budget_bytes` of session and part files, the least recently written removed first. The
    folder is the index: what other replicas wrote is seen at once, and nothing is remembered
    that a restart or another replica could make stale. A session's keyed parts are files of
    their own, one per key whoever wrote it, touched after every record that uses them (so the
    budget removes records before their parts); a record whose part is gone is a miss.
    """

    TOTALS_TTL_S = 1.0  # figures are read often (metrics); a folder scan at most this often
    STALE_TEMP_S = 3600.0  # a temp file this old is a crashed write even if its pid was reused

    def __init__(self, folder: Path, budget_bytes: int = 0):
        """`budget_bytes` 0: unbounded."""
        self.folder = folder
        self.budget_bytes = budget_bytes
        folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._totals: tuple[float, int, int] = (-1e9, 0, 0)  # (read at, sessions, bytes)
        self.evictions_total = 0
        self._remove_crashed_writes()

    def _name(self, session_id: str) -> str:
        return hashlib.sha256(session_id.encode("utf-8")).hexdigest()[:32] + SUFFIX

    def _path(self, session_id: str) -> Path:
        return self.folder / self._name(session_id)

    def put(self, record: SessionRecord) -> int:
        """Write (or replace) a session's file and the parts it names that are not on disk
        yet, then evict down to the budget."""
        path = self._path(record.session_id)
        data = encode_record(record, parts_apart=bool(record.parts))
        part_paths = [self._part_path(p.key) for p in record.parts]
        for part, part_path in zip(record.parts, part_paths, strict=True):
            if not self._touch(part_path):
                self._write(part_path, _encode_part_file(part))
        self._write(path, data)
        for part_path in part_paths:  # newer than the record: the budget removes it first
            self._touch(part_path)
        if self.budget_bytes:
            self._evict_to_budget(keep={path.name, *(p.name for p in part_paths)})
        return len(data)

    def _write(self, path: Path, data: bytes) -> None:
        # Hidden, and named by its writer, so that a crash's leftovers can be told apart.
        tmp = self.folder / f".{path.name}.{os.getpid()}.{threading.get_ident()}{TEMP_SUFFIX}"
        try:
            # No fsync: a killed process loses nothing the kernel holds, and after a power loss
            # a torn file fails its checksum and the session is recomputed.
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)  # atomic: a reader sees the old file or the new one
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _part_path(self, key: int) -> Path:
        return self.folder / f"{key:032x}{PART_SUFFIX}"

    def _touch(self, path: Path) -> bool:
        """Mark a file as just written; False when it is not there (or is a link)."""
        if path.is_symlink():
            return False
        try:
            os.utime(path)
        except FileNotFoundError:
            return False
        return True

    def has_part(self, key: int) -> bool:
        path = self._part_path(key)
        return path.is_file() and not path.is_symlink()

    def get(self, key: int) -> bytes | None:
        """A part's delta (`PartSource`), or None when its file is missing or fails its checks
        (then it is removed)."""
        path = self._part_path(key)
        if path.is_symlink() or not path.is_file():
            return None
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        delta = _decode_part_file(data, key)
        if delta is None:
            log.warning("part file %s fails its checks; removed", path.name)
            path.unlink(missing_ok=True)
        return delta

    def take(self, session_id: str) -> SessionRecord | None:
        """The session's record, or None when no file holds it. The file stays: it is the
        session's copy until a newer turn replaces it or the budget evicts it, so a request
        that fails or is cancelled after taking it loses nothing."""
        path = self._path(session_id)
        if path.is_symlink() or not path.is_file():
            return None
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # evicted or replaced between the check and the read
            return None
        record = decode_record(data, self)
        if record.session_id != session_id:
            raise SessionRecordError("session file holds another session")
        return record

    def discard(self, session_id: str) -> None:
        """Remove a session's file (it failed its checks: it will never be resumed)."""
        self._path(session_id).unlink(missing_ok=True)

    def exists(self, session_id: str) -> bool:
        path = self._path(session_id)
        return path.is_file() and not path.is_symlink()

    def totals(self) -> tuple[int, int]:
        """(sessions, bytes) on disk, this replica's and its neighbours'; at most
        `TOTALS_TTL_S` old."""
        with self._lock:
            read_at, n, size = self._totals
            if time.monotonic() - read_at < self.TOTALS_TTL_S:
                return n, size
        files = self._files()
        n, size = sum(f[1].endswith(SUFFIX) for f in files), sum(f[2] for f in files)
        with self._lock:
            self._totals = (time.monotonic(), n, size)
        return n, size

    def _files(self) -> list[tuple[float, str, int]]:
        """(mtime, name, bytes) of every session and part file, oldest first."""
        out = []
        with os.scandir(self.folder) as it:
            for e in it:
                if not e.name.endswith((SUFFIX, PART_SUFFIX)) or e.name.startswith("."):
                    continue
                try:
                    if not e.is_file(follow_symlinks=False):
                        continue
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:  # another replica took or evicted it meanwhile
                    continue
                out.append((st.st_mtime, e.name, st.st_size))
        out.sort()
        return out

    def _evict_to_budget(self, keep: set[str]) -> None:
        files = self._files()
        total = sum(f[2] for f in files)
        for _, name, size in files:
            if total <= self.budget_bytes:
                break
            if name in keep:  # the files just written stay, even alone over the budget
                continue
            try:
                (self.folder / name).unlink()
                self.evictions_total += 1
            except FileNotFoundError:
                pass  # a neighbour evicted it first: it counts as gone either way
            total -= size
        with self._lock:
            self._totals = (-1e9, 0, 0)

    def _remove_crashed_writes(self) -> None:
        """Temp files whose writer is gone (killed mid-write) are removed at start."""
        now = time.time()
        with os.scandir(self.folder) as it:
            for e in it:
                if not (e.name.startswith(".") and e.name.endswith(TEMP_SUFFIX)):
                    continue
                try:
                    pid = int(e.name[: -len(TEMP_SUFFIX)].split(".")[-2])
                    old = now - e.stat(follow_symlinks=False).st_mtime > self.STALE_TEMP_S
                except (ValueError, IndexError, FileNotFoundError):
                    pid, old = -1, True
                if old or not _process_alive(pid):
                    Path(e.path).unlink(missing_ok=True)
                    log.info("removed %s, left by a write that did not finish", e.name)


def _encode_part_file(part: KeyedPart) -> bytes:
    head = _PART_FILE_HEADER.pack(
        PART_MAGIC,
        PART_FILE_VERSION,
        0,
        part.key.to_bytes(16, "little"),
        len(part.delta),
        zlib.crc32(part.delta),
    )
    return head + part.delta


def _decode_part_file(data: bytes, key: int) -> bytes | None:
    """The delta of a part file that is whole and holds the part `key`; else None."""
    if len(data) < _PART_FILE_HEADER.size:
        return None
    magic, version, reserved, raw_key, nbytes, crc = _PART_FILE_HEADER.unpack_from(data)
    delta = data[_PART_FILE_HEADER.size :]
    if (magic, version, reserved) != (PART_MAGIC, PART_FILE_VERSION, 0):
        return None
    if int.from_bytes(raw_key, "little") != key or len(delta) != nbytes:
        return None
    return delta if zlib.crc32(delta) == crc else None


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class SharedSessions(Protocol):
    """A warm tier every replica reaches (the Ray object store behind the registry actor).

    A record comes with the deltas of its keyed parts (`encode_record(..., parts_apart=True)`),
    which the tier keeps once by key, however many records use them. Both calls run on the
    store's worker thread and may block briefly; neither raises."""

    def publish(self, session_id: str, record: bytes, parts: dict[int, bytes]) -> None: ...

    def fetch(self, session_id: str) -> tuple[bytes, dict[int, bytes]] | None:
        """(record, its parts' deltas by key), or None when the session or a part is gone."""

    def flush(self) -> None: ...


class SessionStore:
    """Warm and cold tiers of idle sessions, plus an optional shared warm tier.

    Invariants: `warm_bytes` is the sum of the warm records' own bytes and of the keyed parts
    they hold (each once, however many records use it), and stays within
    `warm_budget_bytes` once a park is stored (least recently used records leave RAM); with a
    cold tier every parked record is on disk too (RAM is a cache of the folder), so the newest
    turn of a session survives the process. With `shared`, every record this
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
        cold_budget_bytes: int = 0,
        codec: Mode = "int8",
        rope: RopeSpec | None = None,
        part_tokens: int = 0,
    ):
        """`codec`: the delta mode parked sessions are encoded with; any stored mode and
        format version decodes whatever this is, so it may change between restarts. `rope`:
        the model's RoPE, for the codecs that code keys before it. `part_tokens`: cut
        sessions into parts of this many cells, which sessions holding the same tokens share
        in RAM (0: one delta per session; also for codecs that keep a window exact)."""
        self.warm_budget_bytes = warm_budget_bytes
        self.cold = ColdTier(Path(cold_dir).expanduser(), cold_budget_bytes) if cold_dir else None
        self.group = group
        self.codec = codec
        self.rope = rope
        self.shared = shared
        self.part_tokens = part_tokens if splittable(codec) else 0
        self._parts = SharedParts()
        # The keys of the parts warm records could still be cut into (`SessionRecord.keys`):
        # how a session finds another that holds the same tokens before either is cut.
        self._uncut: dict[int, SessionRecord] = {}
        self._parking: Counter[int] = Counter()  # first part keys of parks not stored yet
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
            session_cold_write_errors_total=0,
            session_parts_reused_total=0,
            session_parts_cuts_total=0,
        )
        self._raw_bytes = 0
        self._coded_bytes = 0
        self._closed = False
        # (private cells, seconds) of each session encoded to park it here: part of what a
        # demotion costs (`IdleRent`), read and cleared by the step thread.
        self._encode_times: deque[tuple[int, float]] = deque(maxlen=ENCODE_TIMES_KEPT)

    @property
    def writes_behind(self) -> bool:
        """Whether sessions kept hot are stored too (shared tier, cold folder), so that they
        outlive this replica; worth a state export per turn."""
        return self.shared is not None or self.cold is not None

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
        scope: bytes = b"",
    ) -> None:
        """Encode an idle session's delta and keep it warm here (and in the shared tier, and
        on disk with a cold tier). `local=False`: the session stays hot here, so only write it
        behind (shared tier, disk), so that it outlives this replica. `scope`: only sessions
        parked under the same scope share parts (the engine passes a key salted per
        `cache_salt`)."""
        if not (local or self.writes_behind):
            return
        # The first part key this park may hold, so that a new conversation submitted while it
        # is still being encoded waits for it rather than miss it (`take_parts`).
        first = self._first_part_key(fingerprint + scope, tokens, prefix_tokens) if local else None
        if first is not None:
            with self._lock:
                self._parking[first] += 1
        self._pool.submit(
            self._encode_and_put,
            session_id,
            fingerprint,
            tokens,
            prefix_tokens,
            blob,
            local,
            scope,
            first,
        )

    def _first_part_key(self, seed: bytes, tokens: tuple[int, ...], prefix_tokens: int):
        if not self.part_tokens:
            return None
        ends = part_ends(prefix_tokens, len(tokens), self.part_tokens)[:1]
        return part_keys(seed, prefix_tokens, self.part_tokens, tokens, ends)[0] if ends else None

    def _encode_and_put(
        self, session_id, fingerprint, tokens, prefix_tokens, blob, local, scope, first
    ) -> None:
        try:
            self._encode_and_put_now(
                session_id, fingerprint, tokens, prefix_tokens, blob, local, scope
            )
        finally:
            if first is not None:
                with self._lock:
                    self._parking[first] -= 1
                    if self._parking[first] <= 0:
                        del self._parking[first]

    def _encode_and_put_now(
        self, session_id, fingerprint, tokens, prefix_tokens, blob, local, scope
    ) -> None:
        try:
            started = time.perf_counter()
            blob = bytes(blob)  # a lazy cut of the prefix cells happens here, off the step thread
            record = self._encode(session_id, blob, fingerprint, tokens, prefix_tokens, scope)
            encode_s = time.perf_counter() - started
        except Exception:
            log.exception("could not encode session %s; it will be recomputed", session_id)
            return
        self._store_behind(record)
        if not local:
            return
        with self._lock:
            self._encode_times.append((len(tokens) - prefix_tokens, encode_s))
            self._raw_bytes += len(blob)
            self._coded_bytes += record.nbytes - 4 * len(tokens)
            self._hold(record)  # before the older turn lets go: the parts they share stay put
            self._discard(session_id)
            self._warm[session_id] = record
            self.counters["session_parks_total"] += 1
            demote = self._over_budget()
        for old in demote:
            self._demote(old)

    def _encode(
        self,
        session_id: str,
        blob: bytes,
        fingerprint: bytes,
        tokens: tuple[int, ...],
        prefix_tokens: int,
        scope: bytes = b"",
    ) -> SessionRecord:
        """The record of a private state: one delta, unless another warm session holds some of
        the same parts; then keyed parts as far as the last part another session holds
        (taking those held warm already as they are, and cutting the other session there
        too), and one delta for the rest. A session pays decoding for the parts it shares,
        and no more."""
        whole = functools.partial(SessionRecord, session_id, fingerprint, tokens, prefix_tokens)
        if not self.part_tokens:
            return whole(self._encode_cells(blob))
        try:
            state = parse_seq_state(blob)
        except StateFormatError:  # a cache layout the parser does not know: one delta still works
            return whole(self._encode_cells(blob))
        ends = part_ends(prefix_tokens, end_position(state), self.part_tokens)
        seed = fingerprint + scope
        keys = tuple(part_keys(seed, prefix_tokens, self.part_tokens, tokens, ends))
        with self._lock:
            uncut = {k: self._uncut[k].session_id for k in keys if k in self._uncut}
            others = set(uncut.values()) - {session_id}  # an earlier turn is no other session
            shared = [
                i
                for i, k in enumerate(keys)
                if self._parts.get(k) is not None or uncut.get(k, session_id) != session_id
            ]
        if not shared:
            return whole(self._encode_cells(blob), keys=keys)
        for other in others:
            self._cut_into_parts(other, set(keys))
        n = shared[-1] + 1
        parts, rest = self._encode_parts(state, prefix_tokens, keys[:n], ends[:n])
        return whole(rest, parts, keys=keys[n:])

    def _encode_cells(self, blob: bytes) -> bytes:
        return encode_delta(blob, self.codec, self.group, rope=self.rope)

    def _encode_parts(
        self, state, start: int, keys: tuple[int, ...], ends: list[int]
    ) -> tuple[tuple[KeyedPart, ...], bytes]:
        """Parts of `state` for cells [start, ends[-1]) (one per key), and the delta of the
        cells after them."""
        parts = []
        for key, end in zip(keys, ends, strict=True):
            with self._lock:
                delta = self._parts.get(key)
            if delta is None:
                delta = self._encode_cells(cut(state, start, end))
            else:
                self.counters["session_parts_reused_total"] += 1
            parts.append(KeyedPart(key, delta))
            start = end
        return tuple(parts), self._encode_cells(cut(state, start))

    def _cut_into_parts(self, session_id: str, wanted: set[int]) -> None:
        """Cut a warm session's last delta into parts as far as its last key in `wanted`, now
        that another session holds those tokens too (re-coded from its decoded cells: int8
        codes its own output again to the same values)."""
        with self._lock:
            record = self._warm.get(session_id)
        if record is None:
            return
        n = 1 + max((i for i, k in enumerate(record.keys) if k in wanted), default=-1)
        if n == 0:
            return
        try:
            start = record.prefix_tokens + len(record.parts) * self.part_tokens
            state = parse_seq_state(decode_parts([record.delta]))
            ends = part_ends(start, end_position(state), self.part_tokens)
            if len(ends) != len(record.keys):
                raise StateFormatError(f"{len(ends)} part ends for {len(record.keys)} keys")
            parts, rest = self._encode_parts(state, start, record.keys[:n], ends[:n])
        except Exception:  # the session it was to share with is parked either way
            log.exception("session %s could not be cut into parts; kept as it is", session_id)
            return
        cut_record = dataclasses.replace(
            record, delta=rest, parts=record.parts + parts, keys=record.keys[n:]
        )
        with self._lock:
            if self._warm.get(session_id) is not record:  # taken or replaced meanwhile
                return
            self._hold(cut_record)
            self._let_go(record)
            self._warm[session_id] = cut_record  # keeps its place in the LRU order
        self.counters["session_parts_cuts_total"] += 1
        self._store_behind(cut_record)  # the cold and shared copies name the parts too

    def _hold(self, record: SessionRecord) -> None:
        """Count a record into the warm tier (under the lock)."""
        added = sum(self._parts.acquire(p.key, p.delta) for p in record.parts)
        self.warm_bytes += record.own_bytes + added
        for key in record.keys:
            self._uncut[key] = record

    def _let_go(self, record: SessionRecord) -> None:
        """Count a record out of the warm tier (under the lock)."""
        freed = sum(self._parts.release(p.key) for p in record.parts)
        self.warm_bytes -= record.own_bytes + freed
        for key in record.keys:
            if self._uncut.get(key) is record:
                del self._uncut[key]

    def _over_budget(self) -> list[SessionRecord]:
        out = []
        while self.warm_bytes > self.warm_budget_bytes and self._warm:
            _, old = self._warm.popitem(last=False)
            self._let_go(old)
            out.append(old)
        return out

    def _store_behind(self, record: SessionRecord) -> None:
        """Publish a record to the shared tier and write it to the cold folder, where set."""
        if self.shared is not None:
            apart = encode_record(record, parts_apart=True)
            self.shared.publish(record.session_id, apart, {p.key: p.delta for p in record.parts})
            self.counters["session_shares_total"] += 1
        if self.cold is not None:
            self._write_behind(record)

    def _write_behind(self, record: SessionRecord) -> None:
        """Every turn goes to disk as it is parked, not only when it leaves RAM: a session
        then survives a replica that is killed (kill -9, OOM), not only one that stops."""
        try:
            self.cold.put(record)
        except OSError:
            log.exception("could not write session %s to the cold tier", record.session_id)
            self.counters["session_cold_write_errors_total"] += 1

    def _demote(self, record: SessionRecord) -> None:
        # With a cold tier the record is on disk already (written behind): it only leaves RAM.
        key = "session_drops_total" if self.cold is None else "session_demotions_total"
        self.counters[key] += 1

    def _discard(self, session_id: str) -> None:
        old = self._warm.pop(session_id, None)
        if old is not None:
            self._let_go(old)

    def put_back(self, record: SessionRecord) -> None:
        """A taken session whose request ended without keeping a newer turn (cancelled,
        rejected, failed): warm again, unless a newer turn was parked meanwhile."""
        with self._lock:
            if self._closed or record.session_id in self._warm:
                return
            self._warm[record.session_id] = record
            self._hold(record)
            demote = self._over_budget()
        for old in demote:
            self._demote(old)

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

    def take_parts(
        self, fingerprint: bytes, scope: bytes, prompt: tuple[int, ...], prefix_tokens: int
    ) -> Future | None:
        """Start decoding the parts that stored sessions hold of `prompt` (all but its last
        token), unbroken from the family prefix `prefix_tokens` on: a Future of a `Resumable`
        from tier "parts" (its record is nobody's; the parts stay where they are), or of None.
        Parts are read from RAM, else from the cold folder (which other replicas of the node
        and earlier runs wrote too), else cut out of a warm session kept as one delta. None at
        once when no tier holds the first part (the only key hashed on the caller's thread).
        `scope` as `park`'s."""
        seed = fingerprint + scope
        first = self._first_part_key(seed, prompt, prefix_tokens)
        if first is None:
            return None
        with self._lock:
            warm = (
                self._parts.get(first) is not None
                or first in self._uncut
                or first in self._parking  # stored once the parks queued before it are
            )
        if not warm and not (self.cold is not None and self.cold.has_part(first)):
            return None
        return self._pool.submit(self._take_parts_now, seed, fingerprint, prompt, prefix_tokens)

    def _take_parts_now(
        self, seed: bytes, fingerprint: bytes, prompt: tuple[int, ...], prefix_tokens: int
    ) -> Resumable | None:
        """The cells of the parts held, in key order, then of a warm session kept as one delta
        that holds the next ones: its delta is decoded and the cells cut out (it is cut into
        parts for storage later, when the new session is parked, off the request's path)."""
        started = time.perf_counter()
        ends = part_ends(prefix_tokens, len(prompt), self.part_tokens)
        keys = part_keys(seed, prefix_tokens, self.part_tokens, prompt, ends)
        try:
            states, n = self._held_part_states(keys)
            states += self._uncut_states(keys, n, prefix_tokens)
            if not states:
                return None
            blob = join_states(states)
        except (DeltaError, StateFormatError) as exc:
            log.warning("parts not decoded, recomputing: %s", exc)
            return None
        end = max(end_position(st) for st in states)
        record = SessionRecord("", fingerprint, tuple(prompt[:end]), prefix_tokens, b"")
        return Resumable(record, blob, PARTS_TIER, time.perf_counter() - started)

    def _held_part_states(self, keys: list[int]) -> tuple[list, int]:
        """(decoded states of the parts held for `keys`, unbroken from the first; how many)."""
        states = []
        for key in keys:
            with self._lock:
                delta = self._parts.get(key)
            if delta is None and self.cold is not None:
                delta = self.cold.get(key)
            if delta is None:
                break
            states.append(parse_seq_state(decode_parts([delta])))
        return states, len(states)

    def _uncut_states(self, keys: list[int], n: int, prefix_tokens: int) -> list:
        """The cells for keys[n:] (as far as one warm session holds them unbroken) cut out of
        that session's last delta; [] when none holds keys[n]."""
        with self._lock:
            holder = self._uncut.get(keys[n]) if n < len(keys) else None
        if holder is None:
            return []
        at = holder.keys.index(keys[n])
        count = 0
        while n + count < len(keys) and at + count < len(holder.keys):
            if holder.keys[at + count] != keys[n + count]:
                break
            count += 1
        start = prefix_tokens + n * self.part_tokens
        state = parse_seq_state(decode_parts([holder.delta]))
        return [cells_from(state, start, start + count * self.part_tokens)]

    def _take_now(self, session_id: str) -> Resumable | None:
        started = time.perf_counter()
        with self._lock:
            record = self._warm.pop(session_id, None)
            if record is not None:
                self._let_go(record)
        tier = "warm"
        try:
            if record is None and self.cold is not None:
                tier = "cold"
                record = self.cold.take(session_id)
            if record is None and self.shared is not None:
                tier = "shared"
                found = self.shared.fetch(session_id)
                record = decode_record(*found) if found is not None else None
            if record is None:
                return None
            if record.session_id != session_id:
                raise SessionRecordError(f"record names session {record.session_id!r}")
            blob = record.decode()
        except (SessionRecordError, DeltaError, StateFormatError, OSError) as exc:
            self.counters["session_rejects_total"] += 1
            log.warning("session %s not resumable, dropped, recomputing: %s", session_id, exc)
            if tier == "cold" and not isinstance(exc, OSError):
                self.cold.discard(session_id)  # bad bytes stay bad: never read them again
            return None
        except Exception:  # a bug, not bad bytes: still only a miss for the request
            self.counters["session_rejects_total"] += 1
            log.exception("session %s could not be read, dropped, recomputing", session_id)
            return None
        self.counters["session_resumes_total"] += 1
        return Resumable(record, blob, tier, time.perf_counter() - started)

    # --- figures ------------------------------------------------------------------------------
    def take_encode_times(self) -> list[tuple[int, float]]:
        """The (private cells, seconds) of the sessions encoded to park here since last asked."""
        with self._lock:
            times = list(self._encode_times)
            self._encode_times.clear()
        return times

    def stats(self) -> dict[str, float]:
        cold_sessions, cold_bytes = self.cold.totals() if self.cold is not None else (0, 0)
        with self._lock:
            ratio = self._raw_bytes / self._coded_bytes if self._coded_bytes else 0.0
            return {
                **self.counters,
                "sessions_warm": len(self._warm),
                "sessions_cold": cold_sessions,
                "session_cold_evictions_total": self.cold.evictions_total if self.cold else 0,
                "warm_bytes": self.warm_bytes,
                "warm_shared_parts": len(self._parts),
                "warm_bytes_saved": self._parts.saved_bytes,
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
        """Store what is pending (with a cold tier every parked session is then on disk, and
        survives a restart of the server). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.flush()
        self._pool.shutdown(wait=True)
