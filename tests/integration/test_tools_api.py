"""Function calling end to end: the official `openai` client against the real Serve application
(bundled SmolLM2-135M, whose template knows no tools: the prompt fallback is what it reads)."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

pytestmark = pytest.mark.integration

WEATHER_PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather of a city",
        "parameters": WEATHER_PARAMS,
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The current time in a time zone",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 40}},
            "required": ["zone"],
        },
    },
}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
FORCE_WEATHER = {"type": "function", "function": {"name": "get_weather"}}
# A call takes about 35 tokens; the grammar ends it, and the model then stops.
CALL_TOKENS = 80


@pytest.fixture(scope="module")
def client(server_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0)


def ask(client, **kw):
    body = {"model": "m", "messages": QUESTION, "temperature": 0, "max_tokens": CALL_TOKENS}
    return client.chat.completions.create(**{**body, **kw})


def check_weather_call(call) -> dict:
    assert call.type == "function" and call.function.name == "get_weather"
    assert call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER_PARAMS)
    return arguments


def test_a_named_tool_choice_returns_a_call_that_fits_the_schema(client):
    r = ask(client, tools=[WEATHER, CLOCK], tool_choice=FORCE_WEATHER)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    check_weather_call(call)


def test_a_streamed_named_call_assembles_as_the_client_does(client):
    body = {"model": "m", "messages": QUESTION, "temperature": 0, "max_tokens": CALL_TOKENS}
    with client.chat.completions.stream(
        **body, tools=[WEATHER, CLOCK], tool_choice=FORCE_WEATHER
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_completion()
    assert "tool_calls.function.arguments.done" in kinds
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    check_weather_call(call)


def test_raw_stream_deltas_have_openais_shape(client):
    chunks = list(ask(client, tools=[WEATHER], tool_choice=FORCE_WEATHER, stream=True))
    deltas = [c.choices[0].delta.tool_calls for c in chunks if c.choices]
    deltas = [d for d in deltas if d]
    head = deltas[0][0]
    assert head.index == 0 and head.id and head.type == "function"
    assert head.function.name == "get_weather" and head.function.arguments == ""
    later = [d[0] for d in deltas[1:]]
    assert later and all(d.index == 0 and d.id is None for d in later)
    arguments = "".join(d.function.arguments for d in later)
    jsonschema.validate(json.loads(arguments), WEATHER_PARAMS)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_required_makes_the_model_call_a_tool(client):
    r = ask(client, tools=[WEATHER, CLOCK], tool_choice="required", parallel_tool_calls=False)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    schemas = {"get_weather": WEATHER_PARAMS, "get_time": CLOCK["function"]["parameters"]}
    jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_a_tool_conversation_goes_on_after_the_result(client):
    session = {"X-Session-ID": "tools-weather-conversation"}
    first = ask(client, tools=[WEATHER], tool_choice=FORCE_WEATHER, extra_headers=session)
    message = first.choices[0].message
    (call,) = message.tool_calls
    history = [
        *QUESTION,
        message.model_dump(exclude_none=True),  # as an app sends the call back
        {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 21, "sky": "sunny"}'},
    ]
    second = client.chat.completions.create(
        model="m",
        messages=history,
        tools=[WEATHER],
        temperature=0,
        max_tokens=24,
        extra_headers=session,
    )
    answer = second.choices[0]
    assert answer.message.tool_calls is None
    assert answer.finish_reason in ("stop", "length") and answer.message.content
    # The conversation so far (tools included) came back from the session, not recomputed.
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 32


def test_tool_choice_none_never_calls(client):
    r = ask(client, tools=[WEATHER], tool_choice="none", max_tokens=16)
    choice = r.choices[0]
    assert choice.message.tool_calls is None
    assert isinstance(choice.message.content, str) and choice.finish_reason != "tool_calls"


@pytest.mark.parametrize(
    ("kw", "param"),
    [
        (
            {"tools": [{"type": "function", "function": {"name": "get weather"}}]},
            "tools.0.function.name",
        ),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "string"}},
                    }
                ]
            },
            "tools.0.function.parameters",
        ),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {
                "tools": [WEATHER],
                "tool_choice": {"type": "function", "function": {"name": "get_time"}},
            },
            "tool_choice",
        ),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {"type": "object", "properties": {"x": {"$ref": 1}}},
                        },
                    }
                ],
                "tool_choice": "required",
            },
            "tools.0.function.parameters",
        ),
        ({"functions": [WEATHER["function"]]}, "functions"),
    ],
)
def test_bad_tool_specs_are_400s_naming_the_field(client, kw, param):
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, max_tokens=4, **kw)
    assert err.value.status_code == 400
    assert err.value.param == param
