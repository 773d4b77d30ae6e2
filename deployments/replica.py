"""The model replica: owns one KV3D engine (one per GPU in production) and streams its events."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from deployments.ray_metrics import RayMetricsExporter
from deployments.registry import SessionClient, SnapshotClient, get_registry
from kv3d.config import KV3DConfig
from kv3d.engine.catalog import LocalSnapshots
from kv3d.engine.engine import MIB, Engine
from kv3d.engine.generation import EngineStats, GenerationRequest, StreamEvent
from kv3d.engine.reuse import Publish
from kv3d.server.routing import ReplicaView, RouteKeys

log = logging.getLogger(__name__)


# The replica's own copy of the snapshots it computed takes this share of `cache.ram_warm_mb`.
OWN_SNAPSHOTS_SHARE = 4


def _publish_to(*sinks: Publish) -> Publish:
    def publish(meta, blob) -> None:
        for sink in sinks:
            sink(meta, blob)

    return publish


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a Serve replica (tests of the plain class)
        return "local"


class ModelReplica:
    """Serve-facing shell around `kv3d.engine.engine.Engine`; the engine is built inside the replica
    process because native llama.cpp handles never cross process boundaries."""

    def __init__(self, config: dict[str, Any]):
        cfg = KV3DConfig(**config)
        if os.nice(0) > 0:
            log.warning(
                "this model replica runs at nice %d: its decode threads yield the cores to every "
                "other process; start Ray with RAY_worker_niceness=0",
                os.nice(0),
            )
        self._engine = Engine.from_config(cfg, replica_id=_replica_id())
        self._stream_interval_s = cfg.server.stream_interval_s("ray")
        self._snapshots: SnapshotClient | None = None
        fingerprint = self._engine.fingerprint
        if cfg.prefix.enabled and cfg.prefix.snapshots:
            registry = get_registry(cfg.cache.ram_warm_mb * MIB)
            self._snapshots = SnapshotClient(registry, fingerprint)
            # The snapshots this replica computed are also kept in its own RAM: a family evicted
            # while a request waited for admission comes back from there on the step thread,
            # which never reads the object store (a request fetches from it only when none of
            # its prefix is hot on arrival).
            own = LocalSnapshots(cfg.cache.ram_warm_mb * MIB // OWN_SNAPSHOTS_SHARE, fingerprint)
            self._engine.set_snapshot_sink(_publish_to(own.publish, self._snapshots.publish))
            self._engine.set_snapshot_source(own.fetch)
        if cfg.prefix.enabled and cfg.cache.share_sessions:
            registry = get_registry(cfg.cache.ram_warm_mb * MIB)
            self._engine.set_session_share(SessionClient(registry, fingerprint))
        self._engine.start()
        self._ray_metrics = RayMetricsExporter(self._engine).start()

    async def generate(
        self, request: GenerationRequest, route: RouteKeys | None = None
    ) -> AsyncIterator[StreamEvent]:
        """Stream the request's events. `route` is read by the request router, not here."""
        snapshot = await self._snapshot_for(request)
        # Serve cancels this generator when the caller goes away; Engine.stream then frees the slot.
        async for event in self._engine.stream(
            request, snapshot, min_interval_s=self._stream_interval_s
        ):
            yield event

    async def _snapshot_for(self, request: GenerationRequest):
        """A snapshot from the object store when this replica holds none of the prefix hot."""
        if self._snapshots is None:
            return None
        keys = self._engine.snapshot_keys(request)
        return await self._snapshots.fetch(keys) if keys else None

    def stats(self) -> EngineStats:
        return self._engine.stats()

    def record_routing_stats(self) -> dict[str, Any]:
        """Polled by Serve every `route.stats_period_s`; read by `deployments.router`."""
        return {
            "view": ReplicaView.of(self._engine.routing_view()).to_report(),
            "engine": dataclasses.asdict(self._engine.stats()),
        }

    def check_health(self) -> None:
        if self._engine.batch is None:
            raise RuntimeError("engine is closed")

    def __del__(self) -> None:
        # Serve calls this when the replica stops (scale-down, redeploy) once its requests
        # are done: closing the engine parks every hot session in the warm tier first.
        exporter = getattr(self, "_ray_metrics", None)
        if exporter is not None:
            exporter.close()
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.close()
