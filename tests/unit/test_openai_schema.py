import json
import math

import pytest
from pydantic import ValidationError

from kv3d.server.openai_schema import (
    INT32_MAX,
    MAX_JSON_DEPTH,
    SEED_MAX,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    parse_json_body,
)


def chat(**kw):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    body.update(kw)
    return ChatCompletionRequest.model_validate(body)


@pytest.mark.parametrize(
    "field",
    [
        {"messages": []},
        {"messages": [{"role": "wizard", "content": "hi"}]},
        {"messages": [{"role": "user", "content": 42}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        {"max_tokens": 0},
        {"temperature": 3},
        {"n": 2},
        {"stop": ["a", "b", "c", "d", "e"]},
        {"top_logprobs": 2},
        {"presence_penalty": 0.5},
    ],
)
def test_invalid_chat_requests_are_rejected(field):
    with pytest.raises(ValidationError):
        chat(**field)


def test_text_parts_and_developer_role_are_accepted():
    req = chat(
        messages=[
            {"role": "developer", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
        ]
    )
    msgs = req.chat_messages()
    assert (msgs[0].role, msgs[1].content) == ("system", "ab")


def test_max_completion_tokens_is_the_newer_name_of_max_tokens():
    assert chat(max_completion_tokens=7).max_tokens == 7


def test_logprobs_request_maps_to_top_k():
    assert chat().requested_top_logprobs() is None
    assert chat(logprobs=True).requested_top_logprobs() == 0
    assert chat(logprobs=True, top_logprobs=3).requested_top_logprobs() == 3


def test_completion_prompt_forms():
    assert CompletionRequest.model_validate({"prompt": ["x"]}).prompt == "x"
    assert CompletionRequest.model_validate({"prompt": "x"}).max_tokens == 16
    for bad in ({"prompt": ""}, {"prompt": ["a", "b"]}, {"prompt": "x", "echo": True}):
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate(bad)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("top_k", INT32_MAX + 1),
        ("top_k", 2**32 + 1),  # a C int would read it as 1
        ("seed", SEED_MAX + 1),
        ("seed", -1),
        ("max_tokens", INT32_MAX + 1),
        ("max_completion_tokens", 2**64),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("top_p", math.nan),
        ("top_p", 0.0),
        ("presence_penalty", math.nan),
        ("frequency_penalty", -math.inf),
        ("presence_penalty", 2.5),
        ("top_logprobs", INT32_MAX + 1),
        ("logit_bias", {"-1": 1.0}),
        ("logit_bias", {str(INT32_MAX + 1): 1.0}),
        ("logit_bias", {"1" * 5000: 1.0}),
        ("logit_bias", {"7": 100.5}),
        ("logit_bias", {"7": math.nan}),
        ("logit_bias", {"7": 1.0}),  # in range, but not supported
    ],
)
def test_numbers_past_what_the_backend_takes_are_rejected_naming_the_field(field, value):
    body = {"logprobs": True, field: value}
    with pytest.raises(ValidationError) as info:
        chat(**body)
    assert info.value.errors()[0]["loc"][0] == field


def test_numbers_at_the_backends_limits_are_accepted():
    req = chat(top_k=INT32_MAX, seed=SEED_MAX, max_tokens=INT32_MAX, logit_bias={})
    assert req.sampling().top_k == INT32_MAX and req.sampling().seed == SEED_MAX
    assert chat(seed=0, temperature=0.0, top_p=5e-324, presence_penalty=0.0).sampling().seed == 0
    cmpl = CompletionRequest.model_validate({"prompt": "x", "max_tokens": INT32_MAX})
    assert cmpl.max_tokens == INT32_MAX
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"prompt": "x", "max_tokens": INT32_MAX + 1})


def rejected(raw: bytes) -> APIError:
    with pytest.raises(APIError) as info:
        parse_json_body(raw)
    assert info.value.status == 400
    return info.value


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages.0.content"),
        ({"messages": [{"content": [{"text": "a\udfffb"}]}]}, "messages.0.content.0.text"),
        ({"messages": [{"name": "\udbff"}]}, "messages.0.name"),
        ({"prompt": ["ok", "\ud800x"]}, "prompt.1"),
        ({"stop": "\ud800"}, "stop"),
        ({"tools": [{"function": {"description": "\ud800"}}]}, "tools.0.function.description"),
        ({"logit_bias": {"\ud800": 1}}, "logit_bias.\\ud800"),
    ],
)
def test_lone_surrogates_anywhere_are_a_400_naming_the_field(body, param):
    err = rejected(json.dumps(body).encode())  # written as "\\ud800" escapes
    assert (err.param, err.code) == (param, "invalid_unicode")
    json.dumps(err.body(), ensure_ascii=False).encode()  # the error body itself encodes


def test_surrogate_pairs_and_raw_surrogate_bytes():
    assert parse_json_body(b'{"prompt":"\\ud83d\\ude00"}') == {"prompt": "\U0001f600"}
    assert rejected(b'{"prompt":"\xed\xa0\x80"}').param == "prompt"  # CESU-8 bytes
    assert rejected(b'{"prompt":"\\ude00\\ud83d"}').param == "prompt"  # pair out of order


def test_nesting_is_bounded_before_anything_recurses():
    def nested(depth: int) -> bytes:  # an object holding depth - 1 nested arrays
        return b'{"a":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"

    assert parse_json_body(nested(MAX_JSON_DEPTH))
    assert rejected(nested(MAX_JSON_DEPTH + 1)).code == "nesting_too_deep"
    assert rejected(nested(50_000)).code == "nesting_too_deep"  # json itself overflows here
    assert rejected(b"[" * 50_000 + b"]" * 50_000).code == "nesting_too_deep"
    assert rejected(b'{"a":' * 100 + b"1" + b"}" * 100).code == "nesting_too_deep"


def test_integers_past_pythons_digit_limit_are_a_400():
    assert rejected(b'{"max_tokens":' + b"9" * 5000 + b"}").code == "number_too_large"
    assert rejected(b'{"x":[-' + b"1" * 5000 + b"]}").code == "number_too_large"
    assert parse_json_body(b'{"x":' + b"9" * 4000 + b"}")["x"] > 0
    assert parse_json_body(b'{"x":1e99999}')["x"] == math.inf  # then no field accepts it


@pytest.mark.parametrize("raw", [b"", b"[]", b"null", b"1", b"{", b"\xff", b'{"a":NaN'])
def test_other_bodies_that_are_no_json_object_are_a_400(raw):
    rejected(raw)
