"""The benchmark driver without a server: the seeded workload, stream parsing against a fake
OpenAI-compatible server that reports no usage (as llama_cpp.server streams), the report and
its tables, the progress bar."""

from __future__ import annotations

import asyncio
import io
import json

import httpx
import pytest

from kv3d.bench.compare import (
    ProgressBar,
    _ratios,
    claims,
    comparison_table,
    decode_rows,
    fmt,
    render_table,
    workload_table,
)
from kv3d.bench.phases import StreamError, read_chat_stream
from kv3d.bench.scrape import MetricsSample, parse_metrics
from kv3d.bench.workload import (
    TurnRecord,
    WorkloadSpec,
    plan_conversations,
    run_workload,
    summarize_workload,
)

SPEC = WorkloadSpec(requests=50, turns=3, shared_ratio=0.75, families=3, seed=7, nonce="t")


# --- the workload ------------------------------------------------------------------------------


def test_same_seed_same_conversations():
    assert plan_conversations(SPEC) == plan_conversations(SPEC)
    other = plan_conversations(WorkloadSpec(**{**_spec_dict(SPEC), "seed": 8}))
    assert other != plan_conversations(SPEC)


def test_turns_add_up_to_the_requests():
    plan = plan_conversations(SPEC)
    assert len(plan) == 17  # ceil(50 / 3)
    assert sum(len(c.questions) for c in plan) == 50
    assert {len(c.questions) for c in plan[:-1]} == {3} and len(plan[-1].questions) == 2


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.8, 1.0])
def test_shared_ratio_is_respected(ratio):
    plan = plan_conversations(WorkloadSpec(requests=300, turns=3, shared_ratio=ratio, nonce="t"))
    shared = [c for c in plan if c.family is not None]
    assert len(shared) == round(len(plan) * ratio)


def test_families_share_a_system_prompt_and_the_rest_do_not():
    plan = plan_conversations(SPEC)
    by_family: dict[int, set[str]] = {}
    for c in plan:
        if c.family is not None:
            by_family.setdefault(c.family, set()).add(c.system)
    assert all(len(systems) == 1 for systems in by_family.values())
    own = [c.system for c in plan if c.family is None]
    family_systems = {s for systems in by_family.values() for s in systems}
    assert len(set(own)) == len(own) and not family_systems & set(own)
    # A few hundred tokens of real text (the held-out prose), not filler.
    assert all(len(c.system.split()) > SPEC.system_words for c in plan)
    assert "harbour" in " ".join(family_systems) or "mill" in " ".join(family_systems)


def test_example_turns_are_a_familys_own_and_open_its_conversations():
    spec = WorkloadSpec(requests=12, turns=1, shared_ratio=0.5, families=2, example_turns=3)
    plan = plan_conversations(spec)
    for c in plan:
        assert len(c.examples) == (3 if c.family is not None else 0)
    by_family = {c.family: c.examples for c in plan if c.family is not None}
    assert all(c.examples == by_family[c.family] for c in plan if c.family is not None)
    assert len(set(by_family.values())) == len(by_family)  # one set of examples per family
    sent = []

    def server(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/metrics":
            return httpx.Response(404)
        sent.append(json.loads(request.content)["messages"])
        return _plain_server(request)

    async def go():
        async with _client(server) as http:
            return await run_workload(http, "http://x", spec, warmup=False)

    asyncio.run(go())
    family_opening = [m for m in sent if len(m) == 1 + 2 * 3 + 1]
    assert family_opening and all(
        [x["role"] for x in m] == ["system"] + ["user", "assistant"] * 3 + ["user"]
        for m in family_opening
    )
    assert len(sent) == 12


def test_questions_and_session_ids_are_unique():
    plan = plan_conversations(SPEC)
    questions = [q for c in plan for q in c.questions]
    assert len(set(questions)) == len(questions)
    assert len({c.session_id for c in plan}) == len(plan)


@pytest.mark.parametrize(
    "bad", [{"requests": 0}, {"shared_ratio": 1.5}, {"turns": 0}, {"concurrency": 0}]
)
def test_spec_rejects_nonsense(bad):
    with pytest.raises(ValueError):
        WorkloadSpec(**bad)


def _spec_dict(spec: WorkloadSpec) -> dict:
    return {f: getattr(spec, f) for f in spec.__slots__}


# --- streams from servers that are not KV3D ----------------------------------------------------


def _sse(*payloads: dict | str) -> bytes:
    frames = [p if isinstance(p, str) else json.dumps(p) for p in payloads]
    return b"".join(f"data: {f}\n\n".encode() for f in frames)


def _chunk(content: str | None = None, finish: str | None = None) -> dict:
    delta = {"content": content} if content is not None else {}
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def _plain_server(request: httpx.Request) -> httpx.Response:
    """An OpenAI-compatible server as llama_cpp.server streams: no usage, no extension."""
    if request.url.path == "/metrics":
        return httpx.Response(404)
    body = _sse(
        {"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]},
        _chunk("Hello"),
        _chunk(" there"),
        _chunk(None, "length"),
        "[DONE]",
    )
    return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})


def _client(handler) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


def test_stream_without_usage_is_read_with_nothing_assumed():
    async def go():
        async with _client(_plain_server) as http:
            return await read_chat_stream(http, "http://x", {"messages": []})

    raw = asyncio.run(go())
    assert raw.text == "Hello there" and raw.content_chunks == 2
    assert raw.usage is None and raw.ext is None
    assert raw.ttft_s is not None and len(raw.itl_s) == 1


@pytest.mark.parametrize(
    ("response", "kind"),
    [
        (httpx.Response(500, content=b"boom"), "http_500"),
        (httpx.Response(200, content=_sse(_chunk("Hi"))), "broken_stream"),
        (httpx.Response(200, content=_sse({"error": {"message": "no"}})), "stream_error"),
    ],
)
def test_failed_streams_raise_a_counted_kind(response, kind):
    async def go():
        async with _client(lambda _: response) as http:
            await read_chat_stream(http, "http://x", {"messages": []})

    with pytest.raises(StreamError) as err:
        asyncio.run(go())
    assert err.value.kind == kind


def test_workload_against_a_plain_server_reports_nulls_not_zeros():
    spec = WorkloadSpec(requests=7, turns=2, concurrency=2, nonce="t")

    async def go():
        async with _client(_plain_server) as http:
            return await run_workload(http, "http://x", spec, metrics_period_s=0.05)

    report = asyncio.run(go())
    assert report["server"] == "openai-compatible"
    assert report["requests"] == {"planned": 7, "sent": 7, "ok": 7, "errors": 0, "skipped": 0}
    assert report["completion_tokens"] == 14 and report["completion_tokens_from"] == "chunks"
    assert report["prompt_tokens"] is None
    assert set(report["prefix"].values()) == {None}
    assert report["sessions"]["resumed"] is None
    assert set(report["memory"].values()) == {None}
    json.dumps(report)


def test_a_failed_turn_ends_its_conversation():
    calls = 0

    def flaky(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        if request.url.path == "/metrics":
            return httpx.Response(404)
        calls += 1
        return httpx.Response(503) if calls == 2 else _plain_server(request)

    spec = WorkloadSpec(requests=6, turns=3, concurrency=1, nonce="t")

    async def go():
        async with _client(flaky) as http:
            return await run_workload(http, "http://x", spec, warmup=False)

    report = asyncio.run(go())
    req = report["requests"]
    assert req == {"planned": 6, "sent": 5, "ok": 4, "errors": 1, "skipped": 1}
    assert report["errors_by_kind"] == {"http_503": 1}


# --- the report, from records --------------------------------------------------------------------


def _record(conv: int, turn: int, cached: int, **kw) -> TurnRecord:
    return TurnRecord(
        conversation=conv,
        turn=turn,
        shared=True,
        ok=True,
        ttft_s=0.1 * (turn + 1),
        total_s=0.5,
        itl_s=[0.02, 0.03],
        completion_tokens=4,
        usage_reported=True,
        prompt_tokens=400,
        cached_tokens=cached,
        prefix_source="hot" if cached else "miss",
        **kw,
    )


def _sample(**kw) -> MetricsSample:
    base = dict(
        running_sequences=2,
        sessions_hot=4,
        sessions_warm=2,
        sessions_cold=0,
        hot_bytes=4_000_000.0,
        warm_bytes=300_000.0,
        cold_bytes=0.0,
        delta_compression_ratio=1.9,
        kv_cells_total=5825,
    )
    return MetricsSample(**{**base, **kw})


def test_summary_counts_hit_rates_and_memory():
    spec = WorkloadSpec(requests=4, turns=2, nonce="t")
    plan = plan_conversations(spec)
    records = [
        _record(0, 0, 0),
        _record(0, 1, 380, session_resume_ms=4.0, session_resumed_from="warm"),
        _record(1, 0, 300),
        TurnRecord(1, 1, True, False, "timeout"),
    ]
    report = summarize_workload(
        spec, plan, records, [_sample(), _sample(sessions_hot=0)], _sample(), 2.0, kv3d=True
    )
    assert report["requests"] == {"planned": 4, "sent": 4, "ok": 3, "errors": 1, "skipped": 0}
    assert report["errors_by_kind"] == {"timeout": 1}
    assert report["requests_per_s"] == 1.5 and report["completion_tokens_per_s"] == 6.0
    assert report["prefix"]["hit_rate"] == round(2 / 3, 4)
    assert report["prefix"]["first_turn_hit_rate"] == 0.5
    assert report["prefix"]["by_source"] == {"hot": 2, "miss": 1}
    # 400 + 100 prefilled in the first turns, 20 in the later one (the timeout is not counted)
    assert report["prefix"]["computed_prompt_tokens"] == {"first_turns": 500, "later_turns": 20}
    assert report["sessions"]["resumed_from"] == {"warm": 1}
    assert report["sessions"]["resume_ms"]["p95"] == 4.0
    assert report["ttft_s"]["p50"] <= report["ttft_s"]["p95"]
    assert report["ttft_first_turn_s"]["p50"] == 0.1 and report["ttft_later_turns_s"]["p50"] == 0.2
    assert set(report["ttft_by_source_s"]) == {"hot", "miss"}
    memory = report["memory"]
    assert memory["hot_bytes_per_session"] == 1_000_000  # samples with sessions in the cache
    assert memory["bytes_per_warm_session"] == 150_000 and memory["bytes_per_cold_session"] is None


def test_parse_metrics_reads_kv3d_series_and_ignores_others():
    text = "\n".join(
        [
            "# HELP kv3d_engine_running_sequences Sequences decoding or prefilling now.",
            "kv3d_engine_running_sequences 3.0",
            'kv3d_sessions{tier="hot"} 5.0',
            'kv3d_sessions{tier="warm"} 2.0',
            'kv3d_tier_bytes{tier="hot"} 1000.0',
            'kv3d_tier_bytes{tier="warm"} 64.0',
            "kv3d_engine_kv_cells_reserved 200.0",
            "kv3d_prefix_hot_cells 100.0",
            "kv3d_engine_kv_cells_total 5825.0",
            "kv3d_shared_sessions 4.0",
            "kv3d_prefix_hit_rate 0.5",
        ]
    )
    sample = parse_metrics(text)
    assert sample is not None and sample.running_sequences == 3
    assert sample.sessions_hot == 5 and sample.hot_bytes_per_session == 200.0
    assert sample.sessions_shared == 4 and sample.sessions_cold == 0
    assert sample.kv_cells_per_running_session == 100.0
    assert parse_metrics("vllm_num_requests_running 2.0") is None


# --- tables and progress ------------------------------------------------------------------------


def test_render_table_aligns_columns():
    table = render_table(["figure", "a", "bb"], [["x", "1", "22"], ["longer", "333", "4"]])
    lines = table.splitlines()
    assert len({len(line) for line in lines[:2]}) == 1
    assert lines[2].startswith("x ") and lines[3].endswith("4")
    assert fmt(None) == "n/a" and fmt(0.123456) == "0.123" and fmt(12345.6) == "12346"


def test_workload_and_comparison_tables_show_every_contender():
    spec = WorkloadSpec(requests=2, turns=1, nonce="t")
    plan = plan_conversations(spec)
    kv3d = summarize_workload(
        spec, plan, [_record(0, 0, 0), _record(1, 0, 300)], [], _sample(), 1.0, kv3d=True
    )
    plain = summarize_workload(spec, plan, [_record(0, 0, 0), _record(1, 0, 0)], [], None, 1.0)
    table = workload_table({**kv3d, "url": "http://x"})
    assert "prefix hit rate" in table and "976.6" in table  # 1,000,000 B per hot session

    capacity = {
        "sessions_sent": 96,
        "peak_streaming_sessions": 40,
        "peak_running_sessions": 41,
        "errors": 0,
        "hot_bytes_per_session": 2_000_000,
        "hot_bytes_per_session_at_peak": 1_500_000,
        "kv_cells_per_session_at_peak": 100.0,
    }
    resume = {
        "resume_ms": {"p95": 6.0},
        "second_turn_ttft_s": {"p95": 0.05},
        "resumed_from": {"warm": 3},
    }
    fidelity = {
        "eval_tokens": 128,
        "kl_mean": 1e-4,
        "kl_max": 1e-2,
        "noise_floor_kl_mean": 2e-4,
        "top1": 0.995,
    }
    entries = {
        "kv3d": {
            "workload": kv3d,
            "capacity": capacity,
            "resume": resume,
            "open_ended": {
                "requests": 32,
                "finished": 30,
                "requests_per_s": 2.4,
                "completion_tokens_per_s": 183.0,
                "ttft_s": {"p50": 0.84, "p95": 0.85},
            },
            "error": None,
        },
        "llama-cpp-python": {
            "workload": plain,
            "capacity": {
                **capacity,
                "peak_streaming_sessions": 96,
                "peak_running_sessions": None,
                "hot_bytes_per_session": None,
                "hot_bytes_per_session_at_peak": None,
                "kv_cells_per_session_at_peak": None,
            },
            "resume": {**resume, "resume_ms": {"p95": None}, "resumed_from": None},
            "error": None,
        },
        "llama-server": {"error": "not ready"},
    }
    report = {
        "contenders": entries,
        "claims": {n: claims(n, e, fidelity, 23_040) for n, e in entries.items()},
        "anchor": "llama-cpp-python",
        "ratios": {"kv3d": {"requests_per_s_vs_anchor": 1.0, "ttft_p95_vs_anchor": 0.5}},
    }
    plain_claims = report["claims"]["llama-cpp-python"]
    assert plain_claims["p95_warm_restore_ms"] is None
    assert "extension" in plain_claims["notes"]["p95_warm_restore_ms"]
    assert plain_claims["logit_drift"] is None and report["claims"]["kv3d"]["logit_drift"]
    assert "lower bound" in plain_claims["notes"]["max_concurrent_sessions"]
    kv3d_claims = report["claims"]["kv3d"]
    assert kv3d_claims["avg_bytes_per_active_session"] == 2_304_000  # 100 cells
    assert kv3d_claims["avg_bytes_in_use_per_active_session"] == 1_500_000
    table = comparison_table(report)
    header = table.splitlines()[0]
    assert all(name in header for name in entries)
    assert "did not run" in table and "n/a" in table and "40 / 41" in table
    rows = {line.split("  ")[0]: line for line in table.splitlines()}
    assert "30 / 32, 2.4" in rows["no max_tokens: finished / sent, req/s"]
    assert "840 / 850" in rows["no max_tokens: TTFT p50 / p95 (ms)"]
    assert "183" in rows["no max_tokens: completion tokens/s"]
    json.dumps(report)


def test_progress_bar_writes_tenths_to_a_log_and_redraws_on_a_terminal():
    log = io.StringIO()
    bar = ProgressBar(20, "bench", log)
    advance = bar.start()
    for i in range(20):
        advance(i != 5)
    bar.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 11 and lines[-1].startswith("bench [####")
    assert "20/20 requests" in lines[-1] and "1 errors" in lines[-1]

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Terminal()
    bar = ProgressBar(3, "kv3d", tty)
    bar.start()
    for _ in range(3):
        bar.advance()
    bar.close()
    bar.close()  # idempotent
    assert tty.getvalue().startswith("\r") and tty.getvalue().endswith(
        "3/3 requests, 0s, 0 errors\n"
    )


def test_ratios_are_taken_against_llama_server_first():
    def ran(rps: float, p95: float) -> dict:
        return {"workload": {"requests_per_s": rps, "ttft_s": {"p95": p95}}, "error": None}

    entries = {
        "kv3d": ran(2.4, 1.0),
        "llama-cpp-python": ran(0.6, 8.0),
        "llama-server": ran(2.0, 2.0),
    }
    anchor, ratios = _ratios(entries)
    assert anchor == "llama-server"
    assert ratios["kv3d"] == {"requests_per_s_vs_anchor": 1.2, "ttft_p95_vs_anchor": 0.5}
    del entries["llama-server"]
    assert _ratios(entries)[0] == "llama-cpp-python"
    assert _ratios({"kv3d": ran(1.0, 1.0)}) == (None, {})


def test_decode_ratios_and_rows_come_from_the_decode_probe():
    def decode(single: float, many: float, repeated_ms: float, new_ms: float) -> dict:
        return {
            "single_stream_tokens_per_s": single,
            "aggregate_tokens_per_s": many,
            "one_token_repeated_prompt": {"p50_ms": repeated_ms},
            "one_token_new_prompt": {"p50_ms": new_ms},
        }

    workload = {"requests_per_s": 1.0, "ttft_s": {"p95": 1.0}}
    entries = {
        "kv3d": {"workload": workload, "decode": decode(90, 240, 60, 120), "error": None},
        "llama-server": {"workload": workload, "decode": decode(100, 200, 40, 80), "error": None},
        "llama-cpp-python": {"workload": workload, "decode": None, "error": None},
    }
    anchor, ratios = _ratios(entries)
    assert anchor == "llama-server"
    assert ratios["kv3d"]["single_stream_vs_anchor"] == 0.9
    assert ratios["kv3d"]["aggregate_vs_anchor"] == 1.2
    assert ratios["kv3d"]["one_token_repeated_p50_vs_anchor"] == 1.5
    assert ratios["kv3d"]["one_token_new_p50_vs_anchor"] == 1.5
    assert "single_stream_vs_anchor" not in ratios["llama-cpp-python"]  # no probe, no ratio
    assert dict(decode_rows(entries["kv3d"]["decode"]))["1-token p50 repeated / new (ms)"] == (
        "60 / 120"
    )
    assert set(dict(decode_rows(None)).values()) == {"n/a"}
