"""Bounds on a client's JSON schema (`response_format`), checked before any grammar compiler sees it.

Grammar builders expand what a schema asks for: llama-cpp-python writes one rule element per
required array item and nests one optional group per allowed extra item (`minItems: 10**9` filled
memory until the kernel killed the server), pattern repetitions `{n,m}` and string lengths
alike, one alternative per enum value, a quadratic rule for optional properties; and it follows
`$ref` (a broken one was a 500; `https://` ones would be fetched). So a schema is walked once
here, iteratively and bounded, and refused with a 400 naming the limit it broke. Pure Python: no
engine imports, so every engine gets the same answer.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote

import msgspec

from kernel.errors import InvalidRequestError

MAX_SCHEMA_BYTES = 64 * 1024  # the schema as compact JSON
MAX_DEPTH = 32  # nested schemas (properties inside items inside properties ...)
MAX_REPEAT = 1000  # minItems, maxItems, minLength, maxLength, min/maxProperties, pattern {n,m}
MAX_ENUM = 1000  # values of one enum
MAX_PROPERTIES = 256  # properties (or required names) of one object
MAX_PATTERN_CHARS = 1000  # length of one regular expression
MAX_GRAMMAR_SIZE = 20_000  # rule elements the schema expands to (nodes + repetitions + enum values ...)

_REPEAT_KEYWORDS = (
    "minItems",
    "maxItems",
    "minLength",
    "maxLength",
    "minProperties",
    "maxProperties",
    "minContains",
    "maxContains",
)
_ONE_SCHEMA = (
    "additionalProperties",
    "additionalItems",
    "items",
    "contains",
    "not",
    "if",
    "then",
    "else",
    "propertyNames",
    "unevaluatedItems",
    "unevaluatedProperties",
)
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
# `{n}`, `{n,}` and `{n,m}` in a regular expression (escaped braces are literal, not counts).
_QUANTIFIER = re.compile(r"(?<!\\)\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")


def check_schema(schema: Any, param: str) -> None:
    """Raise `InvalidRequestError` (param: `param` + the offending keyword's path) unless `schema`
    is within every limit above and each `$ref` points inside the schema itself."""
    size = len(msgspec.json.encode(schema))
    if size > MAX_SCHEMA_BYTES:
        raise _refuse(param, "", f"is {size} bytes; this server allows at most {MAX_SCHEMA_BYTES} bytes per schema")
    if not isinstance(schema, dict):
        raise _refuse(param, "", "must be a JSON object")
    grammar_size = 0
    stack: list[tuple[Any, str, int]] = [(schema, "", 1)]
    while stack:
        node, path, depth = stack.pop()
        if isinstance(node, bool):  # `true` / `false` are valid schemas
            continue
        if not isinstance(node, dict):
            raise _refuse(param, path, "must be a schema (a JSON object or a boolean)")
        if depth > MAX_DEPTH:
            raise _refuse(param, path, f"is nested {depth} schemas deep; this server allows at most {MAX_DEPTH}")
        grammar_size += 1 + _node_cost(node, schema, param, path)
        if grammar_size > MAX_GRAMMAR_SIZE:
            raise _refuse(
                param,
                path,
                f"makes the schema expand past {MAX_GRAMMAR_SIZE} grammar elements (repetition counts, enum "
                "values and properties add up); simplify the schema",
            )
        stack.extend((child, child_path, depth + 1) for child, child_path in _children(node, param, path))


def _node_cost(node: dict[str, Any], root: dict[str, Any], param: str, path: str) -> int:
    """Check one schema's own keywords; return what it adds to the expanded grammar."""
    cost = 0
    for keyword in _REPEAT_KEYWORDS:
        if keyword in node:
            value = node[keyword]
            where = _join(path, keyword)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise _refuse(param, where, "must be a non-negative integer")
            if value > MAX_REPEAT:
                raise _refuse(param, where, f"is {value}; this server allows at most {MAX_REPEAT} ({keyword})")
            cost += value
    if "enum" in node:
        values = node["enum"]
        if not isinstance(values, list) or not values:
            raise _refuse(param, _join(path, "enum"), "must be a non-empty array")
        if len(values) > MAX_ENUM:
            raise _refuse(
                param, _join(path, "enum"), f"has {len(values)} values; this server allows at most {MAX_ENUM}"
            )
        cost += len(values)
    for keyword in ("properties", "required"):
        names = node.get(keyword)
        if isinstance(names, dict | list) and len(names) > MAX_PROPERTIES:
            raise _refuse(
                param, _join(path, keyword), f"has {len(names)} entries; this server allows at most {MAX_PROPERTIES}"
            )
    properties = node.get("properties")
    if isinstance(properties, dict):
        required = node.get("required")
        optional = len(properties) - (len(required) if isinstance(required, list) else 0)
        cost += max(0, optional) ** 2 // 2  # optional properties become a rule per suffix of the list
    patterns = [(_join(path, "pattern"), node.get("pattern"))]
    if isinstance(node.get("patternProperties"), dict):
        patterns += [(_join(path, "patternProperties"), p) for p in node["patternProperties"]]
    for where, pattern in patterns:
        if pattern is not None:
            cost += _pattern_cost(pattern, param, where)
    if "$ref" in node:
        _resolve(node["$ref"], root, param, _join(path, "$ref"))
    return cost


def _pattern_cost(pattern: Any, param: str, where: str) -> int:
    if not isinstance(pattern, str):
        raise _refuse(param, where, "must be a string")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise _refuse(
            param, where, f"is {len(pattern)} characters long; this server allows at most {MAX_PATTERN_CHARS}"
        )
    cost = len(pattern)
    for low, high in _QUANTIFIER.findall(pattern):
        count = max(int(low), int(high) if high else 0)
        if count > MAX_REPEAT:
            raise _refuse(param, where, f"repeats {count} times; this server allows at most {MAX_REPEAT} ({{n,m}})")
        cost += count
    return cost


def _children(node: dict[str, Any], param: str, path: str) -> list[tuple[Any, str]]:
    found: list[tuple[Any, str]] = []
    for keyword in _ONE_SCHEMA:
        value = node.get(keyword)
        if isinstance(value, dict | bool):
            found.append((value, _join(path, keyword)))
    for keyword in _SCHEMA_LISTS:
        value = node.get(keyword)
        if isinstance(value, list):
            found += [(item, f"{_join(path, keyword)}[{i}]") for i, item in enumerate(value)]
        elif value is not None and keyword != "items":
            raise _refuse(param, _join(path, keyword), "must be an array of schemas")
    for keyword in _SCHEMA_MAPS:
        value = node.get(keyword)
        if isinstance(value, dict):
            found += [(item, _join(_join(path, keyword), str(name))) for name, item in value.items()]
        elif value is not None:
            raise _refuse(param, _join(path, keyword), "must be an object of schemas")
    return found


def _resolve(ref: Any, root: dict[str, Any], param: str, where: str) -> None:
    """Only references inside this schema (`#` or a JSON pointer `#/...`) that point at a schema."""
    if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
        raise _refuse(param, where, f"{str(ref)[:100]!r} is not supported: only local references ('#/$defs/...')")
    target: Any = root
    for raw in ref[2:].split("/") if ref != "#" else []:
        part = unquote(raw).replace("~1", "/").replace("~0", "~")
        if isinstance(target, dict) and part in target:
            target = target[part]
        elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
            target = target[int(part)]
        else:
            raise _refuse(param, where, f"{ref[:100]!r} points at nothing in the schema")
    if not isinstance(target, dict | bool):
        raise _refuse(param, where, f"{ref[:100]!r} does not point at a schema")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path and key else path or key


def _refuse(param: str, path: str, problem: str) -> InvalidRequestError:
    where = _join(param, path)
    return InvalidRequestError(f"Invalid JSON schema: {where} {problem}", param=where)
