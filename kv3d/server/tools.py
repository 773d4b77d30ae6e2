"""Function calling: the tools a request offers, how the prompt shows them, the grammar that
forces a call, and reading calls back out of the model's text.

One wire format throughout, Hermes/Qwen style: a call is `<tool_call>{"name": ..., "arguments":
{...}}</tool_call>` and a result `<tool_response>...</tool_response>`. Templates that know
tools render their own prompt; every other template gets the tools described in the system
turn, past calls and results written as text in roles it accepts (the fallback).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from kv3d.server.chat import ChatMessage, ChatTemplate, arguments_value
from kv3d.server.openai_schema import APIError
from kv3d.server.structured import schema_to_gbnf

if TYPE_CHECKING:
    from kv3d.server.openai_schema import ChatCompletionRequest

OPEN = "<tool_call>"
CLOSE = "</tool_call>"

ToolMode = Literal["none", "auto", "required", "named"]


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A function the model may call. `parameters` is a JSON schema of an object."""

    name: str
    description: str | None
    parameters: dict[str, Any]
    strict: bool = False  # a forced call's grammar must then enforce every keyword

    def openai(self) -> dict[str, Any]:
        """As chat templates (and OpenAI) spell a tool."""
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass(frozen=True, slots=True)
class ToolUse:
    """The tools a request offers and how the model must use them. Invariant: `forced` is set
    exactly when mode is "named", and names one of `tools`; `tools` is never empty."""

    tools: tuple[ToolSpec, ...]
    mode: ToolMode
    parallel: bool = True
    forced: str | None = None

    @property
    def offered(self) -> tuple[ToolSpec, ...]:
        # "none" leaves the tools out of the prompt: the model is not shown what it may not use.
        return () if self.mode == "none" else self.tools

    @property
    def names(self) -> frozenset[str]:
        return frozenset(t.name for t in self.offered)

    def reader(self) -> CallReader | None:
        """A reader for this request's output; None when no call can be in it."""
        if self.mode == "none":
            return None
        return CallReader(self.names, max_calls=None if self.parallel else 1)


def tool_use(req: ChatCompletionRequest) -> ToolUse | None:
    """The request's tools, or None when it offers none (validated at the boundary)."""
    if not req.tools:
        return None
    specs = tuple(
        ToolSpec(
            t.function.name,
            t.function.description,
            t.function.parameters or _NO_ARGS,
            bool(t.function.strict),
        )
        for t in req.tools
    )
    choice = req.tool_choice or "auto"
    if isinstance(choice, str):
        return ToolUse(specs, choice, req.parallel_tool_calls)
    return ToolUse(specs, "named", req.parallel_tool_calls, forced=choice.function.name)


_NO_ARGS: dict[str, Any] = {"type": "object", "properties": {}}


# --- the prompt --------------------------------------------------------------------------------
def prompt_input(
    template: ChatTemplate, messages: list[ChatMessage], use: ToolUse | None
) -> tuple[list[ChatMessage], list[dict[str, Any]] | None]:
    """The conversation as `template` can render it, and the `tools` to render it with."""
    offered = use.offered if use is not None else ()
    if template.knows_tools:
        return messages, [t.openai() for t in offered] or None
    return fallback_messages(messages, offered, parallel=use.parallel if use else True), None


def fallback_messages(
    messages: list[ChatMessage], offered: tuple[ToolSpec, ...], *, parallel: bool = True
) -> list[ChatMessage]:
    """The conversation in roles and text only, for templates that know nothing of tools.

    The tools' description joins the first system message (or becomes one): it is then part of
    the family prefix that `Tokenizer.family_tokens` finds, which requests share only when they
    have the same system prompt and offer the same tools."""
    out: list[ChatMessage] = []
    from_tool = False  # whether out[-1] holds a tool result
    for m in messages:
        if m.role == "tool":
            text = _tool_response(m)
            if out and out[-1].role == "user":
                out[-1] = ChatMessage("user", f"{out[-1].content}\n{text}")
            else:
                out.append(ChatMessage("user", text))
            from_tool = True
            continue
        if m.role == "user" and from_tool:
            # Templates that insist on alternating roles would refuse two user turns in a row.
            out[-1] = ChatMessage("user", f"{out[-1].content}\n{m.content}")
        elif m.tool_calls:
            calls = "\n".join(_call_text(c.name, c.arguments) for c in m.tool_calls)
            out.append(ChatMessage(m.role, f"{m.content}\n{calls}" if m.content else calls))
        else:
            out.append(ChatMessage(m.role, m.content))
        from_tool = False
    if not offered:
        return out
    described = tools_system_text(offered, parallel=parallel)
    if out and out[0].role == "system":
        out[0] = ChatMessage("system", f"{out[0].content}\n\n{described}")
    else:
        out.insert(0, ChatMessage("system", described))
    return out


def tools_system_text(offered: tuple[ToolSpec, ...], *, parallel: bool = True) -> str:
    listing = "\n".join(json.dumps(t.openai(), ensure_ascii=False) for t in offered)
    how_many = "one block per call" if parallel else "at most one call per answer"
    return (
        "You can call these functions, each given with a JSON schema of its arguments:\n"
        f"<tools>\n{listing}\n</tools>\n"
        "To call a function, answer with\n"
        f'{OPEN}{{"name": <function name>, "arguments": <arguments as a JSON object>}}{CLOSE}\n'
        f"{how_many}. Results come back in <tool_response></tool_response> blocks. "
        "When no function helps, answer normally."
    )


def _call_text(name: str, arguments: str) -> str:
    body = json.dumps({"name": name, "arguments": arguments_value(arguments)}, ensure_ascii=False)
    return f"{OPEN}{body}{CLOSE}"


def _tool_response(m: ChatMessage) -> str:
    head = f'<tool_response name="{m.name}">' if m.name else "<tool_response>"
    return f"{head}\n{m.content}\n</tool_response>"


# --- forcing a call ----------------------------------------------------------------------------
def call_grammar(use: ToolUse | None) -> str | None:
    """The GBNF that holds the answer to calls, for "required" (calls of any offered tool; one
    unless parallel) and a named choice (one call of that tool); None when the model chooses.

    Each call is `<tool_call>` JSON `</tool_call>`, the JSON being the object `{"name": <the
    tool>, "arguments": <an instance of its parameters>}`, keys in that order: the grammar of
    that object comes from one JSON schema (an anyOf of the tools) through `schema_to_gbnf`.
    Raises a 400 naming the tool whose parameters cannot become a grammar."""
    if use is None or use.mode in ("none", "auto"):
        return None
    specs = [t for t in use.tools if use.mode == "required" or t.name == use.forced]
    for i, spec in enumerate(use.tools):
        if spec in specs:  # each schema on its own first: an error points into it
            schema_to_gbnf(
                spec.parameters, strict=spec.strict, param=f"tools.{i}.function.parameters"
            )
    call_json = schema_to_gbnf(_calls_schema(specs), strict=False, param="tools")
    many = use.mode == "required" and use.parallel
    return _wrap_in_tags(call_json, many)


_DEFS = ("$defs", "definitions")


def _calls_schema(specs: list[ToolSpec]) -> dict[str, Any]:
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": s.name},
                "arguments": {k: v for k, v in s.parameters.items() if k not in _DEFS},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for s in specs
    ]
    schema: dict[str, Any] = calls[0] if len(calls) == 1 else {"anyOf": calls}
    # `$ref`s point from the schema's root ("#/$defs/x"): the definitions move to the new root.
    for key in _DEFS:
        merged: dict[str, Any] = {}
        for spec in specs:
            for name, definition in spec.parameters.get(key, {}).items():
                if merged.setdefault(name, definition) != definition:
                    raise APIError(
                        400,
                        f"tools define {key}/{name} differently; a forced call needs one meaning",
                        param="tools",
                        code="invalid_json_schema",
                    )
        if merged:
            schema[key] = merged
    return schema


def _wrap_in_tags(call_json: str, many: bool) -> str:
    # The converter's start rule is renamed (to a name it did not use) and wrapped in the tags.
    name = "tool-call-json"
    while re.search(rf"^{name} ::=", call_json, re.M):
        name += "-x"
    body = re.sub(r"^root ::=", f"{name} ::=", call_json, count=1, flags=re.M)
    block = f'"{OPEN}" "\\n"? {name} "\\n"? "{CLOSE}"'
    root = f'root ::= {block} ( "\\n"? {block} )*' if many else f"root ::= {block}"
    return f"{root}\n{body}"


# --- reading calls out of the output -----------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Call:
    """A call read from the output; `arguments` is compact JSON text of an object."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


Piece = str | Call  # text for `content`, or a call


class CallReader:
    """Reads calls out of the model's text as it arrives, for streamed and whole answers alike.

    Invariant: text leaves as content only once it can no longer be part of a call, and a call
    leaves whole, once its block has closed and parsed; a block that does not parse (or names no
    offered tool) leaves as the text it was. An output that begins with `{` or `[` is read whole
    at the end, as bare JSON calls or else as content."""

    def __init__(self, names: frozenset[str], max_calls: int | None = None):
        self._names = names
        self._max_calls = max_calls
        self._calls = 0
        self._buf = ""
        self._blank = ""  # trailing whitespace held back: it goes if a call comes next
        self._mode: Literal["text", "call", "json"] = "text"
        self._started = False  # some non-blank text has been seen

    def feed(self, text: str) -> list[Piece]:
        self._buf += text
        out: list[Piece] = []
        while True:
            if self._mode == "json":
                return out
            if self._mode == "call":
                end = self._buf.find(CLOSE)
                if end < 0:
                    return out
                body, self._buf = self._buf[:end], self._buf[end + len(CLOSE) :]
                self._mode = "text"
                out += self._block(body, OPEN + body + CLOSE)
                continue
            if not self._started:
                head = self._buf.lstrip()
                if not head:
                    return out
                self._started = True
                if head[0] in "{[":
                    self._mode = "json"
                    return out
            start = self._buf.find(OPEN)
            if start < 0:
                keep = _partial_suffix(self._buf, OPEN)
                out += self._content(self._buf[: len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep :]
                return out
            out += self._content(self._buf[:start])
            self._buf = self._buf[start + len(OPEN) :]
            self._mode = "call"

    def close(self) -> list[Piece]:
        """The rest, once the output has ended."""
        rest, self._buf = self._buf, ""
        if self._mode == "call":  # unclosed: a call all the same when what came parses
            out = self._block(rest, OPEN + rest)
        elif self._mode == "json":
            out = self._block(rest, rest)
        else:
            out = self._content(rest)
        if self._blank and not self._calls:  # an answer without calls keeps its every character
            out.append(self._blank)
        self._blank = ""
        return out

    def _block(self, body: str, raw: str) -> list[Piece]:
        calls = parse_calls(body, self._names)
        if calls is None or (
            self._max_calls is not None and self._calls + len(calls) > self._max_calls
        ):
            return self._content(raw)
        self._calls += len(calls)
        self._blank = ""
        return list(calls)

    def _content(self, text: str) -> list[Piece]:
        text = self._blank + text
        kept = text.rstrip()
        self._blank = text[len(kept) :]
        return [kept] if kept else []


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag` (it may be a tag cut short)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def parse_calls(text: str, names: frozenset[str]) -> list[Call] | None:
    """The calls a block holds: one `{"name", "arguments"}` object or a list of them (Llama's
    `parameters` is read as `arguments`); None unless every one is well formed and names an
    offered tool."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = [_call(item, names) for item in items]
    if not calls or any(c is None for c in calls):
        return None
    return calls  # type: ignore[return-value]


def _call(item: Any, names: frozenset[str]) -> Call | None:
    if not isinstance(item, dict) or item.get("name") not in names:
        return None
    arguments = item.get("arguments", item.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as JSON text
        arguments = arguments_value(arguments)
    if not isinstance(arguments, dict):
        return None
    return Call(item["name"], json.dumps(arguments, ensure_ascii=False, separators=(",", ":")))


def split_output(text: str, reader: CallReader) -> tuple[str | None, list[Call]]:
    """A whole answer as (content, calls); content is None when only calls were made."""
    pieces = reader.feed(text) + reader.close()
    content = "".join(p for p in pieces if isinstance(p, str))
    calls = [p for p in pieces if isinstance(p, Call)]
    return (content or None) if calls else content, calls
