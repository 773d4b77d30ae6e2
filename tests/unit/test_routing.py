"""The routing policy (kv3d.server.routing) on synthetic replica views."""

from __future__ import annotations

import random

import pytest

from kv3d.engine.generation import GenerationRequest
from kv3d.engine.prefix import reusable_blocks
from kv3d.server.routing import (
    RecentRoutes,
    ReplicaView,
    RouteCounter,
    RouteKeyer,
    RouteKeys,
    decide,
    merge_views,
)

KEYS = RouteKeys("chat-1", (11, 12, 13, 14), (32, 64, 96, 128))


def view(blocks=(), sessions=()) -> ReplicaView:
    ends = dict(zip(KEYS.block_keys, KEYS.block_ends, strict=True))
    return ReplicaView(frozenset(sessions), {k: ends[k] for k in blocks})


def test_the_replica_holding_the_session_wins_over_a_longer_prefix():
    views = {"a": view(blocks=(11, 12, 13, 14)), "b": view(blocks=(11,), sessions=("chat-1",))}
    d = decide(KEYS, views, {"a": 0, "b": 1}, imbalance_requests=4)
    assert d.order[0] == "b" and d.reason == "session"


def test_the_longest_hot_prefix_wins():
    views = {"a": view(blocks=(11,)), "b": view(blocks=(11, 12, 13)), "c": view()}
    d = decide(KEYS, views, {"a": 0, "b": 2, "c": 0}, imbalance_requests=4)
    assert (d.order[0], d.reason, d.matched_tokens) == ("b", "prefix", 96)


def test_a_prefix_counts_only_from_its_first_block():
    # Holding blocks 2..4 without block 1 is no prefix of this prompt.
    views = {"a": view(blocks=(12, 13, 14)), "b": view()}
    d = decide(KEYS, views, {"a": 3, "b": 0}, imbalance_requests=4)
    assert d.reason == "fallback" and d.order[0] == "b"


def test_affinity_yields_to_load_beyond_the_threshold():
    views = {"a": view(blocks=(11, 12, 13, 14)), "b": view()}
    assert decide(KEYS, views, {"a": 4, "b": 0}, imbalance_requests=4).order[0] == "a"
    d = decide(KEYS, views, {"a": 5, "b": 0}, imbalance_requests=4)
    assert d.order == ("b", "a") and d.reason == "load"


def test_without_affinity_the_least_loaded_goes_first_and_ties_spread():
    loads = {"a": 2, "b": 0, "c": 1}
    d = decide(None, {}, loads, imbalance_requests=4)
    assert d.order == ("b", "c", "a") and d.reason == "fallback"
    firsts = {
        decide(None, {}, {"a": 0, "b": 0}, 4, random.Random(seed)).order[0] for seed in range(20)
    }
    assert firsts == {"a", "b"}


@pytest.mark.parametrize("seed", range(10))
def test_every_replica_is_ranked_exactly_once(seed):
    rng = random.Random(seed)
    ids = [f"r{i}" for i in range(rng.randint(1, 6))]
    loads = {rid: rng.randint(0, 10) for rid in ids}
    views = {rid: view(blocks=rng.sample(KEYS.block_keys, rng.randint(0, 4))) for rid in ids}
    d = decide(KEYS, views, loads, imbalance_requests=rng.randint(0, 5), rng=rng)
    assert sorted(d.order) == sorted(ids)


def test_no_replicas_gives_an_empty_ranking():
    assert decide(KEYS, {}, {}, 4).order == ()


def test_reports_round_trip_and_malformed_ones_hold_nothing():
    v = ReplicaView(frozenset({"s1"}), {7: 32, 8: 64})
    assert ReplicaView.from_report(v.to_report()) == v
    for bad in (None, "x", {"sessions": "s1"}, {"blocks": [1, 2]}):
        assert ReplicaView.from_report(bad) == ReplicaView()
    mixed = ReplicaView.from_report({"sessions": ["ok", 3], "blocks": {1: 32, "2": 64, 3: "x"}})
    assert mixed == ReplicaView(frozenset({"ok"}), {1: 32})


def test_recent_routes_bridge_the_report_lag_and_expire():
    now = [0.0]
    recent = RecentRoutes(ttl_s=5, clock=lambda: now[0])
    recent.remember("a", KEYS)
    views = recent.views(["a", "b"])
    assert views["a"].sessions == {"chat-1"} and views["a"].depth_tokens(KEYS) == 128
    assert views["b"] == ReplicaView()
    now[0] = 6.0
    assert recent.views(["a"])["a"] == ReplicaView()


def test_a_dead_replica_is_forgotten():
    recent = RecentRoutes(ttl_s=60)
    recent.remember("a", KEYS)
    recent.forget_replica("a")
    assert recent.views(["a"])["a"] == ReplicaView()


def test_a_report_wins_over_recent_memory():
    reported = ReplicaView(frozenset(), {11: 32})
    recent = ReplicaView(frozenset({"chat-1"}), {11: 999, 12: 64})
    merged = merge_views(reported, recent)
    assert merged.blocks == {11: 32, 12: 64} and merged.sessions == {"chat-1"}


def test_route_keys_are_the_engines_blocks():
    fp = bytes(range(16))
    prompt = tuple(range(1, 200))
    req = GenerationRequest("r", prompt, 8, family_tokens=70, session_id="s")
    keys = RouteKeyer(fp, 32).keys(req)
    blocks = reusable_blocks(prompt, 32, fp, 70)
    assert keys.block_keys == tuple(b.key for b in blocks)
    assert keys.block_ends == (32, 64, 70, 102, 134, 166, 198)
    assert keys.session_id == "s"
    assert RouteKeyer(fp, 32, enabled=False).keys(req).block_keys == ()


def test_route_counter_counts_by_reason():
    c = RouteCounter()
    for reason in ("session", "prefix", "prefix", "load"):
        c.add(reason)
    assert c.counts() == {"session": 1, "prefix": 2, "load": 1, "fallback": 0}
