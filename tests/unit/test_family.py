"""Where a chat prompt's family prefix ends, on the bundled models' real templates (vocab only)."""

from __future__ import annotations

from kv3d.server.chat import MIN_LEAD_TOKENS, ChatMessage, Tokenizer


def family(tok: Tokenizer, messages: list[ChatMessage]) -> tuple[list[int], int | None]:
    prompt = tok.encode_chat(messages)
    return prompt, tok.family_tokens(messages, prompt)


def test_leading_system_messages_are_the_family(tokenizer):
    prompt, n = family(
        tokenizer, [ChatMessage("system", "You answer in French."), ChatMessage("user", "Hi")]
    )
    assert n is not None and "You answer in French." in tokenizer.decode(prompt[:n])
    assert "Hi" not in tokenizer.decode(prompt[:n])


def test_without_a_system_message_the_templates_lead_is_the_family(tokenizer):
    # SmolLM2's template writes a default system prompt: every chat without one shares it.
    a, n = family(tokenizer, [ChatMessage("user", "Say hi.")])
    b, m = family(tokenizer, [ChatMessage("user", "0f3c9a2e What is 2 + 2?")])
    assert n == m and n is not None and n >= MIN_LEAD_TOKENS
    assert a[:n] == b[:n] and a[n] != b[n]
    assert "SmolLM" in tokenizer.decode(a[:n])


def test_a_short_template_lead_is_no_family(gemma):
    # Gemma 3 writes only a turn header before the user's text: too short to keep hot alone.
    _, n = family(gemma, [ChatMessage("user", "Say hi.")])
    assert n is None


def test_a_conversation_of_system_messages_only_has_no_family(tokenizer):
    _, n = family(tokenizer, [ChatMessage("system", "Be brief.")])
    assert n is None
