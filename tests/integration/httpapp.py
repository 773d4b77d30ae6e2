"""The in-process HTTP app over a real engine, as the integration tests of the API drive it:
the engine's test config, concurrent calls through an ASGI transport, and request bodies."""

from __future__ import annotations

import asyncio

import httpx

from kv3d.config import load_config
from kv3d.server.api import LocalBackend

KEYS = "key-alpha-123,key-beta-456"
SYSTEM = "You are the support assistant of an inference server company; answer briefly. " * 6


def engine_config(**server):
    return load_config(
        overrides={
            "cache": {"gpu_hot_mb": 96},
            "model": {"context_tokens": 1024},
            "engine": {"max_sequences": 4},
            "server": {"threads": 2, **server},
        }
    )


def call(app, *requests):
    """Send (method, path, kwargs) requests concurrently; returns the responses in order."""

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://kv3d") as http:
            return await asyncio.gather(
                *(http.request(method, path, **kw) for method, path, kw in requests)
            )

    return asyncio.run(go())


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def chat(key: str | None = None, session: str | None = None, **body):
    headers = bearer(key) if key else {}
    if session:
        headers["X-Session-ID"] = session
    payload = {
        "model": "m",
        "temperature": 0,
        "max_tokens": 4,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "How do I change the port?"},
        ],
        **body,
    }
    return ("POST", "/v1/chat/completions", {"json": payload, "headers": headers})


def cached(response: httpx.Response) -> int:
    assert response.status_code == 200, response.text
    return response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def family_body(system: str) -> dict:
    """A 1-token greedy chat under `system` that asks for the first token's top log-probs: how
    the prefix tests compare a recomputed prefix with a shared or restored one."""
    return {
        "model": "m",
        "temperature": 0,
        "max_tokens": 1,
        "logprobs": True,
        "top_logprobs": 10,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": "How do I change the port?"},
        ],
    }


class RecordingBackend(LocalBackend):
    """The real engine, remembering every GenerationRequest the API built."""

    def __init__(self, real):
        super().__init__(real)
        self.requests = []

    def generate(self, request):
        self.requests.append(request)
        return super().generate(request)
