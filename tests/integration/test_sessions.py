"""Sessions on the real model: kept as int8 deltas, resumed from RAM or disk, never wrong."""

from __future__ import annotations

import asyncio

import pytest

from kv3d.config import load_config
from kv3d.engine.engine import Engine, new_request_id
from kv3d.engine.generation import Finished, GenerationRequest, SamplingParams, TextDelta
from kv3d.server.chat import ChatMessage, Tokenizer

pytestmark = pytest.mark.integration

SYSTEM = "You are a concise assistant for the operators of an inference server. " * 6


def config(cold_dir="", warm_mb=64, enabled=True, max_hot=1):
    """`max_hot=1`: the family prefix takes the only holder, so finished sessions cannot stay
    hot and go straight to the warm tier (the tiers below are what most tests look at)."""
    return load_config(
        overrides={
            "cache": {"gpu_hot_mb": 128, "ram_warm_mb": warm_mb, "ssd_cold_path": str(cold_dir)},
            "server": {"threads": 2},
            "model": {"context_tokens": 2048},
            "engine": {"max_sequences": 4},
            "prefix": {"enabled": enabled, "max_hot": max_hot},
        }
    )


@pytest.fixture(scope="module")
def tok(smollm2_path):
    t = Tokenizer.load(smollm2_path)
    yield t
    t.close()


def request(tok, messages, session_id, max_tokens=24, top_logprobs=None):
    msgs = [ChatMessage("system", SYSTEM)] + [ChatMessage(r, c) for r, c in messages]
    prompt = tok.encode_chat(msgs)
    return GenerationRequest(
        new_request_id(),
        tuple(prompt),
        max_tokens,
        SamplingParams(temperature=0.0),
        top_logprobs=top_logprobs,
        family_tokens=tok.family_tokens(msgs, prompt),
        session_id=session_id,
    )


def run(engine, req):
    async def go():
        text, lps, end = "", [], None
        async for ev in engine.stream(req):
            if isinstance(ev, TextDelta):
                text, lps = text + ev.text, lps + list(ev.logprobs)
            else:
                end = ev
        return text + getattr(end, "text", ""), lps, end

    return asyncio.run(go())


def two_turns(engine, tok, session_id, top_logprobs=None):
    turn1 = [("user", "How do I change the port of the server?")]
    answer, _, first = run(engine, request(tok, turn1, session_id))
    if engine.sessions is not None:
        engine.sessions.flush()
    turn2 = turn1 + [("assistant", answer), ("user", "And how do I check that it works?")]
    return first, run(engine, request(tok, turn2, session_id, 1, top_logprobs))


def test_returning_session_resumes_from_the_warm_tier_instead_of_prefilling(tok):
    with Engine.from_config(config()) as engine:
        first, (_, lps, second) = two_turns(engine, tok, "conv-1", top_logprobs=5)
        engine.sessions.flush()
        stats = engine.stats()
    history = first.usage.prompt_tokens + first.usage.completion_tokens
    assert isinstance(second, Finished) and second.session_tier == "warm"
    assert second.session_resume_s is not None and second.session_resume_s < 1.0
    # Nearly all of turn 1 (prompt + answer) comes back; only the new turn is prefilled.
    assert second.usage.cached_tokens >= history - 8
    assert stats.session_parks_total == 2 and stats.session_resumes_total == 1
    assert 1.8 < stats.delta_compression_ratio < 2.0

    with Engine.from_config(config(enabled=False)) as plain:  # recompute everything
        _, (_, ref_lps, ref) = two_turns(plain, tok, "conv-1", top_logprobs=5)
    assert ref.usage.cached_tokens == 0
    # The int8 delta stays within the engine's noise: same top token, close log-probabilities.
    assert lps[0].token_id == ref_lps[0].token_id
    assert abs(lps[0].logprob - ref_lps[0].logprob) < 0.5


@pytest.mark.parametrize("codec, min_ratio", [("int4", 2.2), ("int4p", 3.2)])
def test_a_session_parked_in_4_bits_resumes_and_its_next_token_holds(tok, codec, min_ratio):
    # A long first turn, so that most of the private cells are coded (not in int4's exact
    # window of 32 cells; int4p has none).
    question = "Please read these notes and then answer. " + SYSTEM * 2
    turns = [("user", question)]
    cfg = config()
    cfg.cache.session_codec = codec
    with Engine.from_config(cfg) as engine:
        answer, _, first = run(engine, request(tok, turns, "conv-4bit"))
        engine.sessions.flush()
        turn2 = turns + [("assistant", answer), ("user", "And how do I check that it works?")]
        _, lps, second = run(engine, request(tok, turn2, "conv-4bit", 1, top_logprobs=5))
        engine.sessions.flush()
        stats = engine.stats()
    assert second.session_tier == "warm" and second.usage.cached_tokens > 200
    # ~300 private cells; int4 keeps the newest 32 exact: 2.3x measured, int4p 3.49x (int8:
    # ~1.9x). The cells' metadata is kept as it is, so short deltas stay under 3.5x.
    assert stats.delta_compression_ratio > min_ratio
    with Engine.from_config(config(enabled=False)) as plain:  # recompute everything
        plain_answer, _, _ = run(plain, request(tok, turns, "conv-4bit"))
        assert plain_answer == answer  # turn 1 never went through the codec
        _, ref_lps, _ = run(plain, request(tok, turn2, "conv-4bit", 1, top_logprobs=5))
    # int4 moves the next-token distribution ~1.75x as much as a different batch split does
    # (KL ~6e-3 per token on held-out text). Measured here: the same top token (p ~0.26) and
    # its log-probability 0.034 from recomputation's (int8: 0.048); 0.2 leaves room for the
    # engine's own noise, while a broken codec moves it by nats or changes the token.
    assert lps[0].token_id == ref_lps[0].token_id
    assert abs(lps[0].logprob - ref_lps[0].logprob) < 0.2


def test_cold_tier_survives_a_restart_and_a_corrupt_file_means_recompute(tok, tmp_path):
    cold = tmp_path / "cold"
    with Engine.from_config(config(cold_dir=cold, warm_mb=0)) as engine:
        turn1 = [("user", "How do I change the port of the server?")]
        answer, _, _ = run(engine, request(tok, turn1, "conv-cold"))
        run(engine, request(tok, [("user", "Hello")], "conv-other"))
        engine.sessions.flush()
        stats = engine.stats()
    assert stats.sessions_warm == 0 and stats.sessions_cold == 2 and stats.cold_bytes > 0
    assert not list(cold.glob("*.tmp*"))  # written atomically

    turn2 = turn1 + [("assistant", answer), ("user", "And then?")]
    with Engine.from_config(config(cold_dir=cold, warm_mb=0)) as restarted:
        _, _, resumed = run(restarted, request(tok, turn2, "conv-cold", 4))
        # The family prefix was recomputed (nothing was hot after the restart); the private
        # part of turn 1 came back from disk.
        assert resumed.session_tier == "cold" and resumed.usage.cached_tokens > 30

        for path in cold.glob("*.kv3d"):  # damage whatever is left on disk
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0xFF
            path.write_bytes(bytes(data))
        again = [("user", "Hello"), ("assistant", "Hi!"), ("user", "Bye")]
        text, _, end = run(restarted, request(tok, again, "conv-other", 4))
        assert isinstance(end, Finished) and end.session_tier is None and text
        assert restarted.stats().session_rejects_total == 1


def test_sessions_take_no_kv_cells_while_idle(tok):
    with Engine.from_config(config()) as engine:
        for n in range(6):
            run(engine, request(tok, [("user", f"Question {n}: what is a KV cache?")], f"s{n}"))
        engine.sessions.flush()
        stats = engine.stats()
        per_cell = engine.model.kv_bytes_per_cell("f16")
    assert stats.sessions_warm == 6 and stats.running_sequences == 0
    assert stats.kv_cells_reserved == 0
    # Idle sessions hold no cells: only the one shared family prefix is in the KV cache.
    assert stats.hot_prefixes == 1 and stats.kv_bytes_used == stats.hot_prefix_cells * per_cell
    assert stats.warm_bytes > 0


def test_a_conversation_without_an_id_is_detected_by_its_history(tok):
    with Engine.from_config(config()) as engine:
        first, (_, _, second) = two_turns(engine, tok, session_id=None)
        unrelated = request(tok, [("user", "Something else entirely, please.")], None, 4)
        _, _, other = run(engine, unrelated)
    history = first.usage.prompt_tokens + first.usage.completion_tokens
    assert second.session_tier == "warm"
    assert second.usage.cached_tokens >= history - 40  # up to the history's last whole block
    assert other.session_tier is None  # shares only the family prefix: a prefix hit
    assert other.usage.cached_tokens == unrelated.family_tokens


def test_auto_sessions_can_be_turned_off(tok):
    cfg = config()
    cfg.cache.auto_sessions = False
    with Engine.from_config(cfg) as engine:
        _, (_, _, second) = two_turns(engine, tok, session_id=None)
        engine.sessions.flush()
        assert engine.stats().session_parks_total == 0
    assert second.session_tier is None


def test_idle_sessions_stay_hot_until_pressure_then_demote_lru_to_warm(tok):
    with Engine.from_config(config(max_hot=2)) as engine:  # the family + one idle session
        turn1 = [("user", "How do I change the port of the server?")]
        answer_a, _, first_a = run(engine, request(tok, turn1, "a"))
        assert engine.stats().hot_idle_sessions == 1  # kept hot, no delta written
        engine.sessions.flush()
        assert engine.stats().session_parks_total == 0

        turn2 = turn1 + [("assistant", answer_a), ("user", "And then?")]
        _, _, hot_resume = run(engine, request(tok, turn2, "a", 4))
        assert hot_resume.session_tier is None  # straight from the KV cache
        assert hot_resume.usage.cached_tokens >= (
            first_a.usage.prompt_tokens + first_a.usage.completion_tokens - 32
        )

        # Another session needs the holder: the least recently used idle one (a) is demoted.
        run(engine, request(tok, [("user", "What does kv3d doctor check?")], "b"))
        engine.sessions.flush()
        stats = engine.stats()
        engine.check_invariants()
        assert stats.session_parks_total == 1 and stats.sessions_warm == 1
        assert stats.hot_idle_sessions == 1

        turn3 = turn2 + [("assistant", "Restart it."), ("user", "Thanks.")]
        _, _, warm_resume = run(engine, request(tok, turn3, "a", 2))
        assert warm_resume.session_tier == "warm" and warm_resume.usage.cached_tokens > 100


def test_a_prompt_whose_tokens_pay_an_idle_sessions_price_demotes_it_before_its_first_step(tok):
    with Engine.from_config(config(max_hot=4)) as engine:
        run(engine, request(tok, [("user", "How do I change the port of the server?")], "a"))
        (idle,) = [p for p in engine.reuse.cache.hot() if p.session_key == "a"]
        rent = engine.sessions.rent
        price_s = rent.price_s(idle.owned_cells)  # the start-up self-check's round trips
        assert price_s is not None and price_s > 0
        prompt = request(tok, [("user", "Summarise these notes: " + SYSTEM)], "b", 1)
        to_compute = len(prompt.prompt_tokens) - prompt.family_tokens
        # Attention over one idle cell as the steps would have measured it: enough that this
        # prompt's tokens alone pay twice session a's price (the engine is idle: no step runs).
        rent.cost.s_per_cell_token = 2 * price_s / (to_compute * idle.owned_cells)
        demoted_after_steps = []
        on_evict = engine.reuse.cache.on_evict

        def record(prefix):
            demoted_after_steps.append(engine.stats().steps_total)
            on_evict(prefix)

        engine.reuse.cache.on_evict = record
        steps_before = engine.stats().steps_total
        _, _, end = run(engine, prompt)
        engine.sessions.flush()
        stats = engine.stats()
        engine.check_invariants()
    assert isinstance(end, Finished)
    # Demoted at the prompt's admission, before the step that placed its first cells (charged
    # after that step, it would have left with the prompt's cells already above its own).
    assert demoted_after_steps == [steps_before]
    assert stats.session_rent_demotions_total == 1 and stats.sessions_warm == 1


def test_an_unused_family_leaves_once_its_rent_pays_a_restore_and_comes_back_from_its_snapshot(
    tok, monkeypatch
):
    from kv3d.engine.catalog import LocalSnapshots

    with Engine.from_config(config(max_hot=4)) as engine:
        snapshots = LocalSnapshots(64 << 20, engine.fingerprint)
        engine.set_snapshot_sink(snapshots.publish)
        engine.set_snapshot_source(snapshots.fetch)
        _, _, first = run(engine, request(tok, [("user", "How do I stop it?")], "a"))
        (family,) = [p for p in engine.reuse.cache.hot() if p.session_key is None]
        assert family.restorable  # published when its prompt computed it
        # Attention over one idle cell as if the steps had measured it dear: every step of the
        # next request pays more than any move costs, so session a leaves after the first one,
        # and its family, then used by nothing, after the next.
        rent = engine.sessions.rent
        rent.cost.s_per_cell_token = 1.0
        monkeypatch.setattr(rent.cost, "_fit", lambda: None)  # no refit over this test's steps
        other = [("user", "Summarise these notes: " + "The port is set with --port. " * 8)]
        unique = request(tok, other, "b", 8)
        unique = GenerationRequest(  # a system prompt of its own: not family a's
            unique.request_id,
            tuple(tok.encode_chat([ChatMessage("user", other[0][1])])),
            8,
            SamplingParams(temperature=0.0),
            session_id="b",
        )
        run(engine, unique)
        engine.sessions.flush()
        stats = engine.stats()
        engine.check_invariants()
        assert stats.session_rent_demotions_total >= 1 and stats.prefix_rent_evictions_total == 1
        assert all(p is not family for p in engine.reuse.cache.hot())
        # A new conversation of the family restores it from the snapshot instead of computing it.
        _, _, end = run(engine, request(tok, [("user", "How do I start it?")], "c"))
        stats = engine.stats()
        engine.check_invariants()
    assert isinstance(first, Finished) and isinstance(end, Finished)
    assert stats.snapshot_restores_total == 1
    assert end.usage.cached_tokens >= family.n_tokens


def test_stopping_an_engine_parks_its_hot_sessions_first(tok, tmp_path):
    """Scale-down or redeploy: a session kept hot is not lost when its replica stops."""
    cold = tmp_path / "cold"
    turn1 = [("user", "How do I change the port of the server?")]
    with Engine.from_config(config(cold_dir=cold, max_hot=2)) as engine:
        answer, _, _ = run(engine, request(tok, turn1, "kept-hot"))
        assert engine.stats().hot_idle_sessions == 1 and engine.stats().sessions_warm == 0
    turn2 = turn1 + [("assistant", answer), ("user", "And then?")]
    with Engine.from_config(config(cold_dir=cold, max_hot=2)) as restarted:
        _, _, resumed = run(restarted, request(tok, turn2, "kept-hot", 4))
    assert resumed.session_tier == "cold" and resumed.usage.cached_tokens > 30


def test_a_new_session_of_the_same_family_does_not_replace_an_idle_one(tok):
    with Engine.from_config(config(max_hot=4)) as engine:
        turn1 = [("user", "How do I change the port of the server?")]
        answer_a, _, _ = run(engine, request(tok, turn1, "first"))
        run(engine, request(tok, [("user", "What is a KV cache?")], "second"))
        engine.sessions.flush()
        stats = engine.stats()
        # Both conversations are kept (here: hot), neither was dropped for the other.
        assert stats.hot_idle_sessions + stats.sessions_warm == 2
        turn2 = turn1 + [("assistant", answer_a), ("user", "And then?")]
        _, _, resumed = run(engine, request(tok, turn2, "first", 4))
    assert resumed.usage.cached_tokens > resumed.usage.prompt_tokens - 40


def test_a_hot_session_resumes_hot_even_when_a_shared_copy_exists(tok):
    class Share:  # the object store's role, in memory
        def __init__(self):
            self.records = {}

        def publish(self, session_id, record, parts):
            self.records[session_id] = (record, parts)

        def fetch(self, session_id):
            return self.records.get(session_id)

        def flush(self):
            pass

    share = Share()
    with Engine.from_config(config(max_hot=4)) as engine:
        engine.set_session_share(share)
        first, (_, _, second) = two_turns(engine, tok, "shared-and-hot")
        engine.sessions.flush()
    assert "shared-and-hot" in share.records  # written behind after each turn
    assert second.session_tier is None  # but the exact hot cells were used, not the copy
    history = first.usage.prompt_tokens + first.usage.completion_tokens
    assert second.usage.cached_tokens >= history - 32


def test_branches_of_a_conversation_store_their_common_cells_once(tok):
    # Two conversations with the same long first turn that part at their second question (an
    # edited message, a regenerate under a new id): the parts of the first turn are kept once
    # in the warm tier, and the second branch, resumed on parts the first one coded, goes on
    # as recomputing it does.
    notes = "Please read these notes and then answer. " + SYSTEM * 4
    turn1 = [("user", notes)]
    cfg = config()
    cfg.cache.session_part_tokens = 128
    with Engine.from_config(cfg) as engine:
        answer, _, _ = run(engine, request(tok, turn1, "branch-a"))
        engine.sessions.flush()
        trunk = turn1 + [("assistant", answer)]
        branch_a = trunk + [("user", "And how do I check that it works?")]
        branch_b = trunk + [("user", "Which port does it use by default?")]
        run(engine, request(tok, branch_a, "branch-a", 4))
        engine.sessions.flush()
        run(engine, request(tok, branch_b, "branch-b", 4))
        engine.sessions.flush()
        stats = engine.stats()
        assert stats.session_parts_reused_total >= 2  # b took a's (a was cut into parts for b)
        assert stats.warm_bytes_saved > 0 and stats.warm_shared_parts >= 2
        turn3 = branch_b + [("assistant", "Port 8080."), ("user", "Thanks. Anything else?")]
        _, lps, third = run(engine, request(tok, turn3, "branch-b", 1, top_logprobs=5))
    assert third.session_tier == "warm" and third.usage.cached_tokens > 300
    with Engine.from_config(config(enabled=False)) as plain:  # recompute everything
        _, ref_lps, _ = run(plain, request(tok, turn3, "branch-b", 1, top_logprobs=5))
    assert lps[0].token_id == ref_lps[0].token_id
    assert abs(lps[0].logprob - ref_lps[0].logprob) < 0.5


def test_a_new_conversation_starts_on_the_parts_its_siblings_stored(tok):
    # Conversations parked warm (max_hot=1: none stays hot) with the same first turn, each
    # under its own id: a later one restores the parts of that turn its siblings stored
    # instead of computing them, and goes on as recomputing does.
    notes = "Please read these notes and then answer. " + SYSTEM * 4
    turn1 = [("user", notes), ("assistant", "I have read them."), ("user", "Ready?")]
    cfg = config()
    cfg.cache.session_part_tokens = 128
    with Engine.from_config(cfg) as engine:
        for sid, question in (("sib-a", "How do I start it?"), ("sib-b", "How do I stop it?")):
            run(engine, request(tok, turn1 + [("assistant", "Yes."), ("user", question)], sid, 4))
            engine.sessions.flush()
        third = turn1 + [("assistant", "Yes."), ("user", "Which port does it use?")]
        _, lps, end = run(engine, request(tok, third, "sib-c", 1, top_logprobs=5))
        stats = engine.stats()
    # sib-b already started on parts of sib-a's (cut at its lookup), sib-c on them again.
    assert end.session_tier == "parts" and stats.session_part_resumes_total == 2
    assert end.usage.cached_tokens >= 256  # two parts of 128 past the family prefix, at least
    with Engine.from_config(config(enabled=False)) as plain:  # recompute everything
        _, ref_lps, _ = run(plain, request(tok, third, "sib-c", 1, top_logprobs=5))
    assert lps[0].token_id == ref_lps[0].token_id
    assert abs(lps[0].logprob - ref_lps[0].logprob) < 0.5
