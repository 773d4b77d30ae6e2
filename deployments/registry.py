"""The snapshot registry: a named, detached Ray actor that owns every prefix snapshot.

Objects in Ray's object store die with the process that put them, so the registry itself calls
`ray.put`: snapshots outlive the replica that computed them. Each is an Arrow buffer; `ray.get`
on the same node maps it without a copy. Losing the registry loses only speed: replicas then
recompute, and Ray restarts it empty.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pyarrow as pa
import ray

from kv3d.catalog import CatalogEntry, SnapshotCatalog
from kv3d.snapshot import SnapshotMeta

log = logging.getLogger(__name__)

REGISTRY_NAME = "kv3d-snapshot-registry"
REGISTRY_NAMESPACE = "kv3d"
CALL_TIMEOUT_S = 2.0


class SnapshotRegistry:
    def __init__(self, budget_bytes: int):
        self._catalog = SnapshotCatalog(budget_bytes)

    def publish(
        self, key: int, fingerprint: bytes, n_tokens: int, block_keys: list[int], blob: bytes
    ) -> bool:
        if key in self._catalog:
            self._catalog.touch(key)
            return True
        ref = ray.put(pa.py_buffer(blob))
        entry = CatalogEntry(key, fingerprint, n_tokens, len(blob), tuple(block_keys), ref)
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

    def stats(self) -> dict[str, Any]:
        entries = self._catalog.entries()
        return {
            "snapshots": len(entries),
            "bytes": self._catalog.total_bytes,
            "budget_bytes": self._catalog.budget_bytes,
            "families": [
                {"key": f"{e.key:016x}", "tokens": e.n_tokens, "bytes": e.nbytes, "hits": e.hits}
                for e in entries
            ],
        }


def get_registry(budget_bytes: int):
    """The cluster's registry actor, created on first use."""
    actor = ray.remote(SnapshotRegistry)
    return actor.options(
        name=REGISTRY_NAME,
        namespace=REGISTRY_NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=0,
        max_restarts=-1,
    ).remote(budget_bytes)


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
            meta.key, meta.fingerprint, meta.n_tokens, list(meta.block_keys), blob
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
