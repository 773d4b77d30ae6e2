"""Function calling without a model: reading calls out of text, the prompt fallback, the grammar
of a forced call (compiled by llama.cpp against the bundled vocabulary) and the request checks."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from kv3d.server.chat import ChatMessage, JinjaChatTemplate, ToolCall
from kv3d.server.openai_schema import APIError, ChatCompletionRequest
from kv3d.server.tools import (
    Call,
    CallReader,
    ToolSpec,
    ToolUse,
    call_grammar,
    fallback_messages,
    prompt_input,
    split_output,
    tool_use,
)

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
    "required": ["city"],
}
NAMES = frozenset({"get_weather", "get_time"})


def weather_tool(**function) -> dict:
    return {
        "type": "function",
        "function": {"name": "get_weather", "parameters": WEATHER, **function},
    }


def request(**body) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "Weather in Paris?"}], **body}
    )


def split(text: str, names=NAMES, max_calls=None):
    return split_output(text, CallReader(names, max_calls))


# --- reading calls -----------------------------------------------------------------------------
def test_one_call_is_read_and_its_arguments_normalized():
    content, calls = split('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}')
    assert content is None
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert calls[0].id.startswith("call_")


def test_several_calls_and_the_text_around_them():
    text = (
        "Let me look.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>{"name": "get_time", "arguments": "{\\"tz\\": \\"CET\\"}"}</tool_call>'
    )
    content, calls = split(text)
    assert content == "Let me look."  # the whitespace between text and calls goes
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[1].arguments) == {"tz": "CET"}  # JSON text read as the object
    assert len({c.id for c in calls}) == 2


def test_bare_json_calls_are_read_whole():
    content, calls = split('[{"name": "get_time", "parameters": {"tz": "UTC"}}]')
    assert content is None and [(c.name, c.arguments) for c in calls] == [
        ("get_time", '{"tz":"UTC"}')
    ]
    content, calls = split('{"city": "Paris"}')  # JSON, but no call
    assert (content, calls) == ('{"city": "Paris"}', [])


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>',  # bad JSON
        '<tool_call>{"name": "launch", "arguments": {}}</tool_call>',  # not an offered tool
        '<tool_call>{"name": "get_weather", "arguments": [1]}</tool_call>',  # not an object
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Par',  # cut short
        "The weather is <tool_ fine",
    ],
)
def test_malformed_calls_stay_plain_content(text):
    assert split(text) == (text, [])


def test_calls_beyond_the_limit_stay_content():
    one = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    content, calls = split(one + one, max_calls=1)
    assert len(calls) == 1 and content == one


def test_streamed_text_gives_what_the_whole_text_gives():
    text = (
        'Sure <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
        " and a < b <tool_call>not json</tool_call> done"
    )
    reader = CallReader(NAMES)
    pieces = []
    for ch in text:  # one character at a time: tags arrive cut anywhere
        pieces += reader.feed(ch)
        # No part of the good call ever leaves as content.
        assert not any(isinstance(p, str) and "get_weather" in p for p in pieces)
    pieces += reader.close()
    streamed_content = "".join(p for p in pieces if isinstance(p, str))
    streamed_calls = [(c.name, c.arguments) for c in pieces if isinstance(c, Call)]
    content, calls = split(text)
    assert streamed_content == content
    assert streamed_calls == [(c.name, c.arguments) for c in calls]
    assert streamed_calls == [("get_weather", '{"city":"Oslo"}')]
    assert "<tool_call>not json</tool_call> done" in content


def test_text_without_calls_streams_before_the_answer_ends():
    reader = CallReader(NAMES)
    assert reader.feed("Hello there, ") == ["Hello there,"]  # a call may follow the blank
    assert reader.feed("my friend <tool") == [" my friend"]  # a tag may be starting
    assert reader.feed("s are here.\n") == [" <tools are here."]
    assert reader.close() == ["\n"]  # no call came: every character is kept


# --- the prompt --------------------------------------------------------------------------------
CONVERSATION = [
    ChatMessage("system", "Be brief."),
    ChatMessage("user", "Weather in Paris?"),
    ChatMessage("assistant", "", (ToolCall("c1", "get_weather", '{"city": "Paris"}'),)),
    ChatMessage("tool", "sunny", tool_call_id="c1", name="get_weather"),
    ChatMessage("user", "And tomorrow?"),
]


def test_fallback_writes_tools_calls_and_results_as_text():
    spec = ToolSpec("get_weather", "Weather of a city", WEATHER)
    out = fallback_messages(CONVERSATION, (spec,))
    assert [m.role for m in out] == ["system", "user", "assistant", "user"]
    assert out[0].content.startswith("Be brief.\n\n")  # the tools join the system prompt
    assert '"name": "get_weather"' in out[0].content and "<tool_call>" in out[0].content
    assert out[2].content == (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    )
    # The result and the next question share one user turn: roles keep alternating.
    assert out[3].content == (
        '<tool_response name="get_weather">\nsunny\n</tool_response>\nAnd tomorrow?'
    )
    assert all(not m.tool_calls and m.tool_call_id is None for m in out)


def test_fallback_without_a_system_prompt_adds_one():
    spec = ToolSpec("get_weather", None, WEATHER)
    out = fallback_messages([ChatMessage("user", "hi")], (spec,))
    assert [m.role for m in out] == ["system", "user"]


# A minimal ChatML template that renders tools and tool turns itself (as Qwen's does).
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n{% for t in tools %}{{ t.function | tojson }}\n"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_templates_that_know_tools_render_them_themselves():
    template = JinjaChatTemplate(TOOLS_TEMPLATE, bos_token="", eos_token="")
    assert template.knows_tools
    use = ToolUse((ToolSpec("get_weather", None, WEATHER),), "auto")
    messages, tools = prompt_input(template, CONVERSATION, use)
    assert messages is CONVERSATION and tools == [
        {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}
    ]
    text = template.render(messages, tools=tools)
    assert '{"name": "get_weather", "parameters": {"type": "object"' in text  # unescaped JSON
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert "<|im_start|>tool\nsunny" in text


def test_tool_choice_none_shows_no_tools():
    template = JinjaChatTemplate(TOOLS_TEMPLATE, bos_token="", eos_token="")
    use = ToolUse((ToolSpec("get_weather", None, WEATHER),), "none")
    assert prompt_input(template, CONVERSATION, use) == (CONVERSATION, None)
    assert use.reader() is None


# How each bundled model's template shows a call and its result: neither knows tools.
BUNDLED_TURNS = {
    "tokenizer": ("<|im_start|>assistant\n<tool_call>", "<|im_start|>user\n<tool_response"),
    "gemma": ("<start_of_turn>model\n<tool_call>", "<start_of_turn>user\n<tool_response"),
}


@pytest.mark.parametrize("model", sorted(BUNDLED_TURNS))
def test_bundled_templates_render_a_tool_conversation_through_the_fallback(model, request):
    tok = request.getfixturevalue(model)
    assert not tok.chat_template.knows_tools
    use = ToolUse((ToolSpec("get_weather", "Weather of a city", WEATHER),), "auto")
    messages, tools = prompt_input(tok.chat_template, CONVERSATION, use)
    assert tools is None
    text = tok.chat_template.render(messages)
    call_turn, result_turn = BUNDLED_TURNS[model]
    assert call_turn + '{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert result_turn + ' name="get_weather">\nsunny' in text
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text


def test_the_tools_are_part_of_the_family_prefix(tokenizer):
    def family(spec: ToolSpec) -> list[int]:
        messages, _ = prompt_input(tokenizer.chat_template, CONVERSATION, ToolUse((spec,), "auto"))
        prompt = tokenizer.encode_chat(messages)
        n = tokenizer.family_tokens(messages, prompt)
        assert n is not None
        return prompt[:n]

    weather = family(ToolSpec("get_weather", None, WEATHER))
    assert weather == family(ToolSpec("get_weather", None, WEATHER))  # the same tools share it
    assert weather != family(ToolSpec("get_time", None, WEATHER))  # other tools do not
    assert "get_weather" in tokenizer.decode(weather)


# --- the grammar of a forced call --------------------------------------------------------------
def test_no_grammar_when_the_model_chooses():
    spec = ToolSpec("get_weather", None, WEATHER)
    assert call_grammar(ToolUse((spec,), "auto")) is None
    assert call_grammar(None) is None


def test_named_choice_grammar_holds_one_call_of_that_tool(tokenizer):
    use = tool_use(
        request(
            tools=[weather_tool(), {"type": "function", "function": {"name": "get_time"}}],
            tool_choice={"type": "function", "function": {"name": "get_time"}},
        )
    )
    grammar = call_grammar(use)
    assert grammar is not None and tokenizer.grammar_error(grammar) is None
    root = grammar.splitlines()[0]
    assert root.startswith('root ::= "<tool_call>"') and ")*" not in root  # exactly one call
    assert '"\\"get_time\\""' in grammar and "get_weather" not in grammar


def test_required_grammar_offers_every_tool_and_repeats_when_parallel(tokenizer):
    tools = [weather_tool(), {"type": "function", "function": {"name": "get_time"}}]
    many = call_grammar(tool_use(request(tools=tools, tool_choice="required")))
    assert many is not None and tokenizer.grammar_error(many) is None
    assert ")*" in many.splitlines()[0]
    assert "get_time" in many and "get_weather" in many and '"\\"city\\""' in many
    one = call_grammar(
        tool_use(request(tools=tools, tool_choice="required", parallel_tool_calls=False))
    )
    assert one is not None and ")*" not in one.splitlines()[0]


def test_definitions_move_to_the_root_of_the_call_schema(tokenizer):
    params = {
        "type": "object",
        "properties": {"place": {"$ref": "#/$defs/place"}},
        "$defs": {"place": {"type": "object", "properties": {"zip": {"type": "string"}}}},
    }
    tools = [{"type": "function", "function": {"name": "find", "parameters": params}}]
    grammar = call_grammar(tool_use(request(tools=tools, tool_choice="required")))
    assert grammar is not None and tokenizer.grammar_error(grammar) is None
    assert '"\\"zip\\""' in grammar


def test_a_schema_that_cannot_become_a_grammar_is_a_400_naming_the_tool():
    bad = {"type": "object", "properties": {"n": {"type": "wat"}}}
    tools = [weather_tool(), {"type": "function", "function": {"name": "f", "parameters": bad}}]
    with pytest.raises(APIError) as err:
        call_grammar(tool_use(request(tools=tools, tool_choice="required")))
    assert err.value.status == 400 and err.value.param == "tools.1.function.parameters"


# --- request validation ------------------------------------------------------------------------
def error_param(**body) -> str:
    with pytest.raises(ValidationError) as err:
        request(**body)
    return ".".join(str(p) for p in err.value.errors()[0]["loc"])


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": [weather_tool(name="get weather")]}, "tools.0.function.name"),
        ({"tools": [weather_tool(name="x" * 65)]}, "tools.0.function.name"),
        ({"tools": [weather_tool(parameters={"type": "array"})]}, "tools.0.function.parameters"),
        ({"tools": [weather_tool(parameters=[1])]}, "tools.0.function.parameters"),
        ({"tools": [weather_tool(), weather_tool()]}, "tools"),
        ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools.0.type"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [weather_tool()], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [weather_tool()], "tool_choice": 3}, "tool_choice"),
        (
            {
                "tools": [weather_tool()],
                "tool_choice": {"type": "function", "function": {"name": "get_time"}},
            },
            "tool_choice",
        ),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "c9"}]}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0"),
        ({"messages": [{"role": "assistant", "content": None}]}, "messages.0"),
        ({"messages": [{"role": "user", "tool_calls": []}]}, "messages.0"),
    ],
)
def test_bad_tool_requests_name_their_field(body, param):
    assert error_param(**body) == param


def test_a_tool_conversation_is_read_into_chat_messages():
    req = request(
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        ],
        tools=[weather_tool()],
        tool_choice="none",
    )
    user, assistant, result = req.chat_messages()
    assert assistant == ChatMessage(
        "assistant", "", (ToolCall("c1", "get_weather", '{"city":"Paris"}'),)
    )
    assert result == ChatMessage("tool", "sunny", tool_call_id="c1", name="get_weather")
    use = tool_use(req)
    assert use is not None and use.mode == "none"
