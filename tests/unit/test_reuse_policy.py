"""Prefix reuse on a fake KV memory: what each admission shares, registers, evicts and counts,
with the KV budget's invariants checked after every move."""

from __future__ import annotations

from kv3d.engine.generation import GenerationRequest
from kv3d.engine.reuse import NoReuse, ReuseSettings
from kv3d.engine.scheduler import Pending, SeqProgress
from tests.unit.fakememory import FakeMemory, Harness

FAMILY = tuple(range(1000, 1040))  # 40 tokens of system prompt: blocks end at 8, 16, …, 40


def chat(rid: str, private: tuple[int, ...], family=FAMILY, max_tokens=4, **kw):
    prompt = family + private
    return GenerationRequest(
        rid, prompt, max_tokens, family_tokens=len(family) if family else None, **kw
    )


def test_a_miss_registers_its_family_prefix_once_computed():
    h = Harness()
    pending = h.submit(chat("a", (1, 2, 3, 4, 5)))
    progress, adm = h.admit(pending)
    assert adm.prefix is None and progress.chunk_stop == len(FAMILY)
    reserved = h.budget.reserved_by(progress.slot)
    assert reserved == pending.cells_needed
    h.prefill(progress)
    assert adm.prefix is not None and adm.prefix_tokens == len(FAMILY)
    # The family's cells moved from the sequence's reservation to the hot prefix.
    assert h.budget.reserved_by(progress.slot) == reserved - len(FAMILY)
    assert h.budget.held_cells == len(FAMILY)
    assert h.memory.values(adm.prefix.seq_id) == {
        p: v for p, v in h.memory.values(progress.slot).items() if p < len(FAMILY)
    }
    h.check()
    h.finish(progress)
    assert h.budget.reserved_cells == 0 and h.budget.held_cells == len(FAMILY)
    h.check()


def test_a_hit_shares_the_family_cells_and_reserves_only_the_rest():
    h = Harness()
    first, _ = h.admit(h.submit(chat("a", (1, 2, 3, 4, 5))))
    h.prefill(first)
    family_cells = h.memory.values(first.slot)
    h.finish(first)
    pending = h.submit(chat("b", (9, 9, 9)))
    assert h.reuse.cells_already_hot(pending) == len(FAMILY)
    progress, adm = h.admit(pending)
    assert adm.cached_tokens == len(FAMILY) and progress.num_computed_tokens == len(FAMILY)
    assert h.budget.reserved_by(progress.slot) == pending.cells_needed - len(FAMILY)
    shared = h.memory.values(progress.slot)
    assert shared == {p: v for p, v in family_cells.items() if p < len(FAMILY)}
    assert h.reuse.counters["prefix_hits_total"] == 1
    h.check()
    h.finish(progress)
    h.check()


def test_a_burst_of_one_new_family_waits_for_the_first_to_compute_it():
    h = Harness()
    first = h.submit(chat("a", (1, 2, 3, 4, 5)))
    second = h.submit(chat("b", (6, 7, 8, 9, 10)))
    progress, _ = h.admit(first)
    assert h.reuse.awaited_family(second) is not None
    h.prefill(progress, upto=len(FAMILY))  # the family is now hot
    assert h.reuse.awaited_family(second) is None
    _, adm = h.admit(second)
    assert adm.cached_tokens == len(FAMILY)
    h.check()


def test_make_room_evicts_idle_prefixes_for_the_head_of_the_queue():
    h = Harness(kv_cells=64)
    progress, _ = h.admit(h.submit(chat("a", (1, 2, 3, 4, 5))))
    h.prefill(progress)
    h.finish(progress)
    assert h.budget.held_cells == len(FAMILY)
    other = h.submit(chat("b", tuple(range(30)), family=tuple(range(500, 520))))
    assert not h.scheduler.can_admit(other)  # 54 cells needed, 24 free
    h.reuse.make_room(other.cells_needed)
    assert h.budget.held_cells == 0 and h.reuse.cache.num_hot == 0
    assert h.scheduler.can_admit(other)
    h.check()


def test_a_snapshot_restores_on_another_replica_and_a_foreign_one_is_refused():
    published = []
    a = Harness(publish=lambda meta, blob: published.append(blob))
    progress, _ = a.admit(a.submit(chat("a", (1, 2, 3, 4, 5))))
    a.prefill(progress)
    assert len(published) == 1

    b = Harness()
    pending = b.submit(chat("b", (7, 7, 7)))
    pending.snapshot = published[0]
    progress, adm = b.admit(pending)
    assert adm.restore_s is not None and adm.cached_tokens == len(FAMILY)
    assert b.reuse.counters["snapshot_restores_total"] == 1
    assert b.memory.values(progress.slot) == {
        p: v for p, v in a.memory.values(adm.prefix.seq_id).items()
    }
    b.check()

    c = Harness(fingerprint=b"o" * 16)  # another model: its blocks and snapshots differ
    pending = c.submit(chat("c", (7, 7, 7)))
    pending.snapshot = published[0]
    _, adm = c.admit(pending)
    assert adm.prefix is None and c.reuse.counters["snapshot_rejects_total"] == 1
    c.check()


def test_a_state_llama_cpp_refuses_is_a_miss_and_counts_as_a_state_failure():
    published = []
    a = Harness(publish=lambda meta, blob: published.append(blob))
    progress, _ = a.admit(a.submit(chat("a", (1, 2, 3, 4, 5))))
    a.prefill(progress)
    b = Harness()
    b.memory.refuse_restores = 1
    pending = b.submit(chat("b", (7, 7, 7)))
    pending.snapshot = published[0]
    progress, adm = b.admit(pending)
    assert adm.prefix is None and progress.num_computed_tokens == 0
    assert b.reuse.state_failures == 1 and b.reuse.cache.num_hot == 0
    b.check()


def test_sharing_less_than_expected_reserves_the_difference():
    h = Harness()
    first, _ = h.admit(h.submit(chat("a", (1, 2, 3, 4, 5))))
    h.prefill(first)
    h.finish(first)
    pending = h.submit(chat("b", (9, 9, 9)))
    expected = h.reuse.cells_already_hot(pending)
    progress = h.scheduler.admit(pending, expected)
    h.reuse.cache.evict_unused(10**6)  # the prefix went away between the check and the act
    adm = h.reuse.admit(pending, progress)
    h.reuse.begin(adm, progress)
    assert h.budget.reserved_by(progress.slot) == pending.cells_needed
    h.check()


def test_retired_reuse_drops_idle_prefixes_now_and_used_ones_at_release():
    h = Harness()
    first, _ = h.admit(h.submit(chat("a", (1, 2, 3, 4, 5))))
    h.prefill(first)
    other, _ = h.admit(h.submit(chat("o", (1,), family=tuple(range(300, 316)))))
    h.prefill(other)
    h.finish(other)  # its prefix is idle now
    assert h.reuse.cache.num_hot == 2
    h.reuse.retire()
    assert h.reuse.cache.num_hot == 1 and h.reuse.publish is None  # "a"'s is still in use
    h.finish(first)
    assert h.reuse.cache.num_hot == 0 and h.budget.held_cells == 0
    h.check()


def test_no_reuse_breaks_prefill_where_reuse_would():
    settings = ReuseSettings(block_tokens=8, min_tokens=4)
    request = chat("a", (1, 2, 3, 4, 5))
    progress = SeqProgress(slot=0, prompt_tokens=request.prompt_tokens)
    adm = NoReuse(settings).admit(Pending(request, print), progress)
    assert adm.prefix is None and progress.chunk_stop == len(FAMILY)

    h = Harness(block_tokens=8)
    progress, _ = h.admit(h.submit(request))
    assert progress.chunk_stop == len(FAMILY)


def test_a_collision_is_a_miss_never_wrong_cells():
    h = Harness()
    first, _ = h.admit(h.submit(chat("a", (1, 2, 3, 4, 5))))
    h.prefill(first)
    h.finish(first)
    forged = h.submit(chat("b", (9, 9)))
    # Same block keys as the family, other tokens: what a hash collision looks like.
    forged.request = GenerationRequest(
        "b", (0,) + FAMILY[1:] + (9, 9), 4, family_tokens=len(FAMILY)
    )
    assert h.reuse.cells_already_hot(forged) == 0
    progress, adm = h.admit(forged)
    assert adm.prefix is None and progress.num_computed_tokens == 0
    h.check()


def test_fake_memory_round_trips_state():
    m = FakeMemory()
    m.write(1, [5, 6, 7], 10)
    m.set_seq_state(2, m.seq_state(1))
    assert m.values(2) == m.values(1) and m.seq_pos_max(2) == 12
