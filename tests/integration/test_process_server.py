"""`kv3d serve` in one process (`server.runtime=process`): family prefixes evicted from the KV
cache come back from the process's own snapshot store, bit for bit."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest

from kv3d.config import load_config
from kv3d.engine.engine import Engine
from kv3d.server.local import build_local_app
from tests.integration.httpapp import family_body

pytestmark = pytest.mark.integration


def _system(tag: str) -> str:
    return f"Family {tag} {uuid.uuid4().hex}. " + (
        "You are the support assistant of an inference server company; answer in one line. " * 6
    )


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} missing")


def test_an_evicted_family_prefix_is_restored_from_the_local_store(smollm2_path):
    # One hot prefix at a time: the second family evicts the first from the KV cache.
    cfg = load_config(
        overrides={
            "model": {"path": str(smollm2_path), "context_tokens": 1024},
            "cache": {"gpu_hot_mb": 64, "auto_sessions": False},
            "prefix": {"max_hot": 1, "snapshot_min_tokens": 32},
        }
    )
    a, b = family_body(_system("A")), family_body(_system("B"))
    with Engine.from_config(cfg) as engine:
        app = build_local_app(cfg, engine)

        async def calls():
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://kv3d") as http:
                answers = []
                for body in (a, b, a):
                    r = await http.post("/v1/chat/completions", json=body, timeout=120)
                    assert r.status_code == 200, r.text
                    answers.append(r.json())
                stats = (await http.get("/v1/kv3d/stats")).json()
                metrics = (await http.get("/metrics")).text
                return answers, stats, metrics

        answers, stats, metrics = asyncio.run(calls())
        engine_stats = engine.stats()
    first, _, again = answers

    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert engine_stats.snapshots_published_total >= 2
    assert engine_stats.snapshot_restores_total == 1
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 100
    assert _metric(metrics, "kv3d_snapshots") >= 2

    # Recomputed at first, restored from the store later: the same bits (chunking is fixed).
    def top(answer):
        return [
            (t["token"], t["logprob"])
            for t in answer["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        ]

    assert top(again) == top(first)
    # The stats route shows the local store's families (an open API sees them all).
    assert len(stats["families"]) >= 2 and any(f["hits"] >= 1 for f in stats["families"])
