"""Benchmark driver: measures an OpenAI-compatible server and reports in JSON.

Here: reading a streamed chat response from any OpenAI-compatible server (`read_chat_stream`),
KV3D's `/metrics` (`kv3d.bench.scrape`), and KV3D's own phases. The seed's multi-turn workload
(`kv3d bench --requests N`) is kv3d/bench/workload.py; kv3d/bench/compare.py starts servers and
compares them side by side.

KV3D's phases (`kv3d bench` without `--requests`), each against the same server in one run:
- `prefix`: a ~1,000-token system prompt shared by successive requests; TTFT when its KV was
  computed (miss), shared from the replica's hot cache, or restored from a snapshot (seen with
  2+ replicas), read from KV3D's `kv3d.prefix_source` response extension;
- `sessions`: second turns of long conversations, resumed vs recomputed;
- `prefill`: one long prompt, `max_tokens=1`; prompt tokens / time to first token;
- `single_stream`: one streaming request; decode tokens/s after the first token;
- `concurrent`: N streaming requests at once; aggregate generated tokens/s, TTFT p50/p95;
- `capacity` (`--capacity N`, alone): how many of N sessions run at once.

`routing_phase` is the shared-prefix workload that `kv3d bench --routers` runs once per routing
policy (deployments/compare.py deploys the app for each).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from kv3d.bench.scrape import MetricsSample, idle_session_bytes, read_metrics

log = logging.getLogger(__name__)

FILLER = (
    "KV3D keeps the key-value cache of a shared prompt prefix once and lets every session reuse "
    "it, so long system prompts stop costing prefill time for each new conversation. "
)


class StreamError(RuntimeError):
    """A chat stream that did not complete; `kind` names the failure for the error counts."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


@dataclass(slots=True)
class RawStream:
    """One streamed chat completion as the server sent it: `usage` and `ext` (KV3D's `kv3d`
    extension object) are None when the server sent none, and nothing is assumed for them."""

    ttft_s: float | None  # None: the stream carried no content
    total_s: float
    itl_s: list[float]
    text: str
    content_chunks: int
    usage: dict | None
    ext: dict | None


async def send_once_more_if_stale(
    http: httpx.AsyncClient, request: httpx.Request, *, stream: bool = True
) -> httpx.Response:
    """Send `request`, and once more on a new connection when the server closed the kept-alive
    one before answering: llama-server drops idle connections, and a request that raced that
    close was never read, so it is not the server's failure to count."""
    try:
        return await http.send(request, stream=stream)
    except httpx.RemoteProtocolError:
        return await http.send(request, stream=stream)


async def read_chat_stream(
    http: httpx.AsyncClient,
    url: str,
    body: dict,
    headers: dict | None = None,
    on_first_token: Callable[[], None] | None = None,
) -> RawStream:
    """POST a streaming chat completion and time it; raises `StreamError` unless the server
    answered 200 and ended the stream properly (a finish reason or `[DONE]`)."""
    started = time.perf_counter()
    first = last = None
    itl: list[float] = []
    usage = ext = None
    text: list[str] = []
    finished = False
    request = http.build_request("POST", f"{url}/v1/chat/completions", json=body, headers=headers)
    try:
        async with contextlib.aclosing(await send_once_more_if_stale(http, request)) as r:
            if r.status_code != 200:
                raise StreamError(f"http_{r.status_code}", repr((await r.aread())[:200]))
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    finished = True
                    continue
                if not line.startswith("data: "):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise StreamError("stream_error", str(chunk["error"].get("message")))
                usage = chunk.get("usage") or usage
                ext = chunk.get("kv3d") or ext
                choice = chunk["choices"][0] if chunk.get("choices") else {}
                finished = finished or bool(choice.get("finish_reason"))
                if (choice.get("delta") or {}).get("content"):
                    text.append(choice["delta"]["content"])
                    now = time.perf_counter()
                    if first is None:
                        first = now
                        if on_first_token is not None:
                            on_first_token()
                    else:
                        itl.append(now - last)
                    last = now
    except httpx.TimeoutException as exc:
        raise StreamError("timeout", type(exc).__name__) from exc
    except httpx.HTTPError as exc:  # refused, reset, or a body cut off mid-chunk
        raise StreamError("transport", f"{type(exc).__name__}: {exc}") from exc
    except (json.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
        raise StreamError("bad_chunk", f"{type(exc).__name__}: {exc}") from exc
    if not finished:
        raise StreamError("broken_stream", "the stream ended without a finish reason")
    end = time.perf_counter()
    return RawStream(
        ttft_s=None if first is None else first - started,
        total_s=end - started,
        itl_s=itl,
        text="".join(text),
        content_chunks=len(text),
        usage=usage,
        ext=ext,
    )


def chat_body(messages: list[dict], max_tokens: int, **extra) -> dict:
    return {
        "model": "bench",
        "messages": messages,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.0,
        **extra,
    }


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
    """One streamed chat turn from a server that reports usage (KV3D's phases need it)."""
    raw = await read_chat_stream(http, url, chat_body(messages, max_tokens, **extra), headers)
    if raw.usage is None:
        raise StreamError("no_usage", "the server sent no usage chunk")
    usage, ext = raw.usage, raw.ext or {}
    return StreamResult(
        ttft_s=raw.total_s if raw.ttft_s is None else raw.ttft_s,
        total_s=raw.total_s,
        completion_tokens=usage["completion_tokens"],
        prompt_tokens=usage["prompt_tokens"],
        itl_s=raw.itl_s,
        cached_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
        prefix_source=ext.get("prefix_source", "miss"),
        text=raw.text,
        session_resume_ms=ext.get("session_resume_ms"),
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
        "resume_ms_p50": round(percentile(resume_ms, 0.5), 2),
        "resume_ms_p95": round(percentile(resume_ms, 0.95), 2),
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
    sample_period_s: float = 0.5,
) -> dict:
    """How many sessions the server runs at once: `sessions` long streams, `shared_ratio` of
    them on one ~1,000-token system prompt, the rest short chats with system prompts of their
    own. Counted two ways: by the client, the most streams that had sent a token and not yet
    finished (any server), and by KV3D's `kv3d_engine_running_sequences` gauge, with the hot KV
    bytes per session while they run (KV cells are what limits it). Streams still running after
    `watch_s` are cut."""
    nonce = f"Capacity {time.time_ns()}."
    shared = {"role": "system", "content": _filler(system_words, nonce)}
    # Warm the shared prompt: the measurement is of sessions, not of the first prefill.
    await read_chat_stream(http, url, chat_body([shared, {"role": "user", "content": "Hi"}], 1))

    def messages(i: int) -> list[dict]:
        # `shared_ratio` of the sessions share, spread evenly through the (FIFO) queue.
        sharing = int((i + 1) * shared_ratio) > int(i * shared_ratio)
        own = {"role": "system", "content": _filler(30, f"{nonce} Own {i}.")}
        system = shared if sharing else own
        return [system, {"role": "user", "content": f"Session {i}: tell me a long story."}]

    streaming = peak_streaming = 0

    async def session(i: int) -> None:
        nonlocal streaming
        began = False

        def first_token() -> None:
            nonlocal began, streaming, peak_streaming
            began, streaming = True, streaming + 1
            peak_streaming = max(peak_streaming, streaming)

        # ignore_eos (KV3D extension, ignored elsewhere): every stream runs to max_tokens.
        body = chat_body(messages(i), max_tokens, temperature=0.8, seed=i, ignore_eos=True)
        try:
            await read_chat_stream(http, url, body, on_first_token=first_token)
        finally:
            if began:
                streaming -= 1

    tasks = [asyncio.create_task(session(i)) for i in range(sessions)]
    samples: list[MetricsSample] = []
    deadline = time.perf_counter() + watch_s
    while time.perf_counter() < deadline and not all(t.done() for t in tasks):
        await asyncio.wait(tasks, timeout=sample_period_s)
        sample = await read_metrics(http, url)
        if sample is not None:
            samples.append(sample)
    for task in tasks:
        task.cancel()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    per_session = [s.hot_bytes_per_session for s in samples if s.hot_bytes_per_session]
    at_peak = max(samples, key=lambda s: s.running_sequences, default=None)
    cells = at_peak.kv_cells_per_running_session if at_peak else None
    return {
        "sessions_sent": sessions,
        "shared_ratio": shared_ratio,
        "max_tokens": max_tokens,
        "peak_streaming_sessions": peak_streaming,
        # None: the server has no KV3D /metrics (not 0: nothing was measured).
        "peak_running_sessions": at_peak.running_sequences if at_peak else None,
        "hot_bytes_per_session": round(statistics.mean(per_session)) if per_session else None,
        # In use at the peak: a session still in prefill holds fewer cells than it reserved.
        "hot_bytes_per_session_at_peak": rounded(at_peak.hot_bytes_per_session)
        if at_peak
        else None,
        "kv_cells_per_session_at_peak": None if cells is None else round(cells, 1),
        "kv_cells_total": at_peak.kv_cells_total if at_peak else None,
        "completed": sum(o is None for o in outcomes),
        "errors": sum(isinstance(o, StreamError) for o in outcomes),
        "cut_at_deadline": sum(isinstance(o, asyncio.CancelledError) for o in outcomes),
    }


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
        "ttft_p50_s": round(percentile(ttfts, 0.5), 4),
        "ttft_p95_s": round(percentile(ttfts, 0.95), 4),
        "ttft_by_source_p50_s": {
            source: round(
                percentile([r.ttft_s for r in results if r.prefix_source == source], 0.5), 4
            )
            for source in sorted(sources)
        },
        "wall_s": round(wall_s, 2),
    }


def rounded(value: float | None) -> int | None:
    return None if value is None else round(value)


def percentile(values: list[float], q: float) -> float:
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

        one_token = await one_token_latency(http, url, ask("Say hi."))

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
        "one_token_latency": one_token,
        "concurrent": {
            "streams": concurrency,
            "completion_tokens": generated,
            "wall_s": round(wall_s, 3),
            "aggregate_tokens_per_s": round(generated / wall_s, 1),
            "ttft_p50_s": round(statistics.median(ttfts), 4),
            "ttft_p95_s": round(percentile(ttfts, 0.95), 4),
            "itl_p50_s": round(percentile(itls, 0.5), 4),
            "itl_p95_s": round(percentile(itls, 0.95), 4),
        },
    }


async def one_token_latency(
    http: httpx.AsyncClient,
    url: str,
    messages: list[dict],
    requests: int = 10,
    vary: Callable[[int], str] | None = None,
) -> dict:
    """Wall time of non-streamed 1-token requests one after another: what a short call costs
    end to end (HTTP, routing, a short prefill, one decode). `vary(i)`, when given, is the last
    message's text of request i (a prompt nothing has cached)."""
    body = {**chat_body(messages, 1), "stream": False}
    del body["stream_options"]  # only valid on a stream
    latencies = []
    for i in range(requests):
        if vary is not None:
            body["messages"] = [*messages[:-1], {**messages[-1], "content": vary(i)}]
        started = time.perf_counter()
        request = http.build_request("POST", f"{url}/v1/chat/completions", json=body)
        r = await send_once_more_if_stale(http, request, stream=False)
        if r.status_code != 200:
            raise StreamError(f"http_{r.status_code}", r.text[:200])
        latencies.append(time.perf_counter() - started)
    return {
        "requests": requests,
        "p50_ms": round(1000 * percentile(latencies, 0.5), 1),
        "p95_ms": round(1000 * percentile(latencies, 0.95), 1),
    }


DECODE_PROMPT = "Write a long, detailed story about a lighthouse keeper."


def _generated_tokens(raw: RawStream) -> tuple[int, str]:
    """Tokens a stream generated: its usage, else one per content chunk (servers that send no
    usage on a stream send a chunk per token)."""
    if raw.usage is not None and raw.usage.get("completion_tokens"):
        return int(raw.usage["completion_tokens"]), "usage"
    return raw.content_chunks, "chunks"


async def decode_phase(
    http: httpx.AsyncClient,
    url: str,
    max_tokens: int = 128,
    streams: int = 8,
    single_runs: int = 3,
    one_token_requests: int = 10,
) -> dict:
    """Raw decode speed of any OpenAI-compatible server, measured on a quiet server: one stream
    (median of `single_runs`), `streams` streams at once (aggregate), and the wall time of
    1-token requests, the same prompt repeated (what a prompt cache serves) and a new prompt
    each time (a short call with nothing cached). Streams run to `max_tokens` (`ignore_eos`,
    which llama-server and KV3D honour) at temperature 0.8, so that they differ."""
    messages = [{"role": "user", "content": DECODE_PROMPT}]

    async def one(seed: int) -> tuple[RawStream, int, str]:
        body = chat_body(messages, max_tokens, temperature=0.8, seed=seed, ignore_eos=True)
        raw = await read_chat_stream(http, url, body)
        return (raw, *_generated_tokens(raw))

    await one(0)  # warm up: what a first request costs is not decode speed
    single, counted_by = [], "usage"
    for run in range(single_runs):
        raw, tokens, counted_by = await one(1 + run)
        decode_s = raw.total_s - (raw.ttft_s or raw.total_s)
        single.append((tokens - 1) / decode_s if tokens > 1 and decode_s > 0 else 0.0)

    started = time.perf_counter()
    many = await asyncio.gather(*(one(100 + i) for i in range(streams)))
    wall_s = time.perf_counter() - started
    generated = sum(tokens for _, tokens, _ in many)

    hi = [{"role": "user", "content": "Say hi."}]
    repeated = await one_token_latency(http, url, hi, one_token_requests)
    # Unique from the first word on: a prompt cache that matches token by token (llama-server's
    # slots) would otherwise serve all but the last few tokens of a shared lead.
    new = await one_token_latency(
        http, url, hi, one_token_requests, vary=lambda i: f"{uuid.uuid4().hex} Say hi."
    )
    return {
        "max_tokens": max_tokens,
        "tokens_counted_by": counted_by,
        "single_stream_tokens_per_s": round(statistics.median(single), 1),
        "single_stream_runs_tokens_per_s": [round(x, 1) for x in single],
        "streams": streams,
        "aggregate_tokens_per_s": round(generated / wall_s, 1),
        "aggregate_completion_tokens": generated,
        "one_token_repeated_prompt": repeated,
        "one_token_new_prompt": new,
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
