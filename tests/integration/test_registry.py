"""The snapshot registry as a real, named, detached Ray actor owning real object-store objects."""

from __future__ import annotations

import uuid

import pyarrow as pa
import pytest

from deployments.registry import SessionClient, SnapshotRegistry

pytestmark = pytest.mark.integration

FP = b"k" * 16


@pytest.fixture
def registry(ray_instance):
    ray = ray_instance
    actor = (
        ray.remote(SnapshotRegistry)
        .options(name=f"test-registry-{uuid.uuid4().hex[:8]}", namespace="kv3d-test", num_cpus=0)
        .remote(1000)
    )
    yield actor
    ray.kill(actor)


def test_snapshot_outlives_the_process_that_published_it(ray_instance, registry):
    ray = ray_instance

    @ray.remote(num_cpus=0)
    class Publisher:
        def publish(self, reg, blob):
            return ray.get(reg.publish.remote(7, FP, 3, [5, 7], blob))

    publisher = Publisher.remote()
    assert ray.get(publisher.publish.remote(registry, b"abc" * 100))
    ray.kill(publisher)  # the replica that computed the prefix is gone
    n_tokens, (ref,) = ray.get(registry.lookup.remote(FP, [5, 7, 9]))
    buf = ray.get(ref)
    assert n_tokens == 3 and isinstance(buf, pa.Buffer) and buf.to_pybytes() == b"abc" * 100


def test_budget_evicts_least_recently_used_and_stats_follow(ray_instance, registry):
    ray = ray_instance
    for key in (1, 2, 3):
        assert ray.get(registry.publish.remote(key, FP, 1, [key], bytes(400)))
    stats = ray.get(registry.stats.remote())
    assert stats["snapshots"] == 2 and stats["bytes"] == 800  # 1,000-byte budget
    assert ray.get(registry.lookup.remote(FP, [1])) is None
    assert ray.get(registry.lookup.remote(FP, [3])) is not None
    assert not ray.get(registry.publish.remote(9, FP, 1, [9], bytes(2000)))  # over budget


def test_sessions_share_their_parts_in_the_object_store(ray_instance, registry):
    ray = ray_instance
    client = SessionClient(registry, FP)
    client.publish("a", b"record-a" * 10, {11: b"p" * 100, 12: b"q" * 100})
    client.publish("b", b"record-b" * 10, {11: b"p" * 100})
    client.flush()
    stats = ray.get(registry.stats.remote())
    assert stats["sessions"] == 2 and stats["session_parts"] == 2
    assert stats["bytes"] == 80 + 80 + 200  # part 11 held once
    record, parts = client.fetch("b")
    assert bytes(record) == b"record-b" * 10 and {k: bytes(v) for k, v in parts.items()} == {
        11: b"p" * 100
    }
    assert client.fetch("nobody") is None
    # Under pressure the least recently used go first (a's record), and records go before the
    # parts they use (each touched after its record).
    client.publish("c", b"c" * 700, {})
    client.flush()
    assert client.fetch("a") is None
    assert client.fetch("b") is not None and client.fetch("c") is not None


def test_engine_figures_reach_ray_metrics(ray_instance, smollm2_path):
    """The exporter registers and sets real `ray.util.metrics` gauges from an engine's stats."""
    from deployments.ray_metrics import RayMetricsExporter
    from kv3d.config import load_config
    from kv3d.engine.engine import Engine

    cfg = load_config(overrides={"cache": {"gpu_hot_mb": 64}, "model": {"context_tokens": 512}})
    with Engine.from_config(cfg, replica_id="r-test") as engine:
        exporter = RayMetricsExporter(engine)
        exporter.export_once()
        exporter.close()
    assert {"prefix_hits_total", "running_sequences", "snapshot_restores_total"} <= set(
        exporter._gauges
    )


def test_stats_name_each_snapshots_tenant_and_an_older_publisher_is_nobodys(ray_instance, registry):
    from deployments.registry import SnapshotClient
    from kv3d.engine.snapshot import SnapshotMeta

    ray = ray_instance
    SnapshotClient(registry, FP).publish(SnapshotMeta(11, FP, 3, 90, (11,), "ns-a"), bytes(100))
    # A replica of an older version sends no tenant: its snapshot is kept, under no tenant.
    assert ray.get(registry.publish.remote(12, FP, 3, [12], bytes(100)))
    stats = ray.get(registry.stats.remote())  # after both: one caller's calls run in order
    assert {f["key"]: f["tenant"] for f in stats["families"]} == {
        f"{11:016x}": "ns-a",
        f"{12:016x}": "",
    }
    assert ray.get(registry.lookup.remote(FP, [11])) is not None
