"""What this process's request routers share with its ingress: their decisions by reason and
the counters each model replica reports to them.

A separate module because Serve pickles a router's own module by value when it builds the
router: module-level objects there would be copies, not the ones the ingress reads. Routers
reach these through the module object (`routing_state.ROUTES`), which pickles by reference.
"""

from __future__ import annotations

import weakref
from typing import Any

from kv3d.engine.generation import EngineStats
from kv3d.server.routing import RouteCounter

ROUTES = RouteCounter()
ROUTERS: weakref.WeakSet = weakref.WeakSet()  # live RequestRouters of this process


def reported_engine_stats() -> list[EngineStats]:
    """The newest engine counters every model replica reported to this process's routers."""
    out: dict[str, EngineStats] = {}
    for router in list(ROUTERS):
        for replica in list(router.curr_replicas.values()):
            stats = _engine_stats(replica.routing_stats)
            if stats is not None:
                out[stats.replica_id] = stats
    return list(out.values())


def _engine_stats(report: dict[str, Any] | None) -> EngineStats | None:
    data = (report or {}).get("engine")
    if not isinstance(data, dict):
        return None
    try:
        return EngineStats(**data)
    except TypeError:  # a replica of another KV3D version: its figures are skipped
        return None
