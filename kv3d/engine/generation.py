"""The records that cross from the API layer to the engine and back.

They are plain frozen dataclasses so they pickle cheaply across a Ray DeploymentHandle call and
carry nothing native. A request's stream is zero or more `TextDelta`s ended by exactly one
terminal event: `Finished` or `Rejected`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# llama-server's default repeat_last_n: the window the repetition penalty looks back over.
REPEAT_LAST_N = 64

FinishReason = Literal["stop", "length", "cancelled"]
# Why the engine would not run a request. Domain reasons only: the API layer alone chooses the
# HTTP status and error code each one becomes.
RejectReason = Literal[
    "too_large",  # prompt + max_tokens can never fit this engine's KV cells
    "queue_full",  # the wait queue is at its bound: retry later
    "unavailable",  # shutting down, or no replica can take it now: retry later
    "internal",  # the engine failed this request (the others go on)
]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request picks its tokens. Every default is neutral: a field left at its default
    adds no stage to the sampler chain. Values were checked at the API boundary."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    min_p: float = 0.0
    # OpenAI's penalties: they count every token generated so far (never the prompt's).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # llama.cpp's repeat penalty: divides the logit of each token among the last
    # `penalty_last_n` tokens, prompt included, as llama-server does (its repeat_last_n is 64).
    repetition_penalty: float = 1.0
    penalty_last_n: int = REPEAT_LAST_N
    # (token id, bias added to its logit) pairs: a tuple, not a dict, to stay frozen and cheap.
    logit_bias: tuple[tuple[int, float], ...] = ()
    # GBNF source whose start rule is named `root`; it already compiled against this vocab.
    grammar: str | None = None


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    request_id: str
    prompt_tokens: tuple[int, ...]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    # None: no logprobs; k >= 0: the sampled token's logprob plus the k most likely tokens.
    top_logprobs: int | None = None
    # Where the family prefix (system/developer messages) ends in `prompt_tokens`, if known.
    family_tokens: int | None = None
    # Keep generating past end-of-generation tokens (benchmarks, tests): ends at max_tokens.
    ignore_eos: bool = False
    # A conversation: its KV is kept (as an int8 delta) after the request and resumed later.
    session_id: str | None = None
    # Mixed into every block key: requests under different salts (tenants) share no KV.
    cache_salt: str = ""
    # Who owns the cache this request builds (an opaque id: the API's tenant namespace, "" for
    # one shared owner). The family prefixes it computes are recorded under it.
    tenant: str = ""
    # Completions wanted for this prompt (OpenAI's `n`): the engine runs them as n sequences
    # sharing the prompt's cells, in one event stream (`choices.py`).
    n: int = 1


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    token_bytes: bytes
    logprob: float
    top: tuple[tuple[int, bytes, float], ...] = ()


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str
    num_tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()
    index: int = 0  # the choice it belongs to (requests with n > 1)


@dataclass(frozen=True, slots=True)
class Finished:
    reason: FinishReason
    usage: Usage
    text: str = ""  # text released at the very end (held back for a possible stop string)
    replica_id: str | None = None  # the engine that ran it
    snapshot_restore_s: float | None = None  # set when the prefix came from a snapshot
    session_resume_s: float | None = None  # set when a stored session was resumed
    session_tier: str | None = None  # resumed from: warm | cold | shared | parts (others')
    index: int = 0  # the choice that finished (requests with n > 1)
    final: bool = True  # False while other choices of the request are still running


@dataclass(frozen=True, slots=True)
class Rejected:
    """The engine would not run (or could not finish) the request."""

    reason: RejectReason
    message: str
    retry_after_s: int | None = None


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A replica engine's counters at one moment (monotonic `*_total`, gauges otherwise)."""

    replica_id: str
    taken_at_s: float
    running_sequences: int
    waiting_requests: int
    free_slots: int
    kv_cells_total: int
    kv_cells_reserved: int
    steps_total: int
    batched_steps_total: int  # steps whose llama_decode carried more than one sequence
    max_sequences_in_step: int
    prompt_tokens_total: int
    generated_tokens_total: int
    prefill_tokens_total: int
    canary_runs_total: int = 0
    sequences_parked_total: int = 0  # running sequences taken off the cache when it ran out
    prefix_lookups_total: int = 0
    prefix_hits_total: int = 0
    prefix_tokens_reused_total: int = 0
    hot_prefixes: int = 0
    hot_idle_sessions: int = 0  # finished conversations whose KV is still in the cache
    hot_prefix_cells: int = 0
    snapshot_restores_total: int = 0
    snapshot_rejects_total: int = 0
    snapshots_published_total: int = 0
    session_parks_total: int = 0
    session_shares_total: int = 0
    session_resumes_total: int = 0
    session_demotions_total: int = 0
    session_rent_demotions_total: int = 0  # idle sessions moved out of the KV cache by cost
    prefix_rent_evictions_total: int = 0  # unused family prefixes evicted by cost (restorable)
    session_drops_total: int = 0
    session_rejects_total: int = 0
    session_restore_failures_total: int = 0
    session_cold_write_errors_total: int = 0  # sessions that could not be written to disk
    session_cold_evictions_total: int = 0  # files removed to keep the cold folder's budget
    state_failures_total: int = 0  # intact snapshots/sessions refused with room in the cache
    state_restores_without_room_total: int = 0  # refused in a busy cache: recomputed, no blame
    safe_mode: int = 0  # 1: plain inference only (self-check failed, forced, or tripped)
    safe_mode_reason: str = ""  # why, while safe_mode is 1
    sessions_warm: int = 0
    sessions_cold: int = 0
    warm_bytes: int = 0
    warm_shared_parts: int = 0  # parts of idle sessions that several warm sessions hold
    warm_bytes_saved: int = 0  # bytes those parts would take again, each session its own copy
    session_parts_reused_total: int = 0  # parts found warm when a session was parked
    session_parts_cuts_total: int = 0  # warm sessions cut into parts when another shared them
    session_part_resumes_total: int = 0  # new conversations started on other sessions' parts
    session_refetches_total: int = 0  # sessions demoted while their next turn waited, fetched
    cold_bytes: int = 0
    delta_compression_ratio: float = 0.0
    kv_bytes_used: int = 0  # KV bytes of running sequences and hot prefixes (the hot tier)
    sessions_hot: int = 0  # running sequences + idle sessions still in the KV cache


StreamEvent = TextDelta | Finished | Rejected


def ends_stream(event: StreamEvent) -> bool:
    """Whether `event` is a request's terminal event: nothing follows it."""
    if isinstance(event, Finished):
        return event.final
    return isinstance(event, Rejected)


def coalesce(events: list[StreamEvent]) -> list[StreamEvent]:
    """The same stream in fewer events: the `TextDelta`s of one choice between two terminal
    events become one (text joined, tokens summed, logprobs in order), where the first of them
    stood. Every message downstream (a Ray streaming item, an SSE frame) costs the same whatever
    it carries, so a consumer that fell behind catches up in one message instead of many."""
    out: list[StreamEvent] = []
    merged_at: dict[int, int] = {}  # choice index -> its TextDelta in `out`
    for event in events:
        if not isinstance(event, TextDelta):
            merged_at.clear()  # never move text across a Finished or Rejected
            out.append(event)
            continue
        at = merged_at.get(event.index)
        if at is None:
            merged_at[event.index] = len(out)
            out.append(event)
            continue
        last = out[at]
        out[at] = TextDelta(
            last.text + event.text,
            last.num_tokens + event.num_tokens,
            last.logprobs + event.logprobs,
            event.index,
        )
    return out
