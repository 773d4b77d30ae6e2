import pytest

from kv3d.engine.budget import KVBudget
from kv3d.engine.generation import GenerationRequest
from kv3d.engine.scheduler import (
    OUTPUT_CELLS_PER_GRANT,
    Pending,
    QueueFullError,
    RequestTooLargeError,
    Scheduler,
)


def request(rid: str, prompt_len: int, max_tokens: int = 4) -> Pending:
    events = []
    return Pending(GenerationRequest(rid, tuple(range(prompt_len)), max_tokens), events.append)


def scheduler(kv_cells_total: int = 100, **kw) -> Scheduler:
    args = dict(num_slots=2, batch_tokens=16, max_waiting=2)
    args.update(kw)
    return Scheduler(budget=KVBudget(kv_cells_total), **args)


def admit_all(s: Scheduler, shared: dict[str, int] | None = None):
    """The engine's admission walk, without prefix reuse: first come first served while the
    head fits; `shared` gives the cells a hot prefix would provide per request id."""
    admitted = []
    for pending in s.waiting():
        cells = (shared or {}).get(pending.request.request_id, 0)
        if not s.can_admit(pending, cells):
            break
        admitted.append((pending, s.admit(pending, cells)))
    return admitted


def test_admits_fifo_while_slots_and_cells_allow():
    s = scheduler()
    for rid in "abc":
        s.enqueue(request(rid, 10))
    admitted = admit_all(s)
    assert [p.request.request_id for p, _ in admitted] == ["a", "b"]
    assert s.num_waiting == 1 and s.num_free_slots == 0
    assert s.budget.reserved_cells == 2 * (10 + 4)
    s.check_invariants()


def test_head_of_queue_waits_for_cells_and_blocks_later_requests():
    s = scheduler(kv_cells_total=40)
    s.enqueue(request("big", 30))
    s.enqueue(request("next", 20))
    s.enqueue(request("small", 2))
    assert [p.request.request_id for p, _ in admit_all(s)] == ["big"]
    slot = next(iter(s.running))
    s.release(slot)
    assert [p.request.request_id for p, _ in admit_all(s)] == ["next", "small"]
    s.check_invariants()


def test_decode_tokens_come_first_then_prompt_chunks_within_budget():
    s = scheduler(batch_tokens=8)
    s.enqueue(request("gen", 3))
    s.enqueue(request("long", 20))
    (_, gen), (_, long) = admit_all(s)
    gen.num_computed_tokens, gen.pending_token = 3, 99
    chunks = s.plan()
    assert (chunks[0].slot, chunks[0].tokens, chunks[0].start_pos) == (gen.slot, [99], 3)
    assert not chunks[0].prefill and chunks[0].want_logits
    assert chunks[1].slot == long.slot and len(chunks[1].tokens) == 7  # 8 - 1 decode token
    assert chunks[1].prefill and not chunks[1].want_logits  # prompt not finished yet


def test_last_prompt_chunk_asks_for_logits():
    s = scheduler(batch_tokens=16)
    s.enqueue(request("p", 20))
    ((_, p),) = admit_all(s)
    first = s.plan()
    assert len(first[0].tokens) == 16 and not first[0].want_logits
    p.num_computed_tokens = 16
    second = s.plan()
    assert second[0].tokens == list(range(16, 20)) and second[0].start_pos == 16
    assert second[0].want_logits


def test_queue_bound_rejects_beyond_free_slots_plus_max_waiting():
    s = scheduler(num_slots=1, max_waiting=1)
    s.enqueue(request("a", 1))
    s.enqueue(request("b", 1))
    with pytest.raises(QueueFullError):
        s.enqueue(request("c", 1))


def test_request_larger_than_the_cache_is_refused_up_front():
    with pytest.raises(RequestTooLargeError):
        scheduler(kv_cells_total=50).enqueue(request("x", 48, max_tokens=8))


def test_cancel_waiting_removes_only_that_request():
    s = scheduler(num_slots=1)
    s.enqueue(request("a", 1))
    s.enqueue(request("b", 1))
    assert s.cancel_waiting("b").request.request_id == "b"
    assert s.cancel_waiting("b") is None
    assert [p.request.request_id for p, _ in admit_all(s)] == ["a"]


def test_release_returns_slot_and_cells():
    s = scheduler()
    s.enqueue(request("a", 10))
    ((_, prog),) = admit_all(s)
    s.release(prog.slot)
    assert s.budget.reserved_cells == 0 and s.num_free_slots == 2
    s.check_invariants()


def test_cells_a_hot_prefix_provides_are_not_reserved_and_let_a_request_in():
    s = scheduler(kv_cells_total=40)
    s.enqueue(request("a", 30))
    assert len(admit_all(s)) == 1  # fits alone: 34 of 40 cells
    s.enqueue(request("b", 30))
    assert admit_all(s) == []  # 34 + 34 > 40 without sharing
    (pending,) = s.waiting()
    assert not s.can_admit(pending) and s.can_admit(pending, shared_cells=30)
    progress = s.admit(pending, shared_cells=30)
    assert progress.shared_cells_expected == 30 and s.budget.reserved_by(progress.slot) == 4
    s.check_invariants()


def test_held_cells_count_against_admission():
    s = scheduler(kv_cells_total=40)
    s.budget.hold(30)  # a hot prefix
    s.enqueue(request("a", 10))
    assert admit_all(s) == []
    s.budget.unhold(30)
    assert len(admit_all(s)) == 1
    s.check_invariants()


def test_admit_skips_a_request_cancelled_meanwhile():
    s = scheduler()
    s.enqueue(request("a", 4))
    (pending,) = s.waiting()
    s.cancel_waiting("a")
    assert s.admit(pending) is None
    assert s.num_free_slots == 2 and s.budget.reserved_cells == 0
    s.check_invariants()


def test_next_to_admit_needs_a_free_slot():
    s = scheduler(num_slots=1)
    s.enqueue(request("a", 4))
    s.enqueue(request("b", 4))
    assert s.next_to_admit().request.request_id == "a"
    admit_all(s)
    assert s.next_to_admit() is None  # "b" waits, but no slot is free


def test_the_prompt_with_fewest_tokens_left_is_prefilled_first():
    s = scheduler(batch_tokens=8)
    s.enqueue(request("long", 40))
    s.enqueue(request("short", 5))
    (_, long), (_, short) = admit_all(s)
    chunks = s.plan()
    assert [(c.slot, len(c.tokens)) for c in chunks] == [(short.slot, 5), (long.slot, 3)]


def test_a_prompt_passed_over_for_several_steps_goes_first():
    from kv3d.engine.scheduler import STARVED_AFTER_STEPS

    s = scheduler(kv_cells_total=200, batch_tokens=4, num_slots=2)
    s.enqueue(request("long", 60))
    s.enqueue(request("short", 50))
    (_, long), (_, short) = admit_all(s)
    for _ in range(STARVED_AFTER_STEPS):
        (chunk,) = s.plan()
        assert chunk.slot == short.slot  # fewer tokens left: it takes the whole budget
        short.num_computed_tokens += len(chunk.tokens)
    (chunk,) = s.plan()
    assert chunk.slot == long.slot
    (chunk,) = s.plan()
    assert chunk.slot == short.slot  # served once, the long one waits its turn again


def test_a_family_prefix_counts_its_tokens_once_for_the_requests_waiting_on_it():
    s = scheduler(kv_cells_total=200, batch_tokens=8, num_slots=3)
    for rid, n in (("alone", 30), ("awaited", 60), ("short", 5)):
        s.enqueue(request(rid, n))
    (_, alone), (_, awaited), (_, short) = admit_all(s)
    awaited.awaited_by = 2  # 60 tokens for 3 requests: 20 each, fewer than 30
    assert s.num_awaiting_prefill() == 2
    chunks = s.plan()
    assert [(c.slot, len(c.tokens)) for c in chunks] == [(short.slot, 5), (awaited.slot, 3)]
    short.num_computed_tokens += 5
    awaited.num_computed_tokens += 3
    awaited.awaited_by = 0  # the requests gave up waiting: 57 tokens for one request now
    chunks = s.plan()
    assert [(c.slot, len(c.tokens)) for c in chunks] == [(alone.slot, 8)]


def test_output_cells_are_granted_as_the_sequence_generates():
    s = scheduler(kv_cells_total=1000)
    s.enqueue(request("long", 10, max_tokens=100))
    ((_, seq),) = admit_all(s)
    assert s.budget.reserved_by(seq.slot) == 10 + OUTPUT_CELLS_PER_GRANT
    seq.num_computed_tokens, seq.pending_token = 10, 5
    for generated in range(1, OUTPUT_CELLS_PER_GRANT + 1):
        seq.generated_tokens = generated
        assert s.needs_output_cells() == []
    seq.generated_tokens = OUTPUT_CELLS_PER_GRANT + 1
    assert s.needs_output_cells() == [seq]
    s.grant(seq)
    assert s.budget.reserved_by(seq.slot) == 10 + 2 * OUTPUT_CELLS_PER_GRANT
    assert s.needs_output_cells() == []
    # The last grant stops at max_tokens.
    seq.output_cells = 90
    seq.generated_tokens = 91
    assert s.next_grant(seq) == 10
    s.check_invariants()


def test_a_long_max_tokens_does_not_keep_other_requests_out():
    s = scheduler(kv_cells_total=200)
    s.enqueue(request("a", 10, max_tokens=150))
    s.enqueue(request("b", 10, max_tokens=150))
    assert [p.request.request_id for p, _ in admit_all(s)] == ["a", "b"]
    with pytest.raises(RequestTooLargeError):
        s.enqueue(request("too-long", 10, max_tokens=191))


def test_a_continuation_goes_back_in_arrival_order_and_newest_is_parked_first():
    s = scheduler(kv_cells_total=1000, num_slots=3, max_waiting=4)
    for rid in "abcd":
        s.enqueue(request(rid, 10))
    admitted = dict((p.request.request_id, seq) for p, seq in admit_all(s))
    assert s.newest_running() is admitted["c"]

    def continuation(rid: str) -> Pending:
        pending = Pending(GenerationRequest(rid, tuple(range(12)), 2), [].append)
        pending.arrival = s.release(admitted[rid].slot).arrival
        return pending

    s.requeue_first(continuation("c"))  # parked first, arrived after "a"
    s.requeue_first(continuation("a"))
    assert [p.request.request_id for p in s.waiting()] == ["a", "c", "d"]
    assert s.newest_running() is admitted["b"]
    s.check_invariants()
