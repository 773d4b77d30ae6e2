"""The benchmark driver against the real server: complete, consistent reports (correctness of
the driver, never a speed assertion)."""

import asyncio

import httpx
import pytest

from kv3d.bench.compare import bench_url, server_answers
from kv3d.bench.openended import open_ended_phase
from kv3d.bench.phases import decode_phase, run_bench
from kv3d.bench.workload import WorkloadSpec, run_workload
from tests.conftest import free_port

pytestmark = pytest.mark.integration


def test_bench_report_is_complete(server_url):
    report = asyncio.run(
        run_bench(
            server_url,
            concurrency=3,
            max_tokens=12,
            prefill_words=80,
            prefix_words=120,
            session_count=2,
            session_words=60,
        )
    )
    prefix = report["prefix"]
    assert prefix["cached_tokens_miss"] == 0 and prefix["cached_tokens_hot"] > 100
    assert prefix["ttft_miss_s"] > 0 and prefix["ttft_hot_s"] > 0 and prefix["speedup_hot"] > 0
    sessions = report["sessions"]
    assert sum(sessions["resumed_from"].values()) == sessions["sessions"]
    assert sessions["cached_tokens_resumed"] > sessions["cached_tokens_recomputed"]
    # Warm sessions exist only once something was demoted (pressure, idle rent), which
    # depends on what ran before on this server: the figure is null without one, never zero.
    idle = report["idle_session_bytes"]
    if idle["sessions_warm"]:
        assert idle["bytes_per_warm_session"] > 0
    else:
        assert idle["bytes_per_warm_session"] is None
    assert report["prefill"]["prompt_tokens"] > 80
    assert report["prefill"]["prefill_tokens_per_s"] > 0
    assert report["single_stream"]["completion_tokens"] > 0
    one = report["one_token_latency"]
    assert one["requests"] == 10 and 0 < one["p50_ms"] <= one["p95_ms"]
    concurrent = report["concurrent"]
    assert concurrent["streams"] == 3
    assert concurrent["completion_tokens"] > 0 and concurrent["aggregate_tokens_per_s"] > 0
    assert 0 < concurrent["ttft_p50_s"] <= concurrent["ttft_p95_s"]


def test_decode_probe_counts_every_generated_token(server_url):
    async def go():
        async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as http:
            return await decode_phase(
                http, server_url, max_tokens=12, streams=3, single_runs=2, one_token_requests=3
            )

    report = asyncio.run(go())
    # ignore_eos: every stream runs to max_tokens, counted from usage (KV3D coalesces chunks).
    assert report["tokens_counted_by"] == "usage"
    assert report["aggregate_completion_tokens"] == 3 * 12
    assert len(report["single_stream_runs_tokens_per_s"]) == 2
    assert report["single_stream_tokens_per_s"] > 0 and report["aggregate_tokens_per_s"] > 0
    for key in ("one_token_repeated_prompt", "one_token_new_prompt"):
        assert report[key]["requests"] == 3 and 0 < report[key]["p50_ms"] <= report[key]["p95_ms"]


def test_workload_report_is_complete_and_consistent(server_url):
    spec = WorkloadSpec(
        requests=24, turns=3, shared_ratio=0.75, concurrency=3, max_tokens=4, system_words=120
    )

    async def go():
        async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as http:
            return await run_workload(http, server_url, spec, metrics_period_s=0.5)

    report = asyncio.run(go())
    assert set(report) >= {
        "url",
        "server",
        "workload",
        "requests",
        "errors_by_kind",
        "wall_s",
        "requests_per_s",
        "completion_tokens",
        "completion_tokens_per_s",
        "completion_tokens_from",
        "prompt_tokens",
        "ttft_s",
        "ttft_first_turn_s",
        "ttft_later_turns_s",
        "ttft_by_source_s",
        "itl_s",
        "prefix",
        "sessions",
        "memory",
    }
    assert report["server"] == "kv3d" and report["completion_tokens_from"] == "usage"
    assert report["workload"]["conversations"] == 8
    assert report["workload"]["shared_conversations"] == 6
    req = report["requests"]
    assert req["planned"] == req["sent"] == 24
    assert req["sent"] == req["ok"] + req["errors"] and req["errors"] == 0
    assert report["errors_by_kind"] == {}
    assert 0 < report["completion_tokens"] <= 24 * 4
    assert report["requests_per_s"] > 0 and report["completion_tokens_per_s"] > 0
    assert report["prompt_tokens"] > 24 * 120
    assert 0 < report["ttft_s"]["p50"] <= report["ttft_s"]["p95"]
    assert report["itl_s"]["p50"] <= report["itl_s"]["p95"]
    prefix = report["prefix"]
    assert 0 < prefix["hit_rate"] <= 1 and 0 <= prefix["first_turn_hit_rate"] <= 1
    assert 0 < prefix["cached_token_fraction"] <= 1
    assert sum(prefix["by_source"].values()) == req["ok"]
    assert set(report["ttft_by_source_s"]) == set(prefix["by_source"])
    sessions = report["sessions"]
    assert sessions["resumed"] == sum(sessions["resumed_from"].values())
    memory = report["memory"]
    assert memory["source"] == "/metrics"
    assert memory["hot_bytes_per_session"] > 0 and memory["peak_hot_sessions"] > 0
    # Idle sessions sit in the warm tier, or are shared through the object store.
    assert (memory["bytes_per_warm_session"] or 0) > 0 or memory["sessions_shared"] > 0


def test_bench_starts_kv3d_where_nothing_answers():
    """`kv3d bench --requests` at a local URL with no server: it starts `kv3d serve` there,
    runs, and stops it (its own Ray, on a free port)."""
    url = f"http://127.0.0.1:{free_port()}"
    spec = WorkloadSpec(requests=4, turns=2, concurrency=2, max_tokens=2, system_words=60)
    report = bench_url(url, spec, start_timeout_s=240)
    assert report["server_started_by_bench"] is True and report["server"] == "kv3d"
    assert report["requests"]["ok"] == 4 and report["requests"]["errors"] == 0
    assert not server_answers(url, timeout_s=1.0)


def test_open_ended_probe_gets_whole_answers_without_max_tokens(server_url):
    async def go():
        async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as http:
            return await open_ended_phase(
                http, server_url, requests=4, concurrency=2, budget_s=240.0
            )

    report = asyncio.run(go())
    assert (report["finished"], report["cut"], report["errors"]) == (4, 0, 0)
    assert report["completion_tokens"]["total"] >= 4
    assert 0 < report["ttft_s"]["p50"] <= report["ttft_s"]["p95"]
