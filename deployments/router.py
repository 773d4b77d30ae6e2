"""Ray Serve request routers for the model deployment (RequestRouterConfig in deployments/app.py).

`KV3DRouter` applies `kv3d.server.routing.decide` to what each replica reports through
`record_routing_stats()` (its hot sessions and prefix blocks, and its engine counters) and to
the `RouteKeys` the ingress passes as the `route` argument of `ModelReplica.generate`.
`RoundRobinRouter` is the baseline the benchmark compares against; Ray's default
power-of-two-choices router is the other.

Routers live in the process that holds the DeploymentHandle (the ingress). That process's
`/metrics` reads their decisions and the replicas' reported counters from
`deployments.routing_state`: Serve pickles this module by value, so it keeps no state of its own.
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from deployments import routing_state
from kv3d.server.routing import Decision, RecentRoutes, ReplicaView, RouteKeys, decide, merge_views

log = logging.getLogger(__name__)

ROUTE_ARG = "route"  # the keyword argument of ModelReplica.generate that carries RouteKeys
_SEEN_REQUESTS = 10_000


def _ray_route_counter():
    try:
        from ray.serve.metrics import Counter

        return Counter(
            "kv3d_route_total",
            description="Model replica choices by reason (session, prefix, load, fallback).",
            tag_keys=("reason",),
        )
    except Exception:  # metrics are best effort outside a Serve process
        return None


class _ReportingRouter(RequestRouter):
    """Registers itself so that the ingress can read the replicas' reported counters."""

    def initialize_state(self, **kwargs) -> None:
        routing_state.ROUTERS.add(self)


class KV3DRouter(_ReportingRouter):
    """Session first, then the longest hot prefix, unless load is imbalanced (kv3d.server.routing).

    Invariant: every candidate replica appears exactly once in the ranking it returns, so a
    request is never stuck on one replica; a replica without a report ranks by load alone.
    """

    def initialize_state(
        self, imbalance_requests: int = 4, recent_s: float = 5.0, seed: int | None = None
    ) -> None:
        super().initialize_state()
        self._imbalance = imbalance_requests
        self._recent = RecentRoutes(recent_s)
        self._rng = random.Random(seed)
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._ray_counter = _ray_route_counter()

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        loads = await self._loads(candidate_replicas)
        recent = self._recent.views(by_id)
        views = {
            rid: merge_views(ReplicaView.from_report(r.routing_stats.get("view")), recent[rid])
            for rid, r in by_id.items()
        }
        keys = _route_keys(pending_request)
        decision = decide(keys, views, loads, self._imbalance, self._rng)
        self._record(pending_request, decision, keys)
        return [[by_id[rid]] for rid in decision.order]

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._recent.forget_replica(replica_id.unique_id)

    async def _loads(self, replicas: list[RunningReplica]) -> dict[str, int]:
        """Ongoing requests per replica: Ray's queue-length cache, probing where it has none."""
        loads: dict[str, int] = {}
        unknown = []
        for r in replicas:
            cached = self._replica_queue_len_cache.get(r.replica_id)
            if cached is None:
                unknown.append(r)
            else:
                loads[r.replica_id.unique_id] = cached
        if unknown:
            for r, queue_len in await self._probe_queue_lens(unknown, 0):
                # An unanswered probe ranks the replica last rather than dropping it.
                full = r.max_ongoing_requests
                loads[r.replica_id.unique_id] = full if queue_len is None else queue_len
        return loads

    def _record(
        self, pending: PendingRequest | None, decision: Decision, keys: RouteKeys | None
    ) -> None:
        """Count each generation request once (Serve may ask again while it backs off);
        calls without route keys (stats) are not routing decisions worth counting."""
        if pending is None or keys is None or not decision.order:
            return
        request_id = pending.metadata.internal_request_id
        if request_id in self._seen:
            return
        self._seen[request_id] = None
        if len(self._seen) > _SEEN_REQUESTS:
            self._seen.popitem(last=False)
        routing_state.ROUTES.add(decision.reason, decision.order[0])
        if self._ray_counter is not None:
            self._ray_counter.inc(tags={"reason": decision.reason})
        self._recent.remember(decision.order[0], keys)
        log.debug(
            "route %s -> %s (%s, %d tokens hot)",
            request_id,
            decision.order[0],
            decision.reason,
            decision.matched_tokens,
        )


class RoundRobinRouter(_ReportingRouter):
    """Each replica in turn, whatever the request (a benchmark baseline)."""

    def initialize_state(self, **kwargs) -> None:
        super().initialize_state()
        self._next = 0

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        if not ordered:
            return []
        start = self._next % len(ordered)
        self._next += 1
        return [[r] for r in ordered[start:] + ordered[:start]]


def _route_keys(pending: PendingRequest | None) -> RouteKeys | None:
    if pending is None:
        return None
    keys = pending.kwargs.get(ROUTE_ARG)
    return keys if isinstance(keys, RouteKeys) else None
