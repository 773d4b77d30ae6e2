"""The batching engine on the real bundled model, in-process (no Ray)."""

from __future__ import annotations

import asyncio

import pytest

from kv3d.config import load_config
from kv3d.engine.engine import Engine, new_request_id
from kv3d.engine.generation import Finished, GenerationRequest, Rejected, SamplingParams, TextDelta
from kv3d.server.chat import ChatMessage, Tokenizer

pytestmark = pytest.mark.integration

GREEDY = SamplingParams(temperature=0.0)


def engine_config(**engine):
    return load_config(
        overrides={
            "cache": {"gpu_hot_mb": 128},
            "server": {"threads": 2, "max_queued_requests": 16},
            "model": {"context_tokens": 2048},
            "engine": {"max_sequences": 8, **engine},
        }
    )


@pytest.fixture(scope="module")
def engine():
    with Engine.from_config(engine_config()) as eng:
        yield eng


@pytest.fixture(scope="module")
def tokenizer(engine):
    tok = Tokenizer.load(engine.settings.model_path)
    yield tok
    tok.close()


def chat_tokens(tokenizer, question: str) -> tuple[int, ...]:
    msgs = [ChatMessage("system", "You are a helpful assistant."), ChatMessage("user", question)]
    return tuple(tokenizer.encode_chat(msgs))


async def run(engine, request: GenerationRequest) -> tuple[str, list, Finished | Rejected]:
    text, logprobs = "", []
    async for event in engine.stream(request):
        if isinstance(event, TextDelta):
            text += event.text
            logprobs.extend(event.logprobs)
        else:
            return text + getattr(event, "text", ""), logprobs, event
    raise AssertionError("stream ended without a terminal event")


def req(tokens, max_tokens=16, sampling=GREEDY, **kw) -> GenerationRequest:
    return GenerationRequest(new_request_id(), tuple(tokens), max_tokens, sampling, **kw)


def test_answers_a_chat_prompt_with_usage(engine, tokenizer):
    prompt = chat_tokens(tokenizer, "What is the capital of France?")
    text, _, end = asyncio.run(run(engine, req(prompt, 32)))
    assert isinstance(end, Finished) and end.reason in ("stop", "length")
    assert "Paris" in text
    assert end.usage.prompt_tokens == len(prompt)
    assert 0 < end.usage.completion_tokens <= 32
    assert end.usage.cached_tokens == 0


def test_max_tokens_ends_with_length(engine, tokenizer):
    prompt = chat_tokens(tokenizer, "Write a long story about a dragon.")
    _, _, end = asyncio.run(run(engine, req(prompt, 5)))
    assert end.reason == "length" and end.usage.completion_tokens == 5


def test_stop_string_is_cut_from_the_output(engine, tokenizer):
    prompt = chat_tokens(tokenizer, "What is the capital of France?")
    full, _, _ = asyncio.run(run(engine, req(prompt, 32)))
    word = full.split()[2]  # a word the greedy answer certainly contains
    text, _, end = asyncio.run(run(engine, req(prompt, 32, stop=(word,))))
    assert end.reason == "stop"
    assert word not in text and full.startswith(text)


def test_concurrent_requests_are_decoded_in_shared_steps(engine, tokenizer):
    before = engine.stats()
    questions = [f"Name {n} animals that live in the sea." for n in range(2, 10)]

    async def all_of_them():
        return await asyncio.gather(
            *(run(engine, req(chat_tokens(tokenizer, q), 24)) for q in questions)
        )

    results = asyncio.run(all_of_them())
    assert all(isinstance(end, Finished) and text for text, _, end in results)
    after = engine.stats()
    assert after.batched_steps_total > before.batched_steps_total
    assert after.max_sequences_in_step >= 4
    assert after.running_sequences == 0 and after.kv_cells_reserved == 0
    engine.check_invariants()


def test_cancelling_a_stream_frees_its_slot(engine, tokenizer):
    prompt = chat_tokens(tokenizer, "Tell me everything about the history of Rome.")
    hot = SamplingParams(temperature=2.0, seed=7)  # noisy text: no early end of sequence

    async def start_then_abandon():
        stream = engine.stream(req(prompt, 1500, sampling=hot))
        deltas = 0
        async for event in stream:
            deltas += isinstance(event, TextDelta)
            if deltas == 3:
                break
        assert engine.stats().running_sequences == 1
        await stream.aclose()
        for _ in range(200):
            if engine.stats().running_sequences == 0:
                return
            await asyncio.sleep(0.01)

    asyncio.run(start_then_abandon())
    stats = engine.stats()
    assert stats.running_sequences == 0 and stats.kv_cells_reserved == 0
    assert stats.free_slots == engine.settings.max_sequences
    engine.check_invariants()


def test_greedy_alone_and_amid_traffic_agree_within_the_noise_floor(engine, tokenizer):
    """Batch composition changes the numerics: compare log-probabilities with
    a tolerance, never the text for equality."""
    prompt = chat_tokens(tokenizer, "What is the capital of France?")
    probe = req(prompt, 1, top_logprobs=5)
    _, alone, _ = asyncio.run(run(engine, probe))

    async def amid_traffic():
        others = [
            asyncio.create_task(run(engine, req(chat_tokens(tokenizer, f"Count to {n}."), 48)))
            for n in (10, 20, 30, 40, 50)
        ]
        await asyncio.sleep(0.3)  # the others are decoding when the probe arrives
        steps_before = engine.stats().batched_steps_total
        _, lps, _ = await run(engine, req(prompt, 1, top_logprobs=5))
        await asyncio.gather(*others)
        return lps, engine.stats().batched_steps_total - steps_before

    busy, batched_steps = asyncio.run(amid_traffic())
    assert batched_steps > 0
    top_alone = {tok: lp for tok, _, lp in alone[0].top}
    top_busy = {tok: lp for tok, _, lp in busy[0].top}
    common = set(top_alone) & set(top_busy)
    assert len(common) >= 4
    # Measured max |Δlogit| 1.0-1.6 between chunkings; top log-probs move less.
    assert max(abs(top_alone[t] - top_busy[t]) for t in common) < 0.5
    assert busy[0].token_id in list(top_alone)[:2]


def test_logprobs_are_normalised_and_sorted(engine, tokenizer):
    prompt = chat_tokens(tokenizer, "Say hello.")
    _, lps, _ = asyncio.run(run(engine, req(prompt, 3, top_logprobs=3)))
    assert len(lps) == 3
    for item in lps:
        top = [lp for _, _, lp in item.top]
        assert top == sorted(top, reverse=True) and all(lp <= 0 for lp in top)
        assert item.logprob == pytest.approx(top[0])  # greedy picks the most likely token


def test_a_repeated_prompt_computes_nothing_and_draws_from_the_first_requests_logits(
    engine, tokenizer
):
    question = "Name three rivers of Europe, and for each the sea it flows into and one city on it."
    prompt = chat_tokens(tokenizer, question)
    assert len(prompt) > engine.settings.reuse.block_tokens  # kept: it has a whole block
    _, first, _ = asyncio.run(run(engine, req(prompt, 4, top_logprobs=5)))
    computed = engine.stats().prefill_tokens_total
    seeded = SamplingParams(temperature=1.0, seed=11)
    _, again, end = asyncio.run(run(engine, req(prompt, 1, seeded, top_logprobs=5)))
    assert end.usage.cached_tokens == len(prompt)
    assert engine.stats().prefill_tokens_total == computed  # not one prompt token computed
    assert again[0].top == first[0].top  # the very logits the first request had
    # The draw from kept logits is the draw the sampler makes from the context's: a request
    # under another cache salt computes the prompt anew and, with the same logits, the same
    # seed draws the same token.
    fresh = req(prompt, 1, seeded, top_logprobs=5, cache_salt="elsewhere")
    _, recomputed, end = asyncio.run(run(engine, fresh))
    assert end.usage.cached_tokens == 0
    if recomputed[0].top == first[0].top:
        assert recomputed[0].token_id == again[0].token_id


def test_request_beyond_the_cache_is_rejected_and_engine_keeps_serving(engine, tokenizer):
    huge = req([1] * 10, engine.kv_cells_total)
    _, _, end = asyncio.run(run(engine, huge))
    assert isinstance(end, Rejected) and end.reason == "too_large"
    _, _, ok = asyncio.run(run(engine, req(chat_tokens(tokenizer, "Hi"), 4)))
    assert isinstance(ok, Finished)


def test_an_empty_prompt_is_the_callers_error_and_the_engine_keeps_serving(engine, tokenizer):
    # Nothing to decode from: accepted, it would sit in a slot that no step can advance.
    with pytest.raises(ValueError, match="empty prompt"):
        engine.submit(req((), 4), lambda event: None)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.submit(req((), 4, n=2), lambda event: None)
    _, _, ok = asyncio.run(run(engine, req(chat_tokens(tokenizer, "Hi"), 4)))
    assert isinstance(ok, Finished)
    assert engine.stats().running_sequences == 0


def test_queue_bound_answers_429_with_retry_after(tokenizer):
    cfg = engine_config(max_sequences=1)
    cfg.server.max_queued_requests = 0
    with Engine.from_config(cfg) as small:
        prompt = chat_tokens(tokenizer, "Tell me a long story.")

        async def flood():
            first = asyncio.create_task(run(small, req(prompt, 64)))
            await asyncio.sleep(0.2)
            second = await run(small, req(prompt, 4))
            return await first, second

        (_, _, first_end), (_, _, second_end) = asyncio.run(flood())
    assert isinstance(first_end, Finished)
    assert isinstance(second_end, Rejected) and second_end.reason == "queue_full"
    assert second_end.retry_after_s == cfg.server.retry_after_s


def test_gemma3_chat_template_and_generation_match_llama_cpp(gemma3_path):
    """Gemma 3 (sliding-window attention) through the engine gives what llama-cpp-python's own
    `Llama` gives for the same prompt. The bundled 270M is a base model: its chat answers are
    not meaningful, so the comparison is on a plain completion."""
    from llama_cpp import Llama

    prompt_text = "The capital of France is"
    reference = Llama(str(gemma3_path), n_ctx=256, verbose=False)
    try:
        expected = reference(prompt_text, max_tokens=12, temperature=0.0)["choices"][0]["text"]
    finally:
        reference.close()

    cfg = engine_config(max_sequences=2)
    cfg.model.path = str(gemma3_path)
    with Engine.from_config(cfg) as gemma:
        tok = Tokenizer.load(gemma.settings.model_path)
        try:
            rendered = tok.chat_template.render([ChatMessage("user", "What is 2+2?")])
            chat = tok.encode_chat([ChatMessage("user", "What is 2+2?")])
            plain = tok.encode_text(prompt_text)
        finally:
            tok.close()
        text, _, end = asyncio.run(run(gemma, req(plain, 12)))
        _, _, chat_end = asyncio.run(run(gemma, req(chat, 4)))
    # This GGUF ships no template: llama.cpp's built-in Gemma format must be used.
    assert rendered.startswith("<start_of_turn>user\nWhat is 2+2?<end_of_turn>")
    assert rendered.endswith("<start_of_turn>model\n")
    assert chat[0] == 2 and chat.count(2) == 1  # exactly one BOS
    assert isinstance(chat_end, Finished)
    assert isinstance(end, Finished)
    assert text.split()[:6] == expected.split()[:6]


def test_only_the_step_thread_keeps_decoding_threads(monkeypatch):
    """llama.cpp's CPU backend keeps an OpenMP team per thread that ever decoded, and a second
    live team halves decode speed: the start-up self-check must not decode on the caller's
    (long-lived) thread, only the step thread and threads that end may."""
    import threading

    from kv3d.engine.llama import LlamaContext

    decoded_on = []
    real_decode = LlamaContext.decode

    def recording_decode(self, batch):
        decoded_on.append(threading.current_thread())
        return real_decode(self, batch)

    monkeypatch.setattr(LlamaContext, "decode", recording_decode)
    with Engine.from_config(engine_config()) as eng:
        assert decoded_on, "the self-check decodes at start-up"
        assert threading.current_thread() not in decoded_on
        assert all(not t.is_alive() for t in decoded_on)
        asyncio.run(run(eng, GenerationRequest(new_request_id(), (1, 2, 3), 2, GREEDY)))
        assert decoded_on[-1] is eng._thread


def test_sequences_parked_when_the_cache_runs_out_finish_whole(tokenizer):
    """Four 400-token answers need more cells than a 1,000-cell cache holds: all four start at
    once (cells are granted as they generate), the last to arrive are parked to the session
    store when the cache runs out and resume from there, and every stream ends whole."""
    config = load_config(
        overrides={
            "cache": {"gpu_hot_mb": 23},  # ~1,040 cells of 23,040 bytes
            "server": {"threads": 2},
            "model": {"context_tokens": 512},
            "engine": {"max_sequences": 4},
        }
    )
    questions = ["a dragon", "the sea", "a clockmaker", "a lighthouse keeper"]
    with Engine.from_config(config) as eng:
        assert eng.kv_cells_total < 4 * 430
        requests = [
            req(chat_tokens(tokenizer, f"Tell a long story about {q}."), 400, ignore_eos=True)
            for q in questions
        ]

        async def all_of_them():
            return await asyncio.gather(*(run(eng, r) for r in requests))

        results = asyncio.run(all_of_them())
        stats = eng.stats()
    assert stats.max_sequences_in_step == 4  # prompt + max_tokens would have let two in
    assert stats.sequences_parked_total > 0
    assert stats.session_resumes_total >= 1  # a continuation resumed its stored state
    for request, (text, _, end) in zip(requests, results, strict=True):
        assert isinstance(end, Finished) and end.reason == "length", end
        assert end.usage.completion_tokens == 400
        assert end.usage.prompt_tokens == len(request.prompt_tokens)
        assert len(text) > 400  # ~4 characters a token: no stretch of the answer went missing
