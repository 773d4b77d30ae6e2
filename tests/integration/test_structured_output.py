"""Structured output end to end: the official `openai` client against the real Serve
application, `response_format` (json_object, json_schema) and the `grammar` extension."""

from __future__ import annotations

import json
import time

import jsonschema
import openai
import pytest

pytestmark = pytest.mark.integration

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "zip": {"type": "integer"}},
            "required": ["city", "zip"],
        },
    },
    "required": ["name", "address"],
}
MOOD = {
    "type": "object",
    "properties": {
        "mood": {"enum": ["happy", "sad", "neutral"]},
        "colors": {
            "type": "array",
            "items": {"enum": ["red", "green", "blue"]},
            "minItems": 1,
            "maxItems": 3,
        },
    },
    "required": ["mood", "colors"],
}
ITEMS = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"id": {"type": "integer"}, "ok": {"type": "boolean"}},
                "required": ["id", "ok"],
            },
            "maxItems": 2,
        }
    },
    "required": ["items"],
}
# Long enough to fill whole KV blocks (32 tokens): the prefix a repeat request reuses.
SYSTEM = "You are the data desk of a city newspaper and you answer in JSON only. " * 6


@pytest.fixture(scope="module")
def client(server_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0)


def ask(text: str, system: str = "You are a helpful assistant.") -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": text}]


def schema_format(schema: dict, name: str = "answer") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


@pytest.mark.parametrize(
    ("schema", "question"),
    [
        (PERSON, "Describe a person and their address."),
        (MOOD, "How do you feel, and which colors do you like?"),
        (ITEMS, "List two items, each with an id and an ok flag."),
    ],
    ids=["nested-object", "enum-and-array", "array-of-objects"],
)
def test_json_schema_output_validates(client, schema, question):
    r = client.chat.completions.create(
        model="m",
        messages=ask(question),
        temperature=0,
        max_tokens=80,
        response_format=schema_format(schema),
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_schema_holds_under_sampling_too(client):
    r = client.chat.completions.create(
        model="m",
        messages=ask("How do you feel, and which colors do you like?"),
        temperature=1.0,
        seed=11,
        max_tokens=40,
        response_format=schema_format(MOOD),
    )
    jsonschema.validate(json.loads(r.choices[0].message.content), MOOD)


def test_json_object_output_parses(client):
    r = client.chat.completions.create(
        model="m",
        messages=ask('Answer with a JSON object holding one key "answer": what is 2+2?'),
        temperature=0,
        max_tokens=60,
        response_format={"type": "json_object"},
    )
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_grammar_constrains_output(client):
    for question in ("Is the sky blue?", "Is fire cold?", "Tell me a story."):
        r = client.chat.completions.create(
            model="m",
            messages=ask(question),
            temperature=0,
            max_tokens=8,
            extra_body={"grammar": 'root ::= "yes" | "no"'},
        )
        assert r.choices[0].message.content in ("yes", "no")
        assert r.choices[0].finish_reason == "stop"


def test_grammar_on_the_completions_endpoint(client):
    r = client.completions.create(
        model="m",
        prompt="The year the first moon landing happened:",
        temperature=0,
        max_tokens=8,
        extra_body={"grammar": 'root ::= " " [0-9] [0-9] [0-9] [0-9]'},
    )
    text = r.choices[0].text
    assert len(text) == 5 and text[1:].isdigit(), text


def test_streamed_constrained_output_matches_the_whole(client):
    kwargs = dict(
        model="m",
        messages=ask("How do you feel, and which colors do you like?"),
        temperature=0,
        max_tokens=40,
        response_format=schema_format(MOOD),
    )
    # Each under its own cache_salt, so that neither shares the other's cells. Text is still
    # not compared byte for byte: with flash attention on the CPU, past 512 used cells logits
    # depend on where the cells sit in the cache (other tests' sessions are there), within the
    # engine's noise, which flips near ties such as a space between JSON tokens.
    whole = client.chat.completions.create(extra_body={"cache_salt": "whole"}, **kwargs)
    whole = whole.choices[0].message.content
    stream = client.chat.completions.create(
        stream=True, extra_body={"cache_salt": "stream"}, **kwargs
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(streamed), MOOD)
    assert json.loads(streamed) == json.loads(whole)


def test_a_constrained_request_reuses_the_cached_prefix(client):
    # Grammars are sampling only: the prompt's KV is shared like any other request's.
    def run(question: str):
        return client.chat.completions.create(
            model="m",
            messages=ask(question, system=SYSTEM),
            temperature=0,
            max_tokens=40,
            response_format=schema_format(MOOD),
        )

    first = run(f"How do the readers feel today? ({time.time_ns()})")
    second = run("And which colors do the readers like?")
    jsonschema.validate(json.loads(second.choices[0].message.content), MOOD)
    assert first.usage.prompt_tokens > 64
    assert second.usage.prompt_tokens_details.cached_tokens >= 64


@pytest.mark.parametrize(
    ("extra", "param", "code"),
    [
        (
            {
                "response_format": schema_format(
                    {"type": "object", "properties": {"a": {"type": "nope"}}}
                )
            },
            "response_format.json_schema.schema",
            "invalid_json_schema",
        ),
        (
            {"response_format": schema_format({"$ref": "https://example.com/schema.json"})},
            "response_format.json_schema.schema",
            "invalid_json_schema",
        ),
        ({"extra_body": {"grammar": 'root ::= "a" | undefined'}}, "grammar", "invalid_grammar"),
        ({"extra_body": {"grammar": 'root ::= root "a"'}}, "grammar", "invalid_grammar"),
        (
            {"response_format": {"type": "json_object"}, "extra_body": {"grammar": 'root ::= "a"'}},
            "grammar",
            None,
        ),
    ],
    ids=["unknown-type", "remote-ref", "undefined-rule", "left-recursive", "both"],
)
def test_a_bad_constraint_is_a_400_naming_it(client, extra, param, code):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=ask("Hi"), max_tokens=4, **extra)
    error = info.value.body
    assert info.value.status_code == 400
    assert error["param"] == param and error["code"] == code, error
