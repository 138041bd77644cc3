"""The field policy in docs/api.md, walked against the app: each table row's example is set at its
dotted path on a small valid request, and the answer must match the row's treatment (refused:
400 naming the field; honoured, mapped, hint: 200). The tables are the contract with clients, so
a malformed row, an unknown treatment or an empty table fails here rather than being skipped."""

from __future__ import annotations

import copy
import itertools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from tests.live import fake_app

API_DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"
TREATMENTS = ("honoured", "mapped", "hint", "refused")
HEADER = ("field", "treatment", "example", "what we do")

# A small valid request per API; each row changes one field of a fresh copy.
BASE: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"model": "light", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
    "/v1/completions": {"model": "light", "prompt": "hi", "max_tokens": 8},
    "/v1/responses": {"model": "light", "input": "hi", "max_output_tokens": 8},
    "/v1/messages": {"model": "light", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]},
}
_SECTION = re.compile(r"^## .*\(`POST (/v1/[\w/]+)`\)\s*$")
_CELL_SPLIT = re.compile(r"(?<!\\)\|")
_PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")
_ANY_ITEM = re.compile(r"\[(?!\d+\])[^\]]*\]")  # `[]` or `[kind]`: any item of a list


@dataclass(frozen=True)
class Row:
    api: str  # the endpoint path
    field: str  # dotted path (`reasoning.effort`, `messages[0].role`), or `header:<name>`
    treatment: str
    example: Any
    line: int


def _cells(line: str) -> list[str]:
    inner = line.strip().removeprefix("|").removesuffix("|")
    return [cell.strip().replace("\\|", "|") for cell in _CELL_SPLIT.split(inner)]


def _unquote(cell: str) -> str:
    return cell[1:-1] if len(cell) >= 2 and cell[0] == cell[-1] == "`" else cell


def parse_policy(text: str) -> tuple[list[Row], list[str]]:
    """The rows of every API's table, and what is wrong with the tables (one message per problem)."""
    rows: list[Row] = []
    problems: list[str] = []
    counts: dict[str, int] = {}
    api: str | None = None
    in_table = False
    for number, line in enumerate(text.splitlines(), start=1):
        if line.startswith("## "):
            match = _SECTION.match(line)
            api, in_table = (match.group(1) if match else None), False
            if api is not None:
                if api in counts:
                    problems.append(f"line {number}: a second section for {api}")
                counts[api] = 0
            continue
        if api is None or not line.lstrip().startswith("|"):
            in_table = False  # a markdown table ends at the first line that is not a row
            continue
        cells = _cells(line)
        if tuple(c.lower() for c in cells) == HEADER:
            in_table = True
            continue
        if in_table and all(c and set(c) <= set("-: ") for c in cells):
            continue  # the |---| line under the header
        if not in_table:
            problems.append(f"line {number}: a table row before the header {' | '.join(HEADER)}")
            continue
        if len(cells) != len(HEADER):
            problems.append(f"line {number}: {len(cells)} cells, expected {len(HEADER)}: {line.strip()}")
            continue
        field, treatment, example, meaning = cells
        field, treatment = _unquote(field), _unquote(treatment).lower()
        if not field or not meaning:
            problems.append(f"line {number}: an empty field or 'what we do' cell")
            continue
        if treatment not in TREATMENTS:
            problems.append(f"line {number}: treatment {treatment!r} is not one of {', '.join(TREATMENTS)}")
            continue
        try:
            value = json.loads(_unquote(example))
        except ValueError:
            problems.append(f"line {number}: example {example!r} of {field} is not JSON")
            continue
        rows.append(Row(api, field, treatment, value, number))
        counts[api] += 1
    for endpoint in BASE:
        if endpoint not in counts:
            problems.append(f"no section for POST {endpoint}")
        elif counts[endpoint] == 0:
            problems.append(f"the table for POST {endpoint} has no rows")
    problems += [
        f"a section for {endpoint}, which this test has no base request for" for endpoint in counts.keys() - BASE.keys()
    ]
    return rows, problems


def set_path(body: dict[str, Any], path: str, value: Any) -> None:
    """Set `value` at `path` (`a.b`, `messages[0].content`), creating objects on the way. A field
    of every item of a list (`tools[].strict`, `messages[].content[image]`) takes its example as the
    whole list."""
    if (at := _ANY_ITEM.search(path)) is not None:
        path = path[: at.start()]
    keys: list[str | int] = [
        m.group(1) if m.group(1) is not None else int(m.group(2)) for m in _PATH_PART.finditer(path)
    ]
    node: Any = body
    for key, following in itertools.pairwise(keys):
        if isinstance(node, list):  # `messages.0.role` as well as `messages[0].role`
            node = node[int(key)]
        elif isinstance(key, int):
            node = node[key]
        else:
            if not isinstance(node.get(key), dict | list):
                node[key] = [] if isinstance(following, int) else {}
            node = node[key]
    last = keys[-1]
    node[int(last) if isinstance(node, list) else last] = value


ROWS, PROBLEMS = parse_policy(API_DOC.read_text(encoding="utf-8"))


def test_the_tables_are_well_formed() -> None:
    assert not PROBLEMS, f"{API_DOC}:\n" + "\n".join(PROBLEMS)


@pytest.mark.parametrize(
    "text",
    [
        "## Chat (`POST /v1/chat/completions`)\n| field | treatment | example | what we do |\n|---|---|---|---|\n",
        "## Chat (`POST /v1/chat/completions`)\n| field | treatment | example | what we do |\n|---|---|---|---|\n"
        '| `model` | honoured | "light" |\n',
        "## Chat (`POST /v1/chat/completions`)\n| field | treatment | example | what we do |\n|---|---|---|---|\n"
        '| `model` | ignored | "light" | nothing |\n',
        "## Chat (`POST /v1/chat/completions`)\n| field | treatment | example | what we do |\n|---|---|---|---|\n"
        "| `model` | honoured | light | the tier |\n",
    ],
    ids=["empty-table", "three-cells", "unknown-treatment", "example-not-json"],
)
def test_the_parser_rejects_bad_tables(text: str) -> None:
    rows, problems = parse_policy(text)
    assert problems and not rows


def test_the_parser_reads_dotted_fields_and_escaped_pipes() -> None:
    text = (
        "## Responses (`POST /v1/responses`)\n\n| field | treatment | example | what we do |\n|---|---|---|---|\n"
        '| `reasoning.effort` | mapped | `"high"` | a \\| b |\n'
    )
    rows, _ = parse_policy(text)
    assert rows == [Row("/v1/responses", "reasoning.effort", "mapped", "high", 5)]
    body: dict[str, Any] = {"messages": [{"role": "user"}]}
    set_path(body, "reasoning.effort", "high")
    set_path(body, "messages[0].content", "x")
    assert body == {"messages": [{"role": "user", "content": "x"}], "reasoning": {"effort": "high"}}


@pytest.fixture(scope="module")
def http() -> Iterator[TestClient]:  # type: ignore[type-arg]
    with fake_app({"LIGHT_MODEL_PATH": "fake/echo"}) as client:
        yield client


@pytest.mark.parametrize("row", ROWS, ids=[f"{r.api.removeprefix('/v1/')}:{r.field}" for r in ROWS])
def test_each_field_gets_its_treatment(http: TestClient, row: Row) -> None:  # type: ignore[type-arg]
    body, headers = copy.deepcopy(BASE[row.api]), {}
    if row.field.startswith("header:"):
        headers[row.field.removeprefix("header:")] = (
            row.example if isinstance(row.example, str) else json.dumps(row.example)
        )
    else:
        set_path(body, row.field, row.example)
    answer = http.post(row.api, json=body, headers=headers)
    where = f"docs/api.md line {row.line}: {row.field} = {json.dumps(row.example)} is {row.treatment}"
    if row.treatment == "refused":
        assert answer.status_code == 400, f"{where}, but got {answer.status_code}: {answer.text[:300]}"
        error = answer.json()["error"]
        named = row.field.removeprefix("header:")
        if (at := _ANY_ITEM.search(named)) is not None:
            named = named[: at.start()]  # the 400 names the very item (`messages[0].content[1]`)
        param = error.get("param") or ""  # a part of the field (`messages[0].content[1]`) names it too
        assert param.startswith(named) or named in error["message"], f"{where}; the 400 does not name it: {error}"
    else:
        assert answer.status_code == 200, f"{where}, but got {answer.status_code}: {answer.text[:300]}"
