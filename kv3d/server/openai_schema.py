"""OpenAI API request validation and response shapes (the HTTP boundary's vocabulary).

Requests are pydantic models: everything a handler reads has been validated here. Fields the
OpenAI API defines but KV3D does not implement are ignored when they hold their neutral value
and rejected otherwise, so a client never silently gets behaviour it did not ask for.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from kv3d.engine.generation import REPEAT_LAST_N, SamplingParams, TokenLogprob, Usage
from kv3d.server.chat import ChatMessage, ToolCall
from kv3d.server.sampling import SamplingDefaults

Role = Literal["system", "developer", "user", "assistant", "tool"]

# What the backend's C API takes: llama.cpp reads counts such as top_k as int32, and a seed as
# uint32 where 0xFFFFFFFF means "draw one at random". Larger values would silently wrap.
INT32_MAX = 2**31 - 1
SEED_MAX = 2**32 - 2
# Deepest nesting of objects and arrays a request body may have (OpenAI bodies use a handful).
MAX_JSON_DEPTH = 64
LOGIT_BIAS_MAX = 100.0
# Most completions (`n`) per request: each one takes a sequence slot and its own KV cells.
MAX_CHOICES = 16
# Past this a repetition penalty only bans every recent token (llama-server sets no bound).
REPETITION_PENALTY_MAX = 10.0
MAX_TOOLS = 128  # OpenAI's bound on tools per request
TOOL_NAME = r"^[a-zA-Z0-9_-]{1,64}$"


class APIError(Exception):
    """An error with its HTTP status, rendered in the OpenAI error shape at the boundary."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


# --- request bodies ----------------------------------------------------------------------------
def parse_json_body(raw: bytes | bytearray) -> dict[str, Any]:
    """A request body as a JSON object, or a 400: also for nesting deeper than `MAX_JSON_DEPTH`,
    integers past Python's digit limit, and strings holding lone UTF-16 surrogates (`"\\ud800"`),
    which no tokenizer can encode. Every JSON endpoint reads its body through here."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise _too_deep() from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}") from None
    except ValueError:  # the only other ValueError json raises: int-string conversion limit
        raise APIError(
            400,
            f"request body holds an integer of more than {sys.get_int_max_str_digits()} digits",
            code="number_too_large",
        ) from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    _check_tree(body)
    return body


_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _check_tree(body: dict[str, Any]) -> None:
    """Iteratively (a deep body must not recurse here either): depth and lone surrogates."""
    # Entries: (container, depth, parent entry, key in parent); the chain names the param.
    stack: list[tuple[Any, int, Any, Any]] = [(body, 1, None, None)]
    while stack:
        entry = stack.pop()
        node, depth = entry[0], entry[1]
        for key, value in node.items() if type(node) is dict else enumerate(node):
            if type(key) is str and _SURROGATE.search(key):
                raise _lone_surrogate(entry, key)
            kind = type(value)
            if kind is str:
                if _SURROGATE.search(value):
                    raise _lone_surrogate(entry, key)
            elif kind is list or kind is dict:
                if depth >= MAX_JSON_DEPTH:
                    raise _too_deep()
                if value:
                    stack.append((value, depth + 1, entry, key))


def _too_deep() -> APIError:
    return APIError(
        400,
        f"request body nests objects and arrays deeper than {MAX_JSON_DEPTH} levels",
        code="nesting_too_deep",
    )


def _lone_surrogate(entry: tuple[Any, int, Any, Any], key: Any) -> APIError:
    path = [key]
    while entry[2] is not None:
        path.append(entry[3])
        entry = entry[2]
    # The name may hold the surrogate itself: escaped, so that the error body encodes.
    names = (str(p).encode("utf-8", "backslashreplace").decode("utf-8") for p in reversed(path))
    param = ".".join(names)
    return APIError(
        400,
        f"{param}: the string holds a lone UTF-16 surrogate (\\ud800-\\udfff without its pair), "
        "which is not valid Unicode",
        param=param,
        code="invalid_unicode",
    )


def _is_token_id(key: str) -> bool:
    return key.isascii() and key.isdigit() and len(key) <= 10 and int(key) <= INT32_MAX


class _NullMeansDefault(BaseModel):
    """A body model where JSON null in an optional field means "not sent", as in OpenAI's API
    (its optional fields are nullable; clients send `"temperature": null` for "the default").
    A required field stays required: null there is still a 400."""

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: Any) -> Any:
        if not isinstance(data, dict) or None not in data.values():
            return data
        optional = _optional_names(cls)
        return {k: v for k, v in data.items() if v is not None or k not in optional}


def check_vocabulary(ids: Iterable[int], n_vocab: int, param: str) -> None:
    """A 400 naming `param` and the first of `ids` outside the model's `n_vocab` tokens."""
    outside = next((t for t in ids if not 0 <= t < n_vocab), None)
    if outside is not None:
        raise APIError(
            400,
            f"{param}: token id {outside} is not in this model's vocabulary (0..{n_vocab - 1})",
            param=param,
        )


@functools.cache  # per model class: the same for every request
def _optional_names(model: type[BaseModel]) -> frozenset[str]:
    """The names (and aliases) of `model`'s fields that have a default other than None."""
    names: set[str] = set()
    for name, field in model.model_fields.items():
        if field.is_required() or field.default is None:
            continue
        names.add(name)
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(c for c in alias.choices if isinstance(c, str))
        elif isinstance(alias, str):
            names.add(alias)
    return frozenset(names)


class _Request(_NullMeansDefault):
    # NaN and Infinity (which Python's json reads) are no value any field accepts.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(
        0, ge=0, le=INT32_MAX, description="Extension: keep the k most likely tokens; 0 = off."
    )
    ignore_eos: bool = Field(False, description="Extension: generate until max_tokens.")
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    stop: str | list[str] | None = None
    n: int = Field(
        1,
        ge=1,
        le=MAX_CHOICES,
        description="Completions of the prompt; they share its computed KV cells.",
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(
        1.0,
        gt=0.0,
        le=REPETITION_PENALTY_MAX,
        validation_alias=AliasChoices("repetition_penalty", "repeat_penalty"),
        description="Extension (llama-server's repeat_penalty): divides the logit of each of "
        f"the last {REPEAT_LAST_N} tokens, prompt included; 1 = off.",
    )
    min_p: float = Field(
        0.0, ge=0.0, le=1.0, description="Extension: drop tokens below min_p × the top one's p."
    )
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    grammar: str | None = Field(
        None,
        min_length=1,
        description="Extension (as llama-server's): GBNF the output must match; start rule root.",
    )
    # OpenAI fields KV3D does not implement: accepted at their neutral value only, never ignored.
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    service_tier: Any = None
    store: bool | None = None
    best_of: int | None = None
    # Accepted and ignored: OpenAI keeps it only with stored completions (store is refused).
    metadata: dict[str, str] | None = Field(None, max_length=16)
    user: str | None = Field(None, max_length=256)
    cache_salt: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="Requests share cached prefixes only with requests of the same salt.",
    )

    @field_validator("logit_bias")
    @classmethod
    def _bias_bounds(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        # Ids past this model's vocabulary are refused in sampling(), which knows its size.
        for token, value in (bias or {}).items():
            if not _is_token_id(token):
                raise ValueError(f"keys must be token ids from 0 to {INT32_MAX}; got {token!r}")
            if not -LOGIT_BIAS_MAX <= value <= LOGIT_BIAS_MAX:
                raise ValueError(f"values must lie in [-100, 100]; got {value}")
        return bias

    @field_validator("grammar")
    @classmethod
    def _one_constraint(cls, grammar: str | None, info: ValidationInfo) -> str | None:
        fmt = info.data.get("response_format")
        if grammar is not None and fmt is not None and fmt.type != "text":
            raise ValueError("grammar and a JSON response_format exclude each other; send one")
        return grammar

    @field_validator("audio", "prediction", "web_search_options", "reasoning_effort")
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None:
            raise ValueError(f"{info.field_name} is not supported; omit it")
        return value

    @field_validator("modalities", "verbosity", "service_tier", "store", "best_of")
    @classmethod
    def _neutral_only(cls, value: Any, info: ValidationInfo) -> Any:
        allowed = _NEUTRAL[info.field_name]
        if value is not None and value not in allowed:
            shown = " or ".join(json.dumps(v) for v in allowed)
            raise ValueError(f"only {shown} is supported; got {json.dumps(value)}")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata_shape(cls, metadata: dict[str, str] | None) -> dict[str, str] | None:
        for key, value in (metadata or {}).items():
            if len(key) > 64 or len(value) > 512:
                raise ValueError("keys have at most 64 characters, values at most 512")
        return metadata

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: str | list[str] | None) -> list[str] | None:
        if stop is None:
            return None
        stops = [stop] if isinstance(stop, str) else stop
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

    def sampling(
        self, *, n_vocab: int, grammar: str | None = None, defaults: SamplingDefaults | None = None
    ) -> SamplingParams:
        """The request's sampling; `grammar` is the compiled-checked constraint, if any;
        `defaults` fill the temperature, top_p, top_k and min_p it leaves out (None: the
        fields' own, OpenAI's). A logit_bias id outside the model's vocabulary (`n_vocab`
        tokens) is a 400."""
        bias = tuple((int(token), value) for token, value in (self.logit_bias or {}).items())
        check_vocabulary((t for t, _ in bias), n_vocab, "logit_bias")
        sent = self.model_fields_set

        def pick(name: str):
            source = self if defaults is None or name in sent else defaults
            return getattr(source, name)

        return SamplingParams(
            temperature=pick("temperature"),
            top_p=pick("top_p"),
            top_k=pick("top_k"),
            seed=self.seed,
            min_p=pick("min_p"),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logit_bias=bias,
            grammar=grammar,
        )

    def stop_strings(self) -> tuple[str, ...]:
        return tuple(self.stop or ())  # type: ignore[arg-type]

    @property
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


# The value(s) each half-supported OpenAI field may take (anything else is a 400).
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "modalities": (["text"],),
    "verbosity": ("medium",),
    "service_tier": ("auto", "default"),
    "store": (False,),
    "best_of": (1,),
}


class JSONSchemaSpec(BaseModel):
    """`response_format.json_schema`: the schema the answer (JSON text) must satisfy."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """`response_format`: plain text, any JSON object, or JSON satisfying a schema.
    `json_schema` is set exactly when `type` is "json_schema"."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs a json_schema object')
        if self.type != "json_schema":
            self.json_schema = None  # what other types carry means nothing
        return self


class StreamOptions(_NullMeansDefault):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Role
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = Field(None, max_length=MAX_TOOLS)
    tool_call_id: str | None = Field(None, min_length=1, max_length=256)

    @model_validator(mode="after")
    def _tool_fields(self) -> Message:
        if self.tool_calls == []:
            self.tool_calls = None  # some clients send an empty list for "no calls"
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("tool_calls: only assistant messages carry tool calls")
        if self.content is None and self.tool_calls is None:
            raise ValueError("content: null only in an assistant message with tool_calls")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("tool_call_id: a tool message names the call it answers")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # Declared before tool_choice: its validator reads them.
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: ToolChoiceMode | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    # The legacy names of tools and tool_choice: refused, not translated (see _no_functions).
    functions: Any = None
    function_call: Any = None

    @field_validator("messages")
    @classmethod
    def _results_answer_calls(cls, messages: list[Message]) -> list[Message]:
        called: set[str] = set()
        for i, m in enumerate(messages):
            called.update(c.id for c in m.tool_calls or ())
            if m.role == "tool" and m.tool_call_id not in called:
                raise ValueError(
                    f"messages[{i}] answers tool call {m.tool_call_id!r}, which no earlier "
                    "assistant message made"
                )
        return messages

    @field_validator("tools")
    @classmethod
    def _unique_tools(cls, tools: list[Tool] | None) -> list[Tool] | None:
        names = [t.function.name for t in tools or ()]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"tool names must be unique; {', '.join(twice)} given twice")
        return tools or None

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _choice_of_tools(cls, choice: Any, info: ValidationInfo) -> Any:
        if choice is None:
            return None
        if "tools" not in info.data:  # the tools failed validation: that error is reported
            return choice
        names = {t.function.name for t in info.data["tools"] or ()}
        if isinstance(choice, str):
            if choice not in TOOL_CHOICE_MODES:
                raise ValueError(f"must be one of {', '.join(TOOL_CHOICE_MODES)} or a function")
            if choice != "none" and not names:
                raise ValueError(f"{choice!r} needs tools; the request declares none")
            return choice
        kind = choice.get("type") if isinstance(choice, dict) else None
        function = choice.get("function") if isinstance(choice, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if kind != "function" or not isinstance(name, str):
            raise ValueError(
                'must be "none", "auto", "required" or '
                '{"type": "function", "function": {"name": ...}}'
            )
        if name not in names:
            raise ValueError(f"names function {name!r}, which tools does not declare")
        return NamedToolChoice.model_validate(choice)

    @field_validator("functions", "function_call")
    @classmethod
    def _no_functions(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None:
            newer = "tools" if info.field_name == "functions" else "tool_choice"
            raise ValueError(f"the legacy {info.field_name} is not supported; use {newer}")
        return value

    @model_validator(mode="after")
    def _merge_limits(self) -> ChatCompletionRequest:
        if self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs=true")
        return self

    def chat_messages(self) -> list[ChatMessage]:
        out = []
        called: dict[str, str] = {}  # call id -> function: a tool result names its function
        for m in self.messages:
            calls = tuple(
                ToolCall(c.id, c.function.name, c.function.arguments) for c in m.tool_calls or ()
            )
            called.update((c.id, c.name) for c in calls)
            # "developer" is the newer name of "system"; templates know only the latter.
            role = "system" if m.role == "developer" else m.role
            if role == "tool":
                name = m.name or called.get(m.tool_call_id or "")
                out.append(ChatMessage(role, m.text(), (), m.tool_call_id, name))
            else:
                out.append(ChatMessage(role, m.text(), calls))
        return out

    def requested_top_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Request):
    # OpenAI's four forms: a string, token ids, or a list of either (one element here).
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1, le=INT32_MAX)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: Any) -> str | list[int]:
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise ValueError(
                    f"{len(prompt)} prompts; one prompt per request is supported (send each "
                    "as its own request, or use n for several completions of one prompt)"
                )
            prompt = prompt[0]
        if not prompt:
            raise ValueError("prompt must not be empty")
        if isinstance(prompt, list) and not all(0 <= t <= INT32_MAX for t in prompt):
            raise ValueError(f"token ids must lie in 0..{INT32_MAX}")
        return prompt

    def prompt_tokens(self, encode: Callable[[str], list[int]], n_vocab: int) -> list[int]:
        """The prompt as token ids: text through `encode`; given ids checked against the
        model's vocabulary of `n_vocab` tokens (a 400 naming the first one outside it)."""
        if isinstance(self.prompt, str):
            return encode(self.prompt)
        check_vocabulary(self.prompt, n_vocab, "prompt")
        return list(self.prompt)

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool) -> bool:
        if echo:
            raise ValueError("echo is not supported")
        return echo

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix: str | None) -> str | None:
        if suffix:
            raise ValueError("suffix is not supported")
        return suffix


# --- tools (function calling) ---
ToolChoiceMode = Literal["none", "auto", "required"]
TOOL_CHOICE_MODES = ("none", "auto", "required")


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(pattern=TOOL_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # None: the function takes no arguments
    # Accepted, not enforced under tool_choice "auto": the grammar of "required" and a named
    # choice holds arguments to the schema whatever `strict` says.
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        if schema is not None and schema.get("type", "object") != "object":
            raise ValueError('must be a JSON schema of an object ("type": "object")')
        return schema


class Tool(BaseModel):
    """A function the model may call, as OpenAI declares it."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(pattern=TOOL_NAME)


class NamedToolChoice(BaseModel):
    """`tool_choice` forcing one function: the answer is a call of it."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: NamedFunction


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(pattern=TOOL_NAME)
    arguments: str  # JSON text, as the API returned it


class ToolCallIn(_NullMeansDefault):
    """A call in an assistant message of the history."""

    model_config = ConfigDict(extra="ignore")
    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: CalledFunction


ResponseFormat.model_rebuild()
_Request.model_rebuild()
Message.model_rebuild()
ChatCompletionRequest.model_rebuild()
CompletionRequest.model_rebuild()


# --- responses ---------------------------------------------------------------------------------
def usage_dict(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def _token_str(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def chat_logprobs(items: list[TokenLogprob]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": _token_str(item.token_bytes),
                "logprob": item.logprob,
                "bytes": list(item.token_bytes),
                "top_logprobs": [
                    {"token": _token_str(raw), "logprob": lp, "bytes": list(raw)}
                    for _, raw, lp in item.top
                ],
            }
            for item in items
        ],
        "refusal": None,
    }


def completion_logprobs(items: list[TokenLogprob], text_offset: int = 0) -> dict[str, Any]:
    offsets, at = [], text_offset
    for item in items:
        offsets.append(at)
        at += len(_token_str(item.token_bytes))
    return {
        "tokens": [_token_str(i.token_bytes) for i in items],
        "token_logprobs": [i.logprob for i in items],
        "top_logprobs": [{_token_str(raw): lp for _, raw, lp in i.top} for i in items],
        "text_offset": offsets,
    }


def now_s() -> int:
    return int(time.time())


class TokenizeRequest(_NullMeansDefault):
    """`POST /tokenize`, in llama-server's shape: special tokens written in `content` (such as
    a chat template's markers) are parsed as such."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    content: str
    add_special: bool = False  # prepend BOS where the model uses one
    with_pieces: bool = False  # each token with the text it stands for


class DetokenizeRequest(BaseModel):
    """`POST /detokenize`, in llama-server's shape."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int] = Field(max_length=1 << 20)
