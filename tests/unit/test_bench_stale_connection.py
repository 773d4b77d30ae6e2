"""The benchmark's client sends a request again when a kept-alive connection was closed under it."""

import asyncio

import httpx
import pytest

from kv3d.bench.phases import send_once_more_if_stale


def _client(failures: int, calls: list[int]) -> httpx.AsyncClient:
    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) <= failures:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        return httpx.Response(200, json={"ok": True})

    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


def _send(failures: int, calls: list[int]) -> int:
    async def go() -> int:
        async with _client(failures, calls) as http:
            request = http.build_request("POST", "http://server/v1/chat/completions", json={})
            r = await send_once_more_if_stale(http, request, stream=False)
            return r.status_code

    return asyncio.run(go())


def test_a_request_that_met_a_closed_connection_is_sent_once_more():
    calls: list[int] = []
    assert _send(1, calls) == 200
    assert len(calls) == 2


def test_a_server_that_keeps_dropping_requests_is_a_failure():
    calls: list[int] = []
    with pytest.raises(httpx.RemoteProtocolError):
        _send(2, calls)
    assert len(calls) == 2
