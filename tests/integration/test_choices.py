"""n > 1 completions on the real engine: n sequences, one stream, the prompt computed once."""

from __future__ import annotations

import asyncio

import pytest

from kv3d.engine.engine import new_request_id
from kv3d.engine.generation import Finished, GenerationRequest, Rejected, SamplingParams, TextDelta
from kv3d.server.chat import ChatMessage
from tests.integration.httpapp import SYSTEM

pytestmark = pytest.mark.integration


def prompt(tok, question: str) -> tuple[int, ...]:
    messages = [ChatMessage("system", SYSTEM), ChatMessage("user", question)]
    return tuple(tok.encode_chat(messages))


async def run_all(engine, request: GenerationRequest):
    texts: dict[int, str] = {}
    ends: list = []
    async for event in engine.stream(request):
        if isinstance(event, TextDelta):
            texts[event.index] = texts.get(event.index, "") + event.text
        else:
            ends.append(event)
            if isinstance(event, Finished):
                texts[event.index] = texts.get(event.index, "") + event.text
    return texts, ends


def test_three_choices_share_one_prompt_computation(engine, tok):
    tokens = prompt(tok, "Name three colours.")
    before = engine.stats()
    sampling = SamplingParams(temperature=1.0, seed=7)
    request = GenerationRequest(new_request_id(), tokens, 12, sampling, n=3)
    texts, ends = asyncio.run(run_all(engine, request))
    after = engine.stats()

    assert sorted(e.index for e in ends) == [0, 1, 2]
    assert all(isinstance(e, Finished) for e in ends)
    assert [e.final for e in ends] == [False, False, True]  # the stream ends with the last
    assert sorted(texts) == [0, 1, 2] and all(texts.values())
    assert len(set(texts.values())) > 1, "seed, seed+1, seed+2 should not all agree"
    prefilled = after.prefill_tokens_total - before.prefill_tokens_total
    block = engine.settings.reuse.block_tokens
    # One choice computes the prompt; each other computes at most its last partial block.
    assert prefilled < len(tokens) + 2 * block, (prefilled, len(tokens))
    assert len(tokens) > 2 * block
    engine.check_invariants()


def test_a_choice_that_cannot_fit_rejects_the_whole_request_and_frees_everything(engine, tok):
    tokens = prompt(tok, "Hello")
    too_many = engine.kv_cells_total  # prompt + this can never fit
    request = GenerationRequest(new_request_id(), tokens, too_many, SamplingParams(), n=2)
    texts, ends = asyncio.run(run_all(engine, request))
    assert len(ends) == 1 and isinstance(ends[0], Rejected) and ends[0].reason == "too_large"
    assert not engine.scheduler.running and engine.scheduler.num_waiting == 0
    engine.check_invariants()


def test_closing_the_stream_cancels_every_choice(engine, tok):
    tokens = prompt(tok, "Count to one hundred.")

    async def start_then_abandon():
        sampling = SamplingParams(temperature=1.0, seed=3)
        request = GenerationRequest(new_request_id(), tokens, 200, sampling, n=3)
        stream = engine.stream(request)
        async for event in stream:
            if isinstance(event, TextDelta):
                break
        await stream.aclose()
        for _ in range(500):
            if not engine.scheduler.running:
                return
            await asyncio.sleep(0.01)

    asyncio.run(start_then_abandon())
    assert not engine.scheduler.running
    assert not engine._choice_ids
    engine.check_invariants()
