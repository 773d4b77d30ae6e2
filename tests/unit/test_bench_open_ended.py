"""The open-ended probe sends chats without `max_tokens`, counts what finished, and cuts what
outlives its time budget (against a mock transport: the driver's logic, not a server's)."""

import asyncio
import json

import httpx

from kv3d.bench.openended import open_ended_phase

ANSWER = [
    {"choices": [{"delta": {"content": "Three facts."}, "finish_reason": None}]},
    {"choices": [{"delta": {}, "finish_reason": "stop"}]},
    {"choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": 3}},
]


def _sse(chunks) -> bytes:
    return b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n"


def _run(handler, **kw) -> dict:
    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            return await open_ended_phase(http, "http://server", **kw)

    return asyncio.run(go())


def test_chats_set_no_max_tokens_and_every_answer_is_counted():
    bodies = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, content=_sse(ANSWER))

    report = _run(handler, requests=6, concurrency=2, seed=7, nonce="run-a")
    assert len(bodies) == 6
    assert all("run-a" in b["messages"][0]["content"] for b in bodies)
    assert all("max_tokens" not in b and b["stream"] for b in bodies)
    assert sorted(b["seed"] for b in bodies) == list(range(7, 13))
    assert (report["finished"], report["cut"], report["errors"]) == (6, 0, 0)
    assert report["completion_tokens"] == {"p50": 3, "max": 3, "total": 18}
    assert report["ttft_s"]["p50"] is not None and report["requests_per_s"] > 0
    assert report["completion_tokens_per_s"] > 0


def test_streams_still_running_when_the_budget_is_spent_are_cut():
    async def slow():
        yield _sse(ANSWER[:1])[: -len(b"data: [DONE]\n\n")]
        await asyncio.sleep(30)

    def handler(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content)["seed"] == 0:
            return httpx.Response(200, content=_sse(ANSWER))
        return httpx.Response(200, content=slow())

    report = _run(handler, requests=3, concurrency=3, budget_s=0.5)
    assert (report["finished"], report["cut"], report["errors"]) == (1, 2, 0)
    assert report["wall_s"] < 5
