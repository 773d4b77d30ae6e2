import pytest
from pydantic import ValidationError

from kv3d.server.openai_schema import ChatCompletionRequest, CompletionRequest


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
