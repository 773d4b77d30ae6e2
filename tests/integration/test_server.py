"""End to end over HTTP: the official `openai` client against the real Serve application."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import openai
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.integration.fuzzbodies import EDGE, request_bytes
from tests.integration.sameness import (
    Step,
    assert_same_while_logits_are,
    chat_steps,
    completion_steps,
)

pytestmark = pytest.mark.integration

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def ask(text: str) -> list[dict]:
    return [SYSTEM, {"role": "user", "content": text}]


@pytest.fixture(scope="module")
def client(server_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def aclient(server_url):
    """A factory: an async client belongs to the event loop it is first used in."""
    return lambda: openai.AsyncOpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0)


def metric(server_url: str, name: str) -> float:
    text = httpx.get(f"{server_url}/metrics", timeout=10).text
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


def wait_for_metric(server_url: str, name: str, value: float, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if metric(server_url, name) == value:
            return True
        time.sleep(0.2)
    return False


def test_health(server_url):
    r = httpx.get(f"{server_url}/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "service": "kv3d-engine", "mode": "normal"}


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct.Q4_1"]


def test_chat_completion_any_model_name(client):
    r = client.chat.completions.create(
        model="qwen2.5-7b-instruct",
        messages=ask("What is the capital of France?"),
        temperature=0,
        max_tokens=32,
    )
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.model == "SmolLM2-135M-Instruct.Q4_1"
    assert r.usage.prompt_tokens > 10
    assert 0 < r.usage.completion_tokens <= 32
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens == 0


def test_chat_completion_streaming_matches_non_streaming(client):
    kwargs = dict(
        model="m",
        messages=ask("Count to five."),
        temperature=0,
        max_tokens=24,
        logprobs=True,
        top_logprobs=5,
    )
    whole = client.chat.completions.create(**kwargs).choices[0]
    chunks = list(
        client.chat.completions.create(
            stream=True, stream_options={"include_usage": True}, **kwargs
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes in (["stop"], ["length"])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 2
    streamed = [
        Step(c.token, {t.token: t.logprob for t in c.top_logprobs})
        for chunk in chunks
        if chunk.choices and chunk.choices[0].logprobs
        for c in chunk.choices[0].logprobs.content
    ]
    assert "".join(s.token for s in streamed) == text  # the stream's logprobs cover its text
    # Greedy decoding gives the same text for the same logits.
    if assert_same_while_logits_are(streamed, chat_steps(whole)) == len(streamed):
        assert text == whole.message.content


def test_completions_endpoint(client):
    kwargs = dict(model="m", prompt="The capital of France is", max_tokens=8, temperature=0)
    r = client.completions.create(logprobs=5, **kwargs)
    assert r.object == "text_completion" and r.choices[0].text
    assert r.usage.completion_tokens <= 8
    chunks = [c for c in client.completions.create(stream=True, logprobs=5, **kwargs) if c.choices]
    streamed = [s for c in chunks if c.choices[0].logprobs for s in completion_steps(c.choices[0])]
    text = "".join(c.choices[0].text for c in chunks)
    assert "".join(s.token for s in streamed) == text
    # Greedy decoding gives the same text for the same logits.
    if assert_same_while_logits_are(streamed, completion_steps(r.choices[0])) == len(streamed):
        assert text == r.choices[0].text


def test_completions_from_token_ids_match_the_text_prompt(client, server_url):
    prompt = "The capital of France is"
    ids = httpx.post(f"{server_url}/tokenize", json={"content": prompt, "add_special": True})
    kwargs = dict(model="m", max_tokens=8, temperature=0, logprobs=5)
    by_text = client.completions.create(prompt=prompt, **kwargs)
    by_ids = client.completions.create(prompt=ids.json()["tokens"], **kwargs)
    assert by_ids.usage.prompt_tokens == by_text.usage.prompt_tokens
    steps = completion_steps(by_ids.choices[0])
    if assert_same_while_logits_are(steps, completion_steps(by_text.choices[0])) == len(steps):
        assert by_ids.choices[0].text == by_text.choices[0].text
    n_vocab = 49152  # SmolLM2's vocabulary
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(prompt=[1, n_vocab], **kwargs)
    assert err.value.body["param"] == "prompt"


def test_null_fields_take_their_defaults(server_url):
    body = {
        "model": "m",
        "messages": ask("Say hi."),
        "max_tokens": 4,
        **dict.fromkeys(("temperature", "top_p", "n", "stop", "seed", "stream", "logprobs")),
    }
    r = httpx.post(f"{server_url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 4


def test_sampling_with_seed_is_reproducible(client):
    kwargs = dict(
        model="m",
        messages=ask("Invent a name for a cat."),
        temperature=1.0,
        top_p=0.9,
        seed=1234,
        max_tokens=12,
        extra_body={"top_k": 40},
        logprobs=True,
        top_logprobs=5,
    )
    a = client.chat.completions.create(**kwargs).choices[0]
    b = client.chat.completions.create(**kwargs).choices[0]
    # The same seed draws the same tokens for the same logits.
    assert_same_while_logits_are(chat_steps(a), chat_steps(b))


def test_stop_sequence(client):
    full = (
        client.chat.completions.create(
            model="m", messages=ask("What is the capital of France?"), temperature=0, max_tokens=32
        )
        .choices[0]
        .message.content
    )
    word = full.split()[2]
    r = client.chat.completions.create(
        model="m",
        messages=ask("What is the capital of France?"),
        temperature=0,
        max_tokens=32,
        stop=[word],
    )
    assert r.choices[0].finish_reason == "stop"
    assert word not in r.choices[0].message.content


def test_eight_concurrent_streams_complete_and_share_decode_steps(server_url, aclient):
    batched_before = metric(server_url, "kv3d_engine_batched_steps_total")

    async def one(api, n: int) -> tuple[str, str | None]:
        stream = await api.chat.completions.create(
            model="m",
            messages=ask(f"List {n} colours."),
            max_tokens=32,
            stream=True,
            temperature=0.7,
            seed=n,
        )
        text, finish = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def all_of_them():
        async with aclient() as api:
            return await asyncio.gather(*(one(api, n) for n in range(3, 11)))

    results = asyncio.run(all_of_them())
    assert len(results) == 8
    assert all(text and finish in ("stop", "length") for text, finish in results)
    assert metric(server_url, "kv3d_engine_batched_steps_total") > batched_before
    assert metric(server_url, "kv3d_engine_max_sequences_in_step") >= 4
    assert metric(server_url, "kv3d_engine_running_sequences") == 0


def test_greedy_alone_and_amid_traffic_agree_within_tolerance(client, aclient):
    """Batch composition changes the numerics, so compare log-probabilities with
    a tolerance rather than the generated text for equality."""
    probe = dict(
        model="m",
        messages=ask("What is the capital of France?"),
        temperature=0,
        max_tokens=1,
        logprobs=True,
        top_logprobs=5,
    )
    alone = client.chat.completions.create(**probe).choices[0].logprobs.content[0]

    async def amid_traffic():
        async with aclient() as api:
            others = [
                asyncio.create_task(
                    api.chat.completions.create(
                        model="m", messages=ask(f"Count to {n}."), max_tokens=48, temperature=0
                    )
                )
                for n in (10, 20, 30, 40, 50)
            ]
            await asyncio.sleep(0.5)
            busy = await api.chat.completions.create(**probe)
            await asyncio.gather(*others)
            return busy.choices[0].logprobs.content[0]

    busy = asyncio.run(amid_traffic())
    top_alone = {t.token: t.logprob for t in alone.top_logprobs}
    top_busy = {t.token: t.logprob for t in busy.top_logprobs}
    common = set(top_alone) & set(top_busy)
    assert len(common) >= 4
    assert max(abs(top_alone[t] - top_busy[t]) for t in common) < 0.5
    assert busy.token in list(top_alone)[:2]


# --- bad input ---------------------------------------------------------------------------------
BAD_BODIES = [
    ("malformed JSON", b'{"messages": [', 400),
    ("body not an object", b"[1, 2]", 400),
    ("missing messages", b'{"model": "m"}', 400),
    ("empty messages", b'{"model": "m", "messages": []}', 400),
    ("unknown role", b'{"messages": [{"role": "wizard", "content": "hi"}]}', 400),
    ("non-string content", b'{"messages": [{"role": "user", "content": 42}]}', 400),
    ("max_tokens zero", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', 400),
    (
        "max_tokens negative",
        b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}',
        400,
    ),
    ("n > 16", b'{"messages": [{"role": "user", "content": "hi"}], "n": 17}', 400),
    (
        "beyond the context",
        b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}',
        400,
    ),
    ("lone surrogate", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400),
    ("nested 50000 deep", b"[" * 50_000 + b"]" * 50_000, 400),
    (
        "integer of 5000 digits",
        b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + b"9" * 5000 + b"}",
        400,
    ),
    (
        "top_k past int32",
        b'{"messages": [{"role": "user", "content": "hi"}], "top_k": 4294967297}',
        400,
    ),
]


@pytest.mark.parametrize("name,body,status", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_input_gets_openai_error_shape(server_url, name, body, status):
    r = httpx.post(
        f"{server_url}/v1/chat/completions",
        content=body,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]


def test_prompt_longer_than_the_context_is_400_with_code(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=ask("word " * 3000), max_tokens=8)
    assert info.value.body["code"] == "context_length_exceeded"


def test_unknown_route_is_404_in_error_shape(server_url):
    r = httpx.get(f"{server_url}/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_server_keeps_serving_after_bad_input(client, server_url):
    for _, body, _ in BAD_BODIES:
        httpx.post(
            f"{server_url}/v1/chat/completions",
            content=body,
            headers={"Content-Type": "application/json"},
            timeout=30,
        )
    r = client.chat.completions.create(model="m", messages=ask("Hi"), max_tokens=4)
    assert r.choices[0].message.content is not None


SERVE_FUZZ_EXAMPLES = 40
ENDPOINTS = ("/chat/completions", "/completions")


# A share of test_guard's fuzz, through Ray Serve's HTTP proxy and the ingress deployment.
# max_tokens is always drawn (small, or a number edge): this server has no completion limit.
@settings(max_examples=SERVE_FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=request_bytes(max_tokens=st.one_of(st.integers(-2, 4), EDGE)))
def test_fuzzed_requests_over_serve_never_get_a_5xx(server_url, data):
    headers = {"Content-Type": "application/json"}
    with httpx.Client(base_url=f"{server_url}/v1", headers=headers, timeout=60) as http:
        responses = [http.post(path, content=data) for path in ENDPOINTS]
    event(" ".join(f"HTTP {r.status_code}" for r in responses))
    for r in responses:
        assert r.status_code < 500, r.text
        if r.status_code >= 400:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_client_disconnect_mid_stream_frees_the_slot(server_url):
    body = {
        "model": "m",
        "stream": True,
        "max_tokens": 1500,
        "temperature": 1.0,
        "seed": 7,
        "ignore_eos": True,  # the stream cannot end by itself before the client leaves
        "messages": ask("Tell me everything about the history of Rome."),
    }
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{server_url}/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            # Keep the line iterator referenced: an abandoned httpx iterator is closed when it is
            # collected, and closing it drops the connection before the check below.
            stream = r.iter_lines()
            lines = 0
            while lines < 5:
                lines += next(stream).startswith("data: ")
            # /metrics asks the replica for fresh figures; under load that call can time out
            # and leave older ones, so give it a few tries.
            assert wait_for_metric(server_url, "kv3d_engine_running_sequences", 1, 10)
    # Leaving the `with` closed the connection: the replica must drop the sequence at once, long
    # before the 1500 tokens it was asked for could finish (~15 s here).
    assert wait_for_metric(server_url, "kv3d_engine_running_sequences", 0, 3)
    assert metric(server_url, "kv3d_engine_kv_cells_reserved") == 0


def test_metrics_exposes_the_promised_series(server_url, client):
    client.chat.completions.create(model="m", messages=ask("Hi"), max_tokens=4)
    text = httpx.get(f"{server_url}/metrics").text
    for series in (
        'kv3d_requests_total{endpoint="/v1/chat/completions",status="200"}',
        "kv3d_prompt_tokens_total",
        "kv3d_completion_tokens_total",
        "kv3d_active_requests",
        "kv3d_engine_running_sequences",
        "kv3d_engine_waiting_requests",
        "kv3d_time_to_first_token_seconds_bucket",
        "kv3d_inter_token_latency_seconds_bucket",
    ):
        assert series in text, series
    assert metric(server_url, "kv3d_prompt_tokens_total") > 0
    assert metric(server_url, "kv3d_time_to_first_token_seconds_count") > 0


def test_session_header_resumes_the_conversation(server_url):
    system = {"role": "system", "content": "You answer operators of KV3D in one sentence. " * 5}
    turn1 = [system, {"role": "user", "content": "What does kv3d doctor check?"}]
    with httpx.Client(base_url=f"{server_url}/v1", timeout=60) as http:
        headers = {"X-Session-ID": f"conv-{time.time_ns()}"}
        body = {"model": "m", "temperature": 0, "max_tokens": 16}
        first = http.post(
            "/chat/completions", json={**body, "messages": turn1}, headers=headers
        ).json()
        answer = first["choices"][0]["message"]["content"]
        turn2 = turn1 + [
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "And kv3d bench?"},
        ]
        time.sleep(0.5)  # the first turn's delta is encoded in the background
        second = http.post(
            "/chat/completions", json={**body, "messages": turn2}, headers=headers
        ).json()
        # `user` scopes sessions (an end user may hold many), and a request with only it works.
        by_user = http.post(
            "/chat/completions", json={**body, "messages": turn1, "user": "alice"}
        ).json()
    assert first["kv3d"]["prefix_source"] in ("miss", "hot")
    # Still hot (its whole blocks stayed in the KV cache) or back from the warm tier, depending
    # on how busy the replica's holders are: either way the history is not recomputed.
    source = second["kv3d"]["prefix_source"]
    assert source in ("hot", "session")
    if source == "session":
        assert second["kv3d"]["session_resumed_from"] == "warm"
    history = first["usage"]["prompt_tokens"] + first["usage"]["completion_tokens"]
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= history - 32
    assert by_user["choices"][0]["message"]["content"]
    text = httpx.get(f"{server_url}/metrics").text
    assert 'kv3d_sessions{tier="warm"}' in text and "# TYPE kv3d_resume_seconds histogram" in text
