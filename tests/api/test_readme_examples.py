"""The README's examples run as written, in README order, against one live server on the default
models (Gemma 3 270M, MiniLM, the reranker on the embedding tier), with only the port changed.

Python blocks share one namespace, as in a reader's session (the tool-calling snippet uses the
`client` of the first one); bash blocks run in bash with `set -e`, where `curl` fails on an HTTP
error (the examples use `-s`, which alone would hide a 415). A block the test cannot run says why
in an HTML comment on the line before it: `<!-- readme-test: skip: <reason> -->`.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

from tests.fixtures.lora import build_gguf_lora
from tests.live import LiveServer, live_server

README = Path(__file__).resolve().parents[2] / "README.md"
_BLOCK = re.compile(r"^(?:<!-- readme-test: (?P<mark>.*?) -->\n)?```(?P<lang>\w*)\n(?P<code>.*?)^```$", re.S | re.M)
_HOST = re.compile(r"\b(?:localhost|127\.0\.0\.1):8000\b")
MAX_SKIPPED = 3  # keep the list short: a skipped example is one nobody checks


@dataclass
class Example:
    line: int
    section: str
    lang: str
    code: str
    skip: str | None

    @property
    def id(self) -> str:
        return f"L{self.line}-{re.sub(r'[^a-z0-9]+', '-', self.section.lower()).strip('-')}-{self.lang}"


def examples() -> list[Example]:
    text = README.read_text(encoding="utf-8")
    found = []
    for match in _BLOCK.finditer(text):
        line = text.count("\n", 0, match.start("lang")) + 1
        headings = re.findall(r"^#+ (.+)$", text[: match.start()], re.M)
        mark = match.group("mark")
        if mark is not None and not mark.startswith("skip: "):
            raise ValueError(f"README.md:{line}: unknown readme-test comment {mark!r}")
        skip = mark.removeprefix("skip: ").strip() if mark else None
        found.append(Example(line, headings[-1] if headings else "top", match.group("lang"), match.group("code"), skip))
    return found


RUNNABLE = [e for e in examples() if e.lang in ("bash", "python") and e.skip is None]


def test_every_example_is_run_or_says_why_not() -> None:
    blocks = examples()
    unknown = [f"README.md:{e.line} ```{e.lang}" for e in blocks if e.lang not in ("bash", "python", "dotenv")]
    assert not unknown, f"blocks of a language this test cannot run (bash, python; dotenv for .env lines): {unknown}"
    skipped = [e for e in blocks if e.skip is not None]
    assert all(len(e.skip or "") >= 20 for e in skipped), "a skipped example says why"
    assert len(skipped) <= MAX_SKIPPED, [f"README.md:{e.line}: {e.skip}" for e in skipped]
    sections = {e.section for e in RUNNABLE}
    for section in ("LoRA adapters", "Batch jobs", "RAG over collections", "Operating it", "WebSocket"):
        assert section in sections, f"no example of {section} runs"


@pytest.fixture(scope="module")
def server(gemma_gguf: str, minilm_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    folder = tmp_path_factory.mktemp("readme")
    models = folder / "models"
    models.mkdir()
    build_gguf_lora(gemma_gguf, models / "legal-qa.gguf", zero=False, seed=3, scale=0.05)  # the adapter example's
    env_file = folder / ".env"  # `persist: true` writes here, as into the .env start_service.sh makes
    env_file.write_text("# .env of the README examples' server\nLIGHT_TEMPERATURE=0.7  # the default\n")
    env = {
        "LIGHT_MODEL_PATH": gemma_gguf,
        "LIGHT_N_CTX": "4096",
        "LIGHT_MAX_TOKENS": "32",  # the examples set none: a base model would ramble to 1000 tokens
        "EMBEDDING_MODEL_PATH": minilm_path,
        "RERANKER_MODEL_PATH": "tier:embedding",
        "MODELS_DIR": str(models),
    }
    with live_server(env, wait_for=("light", "embedding", "reranker"), env_file=env_file) as live:
        yield live


@pytest.fixture(scope="module")
def session() -> dict[str, object]:
    return {"__name__": "__readme__"}


@pytest.mark.parametrize("example", RUNNABLE, ids=lambda e: e.id)
def test_example_runs_as_written(example: Example, server: LiveServer, session: dict[str, object]) -> None:
    code = _HOST.sub(f"127.0.0.1:{server.port}", example.code)
    where = f"README.md:{example.line} ({example.section})"
    if example.lang == "python":
        exec(compile(code, where, "exec"), session)  # the README's own example, as a reader runs it
        return
    prelude = 'set -euo pipefail\ncurl() { command curl --fail-with-body --max-time 300 "$@"; }\n'
    run = subprocess.run(
        ["bash", "-c", prelude + code],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "ADMIN_KEY": "admin-key-unused-with-keys-off"},
    )
    assert run.returncode == 0, f"{where} failed ({run.returncode}):\n{run.stdout}\n{run.stderr}"
