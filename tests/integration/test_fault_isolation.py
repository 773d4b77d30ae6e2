"""Never a wedged replica, on the real model: a malformed stored session is a miss, a fault in one
request fails that request alone, and a request whose session is still being read waits
without holding up the others."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future

import pytest

import kv3d.engine.engine as engine_module
from kv3d.engine.codec import encode_delta
from kv3d.engine.engine import Engine
from kv3d.engine.generation import Finished, Rejected, SamplingParams
from kv3d.engine.llama import SamplerChain
from kv3d.engine.sessions import Sessions
from kv3d.engine.tiers import ColdTier, SessionRecord, decode_record, encode_record
from tests.integration.test_sessions import config, request, run
from tests.unit.test_codec import make_state
from tests.unit.test_stored_bytes import record_with, reseal_delta, reseal_record

pytestmark = pytest.mark.integration

DEADLINE_S = 60  # a wedged engine never answers: fail instead of hanging
VICTIM_SEED = 666
TURN1 = [("user", "How do I change the port of the server?")]


class Fault(Exception):
    """The injected fault."""


@pytest.fixture(scope="module")
def tok(smollm2_path):
    from kv3d.server.chat import Tokenizer

    t = Tokenizer.load(smollm2_path)
    yield t
    t.close()


class Answer:
    """One request run on its own thread: (text, logprobs, terminal event) once it ends."""

    def __init__(self, engine, req):
        self.result = None
        self.thread = threading.Thread(target=self._run, args=(engine, req), daemon=True)
        self.thread.start()

    def _run(self, engine, req) -> None:
        self.result = run(engine, req)

    def done(self) -> bool:
        return not self.thread.is_alive()

    def get(self, timeout_s: float = DEADLINE_S):
        """A wedged engine never answers: fail instead of hanging (closing the engine ends
        the thread)."""
        self.thread.join(timeout_s)
        assert self.result is not None, f"no answer in {timeout_s}s: the engine is wedged"
        return self.result


def answer(engine, req):
    return Answer(engine, req).get()


def settle(engine) -> None:
    """Wait until the step thread has nothing left to do, then check the engine's invariants."""
    deadline = time.monotonic() + DEADLINE_S
    while engine.scheduler.has_work() or engine.scheduler.num_waiting:
        assert time.monotonic() < deadline, "the engine never became idle"
        time.sleep(0.01)
    time.sleep(0.05)  # the step that ended the last request returns
    engine.check_invariants()


def ok(end) -> bool:
    return isinstance(end, Finished) and end.usage.completion_tokens > 0


# --- a malformed stored record is a miss ----------------------------------------------------------
def test_a_malformed_cold_record_is_dropped_and_the_request_recomputes(tok, tmp_path, caplog):
    cold = tmp_path / "cold"
    names = ColdTier(cold)._name
    # Checksums valid, contents not: an id that is not UTF-8, and a delta whose tensor table
    # runs past its payload (the count sits in the delta's header, outside its checksum).
    bad_delta = reseal_delta(encode_delta(make_state(), "int8", 32), n=10**6)
    planted = {
        "conv-bad-id": record_with(sid=b"conv-bad-id\xff"),
        "conv-bad-delta": reseal_record(
            encode_record(SessionRecord("conv-bad-delta", b"f" * 16, (1, 2, 3), 1, bad_delta))
        ),
    }
    for sid, data in planted.items():
        (cold / names(sid)).write_bytes(data)
    caplog.set_level(logging.WARNING, logger="kv3d.engine.tiers")
    with Engine.from_config(config(cold_dir=cold, warm_mb=0)) as engine:
        assert engine.sessions.stats()["sessions_cold"] == 2
        for sid in planted:
            _, _, end = answer(engine, request(tok, TURN1, sid, 4))
            assert ok(end) and end.session_tier is None  # recomputed
        _, _, end = answer(engine, request(tok, TURN1, None, 4))
        assert ok(end)
        settle(engine)
        assert engine.sessions.stats()["session_rejects_total"] == 2
    for sid in planted:  # the bad record is gone; the turn just run replaced it
        path = cold / names(sid)
        assert not path.exists() or decode_record(path.read_bytes()).session_id == sid
    assert sum("not resumable" in r.getMessage() for r in caplog.records) == 2


# --- a fault fails its request alone --------------------------------------------------------------
@pytest.fixture(scope="module")
def engine():
    with Engine.from_config(config()) as eng:  # sessions park warm: resumes are exercised
        yield eng


class VictimSampler(SamplerChain):
    def __init__(self, *, seed: int, **kwargs):
        super().__init__(seed=seed, **kwargs)
        self.victim = seed == VICTIM_SEED

    def sample(self, ctx, batch_index):
        if self.victim:
            raise Fault("injected into sample")
        return super().sample(ctx, batch_index)


def fault_in_resume(monkeypatch):
    resume = Sessions.resume

    def faulty(self, pending, progress):
        if pending.request.sampling.seed == VICTIM_SEED:
            raise Fault("injected into resume")
        return resume(self, pending, progress)

    monkeypatch.setattr(Sessions, "resume", faulty)


def fault_in_decode(monkeypatch):
    monkeypatch.setattr(engine_module, "SamplerChain", VictimSampler)


@pytest.mark.parametrize("inject", [fault_in_resume, fault_in_decode])
def test_a_fault_fails_its_request_alone(engine, tok, monkeypatch, inject):
    sid = f"victim-{inject.__name__}"
    text, _, first = answer(engine, request(tok, TURN1, sid, 8))
    engine.sessions.flush()
    turn2 = TURN1 + [("assistant", text), ("user", "And then?")]
    victim = request(tok, turn2, sid, 8)
    victim = type(victim)(**{**_fields(victim), "sampling": SamplingParams(0.0, seed=VICTIM_SEED)})
    bystander = request(tok, [("user", "What is a replica?")], None, 8)
    inject(monkeypatch)

    both = [Answer(engine, victim), Answer(engine, bystander)]
    (_, _, v_end), (b_text, _, b_end) = (a.get() for a in both)
    assert isinstance(v_end, Rejected) and v_end.reason == "internal"
    assert ok(b_end) and b_text  # the other request ran in full
    settle(engine)
    monkeypatch.undo()

    _, _, again = answer(engine, request(tok, turn2, sid, 8))  # the conversation goes on
    _, _, other = answer(engine, request(tok, [("user", "Hello")], None, 8))
    assert ok(again) and ok(other)
    settle(engine)


def _fields(req) -> dict:
    return {name: getattr(req, name) for name in req.__dataclass_fields__}


# --- the step thread never waits on a session being read ------------------------------------------
def test_a_request_whose_session_is_being_read_does_not_hold_up_others(engine, tok, monkeypatch):
    future: Future = Future()
    take_for = engine.sessions.take_for

    def take(req, blocks, hot):
        return future if req.session_id == "slow" else take_for(req, blocks, hot)

    monkeypatch.setattr(engine.sessions, "take_for", take)

    try:
        slow = Answer(engine, request(tok, TURN1, "slow", 4))
        time.sleep(0.1)
        others = [
            Answer(engine, request(tok, [("user", f"Count to {n}.")], None, 4)) for n in (3, 4)
        ]
        assert all(ok(a.get()[2]) for a in others)
        assert not slow.done() and engine.scheduler.num_waiting == 1
    finally:  # the read finishes (nothing was stored); a step thread that waits on it goes on
        future.set_result(None)
    assert ok(slow.get()[2])
    settle(engine)
