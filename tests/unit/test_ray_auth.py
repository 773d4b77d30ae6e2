"""Ray's token authentication in the shipped cluster configs and in `kv3d serve` joining a
cluster; nothing here starts Ray (tests/integration/test_cluster_auth.py does)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from kv3d.cli.main import _ray_environment

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def ray_env(monkeypatch):
    """No Ray variable from the machine running the tests; the function's changes undone."""
    for name in list(os.environ):
        if name.startswith("RAY_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_joining_with_a_handed_token_turns_token_mode_on(ray_env):
    ray_env.setenv("RAY_AUTH_TOKEN_PATH", "/run/secrets/ray-token")
    _ray_environment(joining=True)
    assert os.environ["RAY_AUTH_MODE"] == "token"


def test_joining_never_overrides_an_explicit_mode_nor_invents_one(ray_env):
    _ray_environment(joining=True)
    assert "RAY_AUTH_MODE" not in os.environ  # ~/.ray/auth_token alone: Ray's own rule
    ray_env.setenv("RAY_AUTH_TOKEN", "abc")
    ray_env.setenv("RAY_AUTH_MODE", "disabled")
    _ray_environment(joining=True)
    assert os.environ["RAY_AUTH_MODE"] == "disabled"


def test_a_local_instance_keeps_rays_default_and_full_priority_workers(ray_env):
    _ray_environment(joining=False)
    assert os.environ["RAY_worker_niceness"] == "0"
    assert "RAY_AUTH_MODE" not in os.environ  # ray.init() turns token mode on by itself


def test_the_rayservice_runs_with_token_authentication():
    manifest = yaml.safe_load((REPO / "cluster" / "rayservice.yaml").read_text())
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token"}
    # The operator hands out the token; a hand-set one would not be the operator's.
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            names = {e["name"] for e in container.get("env", [])}
            assert not names & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"}


def test_the_cluster_launcher_starts_every_node_with_the_token():
    config = yaml.safe_load((REPO / "cluster" / "ray-cluster.yaml").read_text())
    assert config["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in config[key] if "ray start" in c]
        assert "RAY_AUTH_MODE=token" in start and "RAY_worker_niceness=0" in start
