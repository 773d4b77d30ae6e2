"""The command line as a user runs it: `kv3d doctor` and `kv3d serve` in real subprocesses."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.integration

KV3D = [sys.executable, "-m", "kv3d.cli"]


def test_doctor_passes_and_writes_the_seed_config(tmp_path):
    config = tmp_path / "kv3d" / "config.json"
    out = subprocess.run(
        [*KV3D, "doctor", "--config", str(config)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[ok  ] model:" in out.stdout and "all required checks passed" in out.stdout
    data = json.loads(config.read_text())
    assert set(data) == {"server", "cache", "model"}
    assert data["server"]["port"] == 8080 and data["cache"]["gpu_hot_mb"] == 2048


def test_doctor_fails_with_advice_when_the_model_is_missing(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model": {"path": str(tmp_path / "missing.gguf")}}))
    out = subprocess.run(
        [*KV3D, "doctor", "--config", str(config)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 1
    assert "[FAIL] model:" in out.stdout and "--model PATH" in out.stdout


def test_serve_rejects_a_missing_model_before_starting_ray(tmp_path):
    out = subprocess.run(
        [*KV3D, "serve", "--model", str(tmp_path / "nope.gguf")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "does not exist" in out.stderr


def test_serve_on_a_taken_port_fails_at_once_saying_so(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [*KV3D, "serve", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
            | {"HOME": str(tmp_path)},
        )
    assert out.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("runtime", ["process", "ray"])
def test_serve_starts_answers_and_stops_on_ctrl_c(tmp_path, runtime):
    """In safe mode, which `/health` reports from its first answer on; in one process (the
    default on one machine) and through Ray Serve."""
    port = free_port()
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "KV3D_CACHE__GPU_HOT_MB": "128",
        "KV3D_MODEL__CONTEXT_TOKENS": "2048",
        "KV3D_DEPLOY__NUM_CPUS": "0",
    }
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [*KV3D, "serve", "--port", str(port), "--safe-mode", "--server.runtime", runtime],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        ready = ""
        while time.monotonic() < deadline and "serving at" not in ready:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "kv3d serve exited early"
            ready = line if "serving at" in line else ready
        assert f"http://127.0.0.1:{port}/v1" in ready
        assert ("one process" in ready) == (runtime == "process")
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()
        assert health["status"] == "ok" and health["mode"] == "safe"
        chat = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
            timeout=60,
        )
        assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
