"""A request that took its stored session and then ends without keeping a newer turn
(cancelled while waiting or mid-turn, rejected for a full queue) leaves the session stored:
the conversation is not lost with the request. Real `Engine` over the fakes, warm tier only."""

from __future__ import annotations

import pytest

from kv3d.engine.generation import Finished, GenerationRequest, Rejected, SamplingParams
from tests.unit.fakeengine import Stream, fake_engine, run_to_idle

FAMILY = tuple(range(1000, 1040))
HISTORY = (5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16)


def turn(rid: str, private: tuple[int, ...], session_id: str | None = "s") -> GenerationRequest:
    return GenerationRequest(
        rid,
        FAMILY + private,
        4,
        SamplingParams(temperature=0.0),
        family_tokens=len(FAMILY),
        session_id=session_id,
    )


@pytest.fixture
def engine(monkeypatch):
    eng = fake_engine(monkeypatch, max_queued_requests=2)  # no cold tier: RAM is all there is
    first = Stream()
    eng.submit(turn("t1", HISTORY), first)
    run_to_idle(eng)
    eng.sessions.flush()
    assert isinstance(first.end, Finished) and eng.sessions.store.holds("s")
    yield eng
    eng.close()


def second_turn(rid: str = "t2") -> GenerationRequest:
    return turn(rid, HISTORY + (40, 41, 42, 43))


def test_cancelled_while_waiting_the_session_stays_stored(engine):
    stream = Stream()
    engine.submit(second_turn(), stream)
    engine.cancel("t2")
    engine.sessions.flush()
    assert stream.end.reason == "cancelled"
    assert engine.sessions.store.holds("s")


def test_cancelled_mid_turn_the_session_stays_stored(engine):
    stream = Stream()
    engine.submit(second_turn(), stream)
    engine.sessions.flush()  # read: admissible now
    while not engine._live:
        engine.step()
    assert not engine.sessions.store.holds("s")  # taken: it lives in the sequence now
    engine.cancel("t2")
    run_to_idle(engine)
    assert stream.end.reason == "cancelled"
    assert engine.sessions.store.holds("s")
    # And the next turn resumes it.
    again = Stream()
    engine.submit(second_turn("t3"), again)
    run_to_idle(engine)
    assert again.end.session_tier == "warm" and again.end.usage.cached_tokens > len(FAMILY)


def test_rejected_for_a_full_queue_the_session_stays_stored(engine):
    # Slots free at the next step do not count as queued: 4 slots + a queue of 2.
    fillers = [Stream() for _ in range(6)]
    for i, stream in enumerate(fillers):
        engine.submit(turn(f"f{i}", (90 + i, 1, 2), session_id=None), stream)
    rejected = Stream()
    engine.submit(second_turn(), rejected)
    engine.sessions.flush()
    assert isinstance(rejected.end, Rejected) and rejected.end.reason == "queue_full"
    assert engine.sessions.store.holds("s")
