"""JSON schemas are bounded before a grammar compiler sees them: each limit is a 400 naming it."""

from __future__ import annotations

from typing import Any

import pytest

from kernel.errors import InvalidRequestError
from service.serving.schema_limits import MAX_DEPTH, MAX_ENUM, MAX_REPEAT, MAX_SCHEMA_BYTES, check_schema

P = "response_format.json_schema.schema"


def refused(schema: Any) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        check_schema(schema, P)
    assert info.value.status == 400 and info.value.param and info.value.param.startswith(P)
    return info.value


def nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth - 1):
        schema = {"type": "object", "properties": {"x": schema}}
    return schema


def test_ordinary_schemas_pass() -> None:
    person = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 80},
            "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "maxItems": 10},
            "kind": {"enum": ["a", "b", "c"]},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            "next": {"$ref": "#"},
        },
        "required": ["name"],
        "$defs": {"tag": {"type": "string"}},
    }
    check_schema(person, P)
    check_schema(nested(MAX_DEPTH), P)
    check_schema({"type": "array", "items": {"type": "integer"}, "minItems": MAX_REPEAT}, P)


@pytest.mark.parametrize(
    ("schema", "param", "words"),
    [
        ({"type": "array", "items": {}, "minItems": 10**9}, "minItems", f"at most {MAX_REPEAT}"),
        ({"properties": {"a": {"type": "array", "maxItems": 10**7}}}, "properties.a.maxItems", "maxItems"),
        ({"type": "string", "minLength": 5000}, "minLength", "minLength"),
        ({"type": "string", "pattern": "^a{1000000}$"}, "pattern", "{n,m}"),
        ({"type": "string", "pattern": "x{2,99999}"}, "pattern", "{n,m}"),
        ({"enum": [str(i) for i in range(2000)]}, "enum", f"at most {MAX_ENUM}"),
        ({"type": "array", "minItems": "5"}, "minItems", "non-negative integer"),
        ({"type": "array", "minItems": -1}, "minItems", "non-negative integer"),
        ({"properties": {f"p{i}": {} for i in range(300)}}, "properties", "at most 256"),
        ({"anyOf": {"type": "string"}}, "anyOf", "array of schemas"),
        ({"properties": {"a": 5}}, "properties.a", "must be a schema"),
    ],
)
def test_limits_are_named(schema: dict[str, Any], param: str, words: str) -> None:
    error = refused(schema)
    assert error.param == f"{P}.{param}"
    assert words in error.message


def test_depth_and_size() -> None:
    assert f"at most {MAX_DEPTH}" in refused(nested(MAX_DEPTH + 1)).message
    big = refused({"description": "x" * MAX_SCHEMA_BYTES})
    assert big.param == P and f"at most {MAX_SCHEMA_BYTES} bytes" in big.message
    assert "JSON object" in refused([1, 2]).message


def test_grammar_size_adds_up() -> None:
    # Each array is within MAX_REPEAT; together they expand past the grammar budget.
    wide = {"properties": {f"p{i}": {"type": "array", "minItems": 900} for i in range(30)}, "required": []}
    assert "grammar elements" in refused(wide).message


@pytest.mark.parametrize(
    ("ref", "words"),
    [
        ("#/$defs/missing", "points at nothing"),
        ("https://example.com/schema.json", "only local references"),
        ("other.json#/a", "only local references"),
        ("#/required", "does not point at a schema"),
        (5, "only local references"),
    ],
)
def test_refs_must_resolve_inside_the_schema(ref: object, words: str) -> None:
    error = refused({"properties": {"a": {"$ref": ref}}, "required": ["a"], "$defs": {"b": {}}})
    assert error.param == f"{P}.properties.a.$ref" and words in error.message


def test_json_pointer_escapes() -> None:
    check_schema({"$defs": {"a/b": {"type": "string"}}, "properties": {"x": {"$ref": "#/$defs/a~1b"}}}, P)
    check_schema({"allOf": [{"type": "object"}], "properties": {"x": {"$ref": "#/allOf/0"}}}, P)
