"""The HTTP app without Ray: `kv3d.server.api` over an in-process engine (LocalBackend)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from kv3d.config import load_config
from kv3d.engine.engine import Engine
from kv3d.server.api import LocalBackend, ServedModel, build_api
from kv3d.server.chat import Tokenizer

pytestmark = pytest.mark.integration


def test_api_serves_over_an_in_process_engine(smollm2_path):
    cfg = load_config(overrides={"cache": {"gpu_hot_mb": 64}, "model": {"context_tokens": 512}})
    tok = Tokenizer.load(smollm2_path)
    with Engine.from_config(cfg) as engine:
        served = ServedModel(engine.model_id, tok, context_tokens=512)
        app = build_api(served, LocalBackend(engine))

        async def calls():
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://kv3d") as http:
                ok = await http.post(
                    "/v1/chat/completions",
                    json={
                        "model": "m",
                        "max_tokens": 6,
                        "temperature": 0,
                        "messages": [{"role": "user", "content": "Say hello."}],
                    },
                )
                bad = await http.post("/v1/chat/completions", json={"messages": []})
                metrics = await http.get("/metrics")
                return ok, bad, metrics

        ok, bad, metrics = asyncio.run(calls())
    tok.close()
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]
    assert ok.json()["usage"]["completion_tokens"] <= 6
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"
    assert "kv3d_engine_steps_total" in metrics.text
