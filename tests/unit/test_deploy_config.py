"""The operator's YAML files and how `route.*` / `deploy.*` map onto Serve's options."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kv3d.config import ConfigError, KV3DConfig, load_config

REPO = Path(__file__).resolve().parents[2]
pytest.importorskip("ray")


@pytest.mark.parametrize("name", ["app.yaml", "app-multigpu.yaml"])
def test_every_shipped_serve_yaml_is_a_valid_config(name):
    spec = yaml.safe_load((REPO / "deployments" / name).read_text())
    (app,) = spec["applications"]
    assert app["import_path"] == "deployments.app:build_app"
    KV3DConfig(**app["args"]["config"])  # unknown or invalid keys raise


def test_the_rayservice_manifest_carries_a_valid_config():
    manifest = yaml.safe_load((REPO / "cluster" / "rayservice.yaml").read_text())
    (app,) = yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"]
    assert app["import_path"] == "deployments.app:build_app"
    KV3DConfig(**app["args"]["config"])


@pytest.mark.parametrize(
    ("policy", "router"),
    [
        ("kv3d", "deployments.router:KV3DRouter"),
        ("round_robin", "deployments.router:RoundRobinRouter"),
        ("pow2", "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter"),
    ],
)
def test_route_policy_selects_the_request_router(policy, router):
    from deployments.app import router_config

    cfg = load_config(overrides={"route": {"policy": policy, "stats_period_s": 0.5}})
    rc = router_config(cfg)
    assert rc.request_router_class == router
    assert rc.request_routing_stats_period_s == 0.5
    if policy == "kv3d":
        assert rc.request_router_kwargs == {"imbalance_requests": 4, "recent_s": 5.0}


def test_fixed_replicas_unless_a_ceiling_asks_for_autoscaling():
    from deployments.app import replica_scaling

    assert replica_scaling(load_config(overrides={"deploy": {"replicas": 3}})) == {
        "num_replicas": 3
    }
    cfg = load_config(overrides={"deploy": {"replicas": 2, "max_replicas": 6}})
    auto = replica_scaling(cfg)["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"]) == (2, 6)
    assert auto["target_ongoing_requests"] == cfg.engine.max_sequences
    assert auto["downscale_delay_s"] == 600


def test_a_ceiling_below_the_floor_is_a_config_error():
    with pytest.raises(ConfigError, match="max_replicas"):
        load_config(overrides={"deploy": {"replicas": 4, "max_replicas": 2}})


def _node(node_id, *, head=False, alive=True, store_bytes=10 * 2**30):
    resources = {"CPU": 2.0, "object_store_memory": float(store_bytes)}
    if head:
        resources["node:__internal_head__"] = 1.0
    return {"NodeID": node_id, "Alive": alive, "Resources": resources}


def test_the_registry_goes_to_the_head_node_where_its_budget_fits():
    from deployments.registry import head_node_for

    nodes = [_node("w1"), _node("h", head=True), _node("w2")]
    assert head_node_for(nodes, 8 * 2**30) == "h"
    # The head's object store cannot hold the warm budget: let Ray place it.
    assert head_node_for(nodes, 16 * 2**30) is None
    # No live head (a cluster being rebuilt): no preference.
    assert head_node_for([_node("w1"), _node("h", head=True, alive=False)], 2**30) is None
