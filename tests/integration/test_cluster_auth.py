"""KV3D on a Ray cluster started the way cluster/README.md says, with Ray's token authentication
on: `ray get-auth-token --generate`, `ray start --head`, `serve run deployments/app.yaml`, a chat
over HTTP, `serve status` and `ray status`; and Ray refuses a client without the token (the test
fails if authentication silently went off). tests/integration/test_multinode.py runs
`serve deploy`."""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.integration.raycluster import (
    BIN,
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
)

pytestmark = [pytest.mark.integration, pytest.mark.own_cluster]

DEPLOY_DEADLINE_S = 150


@pytest.fixture
def short_root():
    # Not tmp_path: Ray's socket paths under the temp dir must stay within 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="kv3d-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def kv3d_serve_joining(client: dict[str, str], token_path: Path, port: int):
    """`kv3d serve` joined to the cluster: ready, one chat answered, Ctrl-C; its output."""
    env = {k: v for k, v in client.items() if k != "RAY_AUTH_MODE"}
    env.update(
        RAY_AUTH_TOKEN_PATH=str(token_path),
        KV3D_CACHE__GPU_HOT_MB="128",
        KV3D_MODEL__CONTEXT_TOKENS="2048",
        KV3D_DEPLOY__NUM_CPUS="0",
    )
    cmd = [str(BIN / "kv3d"), "serve", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(
        cmd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + DEPLOY_DEADLINE_S
        while time.monotonic() < deadline and not any("serving at" in x for x in lines):
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            lines.append(line)
        if any("serving at" in x for x in lines):
            answer = chat(f"http://127.0.0.1:{port}", [{"role": "user", "content": "Hi"}])
            assert answer.status_code == 200, answer.text
            proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            out, _ = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, "".join(lines) + (out or ""))


def test_documented_cluster_path_works_with_token_auth_and_refuses_clients_without_it(
    short_root,
):
    env = cluster_env(short_root)
    token = run(ray("get-auth-token", "--generate"), env)
    assert token.returncode == 0, token.stderr
    assert (short_root / ".ray" / "auth_token").read_text().strip() == token.stdout.strip()

    head = RayNode(short_root, env, "head")
    attached = None
    try:
        wait_head(head)
        mode = httpx.get(f"{head.dashboard}/api/authentication_mode", timeout=5).json()
        assert mode["authentication_mode"] == "token"

        client = {**env, "RAY_ADDRESS": head.address}
        http_port = free_port()
        config = app_yaml(short_root / "app.yaml", http_port)
        # The top-level README's command, attached: it runs until the cluster goes.
        with open(short_root / "serve-run.log", "w") as out:
            attached = subprocess.Popen(
                serve("run", str(config)), env=client, stdout=out, stderr=subprocess.STDOUT
            )
        url = f"http://127.0.0.1:{http_port}"

        def up() -> bool:
            assert attached.poll() is None, (short_root / "serve-run.log").read_text()
            return healthy(url)

        wait_for(up, DEPLOY_DEADLINE_S, "KV3D's /health", head.log)
        answer = chat(url, [{"role": "user", "content": "Hi"}])
        assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"]

        status = run(serve("status", "-a", head.dashboard), client)
        assert status.returncode == 0 and "RUNNING" in status.stdout, status.stderr
        assert run(ray("status"), client).returncode == 0

        # Without the token Ray refuses: its HTTP API (what `serve deploy` uses) and its gRPC
        # (what `ray status`, `serve run` and every worker use).
        apps = f"{head.dashboard}/api/serve/applications/"
        assert httpx.get(apps, timeout=10).status_code == 401
        wrong = {"Authorization": "Bearer " + "0" * 64}
        assert httpx.get(apps, headers=wrong, timeout=10).status_code == 403
        anonymous = run(ray("status"), {**client, "RAY_AUTH_MODE": "disabled"}, timeout=90)
        assert anonymous.returncode != 0
        assert "auth" in (anonymous.stdout + anonymous.stderr).lower()

        # `kv3d serve` joining the cluster in RAY_ADDRESS with a token handed in
        # RAY_AUTH_TOKEN_PATH (no RAY_AUTH_MODE): it authenticates, redeploys and answers.
        joined = kv3d_serve_joining(client, short_root / ".ray" / "auth_token", http_port)
        assert joined.returncode == 0, joined.stdout
        assert f"serving at http://127.0.0.1:{http_port}/v1" in joined.stdout
    finally:
        if attached is not None and attached.poll() is None:
            attached.kill()
            attached.wait()
        head.stop()
