"""The step pacer: prompt tokens per step while others decode, from measured step times."""

from __future__ import annotations

import pytest

from kv3d.engine.pacing import MIN_CHUNK_TOKENS, StepPacer
from kv3d.engine.scheduler import Scheduler


def trained(slowdown_max: float = 2.0, decode_ms: float = 60.0, per_token_ms: float = 2.0):
    pacer = StepPacer(batch_tokens=512, slowdown_max=slowdown_max)
    pacer.observe(decode_tokens=0, prefill_tokens=256, step_ms=256 * per_token_ms)
    pacer.observe(decode_tokens=8, prefill_tokens=0, step_ms=decode_ms)
    return pacer


def test_whole_batch_when_nobody_decodes():
    assert trained().prefill_budget(0) == 512


def test_whole_batch_until_both_costs_are_measured():
    pacer = StepPacer(batch_tokens=512, slowdown_max=2.0)
    assert pacer.prefill_budget(8) == 504
    pacer.observe(decode_tokens=8, prefill_tokens=0, step_ms=60.0)
    assert pacer.prefill_budget(8) == 504


def test_budget_keeps_a_mixed_step_within_the_slowdown():
    # 60 ms decode step, 2 ms per prompt token: 2x allows 60 ms more, i.e. 30 tokens -> floor.
    assert trained().prefill_budget(8) == MIN_CHUNK_TOKENS
    # 3x allows 120 ms more: 60 tokens.
    assert trained(slowdown_max=3.0).prefill_budget(8) == 60
    # Cheap prompt tokens (a GPU): the batch's room bounds it.
    assert trained(per_token_ms=0.01).prefill_budget(8) == 504


def test_each_request_waiting_on_a_prefix_earns_another_minimum_chunk():
    assert trained().prefill_budget(8, awaiting_requests=3) == 4 * MIN_CHUNK_TOKENS
    # Where the slowdown already allows more, waiting requests add nothing.
    assert trained(slowdown_max=4.0).prefill_budget(8, awaiting_requests=1) == 90
    # The batch's room still bounds it.
    assert trained().prefill_budget(8, awaiting_requests=40) == 504


def test_zero_slowdown_turns_pacing_off():
    assert trained(slowdown_max=0.0).prefill_budget(8) == 504


def test_mixed_steps_teach_the_prompt_cost_net_of_decoding():
    pacer = trained(decode_ms=60.0, per_token_ms=2.0)
    for _ in range(50):  # the prompt cost doubles; the decode share is taken out
        pacer.observe(decode_tokens=8, prefill_tokens=32, step_ms=60.0 + 32 * 4.0)
    assert pacer.prefill_ms_per_token == pytest.approx(4.0, rel=1e-3)
    assert trained(slowdown_max=5.0).prefill_budget(8) == 120
    assert StepPacer(512, 5.0, 60.0, 4.0).prefill_budget(8) == 60


def test_scheduler_plan_holds_prompt_chunks_to_the_budget_and_decodes_everyone():
    from tests.unit.test_scheduler import admit_all, request, scheduler

    s: Scheduler = scheduler(batch_tokens=16)
    s.enqueue(request("decoding", 4))
    s.enqueue(request("prefilling", 12))
    (_, gen), (_, pre) = admit_all(s)
    gen.num_computed_tokens, gen.pending_token = 4, 99  # its prompt is done: it generates
    assert s.num_decoding() == 1
    chunks = s.plan(prefill_tokens=5)
    assert [(c.slot, len(c.tokens), c.prefill) for c in chunks] == [
        (gen.slot, 1, False),
        (pre.slot, 5, True),
    ]
    assert [len(c.tokens) for c in s.plan()] == [1, 12]
