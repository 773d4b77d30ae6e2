"""A real Ray cluster on this machine, started the way cluster/README.md tells an operator to:
`ray get-auth-token --generate`, `ray start --head`, `ray start --address=...` per further node,
with Ray's token authentication on. Every node has its own ports and the cluster its own temp
dir and HOME (the token is not the user's ~/.ray/auth_token). Nodes are stopped by signalling
the processes the test started, never with `ray stop`, which stops every Ray on the machine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.conftest import APP_YAML, TEST_OVERRIDES, free_port, merge

BIN = Path(sys.executable).parent


def cluster_env(home: Path) -> dict[str, str]:
    """The operator's shell: no Ray or KV3D settings of ours, RAY_AUTH_MODE as documented."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "KV3D_"))}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token")
    return env


def run(cmd: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def ray(*args: str) -> list[str]:
    return [str(BIN / "ray"), *args]


def serve(*args: str) -> list[str]:
    return [str(BIN / "serve"), *args]


class RayNode:
    """`ray start --block` of one node; `stop()` ends it and everything it spawned."""

    def __init__(
        self,
        root: Path,
        env: dict[str, str],
        name: str,
        head_address: str | None = None,
        num_cpus: int = 2,
        resources: dict[str, float] | None = None,
    ):
        self.name = name
        self.metrics_port = free_port()
        # Every port of our own: the other Ray instances on this machine keep theirs.
        ports = {
            "dashboard-agent-listen-port": free_port(),
            "dashboard-agent-grpc-port": free_port(),
            "runtime-env-agent-port": free_port(),
            "metrics-export-port": self.metrics_port,
            "node-manager-port": free_port(),
            "object-manager-port": free_port(),
            "min-worker-port": 0,  # 0 and 0: workers take random free ports
            "max-worker-port": 0,
        }
        if head_address is None:
            self.gcs_port, self.dashboard_port = free_port(), free_port()
            self.address = f"127.0.0.1:{self.gcs_port}"
            self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
            ports.update(
                {"port": self.gcs_port, "dashboard-port": self.dashboard_port,
                 "ray-client-server-port": free_port()}
            )  # fmt: skip
            role = ["--head", "--dashboard-host=127.0.0.1"]
        else:
            self.address = head_address
            role = [f"--address={head_address}"]
        # Our temp dir on every node, so that `ray start` records this cluster's address there
        # and not in /tmp/ray, where another `ray.init()` on the machine would find it.
        cmd = ray(
            "start", "--block", *role, f"--temp-dir={root / 'ray'}",
            "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
            f"--resources={json.dumps(resources or {})}", "--object-store-memory=200000000",
            *(f"--{k}={v}" for k, v in ports.items()),
        )  # fmt: skip
        self.log = root / f"{name}.log"
        with open(self.log, "w") as out:
            # RAY_worker_niceness=0 as cluster/README.md asks of every raylet.
            self.proc = subprocess.Popen(
                cmd,
                env={**env, "RAY_worker_niceness": "0"},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM to `ray start --block` stops the node's processes (SIGKILL: the node is
        lost as a crashed machine would be); whatever outlives it is killed through the
        process group this test started, ours only."""
        if self.alive():
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # start_new_session: pgid == pid
        except ProcessLookupError:
            pass


def wait_for(check, timeout_s: float, what: str, log: Path | None = None) -> Any:
    """Poll `check` until it returns something true; its value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except httpx.HTTPError:
            pass
        time.sleep(1)
    tail = "\n" + log.read_text()[-4000:] if log is not None and log.exists() else ""
    raise AssertionError(f"{what}: not within {timeout_s:.0f} s{tail}")


def wait_started(node: RayNode, timeout_s: float = 90) -> None:
    """Until `ray start` says the node runs (two nodes of one IP must not register at once)."""

    def started() -> bool:
        assert node.alive(), f"ray start exited:\n{node.log.read_text()}"
        return "Ray runtime started" in node.log.read_text()

    wait_for(started, timeout_s, f"node {node.name}", node.log)


def wait_head(head: RayNode, timeout_s: float = 90) -> None:
    def up() -> bool:
        assert head.alive(), f"ray start exited:\n{head.log.read_text()}"
        return httpx.get(f"{head.dashboard}/api/authentication_mode", timeout=2).is_success

    wait_for(up, timeout_s, "the head's dashboard", head.log)


def app_yaml(
    path: Path, http_port: int, overrides: dict[str, Any] | None = None, **serve_options: Any
) -> Path:
    """deployments/app.yaml as it is, with the suite's test-sized resources (and `overrides`)
    and a free port."""
    spec = yaml.safe_load(APP_YAML.read_text())
    spec["http_options"] = {"host": "127.0.0.1", "port": http_port}
    spec.update(serve_options)
    (app,) = spec["applications"]
    config = merge(app["args"]["config"], TEST_OVERRIDES)
    app["args"]["config"] = merge(config, overrides or {})
    path.write_text(yaml.safe_dump(spec))
    return path


def healthy(url: str) -> bool:
    return httpx.get(f"{url}/health", timeout=2).status_code == 200


def chat(url: str, messages: list[dict[str, str]], **extra: Any) -> httpx.Response:
    body = {"messages": messages, "max_tokens": 4, "temperature": 0, **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
