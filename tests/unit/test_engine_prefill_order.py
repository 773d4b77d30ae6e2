"""Which prompt a step feeds, and how much of it, while other sequences decode (the real
`Engine` over the fakes of tests/unit/fakeengine.py, with the pacer's measured costs fixed):
a prompt computing a family prefix that queued requests wait for counts its tokens once for
all of them, and each waiting request earns the step another minimum chunk."""

from __future__ import annotations

from kv3d.engine.generation import Finished, GenerationRequest, SamplingParams
from kv3d.engine.pacing import MIN_CHUNK_TOKENS, StepPacer
from tests.unit.fakeengine import Stream, fake_engine, run_to_idle

FAMILY = tuple(range(1000, 1200))  # a 200-token system prompt
GREEDY = SamplingParams(temperature=0.0)


class FixedCosts(StepPacer):
    """The pacer with a decode step of 60 ms and 4 ms a prompt token, whatever the fakes take:
    2x a decode step leaves room for 15 prompt tokens, below the minimum chunk."""

    def __init__(self, batch_tokens: int):
        super().__init__(batch_tokens, slowdown_max=2.0, decode_ms=60.0, prefill_ms_per_token=4.0)

    def observe(self, decode_tokens: int, prefill_tokens: int, step_ms: float) -> None:
        pass


def family_chat(rid: str, n: int) -> GenerationRequest:
    private = tuple(range(10 * n + 1, 10 * n + 6))
    return GenerationRequest(rid, FAMILY + private, 4, GREEDY, family_tokens=len(FAMILY))


def tokens_fed(engine, request_id: str) -> int:
    """Rows the last step gave `request_id`'s sequence."""
    slots = [s for s, live in engine._live.items() if live.pending.request.request_id == request_id]
    return sum(1 for _, _, seq, _ in engine.ctx.rows if seq in slots)


def start_decoding(engine) -> Stream:
    stream = Stream()
    engine.submit(GenerationRequest("decoder", tuple(range(1, 9)), 200, GREEDY), stream)
    engine.step()  # nobody decodes yet: its whole prompt in one step
    assert engine.scheduler.num_decoding() == 1
    return stream


def test_a_family_prefix_that_requests_wait_for_goes_first_in_larger_chunks(monkeypatch):
    engine = fake_engine(monkeypatch, batch_tokens=256, max_sequences=8)
    engine.pacer = FixedCosts(256)
    try:
        streams = {"decoder": start_decoding(engine)}
        other = GenerationRequest("other", tuple(range(2000, 2100)), 4, GREEDY)
        for req in [other] + [family_chat(f"f{i}", i) for i in range(4)]:
            streams[req.request_id] = Stream()
            engine.submit(req, streams[req.request_id])
        engine.step()
        # f0 computes the family; f1..f3 wait for it: 1 + 3 minimum chunks, all to f0, whose
        # 205 tokens are ~51 for each of the four, fewer than the other prompt's 100.
        assert engine.scheduler.num_awaiting_prefill() == 3
        assert tokens_fed(engine, "f0") == 4 * MIN_CHUNK_TOKENS
        assert tokens_fed(engine, "other") == 0
        engine.check_invariants()
        run_to_idle(engine)
        assert all(isinstance(s.end, Finished) for s in streams.values())
    finally:
        engine.close()


def test_without_waiting_requests_the_shortest_prompt_goes_first_in_a_minimum_chunk(monkeypatch):
    engine = fake_engine(monkeypatch, batch_tokens=256, max_sequences=8)
    engine.pacer = FixedCosts(256)
    try:
        start_decoding(engine)
        engine.submit(family_chat("f0", 0), Stream())
        engine.submit(GenerationRequest("short", tuple(range(2000, 2020)), 4, GREEDY), Stream())
        engine.step()
        assert engine.scheduler.num_awaiting_prefill() == 0
        # "short" first, up to where its first blocks are registered; f0 gets the rest.
        short = tokens_fed(engine, "short")
        assert 0 < short < MIN_CHUNK_TOKENS
        assert tokens_fed(engine, "f0") == MIN_CHUNK_TOKENS - short
    finally:
        engine.close()
