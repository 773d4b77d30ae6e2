"""The HTTP ingress: serves `kv3d.server.api` and forwards generation to model replicas."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from deployments import routing_state
from deployments.registry import find_registry
from deployments.routing_state import reported_engine_stats
from kv3d.config import KV3DConfig
from kv3d.engine.generation import (
    EngineStats,
    GenerationRequest,
    Rejected,
    StreamEvent,
    ends_stream,
)
from kv3d.engine.modelfile import cache_fingerprint, resolve_model_path
from kv3d.server.api import ServedModel, build_api
from kv3d.server.guard import Guard
from kv3d.server.metrics import ServerMetrics
from kv3d.server.routing import RouteKeyer

log = logging.getLogger(__name__)

STATS_TIMEOUT_S = 2.0
REPLICA_RETRIES = 3  # other replicas tried when one dies before a request's first event
# Pause before retry n (x n): gives Serve's controller time to see a lost node and stop
# routing to its replicas.
RETRY_BACKOFF_S = 0.5


class HandleBackend:
    """Calls `ModelReplica.generate` through a DeploymentHandle as a streaming generator.

    The request's `RouteKeys` travel as the call's `route` argument, where the request router
    reads them. A replica that dies before the request's first event is retried on another
    (nothing was sent to the client yet); one that dies later ends the stream with an error.
    """

    def __init__(
        self,
        handle: DeploymentHandle,
        retry_after_s: int,
        keyer: RouteKeyer,
        configured_safe: bool = False,
    ):
        self._configured_safe = configured_safe
        self._unary = handle
        self._handle = handle.options(stream=True)
        self._retry_after_s = retry_after_s
        self._keyer = keyer

    async def snapshot_stats(self) -> dict[str, Any] | None:
        registry = find_registry()
        if registry is None:
            return None
        try:
            return await asyncio.wait_for(registry.stats.remote(), STATS_TIMEOUT_S)
        except Exception as exc:
            log.warning("no snapshot stats from the registry: %s", exc)
            return None

    async def engine_stats(self) -> list[EngineStats]:
        # Every replica's report to the router (at most one stats period old), plus a fresh
        # answer from whichever replica the router picks for this call.
        reported = {s.replica_id: s for s in reported_engine_stats()}
        try:
            fresh = await asyncio.wait_for(self._unary.stats.remote(), STATS_TIMEOUT_S)
            reported[fresh.replica_id] = fresh
        except Exception as exc:
            log.warning("no engine stats from the model replicas: %s", exc)
        return list(reported.values())

    async def safe_mode(self) -> bool:
        """Whether the model replicas run in safe mode: all of them when the config says so;
        else as they report to the router, or, before any report has come (the first seconds
        after start), as one of them answers now."""
        if self._configured_safe:
            return True
        reported = reported_engine_stats()
        if reported:
            return any(s.safe_mode for s in reported)
        try:
            fresh = await asyncio.wait_for(self._unary.stats.remote(), STATS_TIMEOUT_S)
        except Exception as exc:
            log.warning("no engine stats from the model replicas: %s", exc)
            return False
        return fresh.safe_mode

    async def generate(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        route = self._keyer.keys(request)
        for attempt in range(1 + REPLICA_RETRIES):
            response = self._handle.generate.remote(request, route=route)
            started = ended = False
            try:
                async for event in response:
                    started = True
                    ended = ends_stream(event)
                    yield event
                    if ended:
                        return
                return
            except BackPressureError:
                # Every replica's slots and queue are full, and so is Serve's queue in front of
                # them (server.max_queued_requests): overload, answered like the engine's own.
                ended = True
                yield Rejected(
                    "queue_full",
                    "server busy: every model replica and the queue in front of them are full",
                    retry_after_s=self._retry_after_s,
                )
                return
            except Exception as exc:
                # Nothing reached the client yet, so another replica can take the request
                # whatever broke: a dead replica surfaces as RayActorError or
                # ActorUnavailableError, or as other errors while Serve has not yet noticed
                # that its node is gone and still routes there.
                if started or attempt == REPLICA_RETRIES:
                    raise
                log.warning(
                    "replica failed before request %s began (%s: %s), retrying",
                    request.request_id,
                    type(exc).__name__,
                    exc,
                )
                await asyncio.sleep(RETRY_BACKOFF_S * (attempt + 1))
            finally:
                if not ended:
                    response.cancel()


class Ingress:
    """Validates, tokenizes and streams; holds the tokenizer (vocabulary only, no weights)."""

    def __init__(
        self,
        model_replica: DeploymentHandle,
        config: dict[str, Any],
        key_digests: list[str],
        admin_digests: list[str] | None = None,
    ):
        """`key_digests`, `admin_digests`: SHA-256 of the API keys and of the admin keys (the
        raw keys are not application args)."""
        cfg = KV3DConfig(**config)
        self._guard = Guard(key_digests, cfg.limits, admin_digests or ())
        self._served = ServedModel.load(cfg)
        path = resolve_model_path(cfg.model.path)
        keyer = RouteKeyer(
            cache_fingerprint(path, kv_type=cfg.engine.kv_type, flash_attn=cfg.engine.flash_attn),
            cfg.prefix.block_tokens,
            enabled=cfg.prefix.enabled,
        )
        self._backend = HandleBackend(
            model_replica, cfg.server.retry_after_s, keyer, configured_safe=cfg.server.safe_mode
        )
        self._routes = routing_state.ROUTES if cfg.route.policy == "kv3d" else None

    def __serve_build_asgi_app__(self):
        return build_api(self._served, self._backend, ServerMetrics(self._routes), self._guard)
