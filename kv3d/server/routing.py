"""Which model replica should serve a request: the routing policy, free of Ray.

A request carries `RouteKeys`: its session id and the chained keys of its prompt's whole blocks,
computed by the ingress exactly as the engine computes them (same fingerprint seed, same cuts).
Each replica reports a `ReplicaView` of what it holds: the sessions it can resume locally and
the block keys of its hot prefixes with the prompt tokens each one covers. The policy prefers,
in order: the replica holding the session, the replica holding the longest hot prefix, and
otherwise the least loaded one. Affinity yields to load when the preferred replica has more than
`imbalance_requests` ongoing requests above the least loaded replica: the request then goes
where it can start sooner, and that replica restores the prefix from the object store.

Reported views lag by up to one stats period, so the router also remembers for `recent_s` where
it just sent each session and prefix (`RecentRoutes`); a report always wins where it has data.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from kv3d.engine.generation import GenerationRequest
from kv3d.engine.prefix import Block, block_seed, reusable_blocks
from kv3d.engine.view import CacheView

RouteReason = Literal["session", "prefix", "load", "fallback"]
REASONS: tuple[RouteReason, ...] = ("session", "prefix", "load", "fallback")

# A replica's report is a plain dict (it travels through the Serve controller); these bound
# what a router accepts from one, so a confused replica cannot bloat every router's memory.
MAX_REPORTED_SESSIONS = 4096
MAX_REPORTED_BLOCKS = 65536


@dataclass(frozen=True, slots=True)
class RouteKeys:
    """What the router may know of a request: no text, only keys."""

    session_id: str | None = None
    block_keys: tuple[int, ...] = ()
    block_ends: tuple[int, ...] = ()  # prompt tokens covered up to and including each block

    @classmethod
    def from_blocks(cls, session_id: str | None, blocks: Sequence[Block]) -> RouteKeys:
        return cls(session_id, tuple(b.key for b in blocks), tuple(b.end_tokens for b in blocks))


class RouteKeyer:
    """Computes a request's `RouteKeys` the way its replica's engine cuts and hashes blocks."""

    def __init__(self, fingerprint: bytes, block_tokens: int, enabled: bool = True):
        self.fingerprint = fingerprint
        self.block_tokens = block_tokens
        self.enabled = enabled

    def keys(self, request: GenerationRequest) -> RouteKeys:
        blocks: list[Block] = []
        if self.enabled:
            seed = block_seed(self.fingerprint, request.cache_salt)
            blocks = reusable_blocks(
                request.prompt_tokens, self.block_tokens, seed, request.family_tokens
            )
        return RouteKeys.from_blocks(request.session_id, blocks)


@dataclass(frozen=True, slots=True)
class ReplicaView:
    """What one replica holds: resumable sessions, and hot block key -> prompt tokens covered."""

    sessions: frozenset[str] = frozenset()
    blocks: Mapping[int, int] = field(default_factory=dict)

    @classmethod
    def of(cls, view: CacheView) -> ReplicaView:
        """What an engine says it holds, as the router sees it."""
        return cls(view.sessions, view.blocks)

    def to_report(self) -> dict[str, Any]:
        return {"sessions": sorted(self.sessions), "blocks": dict(self.blocks)}

    @classmethod
    def from_report(cls, report: Mapping[str, Any] | None) -> ReplicaView:
        """Parse a replica's report; anything malformed counts as holding nothing."""
        if not isinstance(report, Mapping):
            return cls()
        sessions = report.get("sessions") or ()
        blocks = report.get("blocks") or {}
        if not isinstance(sessions, (list, tuple)) or not isinstance(blocks, Mapping):
            return cls()
        return cls(
            frozenset(s for s in list(sessions)[:MAX_REPORTED_SESSIONS] if isinstance(s, str)),
            {
                k: v
                for k, v in list(blocks.items())[:MAX_REPORTED_BLOCKS]
                if isinstance(k, int) and isinstance(v, int)
            },
        )

    def depth_tokens(self, keys: RouteKeys) -> int:
        """Prompt tokens of the request's longest run of leading blocks this replica holds."""
        depth = 0
        for key, end in zip(keys.block_keys, keys.block_ends, strict=True):
            if key not in self.blocks:
                break
            depth = end
        return depth


@dataclass(frozen=True, slots=True)
class Decision:
    order: tuple[str, ...]  # replica ids, best first
    reason: RouteReason
    matched_tokens: int = 0  # prompt tokens the first replica holds hot (prefix reason)


def decide(
    keys: RouteKeys | None,
    views: Mapping[str, ReplicaView],
    loads: Mapping[str, int],
    imbalance_requests: int,
    rng: random.Random | None = None,
) -> Decision:
    """Rank the replicas in `loads` (ongoing requests per replica id) for a request.

    Replicas missing from `views` hold nothing. Ties between equally good replicas go to the
    less loaded, then at random, so that new families spread over the replicas.
    """
    rng = rng or random
    ids = list(loads)
    rng.shuffle(ids)
    by_load = sorted(ids, key=lambda rid: loads[rid])
    if not by_load:
        return Decision((), "fallback")
    least = loads[by_load[0]]
    preferred, reason, matched = None, None, 0
    if keys is not None and keys.session_id:
        holders = [rid for rid in by_load if keys.session_id in _view(views, rid).sessions]
        if holders:
            preferred, reason = holders[0], "session"
    if preferred is None and keys is not None and keys.block_keys:
        depths = {rid: _view(views, rid).depth_tokens(keys) for rid in by_load}
        best = max(depths.values())
        if best > 0:
            preferred = next(rid for rid in by_load if depths[rid] == best)
            reason, matched = "prefix", best
    if preferred is None:
        return Decision(tuple(by_load), "fallback")
    if loads[preferred] - least > imbalance_requests:
        return Decision(tuple(by_load), "load")
    rest = tuple(rid for rid in by_load if rid != preferred)
    return Decision((preferred,) + rest, reason, matched)


def _view(views: Mapping[str, ReplicaView], replica_id: str) -> ReplicaView:
    return views.get(replica_id) or _EMPTY


_EMPTY = ReplicaView()


class RecentRoutes:
    """Where this router sent each session and prefix in the last `ttl_s` seconds.

    Bridges the lag of replica reports: the second request of a new family, sent before any
    report shows the first one's prefix, still goes to the same replica. Thread-safe.
    """

    def __init__(self, ttl_s: float, clock=time.monotonic):
        self.ttl_s = ttl_s
        self._clock = clock
        self._sessions: dict[str, tuple[str, float]] = {}
        self._blocks: dict[int, tuple[str, int, float]] = {}
        self._lock = threading.Lock()

    def remember(self, replica_id: str, keys: RouteKeys) -> None:
        until = self._clock() + self.ttl_s
        with self._lock:
            if keys.session_id:
                self._sessions[keys.session_id] = (replica_id, until)
            for key, end in zip(keys.block_keys, keys.block_ends, strict=True):
                self._blocks[key] = (replica_id, end, until)

    def forget_replica(self, replica_id: str) -> None:
        with self._lock:
            self._sessions = {k: v for k, v in self._sessions.items() if v[0] != replica_id}
            self._blocks = {k: v for k, v in self._blocks.items() if v[0] != replica_id}

    def views(self, replica_ids: Iterable[str]) -> dict[str, ReplicaView]:
        """Per replica, what this router recently sent it (expired entries are pruned)."""
        now = self._clock()
        sessions: dict[str, set[str]] = {rid: set() for rid in replica_ids}
        blocks: dict[str, dict[int, int]] = {rid: {} for rid in sessions}
        with self._lock:
            self._sessions = {k: v for k, v in self._sessions.items() if v[1] > now}
            self._blocks = {k: v for k, v in self._blocks.items() if v[2] > now}
            for sid, (rid, _) in self._sessions.items():
                if rid in sessions:
                    sessions[rid].add(sid)
            for key, (rid, end, _) in self._blocks.items():
                if rid in blocks:
                    blocks[rid][key] = end
        return {rid: ReplicaView(frozenset(sessions[rid]), blocks[rid]) for rid in sessions}


def merge_views(reported: ReplicaView, recent: ReplicaView) -> ReplicaView:
    """A replica's report plus what was sent to it since; the report wins for shared keys."""
    if not recent.sessions and not recent.blocks:
        return reported
    return ReplicaView(reported.sessions | recent.sessions, {**recent.blocks, **reported.blocks})


class RouteCounter:
    """Routing decisions by reason, and by replica and reason. Thread-safe."""

    def __init__(self) -> None:
        self._counts = dict.fromkeys(REASONS, 0)
        self._by_replica: dict[str, dict[str, int]] = {}
        self._lock = threading.Lock()

    def add(self, reason: RouteReason, replica_id: str | None = None) -> None:
        with self._lock:
            self._counts[reason] += 1
            if replica_id is not None:
                per = self._by_replica.setdefault(replica_id, dict.fromkeys(REASONS, 0))
                per[reason] += 1

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def by_replica(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {rid: dict(c) for rid, c in self._by_replica.items()}
