"""Open-ended answers: chats that set no `max_tokens`, as many clients send them.

The server decides how long each answer may grow (KV3D: what the context leaves). A server
that reserved KV cells for all of that when it admitted a request would run such requests one
at a time whenever its cache is smaller than its slots times the context; this probe measures
them on any OpenAI-compatible server: requests/s, TTFT and answer lengths. Answers are sampled
(temperature 0.8, one seed per request) so that they end by themselves at varied lengths: a
greedy answer from a small model can ramble to the end of the context. Streams still running
when the time budget is spent are cut and counted, so a run's length is bounded. An answer
that rambles to the end of the context makes the run's requests/s depend on when it ends:
completion tokens/s is the steadier figure of throughput.
"""

from __future__ import annotations

import asyncio
import time

import httpx

from kv3d.bench.phases import StreamError, chat_body, read_chat_stream
from kv3d.bench.workload import latency_stats

TOPICS = (
    "the ocean", "a robot", "bread", "mountains", "a lighthouse", "tea", "trains", "a garden",
    "winter", "chess", "bees", "the moon", "a library", "rain", "a violin", "coffee",
)  # fmt: skip


def open_ended_body(index: int, nonce: str, seed: int) -> dict:
    """Request `index`'s body: a short chat with no `max_tokens`."""
    topic = TOPICS[index % len(TOPICS)]
    messages = [
        {"role": "system", "content": f"You are a helpful assistant (run {nonce})."},
        {"role": "user", "content": f"Tell me three facts about {topic}."},
    ]
    body = chat_body(messages, 1, temperature=0.8, seed=seed + index)
    del body["max_tokens"]
    return body


async def open_ended_phase(
    http: httpx.AsyncClient,
    url: str,
    *,
    requests: int = 32,
    concurrency: int = 16,
    budget_s: float = 120.0,
    seed: int = 0,
    nonce: str = "",
) -> dict:
    """`requests` open-ended chats, `concurrency` at once, within `budget_s` seconds. The same
    `nonce` and `seed` give every server the same prompts (empty: a fresh nonce)."""
    nonce = nonce or f"{time.time_ns():x}"
    slots = asyncio.Semaphore(concurrency)
    started = time.perf_counter()
    deadline = started + budget_s
    done, cut, errors = [], 0, 0

    async def one(index: int) -> None:
        nonlocal cut, errors
        async with slots:
            left_s = deadline - time.perf_counter()
            if left_s <= 0:
                cut += 1
                return
            body = open_ended_body(index, nonce, seed)
            try:
                done.append(await asyncio.wait_for(read_chat_stream(http, url, body), left_s))
            except TimeoutError:
                cut += 1
            except StreamError:
                errors += 1

    await asyncio.gather(*(one(i) for i in range(requests)))
    wall_s = time.perf_counter() - started
    lengths = sorted((r.usage or {}).get("completion_tokens", r.content_chunks) for r in done)
    return {
        "requests": requests,
        "concurrency": concurrency,
        "budget_s": budget_s,
        "finished": len(done),
        "cut": cut,
        "errors": errors,
        "wall_s": round(wall_s, 2),
        "requests_per_s": round(len(done) / wall_s, 3) if wall_s > 0 else None,
        "completion_tokens_per_s": round(sum(lengths) / wall_s, 1) if wall_s > 0 else None,
        "ttft_s": latency_stats([r.ttft_s for r in done if r.ttft_s is not None]),
        "completion_tokens": {
            "p50": lengths[len(lengths) // 2] if lengths else None,
            "max": lengths[-1] if lengths else None,
            "total": sum(lengths),
        },
    }
