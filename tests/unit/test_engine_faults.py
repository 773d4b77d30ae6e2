"""Fault isolation in the real `Engine` (over the fakes of tests/unit/fakeengine.py): a fault
injected at each stage of admitting or advancing one request fails that request alone, leaves
the engine consistent (`check_invariants` after every step) and the next request runs; and the
step thread never waits on a stored session being read."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import pytest

import kv3d.engine.engine as engine_module
import kv3d.engine.sessions as sessions_module
from kv3d.engine.budget import KVBudget
from kv3d.engine.generation import Finished, GenerationRequest, Rejected, SamplingParams
from kv3d.engine.prefix import PrefixCache
from kv3d.engine.reuse import PrefixReuse
from kv3d.engine.sessions import Sessions
from kv3d.engine.tiers import SessionStore
from tests.unit.fakeengine import FakeSampler, Stream, fake_engine, run_to_idle

FAMILY = tuple(range(1000, 1040))
OTHER_FAMILY = tuple(range(2000, 2040))
MARK = 4242  # only the victim's prompts hold this token
VICTIM_SEED = 666


class Fault(Exception):
    """The injected fault (no code path expects it)."""


def request(rid, private, session_id=None, family=FAMILY, max_tokens=4, seed=None):
    return GenerationRequest(
        rid,
        family + private,
        max_tokens,
        SamplingParams(temperature=0.0, seed=seed),
        family_tokens=len(family),
        session_id=session_id,
    )


def submit(engine, req) -> Stream:
    stream = Stream()
    engine.submit(req, stream)
    return stream


def finished(stream: Stream, tokens: int = 4) -> bool:
    end = stream.end
    return isinstance(end, Finished) and end.usage.completion_tokens == tokens


@pytest.fixture
def engine(monkeypatch, tmp_path):
    eng = fake_engine(monkeypatch, cold_path=str(tmp_path / "cold"))
    yield eng
    eng.close()


def first_turns(engine) -> dict[str, tuple[int, ...]]:
    """Turn 1 of two conversations, parked warm; returns each one's turn-2 private tokens."""
    turns = {}
    for sid, turn in (("chat-v", (MARK, *range(1, 20))), ("chat-b", tuple(range(101, 125)))):
        stream = submit(engine, request(f"{sid}-1", turn, sid))
        run_to_idle(engine)
        assert finished(stream)
        reply = tuple(int(piece[1:]) for piece in stream.text.split())
        turns[sid] = turn + reply + (7, 8, 9, 10, 11, 12)
    engine.sessions.flush()
    assert engine.sessions.stats()["sessions_warm"] == 2
    return turns


def victim_request(kind: str, turns) -> GenerationRequest:
    """The faulted request: its conversation's turn 2 (resumes a warm session), a new prompt
    of the hot family (a prefix hit), or one of a family nobody computed (a miss)."""
    if kind == "session":
        return request("victim", turns["chat-v"], "chat-v", seed=VICTIM_SEED)
    if kind == "hit":
        return request("victim", (MARK, 1, 4, 1, 5, 9, 2, 6, 5, 3), seed=VICTIM_SEED)
    return request("victim", (MARK, 1, 4, 1, 5), family=OTHER_FAMILY, seed=VICTIM_SEED)


def is_victim(*args) -> bool:
    """Whether a call's arguments name the victim: its request (or pending request), its
    sequence's progress, or its session id."""
    for arg in args:
        if arg == "chat-v":
            return True
        prompt = getattr(getattr(arg, "request", arg), "prompt_tokens", None)
        if isinstance(prompt, tuple) and MARK in prompt:
            return True
    return False


def first_call(*args) -> bool:
    return True


def inject(monkeypatch, owner, name, *, after=False, when=is_victim) -> list:
    """Make `owner.name` raise `Fault` once, at its first call that `when` accepts (before the
    original runs, or after it with `after`); returns a list that records the firing."""
    original = getattr(owner, name)
    fired = []

    def faulty(*args, **kwargs):
        if fired or not when(*args):
            return original(*args, **kwargs)
        fired.append(name)
        if after:
            original(*args, **kwargs)
        raise Fault(f"injected into {name}")

    monkeypatch.setattr(owner, name, faulty)
    return fired


class VictimSampler(FakeSampler):
    def sample(self, ctx, batch_index):
        if self.seed == VICTIM_SEED:
            raise Fault("injected into sample")
        return super().sample(ctx, batch_index)


def sampler_fault(monkeypatch):
    fired = []

    def make(**kwargs):
        if kwargs["seed"] == VICTIM_SEED and not fired:
            fired.append("SamplerChain")
            raise Fault("injected into SamplerChain")
        return FakeSampler(**kwargs)

    monkeypatch.setattr(engine_module, "SamplerChain", make)
    return fired


def sample_fault(monkeypatch):
    monkeypatch.setattr(engine_module, "SamplerChain", VictimSampler)
    return ["sample"]


# Faults a reuse or session call meets after it took a prefix reference are not injected: each
# of those calls takes the reference as its last act, so such a fault cannot happen.
STAGES = {
    # stage: (kind of victim, injector, what the victim's stream ends with)
    "submit: session take": ("session", lambda mp: inject(mp, Sessions, "take_for"), Rejected),
    "session read (store worker)": (
        "session",
        lambda mp: inject(mp, SessionStore, "_take_now"),
        Finished,  # a stored session that cannot be read is a miss: recomputed
    ),
    "prefix in flight check": (
        "miss",
        lambda mp: inject(mp, PrefixReuse, "awaited_family"),
        Rejected,
    ),
    "making room for the head": (
        "session",
        lambda mp: inject(mp, PrefixReuse, "make_room", when=first_call),
        Rejected,
    ),
    "shared cells": ("session", lambda mp: inject(mp, Sessions, "shared_cells"), Rejected),
    "budget reservation": (
        "session",
        lambda mp: inject(mp, KVBudget, "admit", when=first_call),
        Rejected,
    ),
    "sampler": ("session", sampler_fault, Rejected),
    "session resume": ("session", lambda mp: inject(mp, Sessions, "resume"), Rejected),
    "prefix match in resume": ("session", lambda mp: inject(mp, PrefixReuse, "match"), Rejected),
    "session load cells": (
        "session",
        lambda mp: inject(mp, sessions_module, "load_cells", when=first_call),
        Rejected,
    ),
    "session trim": (
        "session",
        lambda mp: inject(mp, Sessions, "_trim", when=first_call),
        Rejected,
    ),
    "prefix match": ("hit", lambda mp: inject(mp, PrefixReuse, "match"), Rejected),
    "prefix share": (
        "hit",
        lambda mp: inject(mp, PrefixCache, "attach", when=first_call),
        Rejected,
    ),
    "registration plan": (
        "miss",
        lambda mp: inject(mp, PrefixReuse, "plan_registration", when=first_call),
        Rejected,
    ),
    "begin (after it ran)": (
        "miss",
        lambda mp: inject(mp, PrefixReuse, "begin", after=True),
        Rejected,
    ),
    "first prefill chunk": ("miss", lambda mp: inject(mp, PrefixReuse, "after_chunk"), Rejected),
    "prefix registration": (
        "miss",
        lambda mp: inject(mp, PrefixCache, "free_a_holder", when=first_call),
        Rejected,
    ),
    "decode step: sampling": ("session", sample_fault, Rejected),
    "keeping the session": ("session", lambda mp: inject(mp, Sessions, "keep"), Finished),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_fault_at_any_stage_fails_only_its_request(engine, monkeypatch, stage):
    kind, injector, expected = STAGES[stage]
    turns = first_turns(engine)
    fired = injector(monkeypatch)
    victim = submit(engine, victim_request(kind, turns))
    bystander = submit(engine, request("bystander", turns["chat-b"], "chat-b"))
    engine.sessions.flush()  # both sessions read: the victim goes first
    run_to_idle(engine)
    assert fired, f"the fault at {stage!r} was never reached"

    assert isinstance(victim.end, expected), victim.events
    if expected is Rejected:
        assert victim.end.reason == "internal"
    else:
        assert finished(victim)
    # Nothing else is lost: the other request ran in full, from its resumed session.
    assert finished(bystander) and bystander.end.session_tier == "warm"
    assert not engine.scheduler.running and engine.budget.reserved_cells == 0

    monkeypatch.undo()  # the fakes too: the engine keeps the ones it was built with
    monkeypatch.setattr(engine_module, "SamplerChain", FakeSampler)
    after = [
        submit(engine, victim_request(kind, turns)),
        submit(engine, request("next", (5, 6, 7, 8, 9, 10, 11, 12, 13))),
    ]
    run_to_idle(engine)
    assert all(finished(s) for s in after)


def test_a_failing_step_frees_a_slot_an_admission_left_half_done(engine):
    """The step's last resort (a fault no request owns) leaves no slot behind either."""
    pending_req = request("half", (1, 2, 3, 4, 5, 6, 7, 8, 9))
    stream = submit(engine, pending_req)
    (pending,) = engine.scheduler.waiting()
    engine.scheduler.admit(pending, 0)  # as if the step died between admit and start
    engine._fail_all("engine step failed")
    engine.check_invariants()
    assert engine.scheduler.num_free_slots == engine.settings.max_sequences
    assert stream.end is None  # it never started: the caller's own error path answers it


# --- the step thread never waits on a stored session ------------------------------------------
def controlled_session(engine, monkeypatch) -> Future:
    """Requests for session "slow" get a Future the test completes when it wants."""
    future: Future = Future()
    take_for = engine.sessions.take_for

    def take(request, blocks, hot):
        return future if request.session_id == "slow" else take_for(request, blocks, hot)

    monkeypatch.setattr(engine.sessions, "take_for", take)
    return future


def test_a_request_whose_session_is_being_read_waits_while_others_go(engine, monkeypatch):
    turns = first_turns(engine)
    future = controlled_session(engine, monkeypatch)
    slow = submit(engine, request("slow", (1, 2, 3, 4, 5, 6, 7, 8, 9), "slow"))
    others = [submit(engine, request(f"o{i}", (i, 2, 3, 4, 5, 6, 7, 8))) for i in range(3)]
    for _ in range(40):
        engine.step()  # would block forever on the Future if it waited for it
        engine.check_invariants()
    assert all(finished(s) for s in others)
    assert slow.events == [] and engine.scheduler.num_waiting == 1
    assert not engine.scheduler.has_work()  # nothing the step thread could do now

    # The read completes (here: with the stored session of another conversation's history).
    store = engine.sessions.store
    future.set_result(store._take_now("chat-b"))
    assert engine.scheduler.has_work()
    run_to_idle(engine)
    assert finished(slow)
    del turns


def streamed(engine, req) -> tuple[Stream, threading.Event]:
    stream, done = Stream(), threading.Event()

    def emit(event):
        stream(event)
        if isinstance(event, Finished | Rejected):
            done.set()

    engine.submit(req, emit)
    return stream, done


def test_on_the_step_thread_others_go_and_the_read_wakes_it_up(engine, monkeypatch):
    future = controlled_session(engine, monkeypatch)
    steps = []
    real_step = engine.step
    monkeypatch.setattr(engine, "step", lambda: steps.append(1) or real_step())
    engine.start()
    slow, slow_done = streamed(engine, request("slow", (1, 2, 3, 4, 5, 6, 7, 8, 9), "slow"))
    other, other_done = streamed(engine, request("other", (9, 8, 7, 6, 5, 4, 3, 2, 1)))
    try:
        assert other_done.wait(10), "a request queued behind a session being read never ran"
        assert finished(other) and slow.events == []
        time.sleep(0.2)
        before = len(steps)
        time.sleep(0.3)
        assert len(steps) - before <= 1, "the step thread spins while the session is read"
    finally:  # the read completes (nothing stored after all: a miss); it also unblocks a
        future.set_result(None)  # step thread that waits on it, so the engine can close
    assert slow_done.wait(10), "the step thread was not woken when the read finished"
    assert finished(slow)


def test_sessions_never_block_on_a_session_still_being_read(engine):
    """Defence in depth: even when asked early, admission does not wait on the Future."""
    from kv3d.engine.scheduler import Pending, SeqProgress

    future: Future = Future()
    pending = Pending(request("early", (1, 2, 3), "early"), Stream(), session=future)
    timer = threading.Timer(5, future.set_result, (None,))
    timer.start()
    try:
        started = time.monotonic()
        assert engine.sessions.shared_cells(pending, 8) == 8
        assert (
            engine.sessions.resume(pending, SeqProgress(0, pending.request.prompt_tokens)) is None
        )
        assert time.monotonic() - started < 1
    finally:
        timer.cancel()


def test_a_session_demoted_while_its_next_turn_waits_is_fetched_for_it(monkeypatch, tmp_path):
    """Its turn 2 came while it was hot (nothing fetched); room was made before admission."""
    engine = fake_engine(monkeypatch, max_hot_prefixes=4)
    try:
        turn = tuple(range(1, 20))
        first = submit(engine, request("t1", turn, "chat-1"))
        run_to_idle(engine)
        reply = tuple(int(piece[1:]) for piece in first.text.split())
        assert "chat-1" in engine.reuse.hot_view().sessions
        second = submit(engine, request("t2", turn + reply + (7, 8, 9), "chat-1"))
        engine.reuse.evict_idle()  # what making room for other requests does
        run_to_idle(engine)
        assert finished(second) and second.end.session_tier == "warm"
        # Its private history came from the store (the family was computed again: no snapshot
        # store here); the last reply token never went through the model, so it is not kept.
        assert second.end.usage.cached_tokens == len(turn + reply) - 1
        assert engine.stats().session_refetches_total == 1
    finally:
        engine.close()
