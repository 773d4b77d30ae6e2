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

N_VOCAB = 1000


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
        {"n": 0},
        {"n": 17},
        {"stop": ["a", "b", "c", "d", "e"]},
        {"top_logprobs": 2},
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
    assert CompletionRequest.model_validate({"prompt": [5, 0, 7]}).prompt == [5, 0, 7]
    assert CompletionRequest.model_validate({"prompt": [[5, 6]]}).prompt == [5, 6]
    bad_bodies = (
        {"prompt": ""},
        {"prompt": []},
        {"prompt": [[]]},
        {"prompt": ["a", "b"]},
        {"prompt": [[1], [2]]},
        {"prompt": [1, -2]},
        {"prompt": [1, INT32_MAX + 1]},
        {"prompt": [1, "a"]},
        {"prompt": None},
        {"prompt": "x", "echo": True},
    )
    for bad in bad_bodies:
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate(bad)


def test_completion_prompt_tokens_text_or_ids_within_the_vocabulary():
    def encode(text):
        return [len(text)]

    assert CompletionRequest.model_validate({"prompt": "abc"}).prompt_tokens(encode, 10) == [3]
    ids = CompletionRequest.model_validate({"prompt": [9, 0]})
    assert ids.prompt_tokens(encode, 10) == [9, 0]
    with pytest.raises(APIError) as err:
        ids.prompt_tokens(encode, 9)
    assert (err.value.status, err.value.param) == (400, "prompt")
    assert "token id 9" in err.value.message


def test_null_in_an_optional_field_means_its_default():
    nulls = dict.fromkeys(
        (
            "temperature",
            "top_p",
            "n",
            "stream",
            "stop",
            "max_tokens",
            "presence_penalty",
            "frequency_penalty",
            "logprobs",
            "top_logprobs",
            "seed",
            "user",
            "tools",
            "tool_choice",
            "parallel_tool_calls",
            "response_format",
            "logit_bias",
            "repeat_penalty",
            "top_k",
            "min_p",
            "ignore_eos",
        ),
    )
    req = chat(**nulls, stream_options={"include_usage": None})
    assert (req.temperature, req.top_p, req.n, req.stream) == (1.0, 1.0, 1, False)
    assert (req.logprobs, req.parallel_tool_calls, req.repetition_penalty) == (False, True, 1.0)
    assert req.stream_options is not None and not req.stream_options.include_usage
    assert CompletionRequest.model_validate({"prompt": "x", "max_tokens": None}).max_tokens == 16
    with pytest.raises(ValidationError):
        chat(messages=None)  # a required field stays required


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
        ("min_p", -0.1),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", 10.5),
        ("repetition_penalty", math.inf),
    ],
)
def test_numbers_past_what_the_backend_takes_are_rejected_naming_the_field(field, value):
    body = {"logprobs": True, field: value}
    with pytest.raises(ValidationError) as info:
        chat(**body)
    assert info.value.errors()[0]["loc"][0] == field


def test_numbers_at_the_backends_limits_are_accepted():
    req = chat(top_k=INT32_MAX, seed=SEED_MAX, max_tokens=INT32_MAX, logit_bias={})
    sampling = req.sampling(n_vocab=N_VOCAB)
    assert sampling.top_k == INT32_MAX and sampling.seed == SEED_MAX
    zero = chat(seed=0, temperature=0.0, top_p=5e-324, presence_penalty=0.0)
    assert zero.sampling(n_vocab=N_VOCAB).seed == 0
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


# --- sampling and structured output (issue 13) -------------------------------------------------
def test_sampling_fields_reach_the_sampling_params():
    req = chat(
        presence_penalty=-2.0,
        frequency_penalty=1.5,
        repetition_penalty=1.3,
        min_p=0.05,
        logit_bias={"7": -100, "999": 100.0},
    )
    s = req.sampling(n_vocab=N_VOCAB, grammar='root ::= "x"')
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (-2.0, 1.5, 1.3)
    assert s.min_p == 0.05 and s.grammar == 'root ::= "x"'
    assert s.logit_bias == ((7, -100.0), (999, 100.0))
    neutral = chat().sampling(n_vocab=N_VOCAB)
    assert (neutral.repetition_penalty, neutral.logit_bias, neutral.grammar) == (1.0, (), None)


def test_repeat_penalty_is_an_alias_of_repetition_penalty():
    assert chat(repeat_penalty=1.2).sampling(n_vocab=N_VOCAB).repetition_penalty == 1.2


def test_a_logit_bias_id_past_the_vocabulary_is_a_400():
    req = chat(logit_bias={str(N_VOCAB): 5})
    with pytest.raises(APIError) as info:
        req.sampling(n_vocab=N_VOCAB)
    assert (info.value.status, info.value.param) == (400, "logit_bias")
    assert str(N_VOCAB) in info.value.message


SCHEMA_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "person", "schema": {"type": "object"}, "strict": True},
}


def test_response_formats_parse():
    assert chat(response_format={"type": "text"}).response_format.type == "text"
    assert chat(response_format={"type": "json_object"}).response_format.json_schema is None
    spec = chat(response_format=SCHEMA_FORMAT).response_format.json_schema
    assert (spec.name, spec.json_schema, spec.strict) == ("person", {"type": "object"}, True)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
            "response_format.json_schema.name",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "a b"}}},
            "response_format.json_schema.name",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "n"}}},
            "response_format.json_schema.schema",
        ),
        ({"response_format": SCHEMA_FORMAT, "grammar": 'root ::= "x"'}, "grammar"),
        ({"response_format": {"type": "json_object"}, "grammar": 'root ::= "x"'}, "grammar"),
        ({"grammar": ""}, "grammar"),
    ],
)
def test_bad_output_constraints_name_their_field(body, param):
    with pytest.raises(ValidationError) as info:
        chat(**body)
    assert ".".join(str(p) for p in info.value.errors()[0]["loc"]) == param


def test_grammar_with_a_text_response_format_is_fine():
    req = chat(response_format={"type": "text"}, grammar='root ::= "x"')
    assert req.grammar == 'root ::= "x"'


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("audio", {"voice": "alloy", "format": "wav"}),
        ("modalities", ["text", "audio"]),
        ("prediction", {"type": "content", "content": "x"}),
        ("web_search_options", {}),
        ("reasoning_effort", "low"),
        ("verbosity", "high"),
        ("service_tier", "flex"),
        ("store", True),
        ("best_of", 2),
        ("metadata", {"k": "v" * 513}),
        ("metadata", {str(i): "v" for i in range(17)}),
    ],
)
def test_unsupported_openai_fields_are_refused_naming_the_field(field, value):
    with pytest.raises(ValidationError) as info:
        chat(**{field: value})
    assert info.value.errors()[0]["loc"][0] == field


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("modalities", ["text"]),
        ("verbosity", "medium"),
        ("service_tier", "auto"),
        ("service_tier", "default"),
        ("store", False),
        ("best_of", 1),
        ("metadata", {"team": "search"}),
        ("audio", None),
        ("reasoning_effort", None),
        ("not_an_openai_field", {"anything": 1}),  # unknown fields stay ignored
    ],
)
def test_neutral_values_of_unsupported_fields_are_accepted(field, value):
    chat(**{field: value})
