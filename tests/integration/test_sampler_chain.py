"""Each stage of `SamplerChain` acts on the real bundled model's logits (no engine, no server)."""

from __future__ import annotations

from collections import Counter

import pytest

from kv3d.engine.generation import SamplingParams
from kv3d.engine.llama import (
    ContextParams,
    LlamaBatch,
    LlamaContext,
    LlamaError,
    LlamaModel,
    SamplerChain,
    grammar_compiles,
)

pytestmark = pytest.mark.integration

PROMPT = "The list of colors: red, green, blue, red, green, blue, red, green,"


@pytest.fixture(scope="module")
def model(smollm2_path):
    with LlamaModel(smollm2_path) as m:
        yield m


@pytest.fixture(scope="module")
def ctx(model):
    params = ContextParams(512, 1, 256, 2, 2, flash_attn=False)
    with LlamaContext(model, params) as c:
        yield c


def generate(
    model, ctx, params: SamplingParams, n: int = 24, seed: int = 7, from_copies: bool = False
) -> list[int]:
    prompt = model.tokenize(PROMPT, add_special=True, parse_special=False)
    ctx.clear()
    out: list[int] = []
    with (
        LlamaBatch(256) as batch,
        SamplerChain(model=model, params=params, seed=seed, prompt=prompt, max_tokens=n) as chain,
    ):
        for i, token in enumerate(prompt):
            row = batch.add(token, i, 0, i == len(prompt) - 1)
        pos = len(prompt)
        for _ in range(n):
            ctx.decode(batch)
            if from_copies:  # as the engine draws a repeat's first token: from kept logits
                token = chain.sample_logits(ctx.logits(row).copy())
            else:
                token = chain.sample(ctx, row)
            if model.is_eog(token):
                break
            out.append(token)
            batch.clear()
            row = batch.add(token, pos, 0, True)
            pos += 1
    return out


def text(model, tokens: list[int]) -> str:
    return b"".join(model.token_to_piece(t) for t in tokens).decode("utf-8", "replace")


def repeats(tokens: list[int]) -> int:
    return sum(c - 1 for c in Counter(tokens).values())


GREEDY = SamplingParams(temperature=0.0)


def test_greedy_repeats_the_pattern_without_penalties(model, ctx):
    # The baseline the penalty tests compare with: the model loops over the colors.
    assert repeats(generate(model, ctx, GREEDY)) >= 8


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0, frequency_penalty=2.0),
        # The pattern is strong enough to survive OpenAI's top presence penalty (2): the chain
        # itself takes any value, so a larger one shows the stage acts.
        SamplingParams(temperature=0.0, presence_penalty=5.0),
        SamplingParams(temperature=0.0, repetition_penalty=1.8),
    ],
    ids=["frequency", "presence", "repetition"],
)
def test_a_penalty_cuts_repetition(model, ctx, params):
    base = generate(model, ctx, GREEDY)
    penalised = generate(model, ctx, params)
    assert penalised != base
    assert repeats(penalised) < repeats(base)


def test_repetition_penalty_sees_the_prompt(model, ctx):
    # The first greedy token continues the prompt's pattern (" blue"): it is in the prompt only,
    # so only a penalty that sees the prompt can change it. Presence sees generated tokens only.
    first = generate(model, ctx, GREEDY, n=1)
    assert generate(model, ctx, SamplingParams(temperature=0.0, presence_penalty=9.0), n=1) == first
    repeated = generate(model, ctx, SamplingParams(temperature=0.0, repetition_penalty=3.0), n=1)
    assert repeated != first


def test_logit_bias_bans_and_forces(model, ctx):
    first = generate(model, ctx, GREEDY, n=1)[0]
    banned = generate(model, ctx, SamplingParams(temperature=0.0, logit_bias=((first, -100.0),)))
    assert first not in banned
    forced_token = model.tokenize(" zebra", add_special=False, parse_special=False)[0]
    forced = generate(
        model, ctx, SamplingParams(temperature=0.0, logit_bias=((forced_token, 100.0),)), n=4
    )
    assert forced == [forced_token] * 4


def test_min_p_keeps_only_likely_tokens(model, ctx):
    # At a high temperature sampling wanders; min_p=0.9 keeps only tokens near the top one,
    # which here is the greedy continuation.
    hot = SamplingParams(temperature=5.0, seed=1)
    assert generate(model, ctx, hot, n=8, seed=1) != generate(model, ctx, GREEDY, n=8)
    narrow = SamplingParams(temperature=5.0, seed=1, min_p=0.9)
    assert generate(model, ctx, narrow, n=8, seed=1) == generate(model, ctx, GREEDY, n=8)


def test_grammar_constrains_the_output(model, ctx):
    params = SamplingParams(temperature=0.0, grammar='root ::= ("yes" | "no") "!"')
    assert text(model, generate(model, ctx, params)) in ("yes!", "no!")
    sampled = SamplingParams(temperature=1.5, grammar='root ::= [0-9]+ "."')
    out = text(model, generate(model, ctx, sampled, n=12, seed=3))
    assert out.rstrip(".").isdigit(), out


def test_a_seed_fixes_the_draws_for_the_same_logits(model, ctx):
    hot = SamplingParams(temperature=0.8, seed=5)
    first = generate(model, ctx, hot, seed=5)
    assert generate(model, ctx, hot, seed=5) == first
    assert generate(model, ctx, hot, seed=6) != first


@pytest.mark.parametrize(
    "params",
    [
        GREEDY,
        SamplingParams(temperature=0.8, seed=5),
        SamplingParams(temperature=1.0, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.3),
        SamplingParams(temperature=0.7, presence_penalty=1.0, frequency_penalty=0.5),
    ],
)
def test_a_draw_from_kept_logits_is_the_draw_from_the_context(model, ctx, params):
    assert generate(model, ctx, params, from_copies=True) == generate(model, ctx, params)


def test_a_bad_grammar_raises_and_compiles_false(model):
    for bad in ("root ::= (", "start ::= [a-z]", "root ::= root [a-z]"):
        assert not grammar_compiles(model, bad)
        with pytest.raises(LlamaError, match="grammar"):
            SamplerChain(model=model, params=SamplingParams(grammar=bad), seed=1)
    assert grammar_compiles(model, 'root ::= "ok"')
