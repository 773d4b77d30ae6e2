"""Benchmark driver: measures a running OpenAI-compatible server and prints one JSON report.

Phases, each against the same server in one run:
- `prefix`: a ~1,000-token system prompt shared by successive requests; TTFT when its KV was
  computed (miss), shared from the replica's hot cache, or restored from a snapshot (seen with
  2+ replicas), read from KV3D's `kv3d.prefix_source` response extension;
- `prefill`: one long prompt, `max_tokens=1`; prompt tokens / time to first token;
- `single_stream`: one streaming request; decode tokens/s after the first token;
- `concurrent`: N streaming requests at once; aggregate generated tokens/s, TTFT p50/p95.

`routing_phase` is the shared-prefix workload that `kv3d bench --routers` runs once per routing
policy (deployments/compare.py deploys the app for each).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import statistics
import time
from dataclasses import dataclass, field

import httpx

FILLER = (
    "KV3D keeps the key-value cache of a shared prompt prefix once and lets every session reuse "
    "it, so long system prompts stop costing prefill time for each new conversation. "
)


@dataclass(slots=True)
class StreamResult:
    ttft_s: float
    total_s: float
    completion_tokens: int
    prompt_tokens: int
    itl_s: list[float] = field(default_factory=list)
    cached_tokens: int = 0
    prefix_source: str = "miss"  # KV3D's extension: miss | hot | snapshot | session
    text: str = ""
    session_resume_ms: float | None = None

    @property
    def decode_tokens_per_s(self) -> float:
        decode_s = self.total_s - self.ttft_s
        return (self.completion_tokens - 1) / decode_s if decode_s > 0 else 0.0


async def stream_chat(
    http: httpx.AsyncClient,
    url: str,
    messages: list[dict],
    max_tokens: int,
    headers: dict | None = None,
    **extra,
) -> StreamResult:
    body = {
        "model": "bench",
        "messages": messages,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.0,
        **extra,
    }
    started = time.perf_counter()
    first = last = None
    itl: list[float] = []
    usage = ext = None
    text = []
    async with http.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            usage = chunk.get("usage") or usage
            ext = chunk.get("kv3d") or ext
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                text.append(chunk["choices"][0]["delta"]["content"])
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    itl.append(now - last)
                last = now
    end = time.perf_counter()
    if usage is None:
        raise RuntimeError("the server sent no usage chunk")
    return StreamResult(
        ttft_s=(first or end) - started,
        total_s=end - started,
        completion_tokens=usage["completion_tokens"],
        prompt_tokens=usage["prompt_tokens"],
        itl_s=itl,
        cached_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
        prefix_source=(ext or {}).get("prefix_source", "miss"),
        text="".join(text),
        session_resume_ms=(ext or {}).get("session_resume_ms"),
    )


async def prefix_phase(
    http: httpx.AsyncClient, url: str, system_words: int, max_tries: int = 12
) -> dict:
    """TTFT with a long shared system prompt: the first request (miss), then the same family
    until requests have been served both hot and, with 2+ replicas, from a snapshot."""
    nonce = f"Deployment {time.time_ns()}."  # a family no earlier run left in any cache
    system = nonce + " " + " ".join((FILLER * (system_words // 20 + 1)).split()[:system_words])
    by_source: dict[str, list[StreamResult]] = {}
    for i in range(max_tries):
        messages = [
            {"role": "system", "content": system},
            {"role": "user", "content": f"Question {i}: what does KV3D share?"},
        ]
        result = await stream_chat(http, url, messages, 1)
        by_source.setdefault(result.prefix_source, []).append(result)
        if i >= 2 and "hot" in by_source and "snapshot" in by_source:
            break
        await asyncio.sleep(0.2)  # lets a published snapshot reach the registry
    miss = by_source["miss"][0]
    out = {"prompt_tokens": miss.prompt_tokens, "requests": sum(map(len, by_source.values()))}
    for source, results in by_source.items():
        out[f"ttft_{source}_s"] = round(statistics.median(r.ttft_s for r in results), 4)
        out[f"cached_tokens_{source}"] = results[0].cached_tokens
    for source in ("hot", "snapshot"):
        if f"ttft_{source}_s" in out:
            out[f"speedup_{source}"] = round(out["ttft_miss_s"] / out[f"ttft_{source}_s"], 1)
    return out


def _filler(words: int, nonce: str = "") -> str:
    return (nonce + " " + " ".join((FILLER * (words // 20 + 1)).split()[:words])).strip()


async def session_phase(
    http: httpx.AsyncClient,
    url: str,
    *,
    sessions: int = 6,
    system_words: int = 750,
    private_words: int = 600,
) -> dict:
    """Conversations of a ~1,000-token shared system prompt and ~800 private tokens: their
    second turn resumed (hot, or from the warm tier) vs the same turn recomputed (family prefix
    hot). `resume_ms_*` cover warm/cold resumes only."""
    nonce = f"Sessions {time.time_ns()}."
    system = {"role": "system", "content": _filler(system_words, nonce)}
    resumed, recomputed = [], []
    for i in range(sessions):
        headers = {"X-Session-ID": f"{nonce}-{i}"}
        turn1 = [system, {"role": "user", "content": _filler(private_words, f"Case {i}.")}]
        first = await stream_chat(http, url, turn1, 24, headers)
        turn2 = turn1 + [
            {"role": "assistant", "content": first.text},
            {"role": "user", "content": "Summarise that in one line."},
        ]
        await asyncio.sleep(0.3)  # the first turn's delta is encoded off the request path
        resumed.append(await stream_chat(http, url, turn2, 1, headers))
        # The same conversation with one changed word early in the private part: only the
        # family prefix is reusable, the rest is prefilled again.
        changed = [system, {"role": "user", "content": "Changed. " + turn1[1]["content"]}]
        changed += turn2[2:]
        recomputed.append(await stream_chat(http, url, changed, 1))
    resume_ms = [r.session_resume_ms for r in resumed if r.session_resume_ms is not None]
    return {
        "sessions": sessions,
        "history_tokens": resumed[0].prompt_tokens,
        # "hot": the idle session was still in the KV cache; "session": restored from the warm
        # or cold tier (serve with prefix.max_hot=1 to measure that path alone).
        "resumed_from": {s: sum(r.prefix_source == s for r in resumed) for s in ("hot", "session")},
        "cached_tokens_resumed": statistics.median(r.cached_tokens for r in resumed),
        "cached_tokens_recomputed": statistics.median(r.cached_tokens for r in recomputed),
        "resume_ms_p50": round(_pct(resume_ms, 0.5), 2),
        "resume_ms_p95": round(_pct(resume_ms, 0.95), 2),
        "ttft_resumed_s": round(statistics.median(r.ttft_s for r in resumed), 4),
        "ttft_recomputed_s": round(statistics.median(r.ttft_s for r in recomputed), 4),
    }


async def capacity_phase(
    http: httpx.AsyncClient,
    url: str,
    *,
    sessions: int,
    shared_ratio: float = 0.8,
    system_words: int = 750,
    max_tokens: int = 32,
    watch_s: float = 8.0,
) -> dict:
    """How many sessions the server runs at once: `sessions` long streams, `shared_ratio` of
    them on one ~1,000-token system prompt, the rest short chats with system prompts of their
    own; the peak of running sequences while they are admitted (KV cells are what limits it)."""
    nonce = f"Capacity {time.time_ns()}."
    shared = {"role": "system", "content": _filler(system_words, nonce)}
    await stream_chat(http, url, [shared, {"role": "user", "content": "Hi"}], 1)  # warm it

    def messages(i: int) -> list[dict]:
        # `shared_ratio` of the sessions share, spread evenly through the (FIFO) queue.
        sharing = int((i + 1) * shared_ratio) > int(i * shared_ratio)
        own = {"role": "system", "content": _filler(30, f"{nonce} Own {i}.")}
        system = shared if sharing else own
        return [system, {"role": "user", "content": f"Session {i}: tell me a long story."}]

    tasks = [
        asyncio.create_task(
            stream_chat(
                http, url, messages(i), max_tokens, temperature=0.8, seed=i, ignore_eos=True
            )
        )
        for i in range(sessions)
    ]
    peak, deadline = 0, time.perf_counter() + watch_s
    while time.perf_counter() < deadline:
        await asyncio.sleep(0.5)
        metrics = (await http.get(f"{url}/metrics")).text
        for line in metrics.splitlines():
            if line.startswith("kv3d_engine_running_sequences "):
                peak = max(peak, int(float(line.split()[1])))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {"sessions_sent": sessions, "shared_ratio": shared_ratio, "peak_running_sessions": peak}


async def idle_session_bytes(http: httpx.AsyncClient, url: str) -> dict:
    """Bytes per idle session in each tier, from the server's own metrics."""
    values: dict[str, float] = {}
    for line in (await http.get(f"{url}/metrics")).text.splitlines():
        if line.startswith(("kv3d_sessions{", "kv3d_tier_bytes{", "kv3d_delta_compression")):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    out = {"delta_compression_ratio": values.get("kv3d_delta_compression_ratio", 0.0)}
    for tier in ("warm", "cold"):
        n = values.get(f'kv3d_sessions{{tier="{tier}"}}', 0)
        b = values.get(f'kv3d_tier_bytes{{tier="{tier}"}}', 0)
        out[f"sessions_{tier}"] = int(n)
        out[f"bytes_per_{tier}_session"] = round(b / n) if n else None
    return out


async def routing_phase(
    http: httpx.AsyncClient,
    url: str,
    *,
    families: int = 4,
    sessions_per_family: int = 3,
    turns: int = 3,
    concurrency: int = 4,
    system_words: int = 400,
    seed: int = 0,
    nonce: str = "",
) -> dict:
    """The shared-prefix workload for comparing routers: `families` long system prompts, each
    shared by `sessions_per_family` conversations of `turns` turns (X-Session-ID), started in a
    seeded random order, `concurrency` conversations at a time. Reports the prefix hit rate,
    where each request's KV came from, and TTFT percentiles."""
    rng = random.Random(seed)
    nonce = nonce or f"{time.time_ns()}"
    systems = [
        f"Tenant {f} of run {nonce}. " + _filler(system_words, f"{f}") for f in range(families)
    ]
    work = [(f, s) for f in range(families) for s in range(sessions_per_family)]
    rng.shuffle(work)
    gate = asyncio.Semaphore(concurrency)

    async def conversation(family: int, n: int) -> list[StreamResult]:
        messages = [{"role": "system", "content": systems[family]}]
        headers = {"X-Session-ID": f"bench-{nonce}-{family}-{n}"}
        out = []
        async with gate:
            for t in range(turns):
                messages.append({"role": "user", "content": f"Question {n}.{t}: sizing tips?"})
                r = await stream_chat(http, url, messages, 8, headers=headers)
                messages.append({"role": "assistant", "content": r.text})
                out.append(r)
        return out

    started = time.perf_counter()
    done = await asyncio.gather(*(conversation(f, n) for f, n in work))
    wall_s = time.perf_counter() - started
    results = [r for conv in done for r in conv]
    ttfts = [r.ttft_s for r in results]
    sources: dict[str, int] = {}
    for r in results:
        sources[r.prefix_source] = sources.get(r.prefix_source, 0) + 1
    prompt = sum(r.prompt_tokens for r in results)
    return {
        "requests": len(results),
        "prompt_tokens_mean": round(prompt / len(results), 1),
        "prefix_hit_rate": round(sum(r.cached_tokens > 0 for r in results) / len(results), 4),
        "cached_token_fraction": round(sum(r.cached_tokens for r in results) / prompt, 4),
        "by_source": dict(sorted(sources.items())),
        "ttft_p50_s": round(_pct(ttfts, 0.5), 4),
        "ttft_p95_s": round(_pct(ttfts, 0.95), 4),
        "ttft_by_source_p50_s": {
            source: round(_pct([r.ttft_s for r in results if r.prefix_source == source], 0.5), 4)
            for source in sorted(sources)
        },
        "wall_s": round(wall_s, 2),
    }


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def run_bench(
    url: str,
    *,
    concurrency: int = 8,
    max_tokens: int = 128,
    prefill_words: int = 600,
    prefix_words: int = 750,
    capacity_sessions: int = 0,
    session_count: int = 6,
    session_words: int = 600,
) -> dict:
    timeout = httpx.Timeout(600.0)
    async with httpx.AsyncClient(timeout=timeout) as http:
        ask = lambda text: [{"role": "user", "content": text}]  # noqa: E731
        await stream_chat(http, url, ask("Warm up."), 4)

        if capacity_sessions:
            return {
                "url": url,
                "capacity": await capacity_phase(http, url, sessions=capacity_sessions),
            }

        prefix = await prefix_phase(http, url, prefix_words)
        sessions = await session_phase(
            http,
            url,
            sessions=session_count,
            system_words=prefix_words,
            private_words=session_words,
        )
        idle = await idle_session_bytes(http, url)

        # Unique per run: a cached copy from an earlier run would not measure prefill.
        long_prompt = f"Run {time.time_ns()}. " + " ".join(
            (FILLER * (prefill_words // 20 + 1)).split()[:prefill_words]
        )
        prefill = await stream_chat(http, url, ask(long_prompt + "\nSummarise."), 1)

        story = ask("Write a long, detailed story about a lighthouse keeper.")
        # ignore_eos (KV3D extension): every stream runs to max_tokens, so runs compare.
        single = await stream_chat(
            http, url, story, max_tokens, temperature=0.8, seed=1, ignore_eos=True
        )

        started = time.perf_counter()
        many = await asyncio.gather(
            *(
                stream_chat(
                    http, url, story, max_tokens, temperature=0.8, seed=100 + i, ignore_eos=True
                )
                for i in range(concurrency)
            )
        )
        wall_s = time.perf_counter() - started

    ttfts = [r.ttft_s for r in many]
    itls = [x for r in many for x in r.itl_s]
    generated = sum(r.completion_tokens for r in many)
    return {
        "url": url,
        "prefix": prefix,
        "sessions": sessions,
        "idle_session_bytes": idle,
        "prefill": {
            "prompt_tokens": prefill.prompt_tokens,
            "ttft_s": round(prefill.ttft_s, 4),
            "prefill_tokens_per_s": round(prefill.prompt_tokens / prefill.ttft_s, 1),
        },
        "single_stream": {
            "completion_tokens": single.completion_tokens,
            "ttft_s": round(single.ttft_s, 4),
            "decode_tokens_per_s": round(single.decode_tokens_per_s, 1),
        },
        "concurrent": {
            "streams": concurrency,
            "completion_tokens": generated,
            "wall_s": round(wall_s, 3),
            "aggregate_tokens_per_s": round(generated / wall_s, 1),
            "ttft_p50_s": round(statistics.median(ttfts), 4),
            "ttft_p95_s": round(_pct(ttfts, 0.95), 4),
            "itl_p50_s": round(_pct(itls, 0.5), 4),
            "itl_p95_s": round(_pct(itls, 0.95), 4),
        },
    }


def main_bench(
    url: str, concurrency: int, max_tokens: int, json_path: str | None, capacity: int = 0
) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    report = asyncio.run(
        run_bench(url, concurrency=concurrency, max_tokens=max_tokens, capacity_sessions=capacity)
    )
    text = json.dumps(report, indent=2)
    if json_path:
        with open(json_path, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0
