"""n > 1 end to end: the official `openai` client against the real Serve application."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

pytestmark = pytest.mark.integration

# Long enough that the prompt has whole blocks the other choices share.
SYSTEM = "You are the help desk of a bakery; answer in one short sentence. " * 8


@pytest.fixture(scope="module")
def client(server_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0)


def ask(question: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


def test_three_choices_with_the_prompt_counted_once(client):
    one = client.chat.completions.create(
        model="m", messages=ask("What bread do you bake?"), max_tokens=6, temperature=0
    )
    three = client.chat.completions.create(
        model="m",
        messages=ask("What bread do you bake?"),
        max_tokens=6,
        n=3,
        temperature=1.0,
        seed=5,
    )
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert all(c.message.content and c.finish_reason in ("stop", "length") for c in three.choices)
    assert len({c.message.content for c in three.choices}) > 1
    assert three.usage.prompt_tokens == one.usage.prompt_tokens
    assert three.usage.completion_tokens <= 3 * 6
    assert three.usage.completion_tokens > 6  # every choice's tokens are counted
    assert three.usage.total_tokens == three.usage.prompt_tokens + three.usage.completion_tokens


def test_streamed_choices_arrive_by_index_with_one_usage_chunk(client):
    stream = client.chat.completions.create(
        model="m",
        messages=ask("Do you sell cakes?"),
        max_tokens=6,
        n=2,
        temperature=1.0,
        seed=9,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts, finishes, usages = {}, {}, []
    for chunk in stream:
        if chunk.usage is not None:
            usages.append(chunk.usage)
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert sorted(texts) == [0, 1] and all(texts.values())
    assert sorted(finishes) == [0, 1]
    assert len(usages) == 1
    assert 2 <= usages[0].completion_tokens <= 12


def test_each_choice_validates_against_the_schema(client):
    schema = {
        "type": "object",
        "properties": {"bread": {"enum": ["rye", "wheat", "spelt"]}, "loaves": {"type": "integer"}},
        "required": ["bread", "loaves"],
        "additionalProperties": False,
    }
    r = client.chat.completions.create(
        model="m",
        messages=ask("Order some bread as JSON."),
        max_tokens=40,
        n=2,
        temperature=1.0,
        seed=1,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "order", "schema": schema, "strict": True},
        },
    )
    assert len(r.choices) == 2
    for choice in r.choices:
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_completions_endpoint_returns_n_choices(client):
    r = client.completions.create(
        model="m", prompt=SYSTEM + "\nBread:", max_tokens=4, n=2, temperature=1.0, seed=2
    )
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.completion_tokens <= 8


@pytest.mark.parametrize("n", [0, 17])
def test_out_of_range_n_is_a_400_naming_it(client, n):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="m", messages=ask("hi"), max_tokens=2, n=n)
    assert err.value.body["param"] == "n"
