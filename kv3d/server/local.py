"""`kv3d serve` in one process: the HTTP API over an engine in this process, no Ray.

On one machine with one model replica, Ray Serve's proxy → ingress → replica hops add a
message per hop to every request and every streamed chunk, and three more busy processes on
the cores the decode threads need, while adding nothing a single replica uses. Here the API
calls the engine directly (`LocalBackend`); family prefix snapshots go to a RAM store of this
process (`LocalSnapshots`, `cache.ram_warm_mb`) instead of the object store; sessions use the
engine's own warm and cold tiers as they do in a replica. Several replicas, autoscaling or a
cluster need the Ray runtime (`server.runtime`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
import time
from collections.abc import Iterator

import uvicorn

from kv3d.config import KV3DConfig
from kv3d.engine.catalog import LocalSnapshots
from kv3d.engine.engine import MIB, Engine
from kv3d.server.api import LocalBackend, ServedModel, build_api
from kv3d.server.guard import Guard, digests_from_setting
from kv3d.server.metrics import ServerMetrics

log = logging.getLogger(__name__)

READY_LINE = "KV3D is serving at"  # what a supervisor (or `kv3d bench`) waits for


def resolve_runtime(config: KV3DConfig, ray_address: str | None) -> str:
    """`server.runtime` with `auto` decided: one process for one fixed replica and no Ray
    cluster to join, else Ray Serve."""
    runtime = config.server.runtime
    if runtime != "auto":
        return runtime
    one_replica = config.deploy.replicas == 1 and config.deploy.max_replicas <= 1
    return "process" if one_replica and not ray_address else "ray"


class _Server(uvicorn.Server):
    """uvicorn's server, stopping on SIGINT/SIGTERM the same way, but returning afterwards
    instead of re-raising the signal: the engine must still park its hot sessions."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)


def build_local_app(config: KV3DConfig, engine: Engine):
    """The API over `engine` as `config` says (keys, limits, stream interval, snapshots)."""
    snapshots = None
    if config.prefix.enabled and config.prefix.snapshots and not engine.safe_mode:
        snapshots = LocalSnapshots(config.cache.ram_warm_mb * MIB, engine.fingerprint)
        engine.set_snapshot_sink(snapshots.publish)
        engine.set_snapshot_source(snapshots.fetch)
    backend = LocalBackend(
        engine, snapshots, stream_interval_s=config.server.stream_interval_s("process")
    )
    guard = Guard(
        digests_from_setting(config.server.api_key),
        config.limits,
        digests_from_setting(config.server.admin_api_key),
    )
    return build_api(ServedModel.load(config), backend, ServerMetrics(), guard)


def listen_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads so that a taken port fails at once.

    Made with the protocol named: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on
    connections whose socket says it is TCP, and with Nagle on, a short response's last write
    waits for the client's delayed ACK (~40 ms on Linux) on every request."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def serve_in_process(config: KV3DConfig, started_s: float | None = None) -> int:
    """Serve until SIGINT/SIGTERM, then close the engine (hot sessions to the warm tier)."""
    started_s = time.perf_counter() if started_s is None else started_s
    host, port = config.server.host, config.server.port
    try:
        sock = listen_socket(host, port)
    except OSError as exc:
        print(f"kv3d: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    try:
        return _serve(config, sock, started_s)
    finally:
        sock.close()


def _serve(config: KV3DConfig, sock: socket.socket, started_s: float) -> int:
    engine = Engine.from_config(config)
    try:
        app = build_local_app(config, engine)
        engine.start()
        server = _Server(
            uvicorn.Config(
                app,
                host=config.server.host,
                port=config.server.port,
                log_config=None,  # keep the CLI's logging
                log_level="warning",
                access_log=False,
                timeout_graceful_shutdown=config.deploy.shutdown_timeout_s,
            )
        )
        url = f"http://{config.server.host}:{config.server.port}"

        async def run() -> None:
            serving = asyncio.create_task(server.serve(sockets=[sock]))
            while not server.started and not serving.done():
                await asyncio.sleep(0.02)
            if server.started:
                print(
                    f"{READY_LINE} {url}/v1 (one process; ready in "
                    f"{time.perf_counter() - started_s:.1f}s; Ctrl-C to stop)",
                    flush=True,
                )
            await serving

        asyncio.run(run())
        if not server.started:
            log.error("the HTTP server did not start on %s", url)
            return 1
        print("KV3D: shutting down…", flush=True)
    finally:
        engine.close()
    return 0
