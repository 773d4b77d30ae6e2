"""Output cells granted as sequences generate, and sequences parked when the cache runs out
(the real `Engine` over the fakes of tests/unit/fakeengine.py): more requests run at once than
their `max_tokens` would allow, each stream comes out exactly as it would without a park, and
a request cancelled while parked ends cleanly."""

from __future__ import annotations

import pytest

import kv3d.engine.engine as engine_module
from kv3d.engine.generation import Finished, GenerationRequest, SamplingParams
from tests.unit.fakeengine import FakeSampler, Stream, fake_engine, run_to_idle

FAMILY = tuple(range(1000, 1040))
CELLS = 1024  # a budget of 64-byte cells
MAX_TOKENS = 400  # 4 x (50 + 400) cells: more than CELLS


def requests(session_ids: bool) -> list[GenerationRequest]:
    return [
        GenerationRequest(
            f"r{i}",
            FAMILY + tuple(range(10 * i + 1, 10 * i + 11)),
            MAX_TOKENS,
            SamplingParams(temperature=0.0),
            family_tokens=len(FAMILY),
            session_id=f"chat-{i}" if session_ids else None,
        )
        for i in range(4)
    ]


class Samplers:
    """Every sampler the engine makes, to check that each is freed once its request ends."""

    def __init__(self, monkeypatch):
        self.made: list[FakeSampler] = []
        samplers = self

        class Tracked(FakeSampler):
            def __init__(self, **kw):
                super().__init__(**kw)
                samplers.made.append(self)

        monkeypatch.setattr(engine_module, "SamplerChain", Tracked)


def run(engine, reqs) -> tuple[list[Stream], int]:
    streams = []
    for req in reqs:
        streams.append(Stream())
        engine.submit(req, streams[-1])
    running_at_once = 0
    while engine.scheduler.has_work() or engine.scheduler.num_waiting:
        engine.sessions.flush()  # stored sessions being read are waited for here
        engine.step()
        engine.check_invariants()
        running_at_once = max(running_at_once, len(engine.scheduler.running))
    return streams, running_at_once


@pytest.mark.parametrize("session_ids", [True, False], ids=["resumed", "recomputed"])
def test_parked_sequences_stream_what_they_would_have_unparked(monkeypatch, session_ids):
    reference = fake_engine(monkeypatch)  # 2,048 cells: every request fits whole
    try:
        expected, _ = run(reference, requests(session_ids))
    finally:
        reference.close()
    assert reference.stats().sequences_parked_total == 0

    engine = fake_engine(monkeypatch, kv_budget_bytes=64 * CELLS)
    samplers = Samplers(monkeypatch)
    try:
        streams, running_at_once = run(engine, requests(session_ids))
        stats = engine.stats()
    finally:
        engine.close()
    # Reserving prompt + max_tokens, two of the four would have fit at once.
    assert running_at_once == 4
    assert stats.sequences_parked_total > 0
    if session_ids:  # the continuations resumed their stored state; none recomputed it
        assert stats.session_resumes_total >= stats.sequences_parked_total
    for got, want in zip(streams, expected, strict=True):
        assert isinstance(got.end, Finished) and got.end.reason == "length"
        assert got.text == want.text
        assert got.end.usage.prompt_tokens == 50
        assert got.end.usage.completion_tokens == MAX_TOKENS
    # One sampler per request (a continuation goes on with its request's), all freed.
    assert len(samplers.made) == 4 and all(s.closed for s in samplers.made)


def test_a_request_cancelled_while_parked_ends_with_what_it_generated(monkeypatch):
    engine = fake_engine(monkeypatch, kv_budget_bytes=64 * CELLS)
    try:
        reqs = requests(session_ids=True)
        streams = []
        for req in reqs:
            streams.append(Stream())
            engine.submit(req, streams[-1])
        parked = None
        for _ in range(2000):
            engine.step()
            engine.check_invariants()
            parked = next((p for p in engine.scheduler.waiting() if p.parked), None)
            if parked is not None:
                break
        assert parked is not None, "nothing was parked"
        rid, state = parked.request.request_id, parked.parked
        engine.cancel(rid)
        stream = streams[[r.request_id for r in reqs].index(rid)]
        assert isinstance(stream.end, Finished) and stream.end.reason == "cancelled"
        assert stream.end.usage.completion_tokens == state.generated_tokens > 0
        assert state.sampler.closed
        run_to_idle(engine)
        others = [s for s in streams if s is not stream]
        assert all(s.end.usage.completion_tokens == MAX_TOKENS for s in others)
    finally:
        engine.close()


def test_a_turn_resumed_hot_and_parked_continues_from_what_it_stored(monkeypatch):
    """Turn 2 of four conversations resumes each from its hot turn 1 and is parked; its
    continuation resumes the state it stored (all of turn 2 so far), not the shorter hot turn
    1 (which would compute turn 2 again)."""

    def conversations(engine) -> list[Stream]:
        firsts = [
            GenerationRequest(
                f"t1-{i}",
                FAMILY + tuple(range(10 * i + 1, 10 * i + 11)),
                4,
                SamplingParams(temperature=0.0),
                family_tokens=len(FAMILY),
                session_id=f"chat-{i}",
            )
            for i in range(4)
        ]
        replies, _ = run(engine, firsts)
        seconds = [
            GenerationRequest(
                f"t2-{i}",
                first.prompt_tokens + tuple(int(p[1:]) for p in reply.text.split()) + (7, 8),
                MAX_TOKENS,
                SamplingParams(temperature=0.0),
                family_tokens=len(FAMILY),
                session_id=first.session_id,
            )
            for i, (first, reply) in enumerate(zip(firsts, replies, strict=True))
        ]
        streams, _ = run(engine, seconds)
        return streams

    reference = fake_engine(monkeypatch, max_hot_prefixes=8)
    try:
        expected = conversations(reference)
    finally:
        reference.close()
    engine = fake_engine(monkeypatch, kv_budget_bytes=64 * CELLS, max_hot_prefixes=8)
    try:
        streams = conversations(engine)
        stats = engine.stats()
        computed = stats.prefill_tokens_total
    finally:
        engine.close()
    assert stats.sequences_parked_total > 0
    assert stats.session_resumes_total == stats.sequences_parked_total
    # Turn 1 computed once (the family, then 10 tokens each), turn 2 its new tokens (its two
    # and the reply's last, which turn 1 never decoded);
    # a continuation computes only the token it was about to decode.
    assert computed == len(FAMILY) + 4 * 10 + 4 * 3 + stats.sequences_parked_total
    assert [s.text for s in streams] == [s.text for s in expected]


def test_a_continuation_parked_again_before_its_next_token_keeps_its_stream(monkeypatch):
    """A continuation that recomputes its history (no session key) is parked again while it
    prefills: it goes back to the queue with its request's sampler and text stream."""
    reference = fake_engine(monkeypatch)
    try:
        expected, _ = run(reference, requests(session_ids=False))
    finally:
        reference.close()
    engine = fake_engine(monkeypatch, kv_budget_bytes=64 * CELLS)
    samplers = Samplers(monkeypatch)
    try:
        streams = []
        for req in requests(session_ids=False):
            streams.append(Stream())
            engine.submit(req, streams[-1])
        parked_again = False
        for _ in range(5000):
            if not (engine.scheduler.has_work() or engine.scheduler.num_waiting):
                break
            engine.sessions.flush()
            engine.step()
            engine.check_invariants()
            back = [
                slot
                for slot, live in engine._live.items()
                if live.parked is not None and live.progress.generated_tokens == 0
            ]
            if back and not parked_again:  # just admitted again, its next token not drawn
                engine._park(back[0])
                engine.check_invariants()
                parked_again = True
        assert parked_again
    finally:
        engine.close()
    for got, want in zip(streams, expected, strict=True):
        assert got.text == want.text
        assert got.end.usage.completion_tokens == MAX_TOKENS
    assert len(samplers.made) == 4 and all(s.closed for s in samplers.made)
