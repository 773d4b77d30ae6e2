"""The Prometheus view of the engines: what is summed, and over which replicas."""

import dataclasses

from kv3d.engine.generation import EngineStats
from kv3d.server.metrics import ServerMetrics


def stats(replica_id: str, taken_at_s: float, tokens: int) -> EngineStats:
    fields = {f.name: 0 for f in dataclasses.fields(EngineStats)}
    fields.update(replica_id=replica_id, taken_at_s=taken_at_s, generated_tokens_total=tokens)
    return EngineStats(**fields)


def test_a_replica_that_is_gone_stops_counting():
    metrics = ServerMetrics()
    metrics.engine.refresh([stats("a", 1.0, 10), stats("b", 1.0, 5)])
    assert metrics.engine.totals()["generated_tokens_total"] == 15
    metrics.engine.refresh([stats("a", 2.0, 12)])  # b died or was scaled down
    assert metrics.engine.totals()["generated_tokens_total"] == 12
    # An older report of a live replica never replaces a newer one.
    metrics.engine.refresh([stats("a", 1.5, 11)])
    assert metrics.engine.totals()["generated_tokens_total"] == 12
