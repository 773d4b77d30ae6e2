"""The HTTP ingress: serves `kv3d.api` and forwards generation to model replicas."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from deployments.registry import find_registry
from kv3d.api import ServedModel, build_api
from kv3d.chat import Tokenizer
from kv3d.config import KV3DConfig
from kv3d.generation import EngineStats, Finished, GenerationRequest, Rejected, StreamEvent
from kv3d.metrics import ServerMetrics
from kv3d.modelfile import model_id_for, resolve_model_path

log = logging.getLogger(__name__)

STATS_TIMEOUT_S = 2.0


class HandleBackend:
    """Calls `ModelReplica.generate` through a DeploymentHandle as a streaming generator.

    The request's arguments are where a content-aware router reads its routing keys.
    """

    def __init__(self, handle: DeploymentHandle, retry_after_s: int):
        self._unary = handle
        self._handle = handle.options(stream=True)
        self._retry_after_s = retry_after_s

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
        # One replica answers (whichever the router picks); the others' figures arrive with
        # their streams' terminal events.
        try:
            return [await asyncio.wait_for(self._unary.stats.remote(), STATS_TIMEOUT_S)]
        except Exception as exc:
            log.warning("no engine stats from the model replicas: %s", exc)
            return []

    async def generate(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        response = self._handle.generate.remote(request)
        ended = False
        try:
            async for event in response:
                ended = isinstance(event, (Finished, Rejected))
                yield event
                if ended:
                    return
        except BackPressureError as exc:
            ended = True
            yield Rejected(
                503,
                "overloaded",
                f"all model replicas are busy: {exc}",
                retry_after_s=self._retry_after_s,
            )
        finally:
            if not ended:
                response.cancel()


class Ingress:
    """Validates, tokenizes and streams; holds the tokenizer (vocabulary only, no weights)."""

    def __init__(self, model_replica: DeploymentHandle, config: dict[str, Any]):
        cfg = KV3DConfig(**config)
        path = resolve_model_path(cfg.model.path)
        self._tokenizer = Tokenizer.load(path)
        self._served = ServedModel(
            model_id=model_id_for(path, cfg.model.id),
            tokenizer=self._tokenizer,
            context_tokens=min(cfg.model.context_tokens, self._tokenizer.n_ctx_train),
        )
        self._backend = HandleBackend(model_replica, cfg.server.retry_after_s)

    def __serve_build_asgi_app__(self):
        return build_api(self._served, self._backend, ServerMetrics())
