"""The snapshot registry: a named, detached Ray actor that owns every prefix snapshot and the
shared copy of every kept session (the cluster's warm tier).

Objects in Ray's object store die with the process that put them, so the registry itself calls
`ray.put`: snapshots and sessions outlive the replica that computed them. Each is an Arrow
buffer; `ray.get` on the same node maps it without a copy. Losing the registry loses only
speed: replicas then recompute, and Ray restarts it empty.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pyarrow as pa
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from kv3d.engine.catalog import CatalogEntry, SnapshotCatalog
from kv3d.engine.snapshot import SnapshotMeta

log = logging.getLogger(__name__)

# The actor is detached and outlives a redeploy: its name carries the version of its calls, so
# that new replicas never call an older registry with arguments it does not take.
REGISTRY_VERSION = 3  # 3: sessions published with their parts, each part kept once
REGISTRY_NAME = f"kv3d-snapshot-registry-v{REGISTRY_VERSION}"
LEGACY_REGISTRY_NAMES = ("kv3d-snapshot-registry", "kv3d-snapshot-registry-v2")
REGISTRY_NAMESPACE = "kv3d"
CALL_TIMEOUT_S = 2.0


class SnapshotRegistry:
    """Invariant: a session record is listed with the keys of the parts it was published with
    (`_parts_of`), and each part is held once whatever number of records use it. A part is
    touched whenever a record that uses it is published or looked up, after the record, so the
    LRU order drops parts after the records that use them (a part missing all the same, under
    pressure, makes its records a miss: recomputed)."""

    def __init__(self, budget_bytes: int):
        self._catalog = SnapshotCatalog(budget_bytes)
        self._parts_of: dict[tuple, tuple[int, ...]] = {}

    def publish(
        self,
        key: int,
        fingerprint: bytes,
        n_tokens: int,
        block_keys: list[int],
        blob: bytes,
        tenant: str = "",
    ) -> bool:
        """Keep a prefix snapshot. `tenant` (SnapshotMeta.tenant) says whose family it is, for
        the stats; a caller that does not send one (an older replica) publishes under "", which
        only an open API or an admin key sees."""
        if key in self._catalog:
            self._catalog.touch(key)
            return True
        ref = ray.put(pa.py_buffer(blob))
        entry = CatalogEntry(key, fingerprint, n_tokens, len(blob), tuple(block_keys), ref)
        entry.tenant = tenant if isinstance(tenant, str) else ""
        evicted = self._catalog.add(entry)
        if evicted is None:
            log.warning("snapshot %016x (%d bytes) exceeds the whole budget", key, len(blob))
            return False
        return True

    def lookup(self, fingerprint: bytes, block_keys: list[int]) -> tuple[int, list] | None:
        """(tokens, [ref]) of the deepest snapshot for `block_keys`; the ref is wrapped in a
        list so that Ray hands it over unresolved."""
        entry = self._catalog.lookup(fingerprint, block_keys)
        return None if entry is None else (entry.n_tokens, [entry.handle])

    def publish_session(
        self,
        session_id: str,
        fingerprint: bytes,
        record: bytes,
        parts: dict[int, bytes] | None = None,
    ) -> bool:
        """Keep a session's encoded record (the newest turn replaces the older) and the deltas
        of its keyed parts, each once by key: a part already held is only touched."""
        key = _session_key(fingerprint, session_id)
        ref = ray.put(pa.py_buffer(record))
        if not self._add(CatalogEntry(key, fingerprint, 0, len(record), (), ref)):
            log.warning("session record (%d bytes) exceeds the whole budget", len(record))
            return False
        parts = parts or {}
        self._parts_of[key] = tuple(parts)
        for part_key, delta in parts.items():
            held = _part_key(fingerprint, part_key)
            if held in self._catalog:
                self._catalog.touch(held)
                continue
            ref = ray.put(pa.py_buffer(delta))
            if not self._add(CatalogEntry(held, fingerprint, 0, len(delta), (), ref)):
                return False
        return True

    def lookup_session(self, session_id: str, fingerprint: bytes) -> list | None:
        """[ref of the record, {part key: ref}] of the session, or None (also when one of its
        parts is gone)."""
        key = _session_key(fingerprint, session_id)
        entry = self._catalog.get(key)
        if entry is None:
            return None
        refs = {}
        for part_key in self._parts_of.get(key, ()):
            part = self._catalog.get(_part_key(fingerprint, part_key))
            if part is None:
                return None
            refs[part_key] = part.handle
        return [entry.handle, refs]

    def _add(self, entry: CatalogEntry) -> bool:
        evicted = self._catalog.add(entry)
        if evicted is None:
            return False
        for old in evicted:
            self._parts_of.pop(old.key, None)
        return True

    def stats(self) -> dict[str, Any]:
        """Figures of every tenant: the API shows each caller only its own `families`."""
        return self._catalog.stats()


def _session_key(fingerprint: bytes, session_id: str) -> tuple[str, bytes, str]:
    # Never equal to a snapshot's int key; a session of one model is invisible to another.
    return ("session", fingerprint, session_id)


def _part_key(fingerprint: bytes, part_key: int) -> tuple[str, bytes, int]:
    return ("part", fingerprint, part_key)


HEAD_NODE_RESOURCE = "node:__internal_head__"


def head_node_for(nodes: list[dict[str, Any]], budget_bytes: int) -> str | None:
    """The id of the live head node when its object store can hold the whole warm budget
    (`nodes` as `ray.nodes()` lists them), else None: then the registry goes wherever Ray
    puts it. On the head it outlives the loss of any worker node and its replicas."""
    for node in nodes:
        resources = node.get("Resources") or {}
        if node.get("Alive") and HEAD_NODE_RESOURCE in resources:
            fits = resources.get("object_store_memory", 0) >= budget_bytes
            return node["NodeID"] if fits else None
    return None


def get_registry(budget_bytes: int):
    """The cluster's registry actor, created on first use (on the head node where it fits). A
    registry of an older KV3D left running by an upgrade only holds a cache that no new replica
    reads: it is stopped."""
    actor = ray.remote(SnapshotRegistry)
    placement: dict[str, Any] = {}
    head = head_node_for(ray.nodes(), budget_bytes)
    if head is not None:
        placement["scheduling_strategy"] = NodeAffinitySchedulingStrategy(head, soft=True)
    registry = actor.options(
        name=REGISTRY_NAME,
        namespace=REGISTRY_NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=0,
        max_restarts=-1,
        **placement,
    ).remote(budget_bytes)
    for name in LEGACY_REGISTRY_NAMES:
        try:
            old = ray.get_actor(name, namespace=REGISTRY_NAMESPACE)
        except ValueError:
            continue
        log.warning("stopping %s, the snapshot registry of an older KV3D", name)
        ray.kill(old, no_restart=True)
    return registry


def find_registry():
    try:
        return ray.get_actor(REGISTRY_NAME, namespace=REGISTRY_NAMESPACE)
    except ValueError:
        return None


class SnapshotClient:
    """A replica's side of the registry: publish without blocking, fetch with a deadline."""

    def __init__(self, registry, fingerprint: bytes):
        self._registry = registry
        self._fingerprint = fingerprint

    def publish(self, meta: SnapshotMeta, blob: bytes) -> None:
        # Fire and forget: called from the engine's step thread.
        self._registry.publish.remote(
            meta.key, meta.fingerprint, meta.n_tokens, list(meta.block_keys), blob, meta.tenant
        )

    async def fetch(self, block_keys: list[int]):
        """The encoded snapshot for the deepest known block, or None (never raises)."""
        try:
            found = await asyncio.wait_for(
                self._registry.lookup.remote(self._fingerprint, block_keys), CALL_TIMEOUT_S
            )
            if found is None:
                return None
            _, (ref,) = found
            return await asyncio.wait_for(ref, CALL_TIMEOUT_S)
        except Exception as exc:  # registry gone or slow: recompute instead
            log.warning("snapshot fetch failed, recomputing: %s", exc)
            return None


class SessionClient:
    """A replica's side of the shared warm tier (kv3d.engine.tiers.SharedSessions): publishes and
    fetches session records through the registry; never raises."""

    def __init__(self, registry, fingerprint: bytes):
        self._registry = registry
        self._fingerprint = fingerprint
        self._pending: list = []

    def publish(self, session_id: str, record: bytes, parts: dict[int, bytes]) -> None:
        ref = self._registry.publish_session.remote(session_id, self._fingerprint, record, parts)
        self._pending = [r for r in self._pending if not _done(r)] + [ref]

    def fetch(self, session_id: str) -> tuple[bytes, dict[int, bytes]] | None:
        try:
            found = ray.get(
                self._registry.lookup_session.remote(session_id, self._fingerprint),
                timeout=CALL_TIMEOUT_S,
            )
            if found is None:
                return None
            record_ref, part_refs = found
            keys = list(part_refs)
            values = ray.get([record_ref, *(part_refs[k] for k in keys)], timeout=CALL_TIMEOUT_S)
            return values[0], dict(zip(keys, values[1:], strict=True))
        except Exception as exc:  # registry gone or slow: recompute instead
            log.warning("shared session fetch failed, recomputing: %s", exc)
            return None

    def flush(self) -> None:
        """Wait (a bounded time) until published records are in the registry."""
        pending, self._pending = self._pending, []
        if pending:
            ray.wait(pending, num_returns=len(pending), timeout=CALL_TIMEOUT_S)


def _done(ref) -> bool:
    ready, _ = ray.wait([ref], timeout=0)
    return bool(ready)
