"""Prefix reuse on the real models, in-process: hits, exactness, snapshots, fallbacks."""

from __future__ import annotations

import asyncio

import pytest

from kv3d.config import load_config
from kv3d.engine.engine import Engine, new_request_id
from kv3d.engine.generation import Finished, GenerationRequest, SamplingParams, TextDelta
from kv3d.server.chat import ChatMessage, Tokenizer

pytestmark = pytest.mark.integration

GREEDY = SamplingParams(temperature=0.0)
# ~300 tokens: long enough to span blocks, short enough (< 512 cells) that llama.cpp's CPU flash
# attention keeps results independent of where the cells sit (see README, "Exactness").
SYSTEM = (
    "You are the support assistant of a company that builds inference servers. Answer briefly, "
    "cite the documentation section you rely on, and never invent configuration keys. "
) * 8


def config(model_path=None, cache=None, **prefix):
    overrides = {
        "cache": {"gpu_hot_mb": 128, **(cache or {})},
        "server": {"threads": 2},
        "model": {"context_tokens": 2048},
        "engine": {"max_sequences": 4},
        "prefix": {"snapshot_min_tokens": 16, **prefix},
    }
    if model_path is not None:
        overrides["model"]["path"] = str(model_path)
    return load_config(overrides=overrides)


class Published:
    """Collects what an engine publishes (what the registry would receive)."""

    def __init__(self):
        self.items = []

    def __call__(self, meta, blob):
        self.items.append((meta, blob))


def make_request(tok: Tokenizer, question: str, max_tokens=1, top_logprobs=20, system=SYSTEM):
    msgs = [ChatMessage("system", system), ChatMessage("user", question)]
    prompt = tok.encode_chat(msgs)
    return GenerationRequest(
        new_request_id(),
        tuple(prompt),
        max_tokens,
        GREEDY,
        top_logprobs=top_logprobs,
        family_tokens=tok.family_tokens(msgs, prompt),
    )


def fresh(request: GenerationRequest) -> GenerationRequest:
    return GenerationRequest(
        new_request_id(),
        request.prompt_tokens,
        request.max_tokens,
        request.sampling,
        top_logprobs=request.top_logprobs,
        family_tokens=request.family_tokens,
    )


def run(engine: Engine, request: GenerationRequest, snapshot=None):
    async def go():
        text, logprobs, end = "", [], None
        async for event in engine.stream(request, snapshot):
            if isinstance(event, TextDelta):
                text += event.text
                logprobs.extend(event.logprobs)
            else:
                end = event
        return text, logprobs, end

    return asyncio.run(go())


def first_logits(logprobs) -> list[tuple[int, float]]:
    return [(token, lp) for token, _, lp in logprobs[0].top]


@pytest.fixture(scope="module")
def smol_tok(smollm2_path):
    tok = Tokenizer.load(smollm2_path)
    yield tok
    tok.close()


def test_second_request_of_a_family_is_a_hit_with_cached_tokens(smol_tok):
    with Engine.from_config(config()) as engine:
        a = make_request(smol_tok, "How do I change the port?", max_tokens=4)
        b = make_request(smol_tok, "Which metrics exist?", max_tokens=4)
        assert a.family_tokens == b.family_tokens and a.family_tokens > 200
        _, _, end_a = run(engine, a)
        _, _, end_b = run(engine, b)
        stats = engine.stats()
        engine.check_invariants()
    assert end_a.usage.cached_tokens == 0
    assert end_b.usage.cached_tokens == a.family_tokens
    assert (stats.prefix_lookups_total, stats.prefix_hits_total) == (2, 1)
    assert stats.prefix_tokens_reused_total == a.family_tokens
    assert (
        stats.prefill_tokens_total == len(a.prompt_tokens) + len(b.prompt_tokens) - b.family_tokens
    )
    assert stats.hot_prefixes == 1 and stats.kv_cells_reserved == 0


@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_hit_and_snapshot_restore_give_bit_identical_logits(model, request):
    """Chunking held fixed (a miss prefills the family prefix as its own chunk), the logits after
    a shared-cells hit and after a snapshot restore equal computing the prefix in place. (No
    sessions kept: the repeat would share the whole prompt and its kept logits instead.)"""
    path = request.getfixturevalue(f"{model}_path")
    tok = Tokenizer.load(path)
    published = Published()
    try:
        probe = make_request(tok, "How do I change the port?")
        no_sessions = config(path, cache={"auto_sessions": False})
        with Engine.from_config(no_sessions, publish=published) as first:
            _, computed, miss = run(first, probe)
            _, shared, hit = run(first, fresh(probe))
        ((meta, blob),) = published.items
        with Engine.from_config(config(path)) as second:  # another replica: cold cache
            _, restored, via_snapshot = run(second, fresh(probe), snapshot=blob)
            restores = second.stats().snapshot_restores_total
    finally:
        tok.close()
    family = probe.family_tokens or meta.n_tokens
    assert miss.usage.cached_tokens == 0
    assert hit.usage.cached_tokens == family
    assert via_snapshot.usage.cached_tokens == meta.n_tokens and restores == 1
    assert via_snapshot.snapshot_restore_s is not None
    assert first_logits(shared) == first_logits(computed)
    assert first_logits(restored) == first_logits(computed)


def test_reuse_off_gives_the_same_text_at_temperature_zero(smol_tok):
    questions = ["How do I change the port?", "Which metrics exist?", "How do I stop it?"]
    texts = {}
    for enabled in (True, False):
        cfg = config(enabled=enabled)
        # Finished conversations kept hot would occupy cells and move the next request's
        # cells elsewhere, which llama.cpp's CPU flash attention notices (README, Exactness).
        cfg.cache.auto_sessions = False
        with Engine.from_config(cfg) as engine:
            texts[enabled] = [
                run(engine, make_request(smol_tok, q, max_tokens=24, top_logprobs=None))[0]
                for q in questions
            ]
            if enabled:
                assert engine.stats().prefix_hits_total == 2
            else:
                assert engine.stats().prefix_lookups_total == 0
    assert texts[True] == texts[False]


def test_a_damaged_or_foreign_snapshot_is_refused_and_the_request_recomputes(smol_tok, gemma3_path):
    published = Published()
    probe = make_request(smol_tok, "How do I change the port?", max_tokens=8, top_logprobs=None)
    with Engine.from_config(config(), publish=published) as first:
        expected, _, _ = run(first, probe)
    ((_, blob),) = published.items
    damaged = bytearray(blob)
    damaged[len(damaged) // 2] ^= 0xFF
    with Engine.from_config(config()) as second:
        text, _, end = run(second, fresh(probe), snapshot=bytes(damaged))
        assert isinstance(end, Finished) and end.usage.cached_tokens == 0
        assert text == expected
        assert second.stats().snapshot_rejects_total == 1
    with Engine.from_config(config(gemma3_path)) as other_model:
        gemma_tok = Tokenizer.load(gemma3_path)
        try:
            req = make_request(gemma_tok, "Hi", max_tokens=2, top_logprobs=None)
        finally:
            gemma_tok.close()
        _, _, end = run(other_model, req, snapshot=blob)  # SmolLM2's snapshot, Gemma's replica
        assert isinstance(end, Finished) and end.usage.cached_tokens == 0
        assert other_model.stats().snapshot_rejects_total == 1


def test_idle_prefixes_are_evicted_when_cells_run_short(smol_tok):
    cfg = config()
    cfg.cache.gpu_hot_mb = 32  # ~1400 cells: room for few families beside a running request
    cfg.model.context_tokens = 1024
    cfg.engine.max_sequences = 1
    with Engine.from_config(cfg) as engine:
        for n in range(6):
            system = f"Family {n}. " + SYSTEM
            _, _, end = run(
                engine,
                make_request(smol_tok, "Hi", max_tokens=300, top_logprobs=None, system=system),
            )
            assert isinstance(end, Finished)
            engine.check_invariants()
        stats = engine.stats()
        newest = make_request(
            smol_tok, "Hello", max_tokens=2, top_logprobs=None, system="Family 5. " + SYSTEM
        )
        _, _, end = run(engine, newest)
    assert stats.hot_prefixes < 6  # older families made room for newer requests
    assert end.usage.cached_tokens == newest.family_tokens  # the most recent one stayed hot


def test_a_burst_of_one_new_family_computes_its_prefix_once(smol_tok):
    requests = [
        make_request(smol_tok, f"Question {i}: how do I rotate the logs?", max_tokens=2)
        for i in range(4)
    ]

    async def burst(engine):
        async def one(req):
            async for event in engine.stream(req):
                if isinstance(event, Finished):
                    return event

        return await asyncio.gather(*(one(r) for r in requests))

    with Engine.from_config(config()) as engine:
        ends = asyncio.run(burst(engine))
        stats = engine.stats()
    cached = sorted(e.usage.cached_tokens for e in ends)
    family = requests[0].family_tokens
    # One request computes the family prefix; the other three wait for it and share it.
    assert cached[0] == 0 and all(c >= family for c in cached[1:]), cached
    assert (
        stats.prefill_tokens_total
        < family + sum(len(r.prompt_tokens) - family for r in requests) + 4
    )
