"""The model replica: owns one KV3D engine (one per GPU in production) and streams its events."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from kv3d.config import KV3DConfig
from kv3d.engine import Engine
from kv3d.generation import EngineStats, GenerationRequest, StreamEvent

log = logging.getLogger(__name__)


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a Serve replica (tests of the plain class)
        return "local"


class ModelReplica:
    """Serve-facing shell around `kv3d.engine.Engine`; the engine is built inside the replica
    process because native llama.cpp handles never cross process boundaries."""

    def __init__(self, config: dict[str, Any]):
        self._engine = Engine.from_config(KV3DConfig(**config), replica_id=_replica_id()).start()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        # Serve cancels this generator when the caller goes away; Engine.stream then frees the slot.
        async for event in self._engine.stream(request):
            yield event

    def stats(self) -> EngineStats:
        return self._engine.stats()

    def check_health(self) -> None:
        if self._engine.batch is None:
            raise RuntimeError("engine is closed")

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.close()
