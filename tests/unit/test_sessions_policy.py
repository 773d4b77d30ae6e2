"""Sessions on a fake KV memory: keep hot, park warm, demote, resume, defer, and the auto-session
keys, with the KV budget's invariants checked after every move. The tiers are the real
`SessionStore` (int8 codec, cold files in a temp folder)."""

from __future__ import annotations

import numpy as np
import pytest

from kv3d.engine.generation import GenerationRequest
from kv3d.engine.rent import IdleRent
from kv3d.engine.sessions import (
    AUTO_SESSION_PREFIX,
    AUTO_TAIL_PREFIX,
    auto_session_key,
    same_conversation,
)
from kv3d.engine.tiers import SessionStore
from tests.unit.fakememory import Harness

FAMILY = tuple(range(1000, 1040))
TURN1 = tuple(range(1, 21))
REPLY1 = (70, 71, 72, 73)
TURN2 = (80, 81, 82, 83, 84, 85, 86, 87)


def request(rid, private, session_id=None, max_tokens=4):
    return GenerationRequest(
        rid, FAMILY + private, max_tokens, family_tokens=len(FAMILY), session_id=session_id
    )


def first_turn(h: Harness, session_id="chat-1"):
    progress, adm = h.admit(h.submit(request("t1", TURN1, session_id)))
    h.prefill(progress)
    h.generate(progress, REPLY1)
    cells = h.memory.values(progress.slot)
    h.finish(progress, REPLY1)
    return cells


def second_turn_request(session_id="chat-1"):
    # The client sends the history back, plus its new message.
    return request("t2", TURN1 + REPLY1 + TURN2, session_id)


@pytest.fixture
def store(tmp_path):
    s = SessionStore(warm_budget_bytes=64 << 20, cold_dir=str(tmp_path / "cold"))
    yield s
    s.close()


def test_a_finished_conversation_stays_hot_and_its_next_turn_shares_its_cells(store):
    h = Harness(store=store)
    cells = first_turn(h)
    hot = [p for p in h.reuse.cache.hot() if p.session_key == "chat-1"]
    assert len(hot) == 1 and hot[0].parent is not None  # a child of the family prefix
    assert h.budget.held_cells == h.reuse.cache.cells_held
    h.check()
    pending = h.submit(second_turn_request())
    assert pending.session is None  # hot here: nothing to fetch
    progress, adm = h.admit(pending)
    kept = hot[0].n_tokens
    assert adm.prefix is hot[0] and adm.cached_tokens == kept
    assert h.memory.values(progress.slot) == {p: v for p, v in cells.items() if p < kept}
    h.check()
    h.prefill(progress)
    h.finish(progress)
    # The new turn replaced the old one, which dropped with its last user.
    sessions = [p for p in h.reuse.cache.hot() if p.session_key == "chat-1"]
    assert len(sessions) == 1 and sessions[0].n_tokens > kept
    h.check()


def test_a_hot_session_keeps_its_tail_past_the_last_whole_block(store):
    # 40 family + 25 private + 4 reply = 69 tokens: whole blocks of 8 end at 64, and the next
    # turn shares all 69 (llama.cpp's server reuses any common token prefix too).
    h = Harness(store=store)
    private = tuple(range(1, 26))
    progress, _ = h.admit(h.submit(request("t1", private, "chat-1")))
    h.prefill(progress)
    h.generate(progress, REPLY1)
    cells = h.memory.values(progress.slot)
    h.finish(progress, REPLY1)
    history = len(FAMILY + private + REPLY1)
    (kept,) = [p for p in h.reuse.cache.hot() if p.session_key == "chat-1"]
    assert kept.n_tokens == history and kept.owned_cells == history - len(FAMILY)
    h.check()
    progress, adm = h.admit(h.submit(request("t2", private + REPLY1 + TURN2, "chat-1")))
    assert adm.prefix is kept and adm.cached_tokens == history
    assert progress.num_computed_tokens == history
    assert h.memory.values(progress.slot) == cells
    h.check()


def test_a_short_session_is_kept_hot_and_found_as_a_child_of_its_family(store):
    # Nothing private fills a whole block: the session is still kept hot, found by its id or,
    # for a prompt that repeats its whole history, as a child of the family prefix the blocks
    # match; another conversation sharing it does not replace it.
    h = Harness(store=store, holders=8)
    private = (1, 2)
    progress, _ = h.admit(h.submit(request("t1", private, "chat-1")))
    h.prefill(progress)
    h.generate(progress, REPLY1)
    h.finish(progress, REPLY1)
    store.flush()
    assert store.stats()["sessions_warm"] == 0 and h.reuse.stats()["hot_idle_sessions"] == 1
    history = len(FAMILY + private + REPLY1)
    turn2 = private + REPLY1 + TURN2
    other, adm_other = h.admit(h.submit(request("o", turn2, "chat-2")))
    assert adm_other.prefix.session_key == "chat-1" and adm_other.cached_tokens == history
    diverged, adm_diverged = h.admit(h.submit(request("d", (1, 9, 9, 9), "chat-3")))
    # It opens like the session (one token past the family) but does not repeat its history:
    # it gets the family prefix alone, and neither pins nor replaces the session.
    assert adm_diverged.prefix.session_key is None
    assert adm_diverged.cached_tokens == len(FAMILY)
    progress, adm = h.admit(h.submit(request("t2", turn2, "chat-1")))
    assert adm.prefix.session_key == "chat-1" and adm.cached_tokens == history
    for running in (other, diverged, progress):
        h.prefill(running)
        h.finish(running)
        h.check()
    sessions = {p.session_key for p in h.reuse.cache.hot() if p.session_key is not None}
    assert sessions == {"chat-1", "chat-2", "chat-3"}  # chat-1's newer turn replaced its older


def test_an_auto_session_shorter_than_a_block_is_found_by_its_next_turn(store):
    # The same short request repeated without an id or a family: the first registers its whole
    # blocks (16 tokens) as a prefix, and the 4 tokens past them stay hot as an auto session.
    # A repeat shares the whole blocks and computes the rest as the first did (the same logits);
    # a next turn, whose prompt goes on past the history, shares all of it.
    h = Harness(store=store, auto_sessions=True)
    prompt = tuple(range(1, 21))
    for i in range(4):
        progress, adm = h.admit(h.submit(GenerationRequest(f"r{i}", prompt, 4)))
        if i > 0:
            assert adm.prefix.session_key is None and adm.cached_tokens == 16
        h.prefill(progress)
        h.finish(progress, (70,))
        h.check()
    progress, adm = h.admit(h.submit(GenerationRequest("next", prompt + (90, 91), 4)))
    assert adm.prefix.session_key is not None and adm.cached_tokens == len(prompt)
    h.check()


def test_a_repeat_of_a_prompt_kept_with_its_logits_shares_every_cell(store):
    # The engine keeps the logits a prompt gave with its session: a repeat of exactly that
    # prompt shares all of its cells (nothing to compute) and draws from those logits.
    h = Harness(store=store, auto_sessions=True)
    prompt = tuple(range(1, 21))
    logits = np.linspace(-1.0, 1.0, 8, dtype=np.float32)
    progress, _ = h.admit(h.submit(GenerationRequest("first", prompt, 4)))
    h.prefill(progress)
    h.generate(progress, (70, 71))
    cells = h.memory.values(progress.slot)
    h.finish(progress, (70, 71, 72), prompt_logits=logits)
    h.check()
    progress, adm = h.admit(h.submit(GenerationRequest("again", prompt, 4)))
    assert adm.cached_tokens == progress.num_computed_tokens == len(prompt)
    assert adm.prefix.logits is logits and adm.prefix.logits_at == len(prompt)
    assert h.memory.values(progress.slot) == {p: v for p, v in cells.items() if p < len(prompt)}
    h.finish(progress)
    h.check()
    # Another prompt that stops one token short, or goes one further, is no repeat.
    for other in (prompt[:-1], prompt + (5,)):
        progress, adm = h.admit(h.submit(GenerationRequest("other", other, 4)))
        assert progress.num_computed_tokens < len(other)
        h.prefill(progress)
        h.finish(progress)
        h.check()


def test_a_short_first_turn_stays_hot_for_its_next_turn_and_is_never_parked(store):
    # Less than a block (16 tokens) past the family prefix: no later prompt's block names it.
    h = Harness(store=store, auto_sessions=True, block_tokens=16)
    short, reply = (1, 2, 3, 4, 5, 6), (70, 71)
    progress, _ = h.admit(h.submit(request("s1", short)))
    h.prefill(progress)
    h.generate(progress, reply)
    h.finish(progress, reply + (72,))
    h.check()
    (kept,) = [p for p in h.reuse.cache.hot() if p.session_key is not None]
    assert kept.session_key.startswith(AUTO_TAIL_PREFIX) and kept.parent is not None
    # Another conversation that only opens with the family does not attach to it.
    progress, adm = h.admit(h.submit(request("other", (9, 9, 9))))
    assert adm.prefix is kept.parent and adm.cached_tokens == len(FAMILY)
    h.prefill(progress)
    h.finish(progress)
    h.check()
    # Its next turn shares the whole history.
    progress, adm = h.admit(h.submit(request("s2", short + reply + (80, 81))))
    assert adm.prefix is kept and adm.cached_tokens == len(FAMILY + short + reply)
    h.prefill(progress)
    h.finish(progress)
    h.check()
    # Demoted, such sessions are dropped: a stored copy could never be looked up.
    assert h.reuse.evict_idle()
    store.flush()
    assert store.stats()["sessions_warm"] == 0
    h.check()


def test_new_named_conversations_of_one_family_wait_for_the_first_to_compute_it(store):
    # Each names a session the store has never seen: the lookup finds nothing, so like any new
    # request the second waits for the family the first computes instead of computing it too.
    h = Harness(store=store)
    first = h.submit(request("a", TURN1, session_id="new-1"))
    second = h.submit(request("b", TURN2, session_id="new-2"))
    # Nothing stored under its id, no part of its prompt either: nothing is even fetched.
    assert second.session is None and not second.resuming
    progress, _ = h.admit(first)
    assert h.reuse.awaited_family(second) is not None
    h.prefill(progress, upto=len(FAMILY))
    assert h.reuse.awaited_family(second) is None
    _, adm = h.admit(second)
    assert adm.cached_tokens == len(FAMILY)
    h.check()


def test_without_a_free_holder_a_session_parks_warm_and_resumes_from_there(store):
    h = Harness(store=store, holders=1)  # the family prefix takes the only holder
    cells = first_turn(h)
    store.flush()
    assert store.stats()["sessions_warm"] == 1
    pending = h.submit(second_turn_request())
    assert pending.session is not None  # decoding while it waits
    progress, adm = h.admit(pending)
    history = len(FAMILY + TURN1 + REPLY1)
    assert adm.resume_tier == "warm" and adm.cached_tokens == history
    assert adm.prefix_tokens == len(FAMILY)  # the family comes back shared
    assert progress.num_computed_tokens == history
    restored = h.memory.values(progress.slot)
    assert restored.keys() == cells.keys()
    assert all(abs(restored[p] - v) <= 0.02 * abs(v) for p, v in cells.items())  # int8
    assert h.budget.reserved_by(progress.slot) == pending.cells_needed - len(FAMILY)
    h.check()


def test_an_evicted_hot_session_is_demoted_to_the_warm_tier(store):
    h = Harness(store=store)
    first_turn(h)
    assert store.stats()["sessions_warm"] == 0
    h.reuse.evict_idle()
    store.flush()
    assert store.stats()["sessions_warm"] == 1 and store.holds("chat-1")
    assert h.budget.held_cells == 0
    h.check()


def test_a_session_evicted_while_its_next_turn_waits_is_fetched_not_recomputed(store):
    h = Harness(store=store)
    cells = first_turn(h)
    pending = h.submit(second_turn_request())
    assert pending.session is None  # hot when it came: nothing to fetch
    h.reuse.evict_idle()  # before its admission, others need the room: session and family go
    progress, adm = h.admit(pending)
    assert h.sessions.refetches == 1
    # No snapshot store here: the family is computed again, the delta goes on top.
    assert adm.deferred_session is not None and progress.chunk_stop == len(FAMILY)
    h.prefill(progress, upto=len(FAMILY))
    history = len(FAMILY + TURN1 + REPLY1)
    assert adm.resume_tier == "warm" and progress.num_computed_tokens == history
    assert h.memory.values(progress.slot).keys() == cells.keys()
    h.check()


def local_snapshots():
    from kv3d.engine.catalog import LocalSnapshots

    return LocalSnapshots(64 << 20, b"f" * 16)


def test_a_family_evicted_while_a_resume_waits_comes_back_from_its_snapshot(store):
    snapshots = local_snapshots()
    h = Harness(store=store, publish=snapshots.publish, snapshot_source=snapshots.fetch)
    first_turn(h)
    pending = h.submit(second_turn_request())
    h.reuse.evict_idle()
    progress, adm = h.admit(pending)
    history = len(FAMILY + TURN1 + REPLY1)
    assert adm.resume_tier == "warm" and adm.deferred_session is None
    assert adm.prefix_tokens == len(FAMILY) and progress.num_computed_tokens == history
    assert h.reuse.counters["snapshot_restores_total"] == 1
    h.check()


def test_a_new_conversation_whose_family_was_evicted_while_it_waited_restores_it(store):
    snapshots = local_snapshots()
    h = Harness(store=store, publish=snapshots.publish, snapshot_source=snapshots.fetch)
    first_turn(h)
    pending = h.submit(request("t2", (90, 91, 92, 93, 94), "chat-2"))
    assert pending.snapshot is None  # its family was hot when it came
    h.reuse.evict_idle()
    progress, adm = h.admit(pending)
    assert progress.num_computed_tokens == len(FAMILY) and adm.prefix_tokens == len(FAMILY)
    assert h.reuse.counters["snapshot_restores_total"] == 1
    h.check()


def test_after_a_restart_the_family_is_recomputed_and_the_delta_goes_on_top(store):
    h = Harness(store=store)
    cells = first_turn(h)
    h.sessions.close()  # shutdown: hot sessions are parked, warm ones written to disk

    restarted_store = SessionStore(64 << 20, cold_dir=str(store.cold.folder))
    h2 = Harness(store=restarted_store)  # same model, empty cache
    pending = h2.submit(second_turn_request())
    progress, adm = h2.admit(pending)
    assert adm.deferred_session is not None and progress.chunk_stop == len(FAMILY)
    assert progress.num_computed_tokens == 0
    h2.prefill(progress, upto=len(FAMILY))
    history = len(FAMILY + TURN1 + REPLY1)
    assert adm.resume_tier == "cold" and progress.num_computed_tokens == history
    restored = h2.memory.values(progress.slot)
    assert restored.keys() == cells.keys()
    h2.check()
    restarted_store.close()


def test_a_session_llama_cpp_refuses_is_recomputed_and_counted(store):
    h = Harness(store=store, holders=1)
    first_turn(h)
    store.flush()
    h.memory.refuse_restores = 1
    progress, adm = h.admit(h.submit(second_turn_request()))
    assert adm.resume_tier is None and adm.cached_tokens == len(FAMILY)  # a plain prefix hit
    assert h.reuse.counters["session_restore_failures_total"] == 1
    assert h.reuse.state_failures == 1
    h.check()


def test_a_restore_refused_in_a_busy_cache_is_no_evidence_against_the_state_format(store):
    # 100 cells: the family prefix and the running sequence fill more than half of them, so
    # llama.cpp's refusal most likely meant no room, not a state it cannot read.
    h = Harness(store=store, holders=1, kv_cells=100)
    first_turn(h)
    store.flush()
    h.memory.refuse_restores = 1
    progress, adm = h.admit(h.submit(second_turn_request()))
    assert adm.resume_tier is None  # recomputed
    assert h.reuse.state_failures == 0  # nothing toward safe mode
    assert h.reuse.counters["state_restores_without_room_total"] == 1
    h.check()


def test_a_diverged_history_resumes_only_the_common_part(store):
    h = Harness(store=store, holders=1)
    first_turn(h)
    store.flush()
    edited = TURN1[:10] + (99,) * 10 + REPLY1 + TURN2  # the user edited their first message
    progress, adm = h.admit(h.submit(request("t2", edited, "chat-1")))
    assert adm.cached_tokens == len(FAMILY) + 10
    assert h.memory.seq_pos_max(progress.slot) == len(FAMILY) + 10 - 1
    h.check()


def test_another_models_session_is_not_resumed(store):
    h = Harness(store=store, holders=1)
    first_turn(h)
    store.flush()
    other = Harness(store=store, holders=1, fingerprint=b"o" * 16)
    progress, adm = other.admit(other.submit(second_turn_request()))
    assert adm.resume_tier is None and progress.num_computed_tokens == 0
    other.check()


def test_auto_sessions_find_a_returning_history_without_an_id(store):
    h = Harness(store=store, holders=1, auto_sessions=True)
    first_turn(h, session_id=None)
    store.flush()
    (key,) = store.recent_ids(10)
    assert key.startswith(AUTO_SESSION_PREFIX)
    progress, adm = h.admit(h.submit(second_turn_request(session_id=None)))
    assert adm.resume_tier == "warm"
    h.check()


def test_auto_session_keys_and_conversations():
    assert auto_session_key(0xABC) == "auto:0000000000000abc"
    assert same_conversation("chat-1", "chat-1") and not same_conversation("chat-1", "chat-2")
    assert same_conversation(auto_session_key(1), auto_session_key(2))
    assert not same_conversation("chat-1", auto_session_key(2))


def test_a_session_request_with_nothing_stored_is_admitted_on_its_shared_cells(store):
    # Budget for the family once plus two private reservations: sharing the family is what
    # lets the second conversation in.
    h = Harness(store=store, kv_cells=len(FAMILY) + 2 * 40)
    first, _ = h.admit(h.submit(request("a", TURN1, "chat-a")))
    h.prefill(first)
    pending = h.submit(request("b", TURN1, "chat-b"))  # a new conversation: nothing stored
    assert pending.session is None  # nothing under its id, no part of its prompt: no fetch
    shared = h.sessions.shared_cells(pending, h.reuse.cells_already_hot(pending))
    assert shared == len(FAMILY)
    assert h.scheduler.can_admit(pending, shared)
    assert not h.scheduler.can_admit(pending, 0)
    h.check()


def test_a_deferred_resume_is_admitted_on_no_shared_cells(store):
    h = Harness(store=store, holders=1)
    first_turn(h)
    store.flush()
    h.reuse.evict_idle()  # the family prefix is gone: the resume must recompute it first
    pending = h.submit(second_turn_request())
    assert h.sessions.shared_cells(pending, h.reuse.cells_already_hot(pending)) == 0
    progress, adm = h.admit(pending)
    assert adm.deferred_session is not None
    assert h.budget.reserved_by(progress.slot) == pending.cells_needed
    h.check()


def charge_until_due(h: Harness, session_key: str, max_steps=1000) -> int:
    """Run decode steps of 4 tokens over 3,000 cells until the session leaves the cache."""
    for steps in range(1, max_steps + 1):
        h.sessions.after_step(4, 0, 3000, 0.1)
        if not any(p.session_key == session_key for p in h.reuse.cache.hot()):
            return steps
    raise AssertionError(f"{session_key} still hot after {max_steps} steps")


def rent_known(h: Harness) -> IdleRent:
    """An idle rent whose cell cost is known (1 µs per cell and token) and price is 0.1 ms."""
    rent = IdleRent()
    rent.cost.s_per_cell_token = 1e-6
    rent.resumed(1e-4, 1)
    h.sessions.rent = rent
    return rent


def test_an_idle_session_is_demoted_once_the_steps_beside_it_paid_its_price(store):
    h = Harness(store=store)
    rent = rent_known(h)
    cells = first_turn(h)
    # 4 tokens × 1 µs per step against a 100 µs price: due 25 steps after the one it finished
    # in (the harness's first step), which it does not pay for.
    assert charge_until_due(h, "chat-1") == 26
    store.flush()
    assert store.holds("chat-1") and h.sessions.stats()["session_rent_demotions_total"] == 1
    assert rent.encode_cost.seconds(100) is None  # the step thread reads it at its next step
    h.sessions.after_step(4, 0, 3000, 0.1)
    assert rent.encode_cost.seconds(100) > 0  # the park's encode is part of the next price
    family = [p for p in h.reuse.cache.hot() if p.session_key is None]
    assert len(family) == 1 and family[0].n_tokens == len(FAMILY)  # the family stays hot
    h.check()
    progress, adm = h.admit(h.submit(second_turn_request()))
    assert adm.resume_tier == "warm" and adm.cached_tokens == len(FAMILY + TURN1 + REPLY1)
    restored = h.memory.values(progress.slot)
    assert all(abs(restored[p] - v) <= 0.02 * abs(v) for p, v in cells.items())
    h.check()


def test_a_prompt_about_to_run_demotes_the_idle_sessions_its_tokens_would_pay_for(store):
    h = Harness(store=store)
    rent = rent_known(h)
    first_turn(h)
    h.sessions.after_step(4, 0, 3000, 0.1)  # the step it finished in: idle from here
    paid = rent.paid_s_per_cell
    # 1 µs per cell and token against a price of 100 µs per cell: a prompt of 99 tokens leaves
    # it hot, one of 101 would charge it more than its price: it goes before that prompt's
    # first step.
    h.sessions.before_prefill(99)
    assert "chat-1" in {p.session_key for p in h.reuse.cache.hot()}
    h.sessions.before_prefill(0)
    assert "chat-1" in {p.session_key for p in h.reuse.cache.hot()}
    h.sessions.before_prefill(101)
    assert "chat-1" not in {p.session_key for p in h.reuse.cache.hot()}
    assert rent.paid_s_per_cell == paid  # the tokens are charged by the steps that run them
    store.flush()
    assert store.holds("chat-1") and h.sessions.stats()["session_rent_demotions_total"] == 1
    h.check()


def test_a_prompt_does_not_demote_the_session_it_resumes_from(store):
    h = Harness(store=store)
    rent_known(h)
    first_turn(h)
    h.sessions.after_step(4, 0, 3000, 0.1)
    (session,) = [p for p in h.reuse.cache.hot() if p.session_key == "chat-1"]
    progress, adm = h.admit(h.submit(second_turn_request()))
    assert adm.prefix is session
    h.sessions.before_prefill(10_000)
    assert session in h.reuse.cache.hot()
    h.check()


def test_a_session_stays_hot_while_no_step_runs_and_the_longest_idle_goes_first(store):
    h = Harness(store=store, holders=4)
    rent = rent_known(h)
    first_turn(h, "chat-1")
    for _ in range(21):  # the first is the step chat-1 finished in
        h.sessions.after_step(4, 0, 3000, 0.1)
    progress, _ = h.admit(h.submit(request("b1", tuple(range(300, 320)), "chat-2")))
    h.prefill(progress)
    h.finish(progress, REPLY1)
    h.sessions.after_step(4, 0, 3000, 0.1)  # the step chat-2 finished in
    paid = rent.paid_s_per_cell
    # chat-1 has paid 84 of its 100 µs, chat-2 nothing: 4 steps later only chat-1 is due.
    for _ in range(4):
        h.sessions.after_step(4, 0, 3000, 0.1)
    hot = {p.session_key for p in h.reuse.cache.hot()}
    assert "chat-1" not in hot and "chat-2" in hot
    assert rent.paid_s_per_cell == pytest.approx(paid + 16e-6)
    h.check()


def test_an_idle_session_in_use_by_a_running_sequence_is_not_charged(store):
    h = Harness(store=store)
    rent = rent_known(h)
    first_turn(h)
    (session,) = [p for p in h.reuse.cache.hot() if p.session_key == "chat-1"]
    # Another conversation whose prompt starts with chat-1's history attaches to its cells.
    progress, adm = h.admit(h.submit(request("x", TURN1 + REPLY1 + (90, 91, 92))))
    assert adm.prefix is session and session.refs == 1
    for _ in range(100):
        h.sessions.after_step(4, 0, 3000, 0.1)
    assert session in h.reuse.cache.hot()
    h.prefill(progress)
    h.finish(progress)
    h.sessions.after_step(4, 0, 3000, 0.1)
    assert session.idle_mark == rent.paid_s_per_cell  # idle again from after that step
    h.check()


def test_a_session_does_not_pay_rent_for_the_step_it_finished_in(store):
    h = Harness(store=store)
    rent = rent_known(h)
    first_turn(h)  # finished: idle from the end of the step it ran in
    # That step alone is worth the whole 100 µs price, the next one 4 µs.
    h.sessions.after_step(100, 0, 3000, 0.1)
    assert "chat-1" in {p.session_key for p in h.reuse.cache.hot()}
    paid = rent.paid_s_per_cell
    h.sessions.after_step(4, 0, 3000, 0.1)
    assert "chat-1" in {p.session_key for p in h.reuse.cache.hot()}
    assert rent.paid_s_per_cell == pytest.approx(paid + 4e-6)
    h.check()


def test_the_engine_without_sessions_answers_every_call_the_engine_makes_of_sessions():
    from kv3d.engine.sessions import NoSessions, Sessions

    public = {n for n in vars(Sessions) if not n.startswith("_") and callable(vars(Sessions)[n])}
    missing = {n for n in public if not hasattr(NoSessions, n)}
    # `demote` is the prefix cache's eviction hook, which only a real session store sets.
    assert missing <= {"demote"}, missing


def test_an_unused_family_with_a_snapshot_leaves_once_the_steps_paid_its_restore(store):
    snapshots = local_snapshots()
    h = Harness(store=store, publish=snapshots.publish, snapshot_source=snapshots.fetch)
    rent_known(h)
    first_turn(h)
    charge_until_due(h, "chat-1")  # the session goes first; its family was pinned by it
    family = [p for p in h.reuse.cache.hot() if p.session_key is None]
    assert len(family) == 1 and family[0].refs == 0 and family[0].restorable
    # 4 tokens × 1 µs per step against a restore of 100 µs per cell (no export or encode):
    # 25 steps after the one in which it became unused (one more where the clock's floating
    # point difference falls a hair short); a session's price would take longer.
    steps = 0
    while h.reuse.cache.hot():
        assert steps < 100, "the unused family never left"  # fails, not hangs
        h.sessions.after_step(4, 0, 3000, 0.1)
        steps += 1
    assert steps in (26, 27)
    assert h.sessions.stats()["prefix_rent_evictions_total"] == 1
    assert h.sessions.stats()["session_rent_demotions_total"] == 1
    h.check()
    # Its next conversation restores it from the snapshot instead of computing it.
    progress, adm = h.admit(h.submit(request("t3", (90, 91, 92, 93, 94), "chat-2")))
    assert adm.prefix_tokens == len(FAMILY) and progress.num_computed_tokens == len(FAMILY)
    assert h.reuse.counters["snapshot_restores_total"] == 1
    h.check()


def test_an_unused_family_that_no_snapshot_can_bring_back_stays_hot(store):
    h = Harness(store=store)  # no snapshot store: evicting it would mean computing it again
    rent_known(h)
    first_turn(h)
    charge_until_due(h, "chat-1")
    for _ in range(500):
        h.sessions.after_step(4, 0, 3000, 0.1)
    family = [p for p in h.reuse.cache.hot() if p.session_key is None]
    assert len(family) == 1 and family[0].refs == 0 and not family[0].restorable
    assert h.sessions.stats()["prefix_rent_evictions_total"] == 0
    h.check()
