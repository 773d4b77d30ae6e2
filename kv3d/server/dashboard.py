"""The workload analytics page: `/dashboard` (static HTML and KV3D's own chart script, shipped
in the package, no CDN) polling `/v1/kv3d/stats` (the JSON built here).

The stats hold figures and hashes only: prefix families are named by their key, size and hit
count, never by prompt text. The figures are the whole server's, but each caller sees only its
own tenant's families (an admin key: every tenant's, each with its tenant's namespace).
"""

from __future__ import annotations

import time
from importlib.resources import files
from typing import Any

from kv3d.engine.generation import EngineStats
from kv3d.server.guard import OPEN, Tenant
from kv3d.server.metrics import ServerMetrics

ASSETS = {
    "dashboard.html": "text/html; charset=utf-8",
    "kv3dchart.js": "text/javascript; charset=utf-8",
}
TOP_FAMILIES = 10


def asset(name: str) -> bytes:
    """A file of kv3d/static (only the ones in ASSETS: no path from a URL reaches the disk)."""
    if name not in ASSETS:
        raise KeyError(name)
    return (files("kv3d.server") / "static" / name).read_bytes()


def build_stats(
    engines: list[EngineStats],
    registry: dict[str, Any] | None,
    metrics: ServerMetrics,
    safe_mode: bool,
    viewer: Tenant = OPEN,
) -> dict[str, Any]:
    """The stats `viewer` may see: every figure, and the families it owns (all of them for an
    admin key)."""
    lookups = sum(s.prefix_lookups_total for s in engines)
    hits = sum(s.prefix_hits_total for s in engines)
    ttft_p50, ttft_p95 = metrics.recent_ttft.percentiles(0.5, 0.95)
    routes = metrics.routes
    return {
        "taken_at_s": time.time(),
        "mode": "safe" if safe_mode else "normal",
        "safe_mode_reasons": sorted({s.safe_mode_reason for s in engines if s.safe_mode}),
        "hit_rate": hits / lookups if lookups else 0.0,
        "prefix_lookups": lookups,
        "prefix_hits": hits,
        "sessions": {
            "hot": sum(s.sessions_hot for s in engines),
            "warm": sum(s.sessions_warm for s in engines),
            "cold": sum(s.sessions_cold for s in engines),
            "shared": (registry or {}).get("sessions", 0),
        },
        "bytes": {
            "hot": sum(s.kv_bytes_used for s in engines),
            "warm": sum(s.warm_bytes for s in engines),
            "cold": sum(s.cold_bytes for s in engines),
            "object_store": (registry or {}).get("bytes", 0),
        },
        "latency_s": {
            "ttft_p50": ttft_p50,
            "ttft_p95": ttft_p95,
            "resume_p50": {
                tier: window.percentiles(0.5)[0]
                for tier, window in sorted(metrics.recent_resume.items())
            },
        },
        "families": _top_families(registry, viewer),
        "families_scope": "all" if viewer.admin else "tenant",
        "replicas": [_replica(s) for s in sorted(engines, key=lambda s: s.replica_id)],
        "routes": routes.by_replica() if routes is not None else {},
    }


def _top_families(registry: dict[str, Any] | None, viewer: Tenant) -> list[dict[str, Any]]:
    """The most hit of the families `viewer` may see. A family without a tenant (a registry of
    an older version) is the "" tenant's: an open API's, shown to no key but an admin's."""
    families = [
        f for f in (registry or {}).get("families") or [] if viewer.sees(_owner(f.get("tenant")))
    ]
    ranked = sorted(families, key=lambda f: f.get("hits", 0), reverse=True)
    out = []
    for f in ranked[:TOP_FAMILIES]:
        row = {k: f.get(k) for k in ("key", "tokens", "bytes", "hits")}
        if viewer.admin:
            row["tenant"] = _owner(f.get("tenant"))
        out.append(row)
    return out


def _owner(tenant: Any) -> str:
    return tenant if isinstance(tenant, str) else ""


def _replica(s: EngineStats) -> dict[str, Any]:
    return {
        "replica": s.replica_id,
        "running": s.running_sequences,
        "waiting": s.waiting_requests,
        "sessions_hot": s.sessions_hot,
        "sessions_warm": s.sessions_warm,
        "kv_bytes_used": s.kv_bytes_used,
        "hot_prefixes": s.hot_prefixes,
        "prefix_hits": s.prefix_hits_total,
        "safe_mode": bool(s.safe_mode),
        "safe_mode_reason": s.safe_mode_reason,
    }
