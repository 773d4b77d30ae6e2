"""JSON output constraints as GBNF grammars: a JSON Schema, or "any JSON object".

The conversion is llama-cpp-python's `SchemaConverter` (the port of llama.cpp's own
json-schema-to-grammar). It asserts on what it cannot convert, and silently skips keywords it
cannot enforce; so a schema is first walked here, to turn both into a 400 that names the part
(a JSON pointer into the schema) before the converter runs. The resulting GBNF still has to
compile against the model's vocabulary: the API checks that with `Tokenizer.grammar_error`.
"""

from __future__ import annotations

import json
from typing import Any

from llama_cpp.llama_grammar import SchemaConverter

from kv3d.server.chat import Tokenizer
from kv3d.server.openai_schema import APIError, ResponseFormat

SCHEMA_PARAM = "response_format.json_schema.schema"

_TYPES = {"string", "number", "integer", "boolean", "array", "object", "null"}
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")
# Keywords that constrain values but that the grammar does not enforce: refused under `strict`
# (output must then validate), skipped otherwise (best effort, as OpenAI's non-strict mode).
_UNENFORCED = (
    "not",
    "if",
    "then",
    "else",
    "patternProperties",
    "propertyNames",
    "dependentRequired",
    "dependentSchemas",
    "contains",
    "uniqueItems",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "minProperties",
    "maxProperties",
)


def output_grammar(
    fmt: ResponseFormat | None, grammar: str | None, tokenizer: Tokenizer
) -> str | None:
    """The GBNF a request's output must match (None: free text), from its `grammar` or its
    `response_format` (never both: the request model refuses that). It compiles against the
    model's vocabulary, or this is a 400, so no grammar the engine cannot build reaches it."""
    if grammar is not None:
        gbnf, param, code = grammar, "grammar", "invalid_grammar"
    elif fmt is None or fmt.type == "text":
        return None
    elif fmt.type == "json_object":
        gbnf, param, code = JSON_OBJECT_GBNF, "response_format", "invalid_json_schema"
    else:
        assert fmt.json_schema is not None  # the request model ties it to the type
        spec = fmt.json_schema
        gbnf = schema_to_gbnf(spec.json_schema, strict=bool(spec.strict))
        param, code = SCHEMA_PARAM, "invalid_json_schema"
    why = tokenizer.grammar_error(gbnf)
    if why is not None:
        raise APIError(400, f"{param}: {why}", param=param, code=code)
    return gbnf


def schema_to_gbnf(
    schema: dict[str, Any], *, strict: bool = False, param: str = SCHEMA_PARAM
) -> str:
    """The GBNF (start rule `root`) whose sentences are the JSON texts `schema` accepts.

    Raises `APIError(400, code="invalid_json_schema", param=param)` naming the failing part.
    """
    if not isinstance(schema, dict):
        raise _invalid(param, "", "a schema must be a JSON object")
    _check(schema, "", strict, param)
    converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    try:
        # The converter rewrites `$ref`s in place: it gets its own copy.
        resolved = converter.resolve_refs(json.loads(json.dumps(schema)), "input")
        converter.visit(resolved, "")
    except (AssertionError, ValueError, KeyError, TypeError, IndexError, RecursionError) as exc:
        raise _invalid(param, "", f"cannot be turned into a grammar: {exc}") from None
    # JSON forbids raw control characters in strings; the converter's `char` lets them through,
    # and a small model does write raw newlines there. Its rule is replaced by the strict one.
    return converter.format_grammar().replace(_LOOSE_CHAR, _STRICT_CHAR)


_LOOSE_CHAR = 'char ::= [^"\\\\] |'
_STRICT_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'


def _invalid(param: str, pointer: str, why: str) -> APIError:
    where = f"at {pointer}" if pointer else "at its root"
    return APIError(
        400, f"invalid JSON schema {where}: {why}", param=param, code="invalid_json_schema"
    )


def _check(node: Any, pointer: str, strict: bool, param: str) -> None:
    """Refuse, naming the part, what the converter would choke on or (strict) not enforce."""
    if isinstance(node, bool):  # `true` / `false` are schemas too; the converter wants objects
        raise _invalid(param, pointer or "/", "boolean schemas are not supported")
    if not isinstance(node, dict):
        raise _invalid(param, pointer or "/", "a schema must be a JSON object")
    types = node.get("type")
    for t in types if isinstance(types, list) else [types]:
        if t is not None and t not in _TYPES:
            raise _invalid(param, f"{pointer}/type", f"unknown type {t!r}")
    if "enum" in node and (not isinstance(node["enum"], list) or not node["enum"]):
        raise _invalid(param, f"{pointer}/enum", "enum must be a non-empty array")
    ref = node.get("$ref")
    if ref is not None and not (isinstance(ref, str) and ref.startswith("#/")):
        raise _invalid(param, f"{pointer}/$ref", "only local references (#/...) are supported")
    pattern = node.get("pattern")
    if pattern is not None and not (
        isinstance(pattern, str) and pattern.startswith("^") and pattern.endswith("$")
    ):
        raise _invalid(param, f"{pointer}/pattern", "a pattern must be anchored: ^...$")
    if strict:
        for key in _UNENFORCED:
            if key in node:
                raise _invalid(param, f"{pointer}/{key}", f"{key!r} cannot be enforced (strict)")
    required = node.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise _invalid(param, f"{pointer}/required", "required must be an array of names")
    _check_children(node, pointer, strict, param)


def _check_children(node: dict, pointer: str, strict: bool, param: str) -> None:
    for key in _SUBSCHEMA_MAPS:
        children = node.get(key, {})
        if not isinstance(children, dict):
            raise _invalid(param, f"{pointer}/{key}", f"{key} must be an object of schemas")
        for name, child in children.items():
            _check(child, f"{pointer}/{key}/{_escape(name)}", strict, param)
    for key in _SUBSCHEMA_LISTS:
        children = node.get(key, [])
        if not isinstance(children, list) or (key in node and not children):
            raise _invalid(param, f"{pointer}/{key}", f"{key} must be a non-empty array")
        for i, child in enumerate(children):
            _check(child, f"{pointer}/{key}/{i}", strict, param)
    items = node.get("items")
    if isinstance(items, list):
        for i, child in enumerate(items):
            _check(child, f"{pointer}/items/{i}", strict, param)
    elif items is not None:
        _check(items, f"{pointer}/items", strict, param)
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        _check(extra, f"{pointer}/additionalProperties", strict, param)


def _escape(name: str) -> str:
    # JSON pointer escaping (RFC 6901).
    return name.replace("~", "~0").replace("/", "~1")


# json_object mode: any JSON object, through the same converter as schemas.
JSON_OBJECT_GBNF = schema_to_gbnf({"type": "object"})
