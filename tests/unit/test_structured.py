"""JSON Schema → GBNF: what converts, and the 400 naming the part that does not.

The grammars are checked by llama.cpp's own compiler (the bundled model's vocabulary only),
and by which strings they accept: a grammar sampler refuses a token whose text breaks the
grammar, so feeding a JSON text byte by byte tells whether the grammar accepts it.
"""

from __future__ import annotations

import ctypes
import json

import llama_cpp
import pytest

from kv3d.server.chat import Tokenizer
from kv3d.server.openai_schema import APIError
from kv3d.server.structured import JSON_OBJECT_GBNF, SCHEMA_PARAM, schema_to_gbnf

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "role": {"enum": ["admin", "user"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city"],
        },
    },
    "required": ["name", "age", "role", "tags", "address"],
}


@pytest.fixture(scope="module")
def tok(smollm2_path):
    t = Tokenizer.load(smollm2_path)
    yield t
    t.close()


def accepts(tok: Tokenizer, gbnf: str, text: str) -> bool:
    """Whether the grammar accepts exactly `text`: each byte-level piece must be allowed, and
    the end (an end-of-generation token) must be allowed after the last one."""
    model = tok._model
    stage = llama_cpp.llama_sampler_init_grammar(model.vocab, gbnf.encode(), b"root")
    assert stage, "grammar did not compile"
    try:
        for token in model.tokenize(text, add_special=False, parse_special=False):
            if not _allowed(model, stage, token):
                return False
            llama_cpp.llama_sampler_accept(stage, token)
        return _allowed(model, stage, model.token_eos())
    finally:
        llama_cpp.llama_sampler_free(stage)


def _allowed(model, stage, token: int) -> bool:
    data = (llama_cpp.llama_token_data * 1)(llama_cpp.llama_token_data(token, 0.0, 0.0))
    arr = llama_cpp.llama_token_data_array(data, 1, -1, False)
    llama_cpp.llama_sampler_apply(stage, ctypes.pointer(arr))
    return data[0].logit != float("-inf")


def test_nested_objects_enums_and_arrays_compile_and_constrain(tok):
    gbnf = schema_to_gbnf(PERSON)
    assert tok.grammar_error(gbnf) is None
    good = {
        "name": "Ada",
        "age": 36,
        "role": "admin",
        "tags": ["x", "y"],
        "address": {"city": "London"},
    }
    assert accepts(tok, gbnf, json.dumps(good))
    for bad in (
        {**good, "role": "root"},  # not in the enum
        {**good, "age": "36"},  # wrong type
        {**good, "tags": ["a", "b", "c", "d"]},  # past maxItems
        {k: v for k, v in good.items() if k != "address"},  # a required property missing
        {**good, "address": {"zip": "1"}},  # a nested required property missing
    ):
        assert not accepts(tok, gbnf, json.dumps(bad)), bad


def test_refs_and_any_of_convert(tok):
    schema = {
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "number"}}}},
        "type": "object",
        "properties": {
            "at": {"$ref": "#/$defs/point"},
            "id": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
        },
        "required": ["at", "id"],
    }
    gbnf = schema_to_gbnf(schema)
    assert accepts(tok, gbnf, '{"at": {"x": 1.5}, "id": null}')
    assert not accepts(tok, gbnf, '{"at": {"x": "1"}, "id": null}')


def test_json_object_mode_accepts_objects_only(tok):
    assert tok.grammar_error(JSON_OBJECT_GBNF) is None
    assert accepts(tok, JSON_OBJECT_GBNF, '{"a": [1, {"b": null}], "c": "d"}')
    assert not accepts(tok, JSON_OBJECT_GBNF, "[1, 2]")
    assert not accepts(tok, JSON_OBJECT_GBNF, '{"a": 1')


def test_strings_hold_no_raw_control_characters(tok):
    # json.loads refuses a raw newline inside a string: the grammar must too.
    gbnf = schema_to_gbnf({"type": "object", "properties": {"s": {"type": "string"}}})
    assert accepts(tok, gbnf, '{"s": "a\\nb"}')
    assert not accepts(tok, gbnf, '{"s": "a\nb"}')


@pytest.mark.parametrize(
    ("schema", "where"),
    [
        ([1, 2], "at its root"),
        ({"type": "strin"}, "at /type"),
        ({"type": "object", "properties": {"a": {"type": "bogus"}}}, "at /properties/a/type"),
        ({"type": "object", "properties": {"a/b": 3}}, "at /properties/a~1b"),
        ({"type": "array", "items": {"enum": []}}, "at /items/enum"),
        ({"anyOf": []}, "at /anyOf"),
        ({"properties": {"p": {"$ref": "https://example.com/s.json"}}}, "at /properties/p/$ref"),
        ({"type": "string", "pattern": "[a-z]+"}, "at /pattern"),
        ({"type": "object", "required": "a"}, "at /required"),
        ({"$ref": "#/$defs/missing"}, "at its root"),  # the converter's own complaint
    ],
)
def test_a_bad_schema_is_a_400_naming_the_part(schema, where):
    with pytest.raises(APIError) as info:
        schema_to_gbnf(schema)
    err = info.value
    assert (err.status, err.param, err.code) == (400, SCHEMA_PARAM, "invalid_json_schema")
    assert where in err.message


def test_strict_refuses_what_the_grammar_cannot_enforce():
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}}
    assert schema_to_gbnf(schema)  # best effort: the bound is not enforced
    with pytest.raises(APIError, match="at /properties/n/minimum"):
        schema_to_gbnf(schema, strict=True)


def test_the_param_names_the_caller_field():
    with pytest.raises(APIError) as info:
        schema_to_gbnf({"type": "nope"}, param="tools.0.function.parameters")
    assert info.value.param == "tools.0.function.parameters"
