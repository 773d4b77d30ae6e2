"""The warm-tier catalog: which prefix snapshots and shared session records exist, within one
RAM budget, least recently used out first. Plain Python; the Ray registry actor
(deployments/registry.py) owns one, and so does `LocalSnapshots`, the snapshot store of a
server that runs in one process."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kv3d.engine.snapshot import SnapshotMeta

log = logging.getLogger(__name__)


@dataclass(slots=True)
class CatalogEntry:
    key: Hashable  # a snapshot's family key (its last block's hash), or a session's key
    fingerprint: bytes
    n_tokens: int
    nbytes: int
    block_keys: tuple[int, ...]
    handle: Any = None  # what the owner keeps alive for this entry (an ObjectRef)
    created_s: float = field(default_factory=time.time)
    last_used_s: float = field(default_factory=time.time)
    hits: int = 0
    tenant: str = ""  # whose family a snapshot is (SnapshotMeta.tenant); "" for one owner


class SnapshotCatalog:
    """Invariants (`check_invariants`): `total_bytes` is the sum of the entries' bytes and never
    exceeds `budget_bytes`; a block key maps to an entry that has it. `_entries` is kept in
    least-recently-used order, which is the eviction order."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.total_bytes = 0
        self._entries: OrderedDict[Hashable, CatalogEntry] = OrderedDict()
        self._by_block: dict[int, Hashable] = {}

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, entry: CatalogEntry) -> list[CatalogEntry] | None:
        """Insert `entry`, evicting as needed; returns the evicted entries, or None when the
        entry alone exceeds the budget (it is then not added)."""
        if entry.nbytes > self.budget_bytes:
            return None
        if entry.key in self._entries:
            self._drop(self._entries[entry.key])
        evicted = []
        while self.total_bytes + entry.nbytes > self.budget_bytes:
            evicted.append(self._drop(next(iter(self._entries.values()))))
        self._entries[entry.key] = entry
        self.total_bytes += entry.nbytes
        for block_key in entry.block_keys:
            self._by_block[block_key] = entry.key
        return evicted

    def lookup(self, fingerprint: bytes, block_keys: Sequence[int]) -> CatalogEntry | None:
        """The entry for the deepest of `block_keys` that one holds (touches it)."""
        found = None
        for block_key in block_keys:
            key = self._by_block.get(block_key)
            if key is None:
                break
            entry = self._entries[key]
            if entry.fingerprint == fingerprint:
                found = entry
        if found is not None:
            found.hits += 1
            found.last_used_s = time.time()
            self._entries.move_to_end(found.key)
        return found

    def get(self, key: Hashable) -> CatalogEntry | None:
        """The entry under `key` (touches it)."""
        entry = self._entries.get(key)
        if entry is not None:
            entry.hits += 1
            self.touch(key)
        return entry

    def touch(self, key: Hashable) -> None:
        self._entries[key].last_used_s = time.time()
        self._entries.move_to_end(key)

    def remove(self, key: Hashable) -> CatalogEntry | None:
        entry = self._entries.get(key)
        return self._drop(entry) if entry is not None else None

    def entries(self) -> list[CatalogEntry]:
        return list(self._entries.values())

    def families(self) -> list[dict[str, Any]]:
        """Every prefix snapshot (not the session records) as figures: its family key, size,
        hits and tenant; never its tokens."""
        return [
            {
                "key": f"{e.key:016x}",
                "tokens": e.n_tokens,
                "bytes": e.nbytes,
                "hits": e.hits,
                "tenant": e.tenant,
            }
            for e in self._entries.values()
            if isinstance(e.key, int)
        ]

    def stats(self) -> dict[str, Any]:
        """Figures of every tenant (the API shows each caller only its own `families`)."""
        families = self.families()
        kinds = [e.key[0] for e in self._entries.values() if isinstance(e.key, tuple)]
        return {
            "sessions": kinds.count("session"),
            "session_parts": kinds.count("part"),  # parts of session records, each held once
            "snapshots": len(families),
            "bytes": self.total_bytes,
            "budget_bytes": self.budget_bytes,
            "families": families,
        }

    def _drop(self, entry: CatalogEntry) -> CatalogEntry:
        del self._entries[entry.key]
        self.total_bytes -= entry.nbytes
        for block_key in entry.block_keys:
            if self._by_block.get(block_key) == entry.key:
                del self._by_block[block_key]
        return entry

    def check_invariants(self) -> None:
        assert self.total_bytes == sum(e.nbytes for e in self._entries.values())
        assert self.total_bytes <= self.budget_bytes
        for block_key, key in self._by_block.items():
            assert block_key in self._entries[key].block_keys


class LocalSnapshots:
    """The prefix snapshots of one engine in its own process (no object store): a family prefix
    evicted from the KV cache comes back from RAM instead of being recomputed. `publish` is
    called from the engine's step thread and `fetch` from the server's, hence the lock; the
    bytes kept are the snapshot's own, never copied again."""

    def __init__(self, budget_bytes: int, fingerprint: bytes):
        self._catalog = SnapshotCatalog(budget_bytes)
        self._fingerprint = fingerprint
        self._lock = threading.Lock()

    def publish(self, meta: SnapshotMeta, blob: bytes) -> None:
        entry = CatalogEntry(
            meta.key, meta.fingerprint, meta.n_tokens, len(blob), tuple(meta.block_keys), blob
        )
        entry.tenant = meta.tenant
        with self._lock:
            if meta.key in self._catalog:
                self._catalog.touch(meta.key)
                return
            if self._catalog.add(entry) is None:
                log.warning(
                    "snapshot %016x (%d bytes) exceeds the whole budget", meta.key, len(blob)
                )

    def fetch(self, block_keys: list[int]) -> bytes | None:
        """The snapshot of the deepest of `block_keys` kept here, or None."""
        with self._lock:
            entry = self._catalog.lookup(self._fingerprint, block_keys)
            return None if entry is None else entry.handle

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return self._catalog.stats()
