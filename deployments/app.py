"""Assembles the KV3D Serve application; the only place Serve decorators are applied.

`serve run deployments/app.yaml` calls `build_app(args)` with the YAML's `args`; `kv3d serve`
calls `build_from_config`. Both map onto one `KV3DConfig`.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import BackpressureConfig, RequestRouterConfig

from deployments.ingress import Ingress
from deployments.replica import ModelReplica
from kv3d.config import KV3DConfig, load_config
from kv3d.server.guard import digests_from_setting

INGRESS_MAX_ONGOING_REQUESTS = 1024


def router_config(config: KV3DConfig) -> RequestRouterConfig:
    """`route.*` onto Serve's RequestRouterConfig for the model deployment."""
    route = config.route
    # By import path: the router is built in the ingress process, which imports it there.
    chosen: dict[str, Any] = {}  # pow2: Serve's default router
    if route.policy == "kv3d":
        chosen = {
            "request_router_class": "deployments.router:KV3DRouter",
            "request_router_kwargs": {
                "imbalance_requests": route.imbalance_requests,
                "recent_s": route.recent_s,
            },
        }
    elif route.policy == "round_robin":
        chosen = {"request_router_class": "deployments.router:RoundRobinRouter"}
    return RequestRouterConfig(
        **chosen,
        request_routing_stats_period_s=route.stats_period_s,
        request_routing_stats_timeout_s=max(2.0, 2 * route.stats_period_s),
    )


def replica_scaling(config: KV3DConfig) -> dict[str, Any]:
    """A fixed replica count, or autoscaling between `replicas` and `max_replicas`.

    A KV cache is state: scale up quickly, scale down only after long quiet (the removed
    replica's sessions are demoted to the shared warm tier as it stops, see ModelReplica).
    """
    deploy = config.deploy
    if not deploy.max_replicas:
        return {"num_replicas": deploy.replicas}
    target = deploy.target_ongoing_requests or config.engine.max_sequences
    return {
        "autoscaling_config": {
            "min_replicas": deploy.replicas,
            "initial_replicas": deploy.replicas,
            "max_replicas": deploy.max_replicas,
            "target_ongoing_requests": target,
            "upscale_delay_s": 10.0,
            "downscale_delay_s": deploy.downscale_delay_s,
        }
    }


def build_from_config(config: KV3DConfig) -> Application:
    # The API keys travel as digests: application args show in `serve status` and the dashboard.
    key_digests = list(digests_from_setting(config.server.api_key))
    admin_digests = list(digests_from_setting(config.server.admin_api_key))
    data = config.model_dump()
    data["server"]["api_key"] = ""
    data["server"]["admin_api_key"] = ""
    # The engine's own bounded queue (max_queued_requests) is where requests wait, in its
    # order; Serve's queue at the ingress in front of the replicas is bounded by the same
    # figure, and what does not fit in either is answered 429 with Retry-After.
    queued = config.server.max_queued_requests
    replica = serve.deployment(
        ModelReplica,
        name="ModelReplica",
        max_ongoing_requests=config.engine.max_sequences + queued,
        max_queued_requests=max(1, queued),  # Serve takes no 0 (-1 is unbounded)
        ray_actor_options={
            "num_cpus": config.deploy.num_cpus,
            "num_gpus": config.deploy.num_gpus,
        },
        health_check_period_s=10,
        graceful_shutdown_timeout_s=config.deploy.shutdown_timeout_s,
        request_router_config=router_config(config),
        **replica_scaling(config),
    )
    ingress = serve.deployment(
        serve.ingress()(Ingress),
        name="Ingress",
        num_replicas=config.deploy.ingress_replicas,
        max_ongoing_requests=INGRESS_MAX_ONGOING_REQUESTS,
        # Requests beyond what the ingress replicas hold wait in the proxy, a bounded number.
        max_queued_requests=INGRESS_MAX_ONGOING_REQUESTS,
        backpressure_config=BackpressureConfig(
            status_code=429, retry_after_s=config.server.retry_after_s
        ),
        ray_actor_options={"num_cpus": 0},
    )
    return ingress.bind(replica.bind(data), data, key_digests, admin_digests)


def build_app(args: dict[str, Any]) -> Application:
    """Serve application builder: `args` holds `config` (a KV3DConfig dict) and/or
    `config_file` (a JSON path); environment variables `KV3D_*` apply too."""
    unknown = set(args) - {"config", "config_file"}
    if unknown:
        raise ValueError(f"unknown application args {sorted(unknown)}; use config / config_file")
    return build_from_config(load_config(args.get("config_file"), overrides=args.get("config")))
