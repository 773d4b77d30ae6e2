"""KV3D's engine figures as Ray metrics, for the Ray dashboard and Ray's Prometheus endpoint.

Each model replica runs one exporter thread; it reads the engine's counters every few seconds
and mirrors them into `ray.util.metrics` (tagged with the replica id), so the dashboard shows the
same figures the ingress serves at `/metrics`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict

from ray.util import metrics as ray_metrics

from kv3d.engine.engine import Engine

log = logging.getLogger(__name__)

EXPORT_PERIOD_S = 5.0
_SKIP = {"replica_id", "taken_at_s"}


class RayMetricsExporter:
    def __init__(self, engine: Engine, period_s: float = EXPORT_PERIOD_S):
        self._engine = engine
        self._period_s = period_s
        self._stop = threading.Event()
        self._gauges: dict[str, ray_metrics.Gauge] = {}
        self._thread = threading.Thread(target=self._run, name="kv3d-ray-metrics", daemon=True)

    def start(self) -> RayMetricsExporter:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()

    def export_once(self) -> None:
        stats = self._engine.stats()
        tags = {"replica": stats.replica_id}
        for name, value in asdict(stats).items():
            if name in _SKIP or not isinstance(value, (int, float)):  # text: not a gauge
                continue
            gauge = self._gauges.get(name)
            if gauge is None:
                # Totals are exported as gauges of the running total: Ray counters take deltas,
                # and a gauge of the total survives an exporter restart without double counting.
                gauge = ray_metrics.Gauge(f"kv3d_{name}", f"KV3D engine: {name}", ("replica",))
                self._gauges[name] = gauge
            gauge.set(float(value), tags=tags)

    def _run(self) -> None:
        while not self._stop.wait(self._period_s):
            try:
                self.export_once()
            except Exception:  # metrics must never take a replica down
                log.exception("exporting Ray metrics failed")
