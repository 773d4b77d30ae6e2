"""The seed's benchmark workload (`kv3d bench --requests N`, `run_workload`): multi-turn chat
conversations, most of them opening with one of a few long system prompts of real text, the rest
with one of their own.

Reports TTFT, inter-token latency, requests/s, tokens/s, prefix hit rate, resumed sessions and
memory per session (KV3D's `/metrics`). It works against any OpenAI-compatible server: figures a
server does not report (KV3D's `cached_tokens` and `kv3d` extension, its `/metrics`) are None.
"""

from __future__ import annotations

import asyncio
import logging
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import httpx

from kv3d.bench.phases import (
    RawStream,
    StreamError,
    chat_body,
    percentile,
    read_chat_stream,
)
from kv3d.bench.scrape import MetricsSample, read_metrics

log = logging.getLogger(__name__)

QUESTIONS = (
    "What is the main point of the text above?",
    "Which detail in it matters most, and why?",
    "Summarise that in one sentence.",
    "What would you ask the author next?",
    "Name one thing that could go wrong there.",
    "Explain it to a ten-year-old.",
    "What happens next, do you think?",
    "Suggest a title for it.",
)


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    """`requests` chat requests in conversations of `turns` turns; `shared_ratio` of the
    conversations open with one of `families` system prompts, the rest with one of their own,
    each `system_words` words of real text (a few hundred tokens). With `example_turns`, a
    family's conversations then go on with that many worked examples (a user question about
    the text and an answer quoting it, the same for every conversation of the family), as
    few-shot prompts do: what sessions share past their system prompt."""

    requests: int = 1000
    shared_ratio: float = 0.8
    turns: int = 3
    concurrency: int = 8
    max_tokens: int = 16
    families: int = 4
    system_words: int = 250
    seed: int = 0
    nonce: str = ""  # marks the run's prompts, so that no earlier run's cache serves them
    example_turns: int = 0

    def __post_init__(self) -> None:
        if self.requests < 1 or self.turns < 1 or self.concurrency < 1 or self.families < 1:
            raise ValueError("requests, turns, concurrency and families must be at least 1")
        if not 0.0 <= self.shared_ratio <= 1.0:
            raise ValueError(f"shared_ratio must be within [0, 1], not {self.shared_ratio}")
        if self.max_tokens < 1 or self.system_words < 1:
            raise ValueError("max_tokens and system_words must be at least 1")
        if self.example_turns < 0:
            raise ValueError("example_turns must be at least 0")


@dataclass(frozen=True, slots=True)
class Conversation:
    index: int
    family: int | None  # None: a system prompt of its own
    system: str
    questions: tuple[str, ...]  # the user's message of each turn
    session_id: str
    examples: tuple[tuple[str, str], ...] = ()  # (question, answer) the family opens with


def text_window(words: list[str], start: int, count: int) -> str:
    """`count` words of the text from `start`, wrapping around (a prompt may be longer)."""
    return " ".join(words[(start + i) % len(words)] for i in range(count))


def plan_conversations(spec: WorkloadSpec) -> list[Conversation]:
    """The seeded workload: the same spec (seed and nonce included) gives the same
    conversations. The last conversation takes the remainder, so turns add up to `requests`."""
    from kv3d.bench.fidelity import (
        heldout_text,  # the held-out text is real prose, shipped with KV3D
    )

    rng = random.Random(spec.seed)
    words = heldout_text().split()
    count = -(-spec.requests // spec.turns)
    turns = [spec.turns] * (count - 1) + [spec.requests - spec.turns * (count - 1)]
    shared = set(rng.sample(range(count), int(count * spec.shared_ratio + 0.5)))
    # A header first: families and private prompts differ from their first token on.
    families = [
        f"You are the assistant of tenant {f} (run {spec.nonce}). Answer from this text.\n"
        + text_window(words, f * len(words) // spec.families, spec.system_words)
        for f in range(spec.families)
    ]
    examples = [
        tuple(
            (
                f"Example {e + 1}: {QUESTIONS[e % len(QUESTIONS)]}",
                text_window(words, (f * 7919 + e * 104729) % len(words), 40),
            )
            for e in range(spec.example_turns)
        )
        for f in range(spec.families)
    ]
    plan = []
    for i in range(count):
        family = rng.randrange(spec.families) if i in shared else None
        if family is None:
            system = (
                f"You are the assistant of customer {i} (run {spec.nonce}). Answer from this "
                "text.\n" + text_window(words, rng.randrange(len(words)), spec.system_words)
            )
        else:
            system = families[family]
        questions = tuple(f"({i}.{t}) {rng.choice(QUESTIONS)}" for t in range(turns[i]))
        opening = examples[family] if family is not None else ()
        plan.append(Conversation(i, family, system, questions, f"bench-{spec.nonce}-{i}", opening))
    return plan


@dataclass(slots=True)
class TurnRecord:
    """One request of the workload. Figures the server did not report stay None."""

    conversation: int
    turn: int
    shared: bool
    ok: bool
    error: str | None = None
    ttft_s: float | None = None
    total_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    usage_reported: bool = False  # False: completion_tokens counts content chunks
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    prefix_source: str | None = None
    session_resume_ms: float | None = None
    session_resumed_from: str | None = None


def _record(conv: Conversation, turn: int, raw: RawStream) -> TurnRecord:
    usage, ext = raw.usage or {}, raw.ext or {}
    details = usage.get("prompt_tokens_details") or {}
    return TurnRecord(
        conversation=conv.index,
        turn=turn,
        shared=conv.family is not None,
        ok=True,
        ttft_s=raw.ttft_s,
        total_s=raw.total_s,
        itl_s=raw.itl_s,
        completion_tokens=usage.get("completion_tokens", raw.content_chunks),
        usage_reported="completion_tokens" in usage,
        prompt_tokens=usage.get("prompt_tokens"),
        cached_tokens=details.get("cached_tokens"),
        prefix_source=ext.get("prefix_source"),
        session_resume_ms=ext.get("session_resume_ms"),
        session_resumed_from=ext.get("session_resumed_from"),
    )


async def _converse(
    http: httpx.AsyncClient,
    url: str,
    conv: Conversation,
    max_tokens: int,
    records: list[TurnRecord],
    on_request: Callable[[bool], None] | None,
) -> None:
    """Turn by turn: each appends the answer and the next question. A failed turn ends the
    conversation (its history would be wrong); its later turns count as skipped."""
    messages = [{"role": "system", "content": conv.system}]
    for question, answer in conv.examples:
        messages += [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    headers = {"X-Session-ID": conv.session_id}
    for turn, question in enumerate(conv.questions):
        messages.append({"role": "user", "content": question})
        try:
            raw = await read_chat_stream(http, url, chat_body(messages, max_tokens), headers)
        except StreamError as exc:
            records.append(TurnRecord(conv.index, turn, conv.family is not None, False, exc.kind))
            if on_request is not None:
                on_request(False)
            return
        records.append(_record(conv, turn, raw))
        if on_request is not None:
            on_request(True)
        messages.append({"role": "assistant", "content": raw.text})


async def _sample_metrics(
    http: httpx.AsyncClient,
    url: str,
    samples: list[MetricsSample],
    stop: asyncio.Event,
    period_s: float,
) -> None:
    while not stop.is_set():
        sample = await read_metrics(http, url)
        if sample is not None:
            samples.append(sample)
        try:
            await asyncio.wait_for(stop.wait(), period_s)
        except TimeoutError:
            pass


async def run_workload(
    http: httpx.AsyncClient,
    url: str,
    spec: WorkloadSpec,
    *,
    on_request: Callable[[bool], None] | None = None,
    metrics_period_s: float = 1.0,
    warmup: bool = True,
) -> dict:
    """Run the shared-prefix multi-turn workload against any OpenAI-compatible server at `url`
    and return its report (`summarize_workload`). `on_request(ok)` is called after each request
    (a progress bar). KV3D's `/metrics` is sampled while it runs, for memory per session."""
    if not spec.nonce:
        spec = replace(spec, nonce=f"{time.time_ns():x}")
    plan = plan_conversations(spec)
    if warmup:  # outside the figures: a server's lazy start-up is not what is measured
        try:
            hello = [{"role": "user", "content": "Hello."}]
            await read_chat_stream(http, url, chat_body(hello, 2))
        except StreamError as exc:
            log.warning("the warm-up request failed (%s); running the workload anyway", exc)
    kv3d = await read_metrics(http, url) is not None
    samples: list[MetricsSample] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(_sample_metrics(http, url, samples, stop, metrics_period_s))
    gate = asyncio.Semaphore(spec.concurrency)
    records: list[TurnRecord] = []

    async def gated(conv: Conversation) -> None:
        async with gate:
            await _converse(http, url, conv, spec.max_tokens, records, on_request)

    started = time.perf_counter()
    try:
        await asyncio.gather(*(gated(conv) for conv in plan))
    finally:
        wall_s = time.perf_counter() - started
        stop.set()
        await sampler
    # Idle sessions are parked off the request path: let the last ones land before counting.
    await asyncio.sleep(0.5 if kv3d else 0.0)
    final = await read_metrics(http, url)
    return summarize_workload(spec, plan, records, samples, final, wall_s, url=url, kv3d=kv3d)


def latency_stats(values: list[float], digits: int = 4) -> dict:
    if not values:
        return {"p50": None, "p95": None, "mean": None}
    return {
        "p50": round(percentile(values, 0.5), digits),
        "p95": round(percentile(values, 0.95), digits),
        "mean": round(statistics.mean(values), digits),
    }


def _fraction(hits: int, total: int) -> float | None:
    return round(hits / total, 4) if total else None


def _computed(records: list[TurnRecord]) -> int:
    return sum((r.prompt_tokens or 0) - r.cached_tokens for r in records)


def _prefix_figures(ok: list[TurnRecord]) -> dict:
    """Hit rates from `cached_tokens`; all None where the server does not report it."""
    known = [r for r in ok if r.cached_tokens is not None]
    if not known:
        return {
            "hit_rate": None,
            "first_turn_hit_rate": None,
            "cached_token_fraction": None,
            "computed_prompt_tokens": None,
            "by_source": None,
        }
    first = [r for r in known if r.turn == 0]
    prompt = sum(r.prompt_tokens or 0 for r in known)
    sources: dict[str, int] = {}
    for r in known:
        if r.prefix_source is not None:
            sources[r.prefix_source] = sources.get(r.prefix_source, 0) + 1
    return {
        "hit_rate": _fraction(sum(r.cached_tokens > 0 for r in known), len(known)),
        # First turns can only hit a family prompt: later ones also resume their session.
        "first_turn_hit_rate": _fraction(sum(r.cached_tokens > 0 for r in first), len(first)),
        "cached_token_fraction": _fraction(sum(r.cached_tokens for r in known), prompt),
        # What the server prefilled: the work that reuse saves, comparable across servers.
        "computed_prompt_tokens": {
            "first_turns": _computed(first),
            "later_turns": _computed([r for r in known if r.turn > 0]),
        },
        "by_source": dict(sorted(sources.items())) or None,
    }


def _session_figures(ok: list[TurnRecord], kv3d: bool) -> dict:
    if not kv3d:
        return {"resumed": None, "resumed_from": None, "resume_ms": latency_stats([], 3)}
    resumed = [r for r in ok if r.session_resume_ms is not None]
    tiers: dict[str, int] = {}
    for r in resumed:
        tier = r.session_resumed_from or "unknown"
        tiers[tier] = tiers.get(tier, 0) + 1
    return {
        "resumed": len(resumed),
        "resumed_from": dict(sorted(tiers.items())),
        "resume_ms": latency_stats([r.session_resume_ms for r in resumed], 3),
    }


MEMORY_FIGURES = (
    "source",
    "hot_bytes_per_session",
    "peak_hot_sessions",
    "bytes_per_warm_session",
    "warm_bytes_saved",
    "bytes_per_cold_session",
    "sessions_warm",
    "sessions_cold",
    "sessions_shared",
    "object_store_bytes",
    "delta_compression_ratio",
)


def _per(total_bytes: float, count: int) -> int | None:
    return round(total_bytes / count) if count else None


def _memory_figures(samples: list[MetricsSample], final: MetricsSample | None) -> dict:
    """Hot KV bytes per session in the cache (mean over the samples taken while the workload
    ran), and bytes per idle session in the warm and cold tiers at the end; all None without
    KV3D's /metrics."""
    every = samples + ([final] if final is not None else [])
    if not every:
        return dict.fromkeys(MEMORY_FIGURES)
    per_session = [s.hot_bytes_per_session for s in every if s.hot_bytes_per_session]
    last = every[-1]
    return {
        "source": "/metrics",
        "hot_bytes_per_session": round(statistics.mean(per_session)) if per_session else None,
        "peak_hot_sessions": max(s.sessions_hot for s in every),
        "bytes_per_warm_session": _per(last.warm_bytes, last.sessions_warm),
        "warm_bytes_saved": round(last.warm_bytes_saved),
        "bytes_per_cold_session": _per(last.cold_bytes, last.sessions_cold),
        "sessions_warm": last.sessions_warm,
        "sessions_cold": last.sessions_cold,
        # The object store's bytes mix snapshots and sessions: no per-session figure.
        "sessions_shared": last.sessions_shared,
        "object_store_bytes": round(last.object_store_bytes),
        "delta_compression_ratio": last.delta_compression_ratio or None,
    }


def _ttfts(records: list[TurnRecord], keep: Callable[[TurnRecord], bool]) -> list[float]:
    return [r.ttft_s for r in records if r.ttft_s is not None and keep(r)]


def _ttft_by_source(ok: list[TurnRecord]) -> dict | None:
    """TTFT per KV3D `prefix_source` (miss, hot, snapshot, session); None elsewhere."""
    groups: dict[str, list[float]] = {}
    for r in ok:
        if r.prefix_source is not None and r.ttft_s is not None:
            groups.setdefault(r.prefix_source, []).append(r.ttft_s)
    return {source: latency_stats(v) for source, v in sorted(groups.items())} or None


def _counted_from(ok: list[TurnRecord]) -> str | None:
    """How completion tokens were counted: from `usage`, or from content chunks where the
    server's streams carry no usage (llama_cpp.server's do not; it sends a chunk per token)."""
    kinds = {"usage" if r.usage_reported else "chunks" for r in ok}
    return kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else None)


def summarize_workload(
    spec: WorkloadSpec,
    plan: list[Conversation],
    records: list[TurnRecord],
    samples: list[MetricsSample],
    final: MetricsSample | None,
    wall_s: float,
    *,
    url: str = "",
    kv3d: bool = False,
) -> dict:
    """The workload's report: counts, throughput, latency, prefix reuse, sessions, memory.
    A figure the server did not report is None, never 0."""
    ok = [r for r in records if r.ok]
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            errors[r.error or "unknown"] = errors.get(r.error or "unknown", 0) + 1
    completion = sum(r.completion_tokens for r in ok)
    prompt_known = ok and all(r.prompt_tokens is not None for r in ok)
    return {
        "url": url,
        "server": "kv3d" if kv3d else "openai-compatible",
        "workload": {
            **asdict(spec),
            "conversations": len(plan),
            "shared_conversations": sum(c.family is not None for c in plan),
        },
        "requests": {
            "planned": sum(len(c.questions) for c in plan),
            "sent": len(records),
            "ok": len(ok),
            "errors": len(records) - len(ok),
            "skipped": sum(len(c.questions) for c in plan) - len(records),
        },
        "errors_by_kind": dict(sorted(errors.items())),
        "wall_s": round(wall_s, 3),
        "requests_per_s": round(len(ok) / wall_s, 3) if wall_s > 0 else None,
        "completion_tokens": completion,
        "completion_tokens_per_s": round(completion / wall_s, 2) if wall_s > 0 else None,
        "completion_tokens_from": _counted_from(ok),
        "prompt_tokens": sum(r.prompt_tokens for r in ok) if prompt_known else None,
        "ttft_s": latency_stats([r.ttft_s for r in ok if r.ttft_s is not None]),
        # First turns can only reuse a family prompt; later ones also their own history.
        "ttft_first_turn_s": latency_stats(_ttfts(ok, lambda r: r.turn == 0)),
        "ttft_later_turns_s": latency_stats(_ttfts(ok, lambda r: r.turn > 0)),
        "ttft_by_source_s": _ttft_by_source(ok),
        "itl_s": latency_stats([x for r in ok for x in r.itl_s], 5),
        "prefix": _prefix_figures(ok),
        "sessions": _session_figures(ok, kv3d),
        "memory": _memory_figures(samples, final),
    }
