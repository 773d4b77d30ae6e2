"""`kv3d bench --routers …`: the same shared-prefix workload against the KV3D application
deployed once per routing policy, on one Ray instance, with the same seed.

Each policy gets its own application (and so its own replicas, cold caches and routers); the
snapshot registry is shared, but every policy's families are new text, so no policy starts with
another's snapshots.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import httpx

from kv3d.bench.phases import routing_phase
from kv3d.bench.scrape import by_label, parse_prometheus
from kv3d.config import KV3DConfig

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 180


def compare_routers(
    config: KV3DConfig, policies: list[str], *, seed: int = 0, **workload: Any
) -> dict[str, Any]:
    import ray
    from ray import serve

    from deployments.app import build_from_config

    ray.init(logging_level=logging.WARNING, ignore_reinit_error=True)
    port = config.server.port
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    report: dict[str, Any] = {
        "replicas": config.deploy.replicas,
        "seed": seed,
        "workload": workload,
        "policies": {},
    }
    try:
        for policy in policies:
            name = f"bench-{policy}"
            cfg = config.model_copy(deep=True)
            cfg.route.policy = policy
            serve.run(build_from_config(cfg), name=name, route_prefix=f"/{name}", blocking=False)
            url = f"http://127.0.0.1:{port}/{name}"
            _wait_ready(url, config.deploy.replicas)
            log.info("running the shared-prefix workload against %s", policy)
            result = asyncio.run(_run(url, seed, workload))
            result["routes"] = _route_counts(url)
            report["policies"][policy] = result
            serve.delete(name)
    finally:
        serve.shutdown()
        if not os.environ.get("RAY_ADDRESS"):
            ray.shutdown()
    return report


async def _run(url: str, seed: int, workload: dict[str, Any]) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as http:
        return await routing_phase(http, url, seed=seed, **workload)


def _wait_ready(url: str, replicas: int) -> None:
    """Until /health answers and every model replica has reported to the router."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            values = parse_prometheus(httpx.get(f"{url}/metrics", timeout=5).text)
            if values.get("kv3d_engine_replicas", 0.0) >= replicas:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{url} did not get {replicas} model replicas ready")


def _route_counts(url: str) -> dict[str, float]:
    values = parse_prometheus(httpx.get(f"{url}/metrics", timeout=10).text)
    return by_label(values, "kv3d_route_total", "reason")
