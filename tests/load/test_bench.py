"""The benchmark driver against the real server: a complete report (not a speed assertion)."""

import asyncio

import pytest

from kv3d.bench import run_bench

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
    assert report["idle_session_bytes"]["bytes_per_warm_session"] > 0
    assert report["prefill"]["prompt_tokens"] > 80
    assert report["prefill"]["prefill_tokens_per_s"] > 0
    assert report["single_stream"]["completion_tokens"] > 0
    concurrent = report["concurrent"]
    assert concurrent["streams"] == 3
    assert concurrent["completion_tokens"] > 0 and concurrent["aggregate_tokens_per_s"] > 0
    assert 0 < concurrent["ttft_p50_s"] <= concurrent["ttft_p95_s"]
