"""Penalties, min_p and logit_bias end to end: the official `openai` client against the real
Serve application. Greedy or seeded, and two generations are compared token by token while the
model's logits are the same (tests/integration/sameness.py)."""

from __future__ import annotations

import time
from collections import Counter

import httpx
import openai
import pytest

from tests.integration.sameness import Step, assert_same_while_logits_are, completion_steps

pytestmark = pytest.mark.integration

# A prompt the model continues by looping over the same few words.
LOOP = "Colors: red, green, blue, red, green, blue, red, green, blue, red,"


@pytest.fixture(scope="module")
def client(server_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0)


def tokens(client, prompt: str = LOOP, max_tokens: int = 24, **kw) -> list[str]:
    """The generated tokens (their text), by the completions endpoint's logprobs."""
    r = client.completions.create(model="m", prompt=prompt, max_tokens=max_tokens, logprobs=0, **kw)
    return r.choices[0].logprobs.tokens


def steps(client, prompt: str = LOOP, max_tokens: int = 24, **kw) -> list[Step]:
    """The generated tokens with the top log-probabilities of the logits they came from."""
    r = client.completions.create(model="m", prompt=prompt, max_tokens=max_tokens, logprobs=5, **kw)
    return completion_steps(r.choices[0])


def repeats(toks: list[str]) -> int:
    return sum(n - 1 for n in Counter(toks).values())


def token_id(server_url: str, text: str) -> int:
    r = httpx.post(f"{server_url}/tokenize", json={"content": text}, timeout=30)
    (only,) = r.json()["tokens"]
    return only


def test_frequency_penalty_cuts_repetition(client):
    base = tokens(client, temperature=0)
    assert repeats(base) >= 12  # the loop, unpenalised
    penalised = tokens(client, temperature=0, frequency_penalty=2.0)
    assert repeats(penalised) < repeats(base) // 2, (base, penalised)


def test_presence_penalty_changes_a_seeded_generation(client):
    prompt = "Once upon a time, in a small village by the sea,"
    kw = dict(prompt=prompt, max_tokens=40, temperature=0.8)
    # The seed fixes the draws for the same logits (test_sampler_chain); through a server
    # whose cache holds other tests' sessions the logits move within the engine's noise with
    # where cells sit (flash attention on the CPU past 512 cells), so two runs are not
    # compared token for token here.
    distinct = {"base": 0, "penalised": 0}
    for seed in (5, 6, 7):  # one draw can go either way: the penalty shows over several
        base = tokens(client, seed=seed, **kw)
        penalised = tokens(client, presence_penalty=2.0, seed=seed, **kw)
        assert penalised != base
        distinct["base"] += len(set(base))
        distinct["penalised"] += len(set(penalised))
    assert distinct["penalised"] > distinct["base"], distinct  # more distinct tokens


def test_repetition_penalty_and_its_repeat_penalty_alias(client):
    base = tokens(client, temperature=0)
    by_name = steps(client, temperature=0, extra_body={"repetition_penalty": 1.5})
    by_alias = steps(client, temperature=0, extra_body={"repeat_penalty": 1.5})
    assert_same_while_logits_are(by_name, by_alias)
    assert repeats([s.token for s in by_name]) < repeats(base)


def test_min_p_one_keeps_only_the_top_token(client):
    greedy = steps(client, prompt="The ocean is", max_tokens=12, temperature=0)
    hot = dict(prompt="The ocean is", max_tokens=12, temperature=2.0, seed=3)
    # Free sampling at temperature 2 wanders.
    assert tokens(client, **hot) != [s.token for s in greedy]
    assert_same_while_logits_are(steps(client, extra_body={"min_p": 1.0}, **hot), greedy)


def test_logit_bias_removes_the_first_token_and_forces_another(client, server_url):
    first = tokens(client, temperature=0, max_tokens=1)[0]
    banned = token_id(server_url, first)
    without = tokens(client, temperature=0, logit_bias={str(banned): -100})
    assert first not in without
    zebra = token_id(server_url, " zebra")
    forced = tokens(client, temperature=0, max_tokens=3, logit_bias={str(zebra): 100})
    assert forced == [" zebra"] * 3


def test_logit_bias_past_the_vocabulary_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=2,
            logit_bias={"10000000": 5},
        )
    assert info.value.body["param"] == "logit_bias"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("audio", {"voice": "alloy", "format": "wav"}),
        ("modalities", ["text", "audio"]),
        ("reasoning_effort", "high"),
        ("store", True),
        ("service_tier", "flex"),
        ("repetition_penalty", 0),
        ("min_p", 2),
    ],
)
def test_unsupported_or_out_of_range_fields_are_400s_naming_them(client, field, value):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=2,
            extra_body={field: value},
        )
    assert info.value.body["param"] == field


def test_penalties_keep_sessions_and_prefix_reuse(server_url):
    # Penalties are sampling only: a conversation with them resumes its KV like any other.
    system = {"role": "system", "content": "You are a terse assistant of a weather desk. " * 6}
    turn1 = [system, {"role": "user", "content": "Will it rain tomorrow?"}]
    body = {"model": "m", "temperature": 0, "max_tokens": 12, "frequency_penalty": 1.0}
    body["presence_penalty"] = 0.5
    with httpx.Client(base_url=f"{server_url}/v1", timeout=120) as http:
        headers = {"X-Session-ID": f"pen-{time.time_ns()}"}
        first = http.post("/chat/completions", json={**body, "messages": turn1}, headers=headers)
        assert first.status_code == 200, first.text
        first = first.json()
        turn2 = turn1 + [
            {"role": "assistant", "content": first["choices"][0]["message"]["content"]},
            {"role": "user", "content": "And the day after?"},
        ]
        time.sleep(0.5)  # the first turn's delta is encoded in the background
        second = http.post(
            "/chat/completions", json={**body, "messages": turn2}, headers=headers
        ).json()
    history = first["usage"]["prompt_tokens"] + first["usage"]["completion_tokens"]
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= history - 32
