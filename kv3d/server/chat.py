"""Chat prompts: render the model's chat template, then tokenize.

The template is the Jinja source stored in the GGUF (`tokenizer.chat_template`), rendered in a
sandbox, so each model gets the prompt format it was trained on. Some GGUFs ship without one
(the bundled Gemma 3 270M does): then llama.cpp's built-in template for the model's
architecture renders the conversation, and ChatML only when the architecture is unknown.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Protocol

import jinja2
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kv3d.engine.llama import LlamaModel, apply_builtin_template, grammar_compiles

# llama.cpp built-in template per `general.architecture`, for GGUFs without a template.
BUILTIN_TEMPLATE_BY_ARCH = {
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3": "gemma",
    "llama": "llama3",
    "phi3": "phi3",
    "qwen2": "chatml",
    "qwen3": "chatml",
}


class TemplateError(ValueError):
    """The chat template refused the conversation (e.g. roles out of the order it allows)."""


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A function call an assistant turn made; `arguments` is JSON text, as OpenAI carries it."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # assistant turns that called functions
    tool_call_id: str | None = None  # tool turns: the call this is the result of
    name: str | None = None  # tool turns: the function that was called


class ChatTemplate(Protocol):
    # Whether it renders `tools`, assistant `tool_calls` and `tool` turns itself; when not,
    # kv3d.server.tools writes them as plain text first.
    knows_tools: bool

    def render(
        self,
        messages: list[ChatMessage],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
    ) -> str: ...


class JinjaChatTemplate:
    def __init__(self, source: str, *, bos_token: str, eos_token: str):
        # Lenient undefined on purpose: templates test optional variables such as `tools`.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        # Templates were written against transformers' tojson (no HTML escaping of <, >, &).
        env.filters["tojson"] = _tojson
        self._template = env.from_string(source)
        self.knows_tools = "tools" in jinja2.meta.find_undeclared_variables(env.parse(source))
        self._bos_token = bos_token
        self._eos_token = eos_token

    def render(
        self,
        messages: list[ChatMessage],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
    ) -> str:
        try:
            return self._template.render(
                messages=[_message_dict(m) for m in messages],
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                bos_token=self._bos_token,
                eos_token=self._eos_token,
            )
        except TemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise TemplateError(f"the model's chat template failed: {exc}") from exc


def _raise(message: str):
    raise TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _message_dict(m: ChatMessage) -> dict:
    """A message as chat templates read it (transformers' shape: call arguments as objects)."""
    out: dict = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": arguments_value(c.arguments)},
            }
            for c in m.tool_calls
        ]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        out["name"] = m.name
    return out


def arguments_value(arguments: str):
    """A call's JSON arguments text as an object when it is one, else the text unchanged."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return arguments
    return value if isinstance(value, dict) else arguments


class BuiltinChatTemplate:
    """One of llama.cpp's named templates (`gemma`, `chatml`, …), rendered by llama.cpp. It knows
    roles and text only."""

    knows_tools = False

    def __init__(self, name: str):
        self.name = name

    def render(
        self,
        messages: list[ChatMessage],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
    ) -> str:
        return apply_builtin_template(
            self.name, [(m.role, m.content) for m in messages], add_generation_prompt
        )


# A template lead shorter than this is no family prefix: it saves little prefill, and a prefix
# too short to be kept hot would leave a short conversation no family to stay hot beside.
MIN_LEAD_TOKENS = 16
# Template leads remembered (one per set of tools offered).
MAX_CACHED_LEADS = 64


class Tokenizer:
    """The model's vocabulary and chat template, without its weights (cheap for the ingress)."""

    def __init__(self, model: LlamaModel):
        self._model = model
        self._leads: dict[str, list[int]] = {}  # the template's lead, by the tools offered

    @classmethod
    def load(cls, path: Path) -> Tokenizer:
        return cls(LlamaModel(path, vocab_only=True))

    def close(self) -> None:
        self._model.close()

    @property
    def n_ctx_train(self) -> int:
        return self._model.n_ctx_train

    def meta(self, key: str) -> str | None:
        """The model's GGUF metadata value under `key`, as text, or None."""
        return self._model.meta(key)

    @cached_property
    def chat_template(self) -> ChatTemplate:
        m = self._model
        source = m.chat_template()
        if source is None:
            arch = m.meta("general.architecture") or ""
            return BuiltinChatTemplate(BUILTIN_TEMPLATE_BY_ARCH.get(arch, "chatml"))
        bos = m.token_to_piece(m.token_bos(), special=True).decode("utf-8", "replace")
        eos = m.token_to_piece(m.token_eos(), special=True).decode("utf-8", "replace")
        return JinjaChatTemplate(source, bos_token=bos, eos_token=eos)

    def encode_chat(
        self, messages: list[ChatMessage], tools: list[dict] | None = None
    ) -> list[int]:
        return self._encode_rendered(self.chat_template.render(messages, tools=tools))

    def family_tokens(
        self, messages: list[ChatMessage], prompt: list[int], tools: list[dict] | None = None
    ) -> int | None:
        """Where the leading system messages end in `prompt`: the family prefix that sessions
        with the same system prompt share. None when there is none, or when the template does
        not render them as a token prefix of the whole conversation. Templates that know tools
        mostly write them into the system turn, so `tools` (as given to `encode_chat`) is part of
        the family: requests share it only when they offer the same tools."""
        leading = []
        for message in messages:
            if message.role != "system":
                break
            leading.append(message)
        if not leading:
            return self._template_lead(messages, prompt, tools)
        if len(leading) == len(messages):
            return None
        text = self.chat_template.render(leading, add_generation_prompt=False, tools=tools)
        if not text.strip():  # the template folds system text into the first user turn
            return None
        head = self._encode_rendered(text)
        n = len(head)
        return n if 0 < n < len(prompt) and prompt[:n] == head else None

    def _template_lead(
        self, messages: list[ChatMessage], prompt: list[int], tools: list[dict] | None
    ) -> int | None:
        """Without a system message, the family prefix is what the template writes before the
        first user message's text (its header, and a default system prompt where it has one:
        SmolLM2's, Qwen's, Llama 3's dates), when that is at least `MIN_LEAD_TOKENS` long."""
        if not messages or messages[0].role != "user":
            return None
        key = json.dumps(tools, sort_keys=True) if tools else ""
        lead = self._leads.get(key)
        if lead is None:
            if len(self._leads) >= MAX_CACHED_LEADS:
                self._leads.clear()
            lead = self._leads[key] = self._lead_tokens(tools)
        n = len(lead)
        if n < MIN_LEAD_TOKENS or n >= len(prompt):
            return None
        if prompt[:n] != lead:
            self._leads.pop(key, None)  # a template that writes today's date: look again
            return None
        return n

    def _lead_tokens(self, tools: list[dict] | None) -> list[int]:
        """The tokens two one-message conversations that differ from the user's text on share."""
        a, b = (
            self._encode_rendered(
                self.chat_template.render([ChatMessage("user", text)], tools=tools)
            )
            for text in ("Alpha", "Omega")
        )
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return a[:n]

    def _encode_rendered(self, text: str) -> list[int]:
        # The template writes its own special tokens (BOS included, where the model uses one).
        tokens = self._model.tokenize(text, add_special=False, parse_special=True)
        bos = self._model.token_bos()
        if self._model.add_bos and (not tokens or tokens[0] != bos):
            tokens.insert(0, bos)
        return tokens

    def encode_text(self, text: str) -> list[int]:
        return self._model.tokenize(text, add_special=True, parse_special=False)

    @property
    def n_vocab(self) -> int:
        return self._model.n_vocab

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        """Text as the model reads it, special-token markers in it included."""
        return self._model.tokenize(text, add_special=add_special, parse_special=True)

    def piece(self, token: int) -> bytes:
        """The bytes a token stands for, special tokens written out."""
        return self._model.token_to_piece(token, special=True)

    def decode(self, tokens: list[int]) -> str:
        return b"".join(self._model.token_to_piece(t) for t in tokens).decode("utf-8", "replace")

    def grammar_error(self, gbnf: str) -> str | None:
        """Why llama.cpp would refuse `gbnf` (start rule `root`) for this vocabulary, or None.

        The same compile the engine's sampler does, so a grammar that passes here cannot fail
        there."""
        if grammar_compiles(self._model, gbnf):
            return None
        return (
            "the grammar does not compile: it must be GBNF with a rule named root, and no rule "
            "may be undefined or left-recursive"
        )
