"""Prometheus metrics served at `/metrics`.

The API layer measures what a client sees (requests, tokens, TTFT, inter-token latency); engine
figures come from the `EngineStats` each replica attaches to its terminal events, newest per
replica, summed over replicas.
"""

from __future__ import annotations

import threading
from collections import deque
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

from kv3d.engine.generation import EngineStats
from kv3d.server.routing import RouteCounter

# `*_created` series double the exposition and no KV3D dashboard reads them.
disable_created_metrics()

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
RESTORE_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


# (EngineStats field, metric name, kind, help). Counters are named without `_total`.
_ENGINE_SERIES = (
    (
        "running_sequences",
        "kv3d_engine_running_sequences",
        "gauge",
        "Sequences decoding or prefilling now.",
    ),
    (
        "waiting_requests",
        "kv3d_engine_waiting_requests",
        "gauge",
        "Requests queued for a sequence slot (queue depth).",
    ),
    ("kv_cells_total", "kv3d_engine_kv_cells_total", "gauge", "KV cells in the replicas' caches."),
    (
        "kv_cells_reserved",
        "kv3d_engine_kv_cells_reserved",
        "gauge",
        "KV cells reserved by running sequences.",
    ),
    (
        "max_sequences_in_step",
        "kv3d_engine_max_sequences_in_step",
        "max",
        "Most sequences one decode step carried (max over replicas).",
    ),
    ("steps_total", "kv3d_engine_steps", "counter", "Decode steps run."),
    (
        "batched_steps_total",
        "kv3d_engine_batched_steps",
        "counter",
        "Decode steps that carried more than one sequence.",
    ),
    (
        "prefill_tokens_total",
        "kv3d_engine_prefill_tokens",
        "counter",
        "Prompt tokens computed by prefill.",
    ),
    ("generated_tokens_total", "kv3d_engine_generated_tokens", "counter", "Tokens generated."),
    (
        "sequences_parked_total",
        "kv3d_engine_sequences_parked",
        "counter",
        "Running sequences parked because the KV cache ran out while they generated (each "
        "continues from the session store, or recomputes, once cells free up).",
    ),
    (
        "prefix_lookups_total",
        "kv3d_prefix_lookups",
        "counter",
        "Requests whose prompt prefix was looked up.",
    ),
    (
        "prefix_hits_total",
        "kv3d_prefix_hits",
        "counter",
        "Requests that reused a cached prefix (hot or restored from a snapshot).",
    ),
    (
        "prefix_tokens_reused_total",
        "kv3d_prefix_tokens_reused",
        "counter",
        "Prompt tokens taken from cache instead of prefill.",
    ),
    ("hot_prefixes", "kv3d_prefix_hot", "gauge", "Prefixes held hot in the replicas' KV caches."),
    ("hot_prefix_cells", "kv3d_prefix_hot_cells", "gauge", "KV cells owned by hot prefixes."),
    (
        "snapshot_restores_total",
        "kv3d_snapshot_restores",
        "counter",
        "Prefixes restored from a snapshot (object store, or the server's RAM), not computed.",
    ),
    (
        "snapshot_rejects_total",
        "kv3d_snapshot_rejects",
        "counter",
        "Snapshots refused by validation (the request recomputed).",
    ),
    (
        "snapshots_published_total",
        "kv3d_snapshots_published",
        "counter",
        "Family prefixes published as snapshots.",
    ),
    (
        "session_parks_total",
        "kv3d_session_parks",
        "counter",
        "Finished conversations whose KV was kept as an int8 delta.",
    ),
    (
        "safe_mode",
        "kv3d_safe_mode",
        "max",
        "1 when a replica serves in safe mode (plain inference, no reuse).",
    ),
    (
        "canary_runs_total",
        "kv3d_canary_runs",
        "counter",
        "Idle-time checks that restored state and int8 deltas match recomputation.",
    ),
    (
        "state_failures_total",
        "kv3d_state_failures",
        "counter",
        "Intact snapshots or session deltas that llama.cpp refused to restore.",
    ),
    (
        "session_shares_total",
        "kv3d_session_shares",
        "counter",
        "Session deltas published to the shared warm tier (object store).",
    ),
    (
        "session_resumes_total",
        "kv3d_session_promotions",
        "counter",
        "Sessions brought back from the warm or cold tier into the KV cache.",
    ),
    (
        "session_demotions_total",
        "kv3d_session_demotions",
        "counter",
        "Sessions that left the warm tier for lack of room (on disk with a cold tier).",
    ),
    (
        "session_rent_demotions_total",
        "kv3d_session_rent_demotions",
        "counter",
        "Idle sessions moved from the KV cache to the warm tier because attending over their "
        "cells had cost the running sequences more than a demotion and a resume.",
    ),
    (
        "prefix_rent_evictions_total",
        "kv3d_prefix_rent_evictions",
        "counter",
        "Unused family prefixes evicted from the KV cache because attending over their cells "
        "had cost the running sequences more than restoring them from their snapshot.",
    ),
    (
        "session_drops_total",
        "kv3d_session_evictions",
        "counter",
        "Sessions dropped for lack of room (recomputed if they return).",
    ),
    (
        "session_cold_evictions_total",
        "kv3d_session_cold_evictions",
        "counter",
        "Session files removed to keep the cold folder within cache.ssd_cold_mb.",
    ),
    (
        "session_cold_write_errors_total",
        "kv3d_session_cold_write_errors",
        "counter",
        "Sessions that could not be written to the cold folder (disk full, permissions).",
    ),
    (
        "session_rejects_total",
        "kv3d_session_rejects",
        "counter",
        "Stored sessions refused by validation (recomputed).",
    ),
    (
        "session_parts_reused_total",
        "kv3d_session_parts_reused",
        "counter",
        "Parts of parked sessions found in RAM already (another session's, or an earlier "
        "turn's): kept once, not encoded again.",
    ),
    (
        "session_part_resumes_total",
        "kv3d_session_part_resumes",
        "counter",
        "New conversations that started on parts other sessions stored (not recomputed).",
    ),
    (
        "session_refetches_total",
        "kv3d_session_refetches",
        "counter",
        "Sessions demoted while their next turn waited for admission, fetched back for it "
        "(the cache was short of cells).",
    ),
    (
        "warm_bytes_saved",
        "kv3d_session_warm_bytes_saved",
        "gauge",
        "RAM the warm tier saves by keeping parts that several sessions hold once.",
    ),
    (
        "delta_compression_ratio",
        "kv3d_delta_compression_ratio",
        "max",
        "f16 bytes / int8 delta bytes of the sessions kept so far.",
    ),
)

# Sessions and bytes per tier: (tier, EngineStats field for sessions, for bytes).
_TIERS = (
    ("hot", "sessions_hot", "kv_bytes_used"),
    ("warm", "sessions_warm", "warm_bytes"),
    ("cold", "sessions_cold", "cold_bytes"),
)


class _EngineCollector(Collector):
    """Sums the newest `EngineStats` of every live replica: one that is gone (dead, scaled
    down) stops counting as soon as it is missing from a `refresh`."""

    def __init__(self) -> None:
        self._latest: dict[str, EngineStats] = {}
        self._lock = threading.Lock()

    def observe(self, stats: EngineStats) -> None:
        with self._lock:
            old = self._latest.get(stats.replica_id)
            if old is None or old.taken_at_s <= stats.taken_at_s:
                self._latest[stats.replica_id] = stats

    def refresh(self, live: list[EngineStats]) -> None:
        """`live`: the stats of every replica there is now (all of them, not a sample)."""
        with self._lock:
            for stats in live:
                old = self._latest.get(stats.replica_id)
                if old is None or old.taken_at_s <= stats.taken_at_s:
                    self._latest[stats.replica_id] = stats
            alive = {s.replica_id for s in live}
            for replica_id in [r for r in self._latest if r not in alive]:
                del self._latest[replica_id]

    def totals(self) -> dict[str, float]:
        with self._lock:
            stats = list(self._latest.values())
        out = {}
        for field, _, kind, _ in _ENGINE_SERIES:
            values = [getattr(s, field) for s in stats]
            out[field] = max(values, default=0) if kind == "max" else sum(values)
        for _, count_field, bytes_field in _TIERS:
            for name in (count_field, bytes_field):
                out[name] = sum(getattr(s, name) for s in stats)
        out["replicas"] = len(stats)
        return out

    def collect(self) -> Iterator:
        totals = self.totals()
        yield GaugeMetricFamily(
            "kv3d_engine_replicas", "Replicas that reported.", totals["replicas"]
        )
        for field, name, kind, doc in _ENGINE_SERIES:
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(name, doc, totals[field])
        sessions = GaugeMetricFamily("kv3d_sessions", "Sessions per tier.", labels=["tier"])
        tier_bytes = GaugeMetricFamily("kv3d_tier_bytes", "Bytes held per tier.", labels=["tier"])
        for tier, count_field, bytes_field in _TIERS:
            sessions.add_metric([tier], totals[count_field])
            tier_bytes.add_metric([tier], totals[bytes_field])
        yield sessions
        yield tier_bytes


class _SnapshotCollector(Collector):
    def __init__(self) -> None:
        self.snapshots = 0
        self.bytes = 0
        self.shared_sessions = 0

    def collect(self) -> Iterator:
        yield GaugeMetricFamily(
            "kv3d_snapshots", "Prefix snapshots in the object store.", self.snapshots
        )
        yield GaugeMetricFamily(
            "kv3d_snapshot_bytes",
            "Bytes in the object store's warm tier (snapshots and shared sessions).",
            self.bytes,
        )
        yield GaugeMetricFamily(
            "kv3d_shared_sessions",
            "Session records in the object store, resumable by any replica.",
            self.shared_sessions,
        )


class _RouteCollector(Collector):
    def __init__(self, routes: RouteCounter) -> None:
        self._routes = routes

    def collect(self) -> Iterator:
        family = CounterMetricFamily(
            "kv3d_route", "Model replica choices by reason.", labels=["reason"]
        )
        for reason, n in self._routes.counts().items():
            family.add_metric([reason], n)
        yield family


class LatencyWindow:
    """The most recent observations of one latency, for percentiles on the dashboard
    (Prometheus histograms answer the same over any window, but only to a bucket's width)."""

    def __init__(self, size: int = 1024) -> None:
        self._values: deque[float] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, value: float) -> None:
        with self._lock:
            self._values.append(value)

    def percentiles(self, *qs: float) -> list[float | None]:
        with self._lock:
            ordered = sorted(self._values)
        if not ordered:
            return [None for _ in qs]
        return [ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] for q in qs]

    def __len__(self) -> int:
        return len(self._values)


class ServerMetrics:
    def __init__(self, routes: RouteCounter | None = None) -> None:
        """`routes`: the routing decisions of this process, where a KV3D router runs."""
        self.routes = routes
        self.recent_ttft = LatencyWindow()
        self.recent_resume: dict[str, LatencyWindow] = {}
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
        self.restore = Histogram(
            "kv3d_snapshot_restore_seconds",
            "Restoring a prefix snapshot from the object store.",
            buckets=RESTORE_BUCKETS_S,
            registry=r,
        )
        self.resume = Histogram(
            "kv3d_resume_seconds",
            "Bringing a stored session back: fetch, decode, restore.",
            ["tier"],
            buckets=RESTORE_BUCKETS_S,
            registry=r,
        )
        self.engine = _EngineCollector()
        self.snapshots = _SnapshotCollector()
        r.register(self.engine)
        r.register(self.snapshots)
        if routes is not None:
            r.register(_RouteCollector(routes))

    def observe_ttft(self, seconds: float) -> None:
        self.ttft.observe(seconds)
        self.recent_ttft.add(seconds)

    def observe_resume(self, tier: str, seconds: float) -> None:
        self.resume.labels(tier).observe(seconds)
        self.recent_resume.setdefault(tier, LatencyWindow()).add(seconds)

    def hit_rate(self) -> float:
        totals = self.engine.totals()
        lookups = totals["prefix_lookups_total"]
        return totals["prefix_hits_total"] / lookups if lookups else 0.0

    def render(self) -> bytes:
        # The hit rate goes last as an untyped sample without HELP/TYPE lines, so that
        # `curl -s …/metrics | grep hit_rate` prints exactly the one line the README promises.
        rate = f"kv3d_prefix_hit_rate {round(self.hit_rate(), 6)}\n".encode()
        return generate_latest(self.registry) + rate
