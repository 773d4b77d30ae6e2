"""Assembles the KV3D Serve application; the only place Serve decorators are applied.

`serve run deployments/app.yaml` calls `build_app(args)` with the YAML's `args`; `kv3d serve`
calls `build_from_config`. Both map onto one `KV3DConfig`.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from deployments.ingress import Ingress
from deployments.replica import ModelReplica
from kv3d.config import KV3DConfig, load_config

INGRESS_MAX_ONGOING_REQUESTS = 1024


def build_from_config(config: KV3DConfig) -> Application:
    data = config.model_dump()
    # Serve must not queue in front of the engine: the engine's own bounded queue answers 429.
    replica_concurrency = config.engine.max_sequences + config.server.max_queued_requests
    replica = serve.deployment(
        ModelReplica,
        name="ModelReplica",
        num_replicas=config.deploy.replicas,
        max_ongoing_requests=replica_concurrency,
        ray_actor_options={
            "num_cpus": config.deploy.num_cpus,
            "num_gpus": config.deploy.num_gpus,
        },
        health_check_period_s=10,
    )
    ingress = serve.deployment(
        serve.ingress()(Ingress),
        name="Ingress",
        num_replicas=config.deploy.ingress_replicas,
        max_ongoing_requests=INGRESS_MAX_ONGOING_REQUESTS,
        ray_actor_options={"num_cpus": 0},
    )
    return ingress.bind(replica.bind(data), data)


def build_app(args: dict[str, Any]) -> Application:
    """Serve application builder: `args` holds `config` (a KV3DConfig dict) and/or
    `config_file` (a JSON path); environment variables `KV3D_*` apply too."""
    unknown = set(args) - {"config", "config_file"}
    if unknown:
        raise ValueError(f"unknown application args {sorted(unknown)}; use config / config_file")
    return build_from_config(load_config(args.get("config_file"), overrides=args.get("config")))
