"""Request bodies for the no-5xx fuzz tests (in-process app and the real Serve HTTP path).

JSON of any shape; chat/completion bodies whose every numeric field also takes the edges of the
C and JSON number types (int32, uint32, int64, NaN, ±Infinity, subnormals); strings that hold
lone UTF-16 surrogates; and raw bodies a JSON library will not write: nesting tens of thousands
deep, integers past Python's digit limit, surrogates as raw (CESU-8) bytes.
"""

from __future__ import annotations

import json
import math
import sys

from hypothesis import strategies as st

from kv3d.server.openai_schema import MAX_JSON_DEPTH

INT_EDGES = [
    0,
    1,
    -1,
    2**31 - 1,
    2**31,
    -(2**31),
    -(2**31) - 1,
    2**32 - 2,
    2**32 - 1,
    2**32,
    2**32 + 1,
    2**63 - 1,
    2**63,
    -(2**63),
    -(2**63) - 1,
    2**64,
    10**30,
]
FLOAT_EDGES = [
    0.0,
    -0.0,
    5e-324,
    1e-45,
    0.5,
    1.0,
    1.0000000000000002,
    2.0,
    2.0000000000000004,
    1e308,
    -1e308,
    math.nan,
    math.inf,
    -math.inf,
]
EDGE = st.sampled_from(INT_EDGES + FLOAT_EDGES)
NUMBER = EDGE | st.integers() | st.floats()

# A lone surrogate alone or inside other text; json.dumps writes it as a \udXXX escape.
SURROGATE = st.characters(categories=["Cs"])
TEXT = st.text(max_size=20) | st.builds(
    lambda head, s, tail: head + s + tail, st.text(max_size=4), SURROGATE, st.text(max_size=4)
)

JSON = st.recursive(
    st.none() | st.booleans() | NUMBER | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)


def number(low: int, high: int):
    """A field's own small range, the number edges, or any JSON."""
    return st.one_of(st.integers(low, high), EDGE, JSON)


CONTENT = st.one_of(
    TEXT,
    st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}), max_size=3),
    JSON,
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "developer", "tool", 3])},
    optional={"content": CONTENT, "name": TEXT},
)
LOGIT_BIAS = st.dictionaries(
    st.sampled_from([str(n) for n in INT_EDGES]) | TEXT, NUMBER | JSON, max_size=3
)


def request_body(max_tokens=None):
    """A chat or completion body (both endpoints get the same one). `max_tokens`: a strategy
    that is always drawn (to bound generation where no server limit does), else optional."""
    required = {"messages": st.one_of(st.lists(MESSAGE, max_size=4), JSON)}
    optional = {
        "model": st.one_of(TEXT, JSON),
        "max_tokens": number(-5, 6),
        "max_completion_tokens": number(-5, 6),
        "temperature": st.one_of(st.floats(-1, 3), EDGE, JSON),
        "top_p": st.one_of(st.floats(-1, 2), EDGE, JSON),
        "top_k": number(-3, 50),
        "stop": st.one_of(TEXT, st.lists(TEXT, max_size=5), JSON),
        "stream": st.booleans(),
        "logprobs": st.one_of(st.booleans(), number(-2, 8)),
        "top_logprobs": number(-2, 30),
        "seed": number(-2, 100),
        "n": number(-1, 3),
        "presence_penalty": st.one_of(st.floats(-3, 3), EDGE, JSON),
        "frequency_penalty": st.one_of(st.floats(-3, 3), EDGE, JSON),
        "logit_bias": st.one_of(LOGIT_BIAS, JSON),
        "user": st.one_of(st.text(max_size=300), TEXT, JSON),
        "cache_salt": st.one_of(st.text(max_size=300), TEXT, JSON),
        "prompt": st.one_of(TEXT, st.lists(TEXT, max_size=2), JSON),
    }
    if max_tokens is not None:
        required["max_tokens"] = max_tokens
        del optional["max_tokens"]
    return st.fixed_dictionaries(required, optional=optional)


EDGE_FIELDS = [
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "logprobs",
    "top_logprobs",
    "presence_penalty",
    "frequency_penalty",
]


def edge_body(max_tokens=None):
    """A body both endpoints serve (messages and a prompt, valid sampling fields), as it is or
    with one numeric field set to a number edge: what is in range reaches the engine."""
    text = st.text(min_size=1, max_size=20)  # no lone surrogates: TEXT is where they are
    turn = st.fixed_dictionaries({"role": st.just("user"), "content": text})
    system = st.fixed_dictionaries({"role": st.just("system"), "content": text})
    valid = st.fixed_dictionaries(
        {
            "messages": st.tuples(st.lists(system, max_size=1), turn).map(lambda t: [*t[0], t[1]]),
            "prompt": text,
            "max_tokens": max_tokens if max_tokens is not None else st.integers(1, 6),
        },
        optional={
            "temperature": st.floats(0, 2),
            "top_p": st.floats(0, 1, exclude_min=True),
            "top_k": st.integers(0, 100),
            "seed": st.integers(0, 2**32 - 2),
            "logprobs": st.sampled_from([True, 1]),  # valid for both endpoints
            "top_logprobs": st.integers(0, 5),
            "logit_bias": st.just({}),
            "stop": st.lists(text, max_size=4),
            "stream": st.booleans(),
        },
    )
    with_edge = st.builds(
        lambda body, field, value: {**body, field: value},
        valid,
        st.sampled_from(EDGE_FIELDS),
        EDGE,
    )
    return valid | with_edge


# --- raw bodies --------------------------------------------------------------------------------
FIELDS = ["messages", "prompt", "max_tokens", "top_k", "seed", "temperature", "logit_bias", "x"]
DIGITS = sys.get_int_max_str_digits()


def _field_holding(field: str, value: bytes) -> bytes:
    return b'{"' + field.encode() + b'":' + value + b"}"


def _deep(depth: int, opener: bytes) -> bytes:
    if opener == b"[":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


DEEP = st.builds(
    lambda depth, opener, field, bare: (
        _deep(depth, opener) if bare else _field_holding(field, _deep(depth, opener))
    ),
    st.sampled_from([MAX_JSON_DEPTH - 2, MAX_JSON_DEPTH - 1, MAX_JSON_DEPTH, 999, 1000, 50_000]),
    st.sampled_from([b"[", b"{"]),
    st.sampled_from(FIELDS),
    st.booleans(),
)
HUGE_NUMBER = st.builds(
    lambda field, sign, digits, tail: _field_holding(field, sign + b"9" * digits + tail),
    st.sampled_from(FIELDS),
    st.sampled_from([b"", b"-"]),
    st.sampled_from([DIGITS - 1, DIGITS, DIGITS + 1, 5_000, 100_000]),
    st.sampled_from([b"", b".5", b"e5", b"e99999", b"e-99999"]),
)
RAW_SURROGATE = st.builds(
    lambda field, raw: _field_holding(field, b'"a' + raw + b'b"'),
    st.sampled_from(FIELDS),
    st.sampled_from([b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\\ud800", b"\\udfff\\ud800"]),
)
RAW = st.one_of(DEEP, HUGE_NUMBER, RAW_SURROGATE, st.binary(max_size=64))


def encoded(body) -> bytes:
    # Python's json writes NaN and Infinity, and lone surrogates as escapes: a server must
    # survive both.
    return json.dumps(body).encode()


def request_bytes(max_tokens=None):
    """The bytes of one request body: a fuzzed body encoded, a fuzzed JSON value, or raw."""
    return st.one_of(
        edge_body(max_tokens).map(encoded),
        request_body(max_tokens).map(encoded),
        st.one_of(JSON.map(encoded), RAW),
    )
