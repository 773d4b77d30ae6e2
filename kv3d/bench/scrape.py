"""Reading a server's Prometheus `/metrics`: the one text parser the tooling uses, and the KV3D
figures the benchmarks report from it."""

from __future__ import annotations

from dataclasses import dataclass

import httpx


def parse_prometheus(text: str) -> dict[str, float]:
    """Every sample of a Prometheus text exposition, keyed by its series as written (name plus
    labels, e.g. `kv3d_sessions{tier="warm"}`). Comments and lines that do not parse are
    skipped; a trailing timestamp is ignored."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        series, _, rest = line.rpartition("}") if "}" in line else ("", "", line)
        if series:
            series, fields = series + "}", rest.split()
        else:
            name, *fields = rest.split()
            series = name
        if not fields:
            continue
        try:
            values[series] = float(fields[0])
        except ValueError:
            continue
    return values


def by_label(values: dict[str, float], name: str, label: str) -> dict[str, float]:
    """The samples of metric `name` keyed by the value of one of their labels."""
    out = {}
    prefix = name + "{"
    for series, value in values.items():
        if not series.startswith(prefix):
            continue
        for pair in series[len(prefix) : -1].split(","):
            key, _, quoted = pair.partition("=")
            if key.strip() == label:
                out[quoted.strip().strip('"')] = value
    return out


@dataclass(frozen=True, slots=True)
class MetricsSample:
    """The figures of KV3D's `/metrics` the bench reports (series named in
    kv3d/server/metrics.py)."""

    running_sequences: int
    sessions_hot: int  # running sequences + idle sessions still in the KV cache
    sessions_warm: int
    sessions_cold: int
    hot_bytes: float  # KV bytes of running sequences and hot prefixes
    warm_bytes: float
    cold_bytes: float
    delta_compression_ratio: float
    kv_cells_total: int
    sessions_shared: int = 0  # session records in the object store (any replica resumes them)
    object_store_bytes: float = 0.0  # snapshots and shared sessions together
    kv_cells_reserved: int = 0  # by running sequences: their prompts and output grants
    hot_prefix_cells: int = 0  # owned by hot prefixes and idle sessions
    warm_bytes_saved: float = 0.0  # parts several warm sessions hold, kept once

    @property
    def hot_bytes_per_session(self) -> float | None:
        return self.hot_bytes / self.sessions_hot if self.sessions_hot else None

    @property
    def kv_cells_per_running_session(self) -> float | None:
        """KV cells committed per running sequence, shared cells counted once: what admission
        counts against the budget (a sequence still in prefill has its cells reserved)."""
        committed = self.kv_cells_reserved + self.hot_prefix_cells
        return committed / self.running_sequences if self.running_sequences else None


def parse_metrics(text: str) -> MetricsSample | None:
    """None unless `text` is KV3D's Prometheus exposition."""
    values = parse_prometheus(text)
    if "kv3d_engine_running_sequences" not in values:
        return None

    def tier(series: str, name: str) -> float:
        return values.get(f'{series}{{tier="{name}"}}', 0.0)

    return MetricsSample(
        running_sequences=int(values["kv3d_engine_running_sequences"]),
        sessions_hot=int(tier("kv3d_sessions", "hot")),
        sessions_warm=int(tier("kv3d_sessions", "warm")),
        sessions_cold=int(tier("kv3d_sessions", "cold")),
        hot_bytes=tier("kv3d_tier_bytes", "hot"),
        warm_bytes=tier("kv3d_tier_bytes", "warm"),
        cold_bytes=tier("kv3d_tier_bytes", "cold"),
        delta_compression_ratio=values.get("kv3d_delta_compression_ratio", 0.0),
        kv_cells_total=int(values.get("kv3d_engine_kv_cells_total", 0)),
        sessions_shared=int(values.get("kv3d_shared_sessions", 0)),
        object_store_bytes=values.get("kv3d_snapshot_bytes", 0.0),
        kv_cells_reserved=int(values.get("kv3d_engine_kv_cells_reserved", 0)),
        hot_prefix_cells=int(values.get("kv3d_prefix_hot_cells", 0)),
        warm_bytes_saved=values.get("kv3d_session_warm_bytes_saved", 0.0),
    )


async def read_metrics(http: httpx.AsyncClient, url: str) -> MetricsSample | None:
    """KV3D's figures now, or None where the server has no (KV3D) `/metrics`."""
    try:
        r = await http.get(f"{url}/metrics", timeout=10.0)
    except httpx.HTTPError:
        return None
    return parse_metrics(r.text) if r.status_code == 200 else None


async def idle_session_bytes(http: httpx.AsyncClient, url: str) -> dict:
    """Bytes per idle session in each tier, from the server's own metrics."""
    values = parse_prometheus((await http.get(f"{url}/metrics")).text)
    out = {"delta_compression_ratio": values.get("kv3d_delta_compression_ratio", 0.0)}
    for tier in ("warm", "cold"):
        n = values.get(f'kv3d_sessions{{tier="{tier}"}}', 0)
        b = values.get(f'kv3d_tier_bytes{{tier="{tier}"}}', 0)
        out[f"sessions_{tier}"] = int(n)
        out[f"bytes_per_{tier}_session"] = round(b / n) if n else None
    return out
