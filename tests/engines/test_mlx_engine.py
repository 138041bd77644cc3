"""MlxBackend driven in-process on a tiny random mlx-lm model (real loading, real generation).

The model is random, so tests assert behaviour (counts, determinism, grammar, cache reuse),
never content or speed.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mlx_lm")

from backends.base import RANDOM_SEED, Chunk, GenerationRequest, ResponseFormat
from backends.mlx.backend import MlxBackend
from kernel.config import TierSettings
from kernel.errors import ContextLengthExceeded, InvalidRequestError, ModelUnavailableError
from tests.fixtures.tiny_mlx import build_tiny_mlx_model

MESSAGES = [
    {"role": "system", "content": "You are a terse pirate."},
    {"role": "user", "content": "What is the capital of France?"},
]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_mlx_model(tmp_path_factory.mktemp("mlx") / "tiny-llama")


def make_backend(model_dir: Path, **tier: Any) -> MlxBackend:
    settings = TierSettings(name="light", **{"n_ctx": 2048, **tier})
    backend = MlxBackend(settings, str(model_dir))
    backend.load()
    return backend


@pytest.fixture(scope="session")
def shared(model_dir: Path) -> Iterator[MlxBackend]:
    backend = make_backend(model_dir)
    yield backend
    backend.close()


@pytest.fixture
def backend(shared: MlxBackend) -> MlxBackend:
    shared.prefix_cache.clear()  # each test starts cold unless it warms the cache itself
    return shared


@pytest.fixture
def prompt(backend: MlxBackend) -> str:
    return backend.render_chat(MESSAGES)


def run(backend: MlxBackend, prompt: str | list[int], **kw: Any) -> tuple[str, Chunk]:
    kw.setdefault("max_tokens", 24)
    kw.setdefault("temperature", 0.0)
    chunks = list(backend.stream(GenerationRequest(prompt=prompt, **kw)))
    assert all(c.usage is None and c.finish_reason is None for c in chunks[:-1])
    return "".join(c.text for c in chunks), chunks[-1]


# -- loading and prompts -------------------------------------------------------------------


def test_load_and_info(backend: MlxBackend) -> None:
    info = backend.info()
    assert (info.engine, info.context_length) == ("mlx", 2048)
    assert info.device in ("cpu", "gpu")
    # <eos> from config.json and <end_of_turn> from generation_config.json both end generation.
    assert len(backend.eos_token_ids) == 2


def test_missing_model_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailableError, match=r"cannot load MLX model .*: no such folder"):
        MlxBackend(TierSettings(name="light"), str(tmp_path / "nope")).load()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelUnavailableError):
        MlxBackend(TierSettings(name="light"), str(tmp_path / "empty")).load()


def test_unloaded_backend_refuses_work(model_dir: Path) -> None:
    with pytest.raises(ModelUnavailableError, match="not loaded"):
        MlxBackend(TierSettings(name="light"), str(model_dir)).encode("hi")


def test_encode_adds_bos_once(backend: MlxBackend) -> None:
    bos = backend.encode("hello world")[0]
    assert backend.encode("<bos>hello world") == backend.encode("hello world")
    assert backend.encode("hello world").count(bos) == 1


def test_render_chat_keeps_system(backend: MlxBackend, prompt: str) -> None:
    assert "You are a terse pirate." in prompt
    assert prompt.index("terse pirate") < prompt.index("capital of France")
    assert prompt.startswith("<bos>") and prompt.endswith("<start_of_turn>model\n")
    assert backend.encode(prompt).count(backend.encode(prompt)[0]) == 1  # no second BOS


def test_configured_chat_template_overrides(model_dir: Path) -> None:
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]"
    backend = make_backend(model_dir, chat_template=template)
    assert backend.render_chat(MESSAGES) == (
        "[system] You are a terse pirate.\n[user] What is the capital of France?\n[assistant]"
    )


def test_no_chat_template_is_a_clear_error(model_dir: Path, tmp_path: Path) -> None:
    bare = Path(shutil.copytree(model_dir, tmp_path / "bare"))
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    backend = make_backend(bare)
    with pytest.raises(InvalidRequestError, match="no chat template"):
        backend.render_chat(MESSAGES)
    # Plain completions still work.
    assert run(backend, "Once upon a time", max_tokens=3)[1].usage is not None


# -- generation ----------------------------------------------------------------------------


def test_stream_chunks_and_usage(backend: MlxBackend, prompt: str) -> None:
    chunks = list(backend.stream(GenerationRequest(prompt=prompt, max_tokens=12, temperature=0.0)))
    final = chunks[-1]
    assert final.text == "" and final.finish_reason == "length"
    assert final.usage is not None
    assert final.usage.prompt_tokens == len(backend.encode(prompt))
    assert final.usage.completion_tokens == 12
    assert final.usage.cached_tokens == 0
    assert "".join(c.text for c in chunks[:-1])
    assert "<eos>" not in "".join(c.text for c in chunks)


def test_greedy_is_deterministic(backend: MlxBackend, prompt: str) -> None:
    first, _ = run(backend, prompt)
    backend.prefix_cache.clear()
    second, _ = run(backend, prompt)
    third, final = run(backend, prompt)  # served from the prefix cache: same text
    assert first == second == third
    assert final.usage is not None and final.usage.cached_tokens > 0


def test_logprobs_carry_each_tokens_bytes(backend: MlxBackend, prompt: str) -> None:
    """A byte token (0xF0, the start of a 4-byte character) reports its own byte, not U+FFFD's."""
    lead = backend.encode("\U00013000")[-4]
    request = GenerationRequest(
        prompt=prompt, max_tokens=3, temperature=0.0, logprobs=True, top_logprobs=2, logit_bias=((lead, 100.0),)
    )
    scored = [t.logprob for c in backend.stream(request) for t in c.scored]
    assert [(s.raw, s.token) for s in scored if s] == [(b"\xf0", "\ufffd")] * 3


def test_random_seed_draws_afresh(backend: MlxBackend, prompt: str) -> None:
    """RANDOM_SEED (llama.cpp's "random seed") means random draws here too, as the cache assumes."""
    texts = {run(backend, prompt, temperature=1.0, seed=RANDOM_SEED)[0] for _ in range(3)}
    assert len(texts) > 1


def test_seed_reproduces_sampling(backend: MlxBackend, prompt: str) -> None:
    texts = [run(backend, prompt, temperature=1.0, seed=seed)[0] for seed in (7, 7, 8, 9)]
    assert texts[0] == texts[1]
    assert len(set(texts)) > 1


def test_sampling_options_are_accepted(backend: MlxBackend, prompt: str) -> None:
    text, final = run(backend, prompt, temperature=0.8, top_p=0.9, top_k=20, min_p=0.05, seed=3)
    assert final.usage is not None and final.usage.completion_tokens == 24 and text


def test_repeat_penalty_changes_greedy_output(backend: MlxBackend, prompt: str) -> None:
    plain, _ = run(backend, prompt, max_tokens=30)
    penalised, _ = run(backend, prompt, max_tokens=30, repeat_penalty=1.5)
    assert plain != penalised
    # With the cache warm, the penalty still sees the cached prompt tail: same text.
    again, final = run(backend, prompt, max_tokens=30, repeat_penalty=1.5)
    assert final.usage is not None and final.usage.cached_tokens > 0
    assert again == penalised


def test_max_tokens_finishes_with_length(backend: MlxBackend, prompt: str) -> None:
    _, final = run(backend, prompt, max_tokens=5)
    assert final.finish_reason == "length"
    assert final.usage is not None and final.usage.completion_tokens == 5


def test_stop_string_cuts_output(backend: MlxBackend, prompt: str) -> None:
    full, _ = run(backend, prompt, max_tokens=30)
    stop = full[6:9]
    text, final = run(backend, prompt, max_tokens=30, stop=(stop,))
    assert text == full[: full.index(stop)]
    assert final.finish_reason == "stop"


def test_generation_runs_in_a_worker_thread(backend: MlxBackend, prompt: str) -> None:
    expected, _ = run(backend, prompt)
    backend.prefix_cache.clear()
    result: list[str] = []
    worker = threading.Thread(target=lambda: result.append(run(backend, prompt)[0]))
    worker.start()
    worker.join(timeout=30)
    assert result == [expected]


# -- structured output ---------------------------------------------------------------------


def test_unconstrained_output_is_not_json(backend: MlxBackend, prompt: str) -> None:
    text, _ = run(backend, prompt, max_tokens=40)
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


@pytest.mark.parametrize(("temperature", "seed"), [(0.0, None), (0.7, 1), (1.0, 2)])
def test_json_object(backend: MlxBackend, prompt: str, temperature: float, seed: int | None) -> None:
    text, final = run(
        backend,
        prompt,
        max_tokens=200,
        temperature=temperature,
        seed=seed,
        response_format=ResponseFormat("json_object"),
    )
    assert isinstance(json.loads(text), dict)
    # The grammar completed, only an end-of-generation token was allowed, and it was not shown.
    assert final.finish_reason == "stop"
    assert final.usage is not None and final.usage.completion_tokens < 200
    assert "<eos>" not in text and "<end_of_turn>" not in text


SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "population": {"type": "integer", "minimum": 0, "maximum": 99999},
        "tags": {"type": "array", "items": {"enum": ["old", "big", "wet"]}, "maxItems": 3},
        "capital": {"type": "boolean"},
    },
    "required": ["city", "population", "tags", "capital"],
    "additionalProperties": False,
}


@pytest.mark.parametrize(("temperature", "seed"), [(0.0, None), (1.0, 5)])
def test_json_schema(backend: MlxBackend, prompt: str, temperature: float, seed: int | None) -> None:
    fmt = ResponseFormat("json_schema", schema=SCHEMA)
    text, final = run(backend, prompt, max_tokens=200, temperature=temperature, seed=seed, response_format=fmt)
    data = json.loads(text)
    assert final.finish_reason == "stop"
    assert set(data) == {"city", "population", "tags", "capital"}
    assert isinstance(data["city"], str) and len(data["city"]) <= 12
    assert isinstance(data["population"], int) and 0 <= data["population"] <= 99999
    assert len(data["tags"]) <= 3 and set(data["tags"]) <= {"old", "big", "wet"}
    assert isinstance(data["capital"], bool)
    # A fresh grammar state on a cached prompt: the same greedy JSON again.
    if seed is None:
        again, final = run(backend, prompt, max_tokens=200, response_format=fmt)
        assert again == text and final.usage is not None and final.usage.cached_tokens > 0


def test_scalar_root_goes_on_while_the_model_extends_it(backend: MlxBackend, prompt: str) -> None:
    """An integer the grammar could end after its first digit is not cut there (llama.cpp's was)."""
    five = backend.encode("5")[-1]
    fmt = ResponseFormat("json_schema", {"type": "integer"})
    text, final = run(backend, prompt, max_tokens=6, logit_bias=((five, 100.0),), response_format=fmt)
    assert text == "555555" and final.finish_reason == "length"


def test_invalid_schema_is_rejected_before_streaming(backend: MlxBackend, prompt: str) -> None:
    request = GenerationRequest(
        prompt=backend.encode(prompt), max_tokens=5, response_format=ResponseFormat("json_schema", {"type": "nope"})
    )
    with pytest.raises(InvalidRequestError, match="schema") as info:
        backend.decode(backend.encode(prompt), request, 5)
    assert info.value.param == "response_format"


# -- prefix cache --------------------------------------------------------------------------


def test_follow_up_turn_reuses_the_prefix(backend: MlxBackend) -> None:
    history = [{"role": "system", "content": "Answer about the weather. " * 8}]
    for i in range(4):
        history += [
            {"role": "user", "content": f"Question {i}: will it rain in the city tomorrow?"},
            {"role": "assistant", "content": "The weather today is sunny with a light wind."},
        ]
    history.append({"role": "user", "content": "And the day after?"})
    first_prompt = backend.render_chat(history)
    reply, first = run(backend, first_prompt, max_tokens=8)
    history += [{"role": "assistant", "content": reply}, {"role": "user", "content": "Thanks!"}]
    second_prompt = backend.render_chat(history)
    _, second = run(backend, second_prompt, max_tokens=8)

    assert first.usage is not None and second.usage is not None
    assert first.usage.cached_tokens == 0
    # The whole first prompt is reused; only the new turn runs through the model.
    assert second.usage.cached_tokens >= first.usage.prompt_tokens
    assert second.usage.prompt_tokens - second.usage.cached_tokens < first.usage.prompt_tokens // 4


def test_diverging_prompt_reuses_shared_part(backend: MlxBackend) -> None:
    base = backend.render_chat([*MESSAGES[:1], {"role": "user", "content": "Tell me about Paris."}])
    other = backend.render_chat([*MESSAGES[:1], {"role": "user", "content": "Tell me about Berlin."}])
    run(backend, base, max_tokens=4)
    expected_without_cache = run(make_backend_like(backend), other, max_tokens=6)[0]
    text, final = run(backend, other, max_tokens=6)
    shared = len(_common(backend.encode(base), backend.encode(other)))
    assert final.usage is not None and final.usage.cached_tokens == shared
    assert text == expected_without_cache
    # The diverging entry was copied, not consumed: the first prompt is still fully cached.
    _, again = run(backend, base, max_tokens=4)
    assert again.usage is not None and again.usage.cached_tokens == len(backend.encode(base)) - 1


def test_prefix_cache_is_bounded(model_dir: Path) -> None:
    backend = make_backend(model_dir, prefix_cache_entries=2)
    for word in ("alpha", "beta", "gamma", "delta"):
        run(backend, f"{word} " * 5, max_tokens=2)
    assert len(backend.prefix_cache) == 2


def test_prefix_cache_can_be_disabled(model_dir: Path, prompt: str) -> None:
    backend = make_backend(model_dir, prefix_cache_entries=0)
    run(backend, prompt, max_tokens=3)
    _, final = run(backend, prompt, max_tokens=3)
    assert final.usage is not None and final.usage.cached_tokens == 0
    assert len(backend.prefix_cache) == 0


# -- cancellation and limits ---------------------------------------------------------------


def test_closing_the_stream_stops_generation(backend: MlxBackend, prompt: str) -> None:
    expected, _ = run(backend, prompt, max_tokens=20)
    backend.prefix_cache.clear()
    tokens = backend.encode(prompt)
    decoding = backend.decode(tokens, GenerationRequest(prompt=tokens, max_tokens=20, temperature=0.0), 20)
    taken = [next(decoding).text for _ in range(3)]
    decoding.close()
    with pytest.raises(StopIteration):
        next(decoding)
    assert expected.startswith("".join(taken))
    # What was computed before the close is kept, and matches prompt + the 3 yielded tokens.
    [sequence] = backend.prefix_cache.sequences()
    assert len(sequence) == len(tokens) + 3 and sequence[: len(tokens)] == tokens
    # The engine is still usable, and the cached state gives the same text.
    text, final = run(backend, prompt, max_tokens=20)
    assert text == expected
    assert final.usage is not None and final.usage.cached_tokens == len(tokens) - 1


def test_closing_stream_chunks_early(backend: MlxBackend, prompt: str) -> None:
    stream = backend.stream(GenerationRequest(prompt=prompt, max_tokens=50, temperature=0.0))
    next(stream)
    stream.close()
    assert run(backend, prompt, max_tokens=2)[1].usage is not None


def test_context_length_exceeded(model_dir: Path) -> None:
    backend = make_backend(model_dir, n_ctx=32)
    with pytest.raises(ContextLengthExceeded) as info:
        run(backend, "The weather today is sunny with a light wind. " * 10)
    assert info.value.context_length == 32 and info.value.prompt_tokens > 32


def test_max_tokens_clipped_to_context(model_dir: Path) -> None:
    backend = make_backend(model_dir, n_ctx=32)
    prompt = backend.encode("Paris is the capital of France and Berlin is the capital of Germany. " * 3)[:29]
    assert len(prompt) == 29
    _, final = run(backend, prompt, max_tokens=100)
    assert final.finish_reason == "length"
    assert final.usage is not None and final.usage.completion_tokens == 3


def make_backend_like(backend: MlxBackend) -> MlxBackend:
    return make_backend(Path(backend.model_path), prefix_cache_entries=0)


def _common(a: list[int], b: list[int]) -> list[int]:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]
