"""Prometheus metrics served at `/metrics`.

The API layer measures what a client sees (requests, tokens, TTFT, inter-token latency); engine
figures come from the `EngineStats` each replica attaches to its terminal events, newest per
replica, summed over replicas.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kv3d.generation import EngineStats

# `*_created` series double the exposition and no KV3D dashboard reads them.
disable_created_metrics()

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class _EngineCollector(Collector):
    """Sums the newest `EngineStats` of every replica that reported one."""

    _GAUGES = {
        "running_sequences": "Sequences decoding or prefilling now.",
        "waiting_requests": "Requests queued for a sequence slot (queue depth).",
        "kv_cells_total": "KV cells in the replicas' caches.",
        "kv_cells_reserved": "KV cells reserved by running sequences.",
        "max_sequences_in_step": "Most sequences one decode step carried (max over replicas).",
    }
    _COUNTERS = {
        "steps_total": "Decode steps run.",
        "batched_steps_total": "Decode steps that carried more than one sequence.",
        "prefill_tokens_total": "Prompt tokens computed by prefill.",
        "generated_tokens_total": "Tokens generated.",
    }

    def __init__(self) -> None:
        self._latest: dict[str, EngineStats] = {}
        self._lock = threading.Lock()

    def observe(self, stats: EngineStats) -> None:
        with self._lock:
            old = self._latest.get(stats.replica_id)
            if old is None or old.taken_at_s <= stats.taken_at_s:
                self._latest[stats.replica_id] = stats

    def collect(self) -> Iterator:
        with self._lock:
            stats = list(self._latest.values())
        yield GaugeMetricFamily("kv3d_engine_replicas", "Replicas that reported.", len(stats))
        for name, doc in self._GAUGES.items():
            values = [getattr(s, name) for s in stats]
            value = max(values, default=0) if name.startswith("max_") else sum(values)
            yield GaugeMetricFamily(f"kv3d_engine_{name}", doc, value)
        for name, doc in self._COUNTERS.items():
            base = name.removesuffix("_total")
            total = sum(getattr(s, name) for s in stats)
            yield CounterMetricFamily(f"kv3d_engine_{base}", doc, total)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "kv3d_requests",
            "HTTP API requests by endpoint and status.",
            ["endpoint", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter("kv3d_prompt_tokens", "Prompt tokens received.", registry=r)
        self.completion_tokens = Counter(
            "kv3d_completion_tokens", "Completion tokens sent.", registry=r
        )
        self.active_requests = Gauge(
            "kv3d_active_requests",
            "Generation requests in flight (active sequences + queued).",
            registry=r,
        )
        self.ttft = Histogram(
            "kv3d_time_to_first_token_seconds",
            "Request arrival to first token.",
            buckets=TTFT_BUCKETS_S,
            registry=r,
        )
        self.itl = Histogram(
            "kv3d_inter_token_latency_seconds",
            "Time between successive streamed tokens.",
            buckets=ITL_BUCKETS_S,
            registry=r,
        )
        self.engine = _EngineCollector()
        r.register(self.engine)

    def render(self) -> bytes:
        return generate_latest(self.registry)
