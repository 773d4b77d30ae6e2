"""Guardrails on the real model through the HTTP app (in-process engine): API keys, tenant
isolation of the cache, request limits, safe mode, and a fuzz test that finds no 5xx."""

from __future__ import annotations

import json
import logging

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings

from kv3d.config import LimitsConfig
from kv3d.engine.engine import Engine
from kv3d.engine.reuse import NoReuse
from kv3d.engine.sessions import NoSessions
from kv3d.server.api import LocalBackend, ServedModel, build_api
from kv3d.server.guard import Guard, digests_from_setting
from tests.integration.fuzzbodies import request_bytes
from tests.integration.httpapp import KEYS, bearer, cached, call, chat, engine_config

pytestmark = pytest.mark.integration


def app_for(engine, tok, keys: str = "", **limits):
    served = ServedModel(engine.model_id, tok, context_tokens=1024)
    guard = Guard(digests_from_setting(keys), LimitsConfig(**limits))
    return build_api(served, LocalBackend(engine), guard=guard)


def test_every_endpoint_but_health_requires_a_valid_key(engine, tok, caplog):
    app = app_for(engine, tok, KEYS)
    caplog.set_level(logging.DEBUG)
    health, no_key, wrong, models_a, models_b, metrics, gen = call(
        app,
        ("GET", "/health", {}),
        ("GET", "/v1/models", {}),
        ("GET", "/v1/models", {"headers": bearer("key-alpha-124")}),
        ("GET", "/v1/models", {"headers": bearer("key-alpha-123")}),
        ("GET", "/v1/models", {"headers": bearer("key-beta-456")}),
        ("GET", "/metrics", {"headers": {"Authorization": "Basic key-alpha-123"}}),
        chat(None),
    )
    assert health.status_code == 200 and health.json()["mode"] == "normal"
    assert models_a.status_code == models_b.status_code == 200
    for r in (no_key, wrong, metrics, gen):
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["WWW-Authenticate"] == "Bearer"
    assert "key-alpha" not in caplog.text and "key-beta" not in caplog.text


def test_every_answer_is_counted_by_route_and_status(engine, tok):
    app = app_for(engine, tok, KEYS)
    key = "key-alpha-123"
    # Its own prompt: the engine is shared, and other tests count on alpha's being cold.
    own = {"messages": [{"role": "user", "content": "Count the requests."}]}
    refused, whole, streamed, missing = call(
        app,
        chat("key-wrong"),
        chat(key, **own),
        chat(key, stream=True, **own),
        ("GET", "/v1/nowhere", {"headers": bearer(key)}),
    )
    assert (refused.status_code, whole.status_code, streamed.status_code) == (401, 200, 200)
    assert missing.status_code == 404
    assert "data: [DONE]" in streamed.text
    (metrics,) = call(app, ("GET", "/metrics", {"headers": bearer(key)}))
    counted = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in metrics.text.splitlines()
        if line.startswith("kv3d_requests_total{")
    }
    chat_ok = 'kv3d_requests_total{endpoint="/v1/chat/completions",status="200"}'
    assert counted[chat_ok] == 2  # whole and streamed
    # Refused before routing, and routed nowhere: neither names a route.
    assert counted['kv3d_requests_total{endpoint="unmatched",status="401"}'] == 1
    assert counted['kv3d_requests_total{endpoint="unmatched",status="404"}'] == 1


def test_tenants_never_share_cached_prefixes_or_sessions(engine, tok):
    app = app_for(engine, tok, KEYS)
    alpha, beta = "key-alpha-123", "key-beta-456"
    (a1,) = call(app, chat(alpha, session="conv"))
    (a2,) = call(app, chat(alpha))
    assert cached(a1) == 0 and cached(a2) > 0  # the same tenant reuses its prefix
    # Another tenant, same prompt and same session id: nothing of alpha's is visible.
    (b1,) = call(app, chat(beta, session="conv"))
    assert cached(b1) == 0 and b1.json()["kv3d"]["prefix_source"] == "miss"
    (b2,) = call(app, chat(beta))
    assert cached(b2) > 0
    # A cache salt splits one tenant the same way.
    (s1,) = call(app, chat(alpha, cache_salt="project-x"))
    (s2,) = call(app, chat(alpha, cache_salt="project-x"))
    assert cached(s1) == 0 and cached(s2) > 0


def test_each_limit_has_a_clear_error(engine, tok):
    app = app_for(
        engine,
        tok,
        max_body_bytes=4096,
        max_messages=4,
        max_prompt_tokens=200,
        max_completion_tokens=16,
    )
    many = [{"role": "user", "content": "hi"}] * 5
    big, too_many, long_prompt, long_answer, ok = call(
        app,
        chat(messages=[{"role": "user", "content": "x" * 5000}]),
        chat(messages=many),
        chat(messages=[{"role": "user", "content": "word " * 400}]),
        chat(max_tokens=17),
        chat(max_tokens=16),
    )
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    assert too_many.status_code == 400 and too_many.json()["error"]["code"] == "too_many_messages"
    assert long_prompt.status_code == 400
    assert long_prompt.json()["error"]["code"] == "prompt_too_long"
    assert long_answer.status_code == 400
    assert long_answer.json()["error"]["param"] == "max_tokens"
    assert ok.status_code == 200


def test_concurrent_requests_per_key_are_capped(engine, tok):
    app = app_for(engine, tok, KEYS, max_streams_per_key=1)
    slow = chat("key-alpha-123", max_tokens=200, ignore_eos=True)
    first, second, other = call(app, slow, chat("key-alpha-123"), chat("key-beta-456"))
    assert first.status_code == 200 and other.status_code == 200
    assert second.status_code == 429
    assert second.json()["error"]["code"] == "too_many_concurrent_requests"
    (after,) = call(app, chat("key-alpha-123"))
    assert after.status_code == 200  # the slot came back when the first request ended


def test_forced_safe_mode_serves_plain_inference(tok):
    with Engine.from_config(engine_config(safe_mode=True)) as safe:
        app = app_for(safe, tok)
        first, second = call(app, chat()), call(app, chat())
        health, metrics = call(app, ("GET", "/health", {}), ("GET", "/metrics", {}))
        assert isinstance(safe.sessions, NoSessions) and isinstance(safe.reuse, NoReuse)
    assert health.status_code == 200 and health.json()["mode"] == "safe"
    assert "kv3d_safe_mode 1.0" in metrics.text
    assert cached(first[0]) == 0 and cached(second[0]) == 0


def test_repeated_state_restore_failures_trip_safe_mode(tok):
    with Engine.from_config(engine_config()) as e:
        app = app_for(e, tok)
        for n in range(3):  # three sessions, kept as deltas…
            call(app, chat(session=f"s{n}", max_tokens=8))

        def refuse(seq_id, blob):
            raise RuntimeError("llama.cpp refused the state")

        e.ctx.set_seq_state = refuse  # …that llama.cpp now refuses to restore
        for n in range(3):
            e.reuse.cache.evict_unused(10**9)  # the sessions must come back from the warm tier
            # What the engine thread does after each step it evicts in: without it, the next
            # request would still see its session listed as hot and fetch nothing to restore.
            e._refresh_hot_view()
            e.sessions.flush()
            (r,) = call(app, chat(session=f"s{n}", max_tokens=8))
            assert r.status_code == 200  # each still answered, by recomputing
        (health,) = call(app, ("GET", "/health", {}))
        assert e.safe_mode and health.json()["mode"] == "safe"


@pytest.fixture(scope="module")
def fuzz_app(engine, tok):
    return app_for(engine, tok, max_completion_tokens=6)


CMPL = "/v1/completions"
HELLO = [{"role": "user", "content": "Hello"}]


def post(path: str, data: bytes):
    return ("POST", path, {"content": data, "headers": {"Content-Type": "application/json"}})


FUZZ_EXAMPLES = 120


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=request_bytes())
def test_fuzzed_requests_never_get_a_5xx(fuzz_app, data):
    chat_r, completion_r = call(fuzz_app, post("/v1/chat/completions", data), post(CMPL, data))
    event(f"HTTP {chat_r.status_code} (chat), {completion_r.status_code} (completions)")
    for r in (chat_r, completion_r):
        assert r.status_code < 500, r.text
        if r.status_code >= 400:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def error_of(response: httpx.Response) -> dict:
    assert response.status_code == 400, response.text
    return response.json()["error"]


def test_lone_surrogates_are_a_400_in_every_string_field(fuzz_app):
    lone = "a\ud800b"
    parts = [{"type": "text", "text": "ok"}, {"type": "text", "text": lone}]
    cases = [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": lone}]}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": parts}]}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "name": lone}]}),
        ("/v1/chat/completions", {"messages": HELLO, "stop": [lone]}),
        ("/v1/chat/completions", {"messages": HELLO, "cache_salt": lone}),
        ("/v1/chat/completions", {"messages": HELLO, "user": lone}),
        ("/v1/chat/completions", {"messages": HELLO, "tools": [{"function": {"name": lone}}]}),
        (CMPL, {"prompt": lone}),
        (CMPL, {"prompt": [lone]}),
        (CMPL, {"prompt": "hi", "stop": lone}),
    ]
    params = [
        "messages.0.content",
        "messages.0.content.1.text",
        "messages.0.name",
        "stop.0",
        "cache_salt",
        "user",
        "tools.0.function.name",
        "prompt",
        "prompt.0",
        "stop",
    ]
    # json.dumps writes the lone surrogate as the escape "\ud800", as a client's JSON would.
    responses = call(fuzz_app, *(post(path, json.dumps(body).encode()) for path, body in cases))
    for response, param in zip(responses, params, strict=True):
        err = error_of(response)
        assert (err["param"], err["code"]) == (param, "invalid_unicode")
    # Raw surrogate bytes (CESU-8), which Python's json decodes to the same string.
    raw = b'{"prompt":"a\xed\xa0\x80b"}'
    (r,) = call(fuzz_app, post(CMPL, raw))
    assert error_of(r)["param"] == "prompt"
    # A surrogate pair is one valid character (an emoji): served as usual.
    (ok,) = call(fuzz_app, chat(messages=[{"role": "user", "content": "\U0001f600 hi"}]))
    assert ok.status_code == 200, ok.text


def test_deep_nesting_and_huge_integers_are_a_400(fuzz_app):
    deep = b"[" * 50_000 + b"]" * 50_000
    deep_field = b'{"messages":' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    huge = b'{"messages":[{"role":"user","content":"hi"}],"max_tokens":' + b"9" * 5000 + b"}"
    huge_cmpl = b'{"prompt":"hi","seed":-' + b"1" * 5000 + b"}"
    responses = call(
        fuzz_app,
        post("/v1/chat/completions", deep),
        post(CMPL, deep_field),
        post("/v1/chat/completions", huge),
        post(CMPL, huge_cmpl),
    )
    codes = [error_of(r)["code"] for r in responses]
    assert codes == ["nesting_too_deep"] * 2 + ["number_too_large"] * 2


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("top_k", 2**32 + 1),  # was served as top_k=1: C int truncation
        ("top_k", 2**31),
        ("seed", 2**32 - 1),  # llama.cpp's "random seed" marker
        ("seed", 2**64),
        ("seed", -1),
        ("max_tokens", 2**31),
        ("max_completion_tokens", 2**63),
        ("temperature", "NaN"),
        ("top_p", "Infinity"),
        ("presence_penalty", "-Infinity"),
        ("frequency_penalty", 2.5),
        ("top_logprobs", 2**31),
        ("logit_bias", {"4294967296": 1}),
        ("logit_bias", {"5": "NaN"}),
    ],
)
def test_numbers_out_of_the_backends_range_are_a_400_naming_the_field(fuzz_app, field, value):
    body = {"messages": HELLO, "max_tokens": 2, "logprobs": True, field: value}
    if field == "max_completion_tokens":
        del body["max_tokens"]
    # NaN and Infinity are written as JavaScript's literals, which Python's json reads.
    data = json.dumps(body).replace('"NaN"', "NaN").replace('"Infinity"', "Infinity")
    data = data.replace('"-Infinity"', "-Infinity")
    (r,) = call(fuzz_app, post("/v1/chat/completions", data.encode()))
    assert error_of(r)["param"].split(".")[0] == field


def test_numbers_at_the_backends_limits_are_served(fuzz_app):
    edges = {"top_k": 2**31 - 1, "seed": 2**32 - 2, "temperature": 2.0, "top_p": 5e-324}
    ok, zero_seed, cmpl = call(
        fuzz_app,
        chat(**edges),
        chat(seed=0, logit_bias={}, presence_penalty=0.0),
        post(CMPL, json.dumps({"prompt": "Hi", "max_tokens": 2, "logprobs": 5}).encode()),
    )
    for r in (ok, zero_seed, cmpl):
        assert r.status_code == 200, r.text


def test_the_idle_canary_passes_and_its_failure_trips_safe_mode(monkeypatch):
    import time

    cfg = engine_config(canary_period_s=0.2)
    with Engine.from_config(cfg) as e:
        deadline = time.monotonic() + 10
        while e.stats().canary_runs_total < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert e.stats().canary_runs_total >= 2 and not e.safe_mode

        def broken_codec(data):
            raise ValueError("delta does not decode")

        monkeypatch.setattr("kv3d.engine.selfcheck.decode_delta", broken_codec)
        while not e.safe_mode and time.monotonic() < deadline:
            time.sleep(0.05)
        assert e.safe_mode and "canary" in e.safe_mode_reason
