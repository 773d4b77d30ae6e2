"""KV3D on a Ray cluster of three nodes on this machine (a head and two workers, each its own
raylet and object store, started with `ray start` as cluster/README.md says, token
authentication on), one model replica per worker node:

- a prefix computed on one node is restored on the other from the object store;
- a session whose turn ran on one node resumes on the other from the shared warm tier;
- when one worker node is lost mid-run (its processes killed), every later request succeeds.

Which node did what is read from each node's own Prometheus endpoint (Ray's metrics agent of
that node exports the `ray_kv3d_*` figures of the replica it hosts)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.integration.raycluster import (
    RayNode,
    app_yaml,
    chat,
    cluster_env,
    healthy,
    ray,
    run,
    serve,
    wait_for,
    wait_head,
    wait_started,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.own_cluster,
    # Three raylets, two model replicas and Serve on one machine: on 2 cores it passed alone
    # but not reliably beside the rest of the suite (its nodes' metrics agents came up late, or
    # a request landed on the killed node before Serve noticed), so it runs when asked for.
    pytest.mark.skipif(
        os.environ.get("KV3D_MULTINODE_TESTS") != "1",
        reason="three Ray nodes on one machine: set KV3D_MULTINODE_TESTS=1 (needs 4+ cores)",
    ),
]

SYSTEM = "You are the support assistant of an inference server company; answer in one line. " * 6
# Each worker node takes one model replica: the head has no CPU to give, the replica wants one.
OVERRIDES = {
    "deploy": {"replicas": 2, "num_cpus": 1},
    "route": {"policy": "round_robin"},  # alternate: the next request is the other node's
    "prefix": {"snapshot_min_tokens": 32},
}
# Ray's metrics agents report every second (default 10) so that the test waits less.
FAST_METRICS = {"RAY_metrics_report_interval_ms": "1000"}


@pytest.fixture
def short_root():
    # Not tmp_path: Ray's socket paths under the temp dir must stay within 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="kv3d-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def node_figure(node: RayNode, name: str) -> float:
    """The sum over the replicas on `node` of `ray_kv3d_<name>`, from the node's own agent."""
    text = httpx.get(f"http://127.0.0.1:{node.metrics_port}/metrics", timeout=5).text
    pattern = re.compile(rf"^ray_kv3d_{name}\{{[^}}]*\}} ([0-9.e+-]+)$", re.M)
    return sum(float(v) for v in pattern.findall(text))


def state(head: RayNode, token: str, what: str) -> list[dict]:
    """Ray's state API (`ray list ...`) over HTTP, with the cluster's token."""
    r = httpx.get(
        f"{head.dashboard}/api/v0/{what}",
        params={"limit": 1000, "detail": 1},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    r.raise_for_status()
    return r.json()["data"]["result"]["result"]


def placement(head: RayNode, token: str, workers: list[RayNode], deployment: str) -> list[str]:
    """The nodes ("head" or a worker's name) of the deployment's live replicas."""
    nodes = {n["node_id"]: n for n in state(head, token, "nodes") if n["state"] == "ALIVE"}
    found = []
    for actor in state(head, token, "actors"):
        if actor["state"] != "ALIVE" or not actor["class_name"].endswith(f":{deployment}"):
            continue
        resources = nodes.get(actor["node_id"], {}).get("resources_total", {})
        found.append(next((w.name for w in workers if f"kv3d_{w.name}" in resources), "head"))
    return sorted(found)


def test_prefix_and_session_cross_nodes_and_losing_a_node_loses_no_request(short_root):
    env = {**cluster_env(short_root), **FAST_METRICS}
    token = run(ray("get-auth-token", "--generate"), env).stdout.strip()
    head = RayNode(short_root, env, "head", num_cpus=0)
    workers: list[RayNode] = []
    try:
        wait_head(head)
        for name in ("node_a", "node_b"):
            resources = {f"kv3d_{name}": 1}
            workers.append(RayNode(short_root, env, name, head.address, 1, resources))
            wait_started(workers[-1])
        alive = [n for n in state(head, token, "nodes") if n["state"] == "ALIVE"]
        assert len(alive) == 3
        port = free_port()
        # Every node's IP is 127.0.0.1 here: one HTTP proxy, on the head (EveryNode elsewhere).
        config = app_yaml(short_root / "app.yaml", port, OVERRIDES, proxy_location="HeadOnly")
        client = {**env, "RAY_ADDRESS": head.address}
        deploy = run(serve("deploy", str(config), "-a", head.dashboard), client)
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: healthy(url), 180, "KV3D's /health", head.log)
        names = sorted(w.name for w in workers)
        wait_for(
            lambda: placement(head, token, workers, "ModelReplica") == names,
            240,
            "a model replica on each worker node",
            head.log,
        )
        wait_for(lambda: all(_exports(w) for w in workers), 120, "the replicas' Ray metrics")

        # A prefix computed on one node is restored on the other from the object store.
        family = f"Family {uuid.uuid4().hex}. {SYSTEM}"
        messages = [{"role": "system", "content": family}, {"role": "user", "content": "Port?"}]
        # Nothing else between them: the ingress's own stats calls take round-robin turns too.
        for _ in range(3):
            assert chat(url, messages).status_code == 200
            time.sleep(0.5)  # the snapshot reaches the registry
        published = wait_for(
            lambda: _by_node(workers, "snapshots_published_total"), 60, "snapshot figures"
        )
        restored = wait_for(
            lambda: _by_node(workers, "snapshot_restores_total"), 60, "restore figures"
        )
        assert any(p != r for p in published for r in restored), (published, restored)

        # A session whose turn ran on one node resumes on the other (shared warm tier).
        shares = {w.name: node_figure(w, "session_shares_total") for w in workers}
        resumes = {w.name: node_figure(w, "session_resumes_total") for w in workers}
        session = {"X-Session-ID": f"s-{uuid.uuid4().hex}"}
        turn1 = [{"role": "user", "content": "Name a colour."}]
        first = httpx.post(
            f"{url}/v1/chat/completions",
            json={"messages": turn1, "max_tokens": 4, "temperature": 0},
            headers=session,
            timeout=120,
        )
        assert first.status_code == 200
        # The node that ran turn 1 published its delta (the registry has it by then).
        (parked_on,) = wait_for(
            lambda: _grown(workers, "session_shares_total", shares), 60, "a share"
        )
        turn2 = [
            *turn1,
            {"role": "assistant", "content": first.json()["choices"][0]["message"]["content"]},
            {"role": "user", "content": "And another?"},
        ]
        second = httpx.post(
            f"{url}/v1/chat/completions",
            json={"messages": turn2, "max_tokens": 4, "temperature": 0},
            headers=session,
            timeout=120,
        )
        assert second.status_code == 200
        resumed_on = wait_for(
            lambda: _grown(workers, "session_resumes_total", resumes), 60, "resume"
        )
        assert resumed_on == [next(w.name for w in workers if w.name != parked_on)]

        # Lose the worker node that does not host the ingress, mid-run: no later request fails.
        (host,) = placement(head, token, workers, "Ingress")
        victim = next(w for w in workers if w.name != host)
        outcomes: list[tuple[float, int]] = []
        stop = threading.Event()

        def traffic() -> None:
            i = 0
            while not stop.is_set():
                i += 1
                started = time.monotonic()
                try:
                    code = chat(url, [*messages[:1], {"role": "user", "content": f"Q{i}?"}])
                    outcomes.append((started, code.status_code))
                except httpx.HTTPError:
                    outcomes.append((started, 0))

        thread = threading.Thread(target=traffic, daemon=True)
        thread.start()
        time.sleep(3)
        killed_at = time.monotonic()
        victim.stop(signal.SIGKILL)
        time.sleep(20)
        stop.set()
        thread.join(timeout=150)
        later = [code for started, code in outcomes if started > killed_at]
        assert len(later) >= 3 and all(code == 200 for code in later), (victim.name, outcomes)
        answer = chat(url, turn2)
        assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"]
    finally:
        for node in [*workers, head]:
            node.stop()


def _exports(node: RayNode) -> bool:
    text = httpx.get(f"http://127.0.0.1:{node.metrics_port}/metrics", timeout=5).text
    return "ray_kv3d_steps_total" in text


def _by_node(workers: list[RayNode], name: str) -> dict[str, float]:
    """{node: figure} of the nodes where `name` is above zero."""
    figures = {w.name: node_figure(w, name) for w in workers if w.alive()}
    return {k: v for k, v in figures.items() if v > 0}


def _grown(workers: list[RayNode], name: str, before: dict[str, float]) -> list[str]:
    """The nodes where `name` grew since `before`."""
    return [w.name for w in workers if w.alive() and node_figure(w, name) > before[w.name]]
