"""Reasoning controls on both engines, in-process: the chat template's thinking switch and a
thinking-token budget enforced while decoding, alone and inside a continuous batch.

The models (tiny random MLX, base Gemma GGUF) never close a thinking block by themselves, which is
what a budget is for: a template that opens the block (as DeepSeek-R1's does) leaves them thinking
until the engine forces `</think>` in at the budget; then the answer follows.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from backends.base import Backend, GenerationRequest, Token
from kernel.config import TierSettings
from tests.batching import batched

# Gemma's turn markers (both models know them); the generation prompt opens a thinking block
# unless the thinking switch is off, in which case it writes an empty one, as Qwen3's does.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n{% endif %}{% endif %}"
)
MESSAGES = ({"role": "user", "content": "What is the capital of France?"},)
CLOSE = "</think>\n\n"
MAX = 24


def _tier(**extra: object) -> TierSettings:
    return TierSettings(name="light", n_ctx=1024, chat_template=TEMPLATE, reasoning_parser="think", **extra)  # type: ignore[arg-type]


@pytest.fixture(scope="module", params=["mlx", "llamacpp"])
def engine(request: pytest.FixtureRequest) -> Iterator[Backend]:
    backend: Backend
    if request.param == "mlx":
        pytest.importorskip("mlx_lm")
        from backends.mlx.backend import MlxBackend

        path: Path = request.getfixturevalue("tiny_mlx_model")
        backend = MlxBackend(_tier(max_batch=2), str(path))
    else:
        pytest.importorskip("llama_cpp")
        from backends.llamacpp.backend import LlamaCppBackend

        backend = LlamaCppBackend(_tier(max_batch=2, n_batch=64), request.getfixturevalue("gemma_gguf"))
    backend.load()
    yield backend
    backend.close()


def _request(backend: Backend, budget: int | None, thinking: bool | None = None) -> GenerationRequest:
    # The base Gemma may end its turn at once; the test is about what comes before that.
    ends = {t for word in ("<end_of_turn>", "<eos>") for t in backend.encode(word)[-1:]}
    return GenerationRequest(
        messages=MESSAGES,
        max_tokens=MAX,
        temperature=0.0,
        logit_bias=tuple((t, -100.0) for t in sorted(ends)),
        thinking=thinking,
        thinking_budget=budget,
    )


def _alone(backend: Backend, request: GenerationRequest) -> list[Token]:
    backend.reset_prefix_cache()
    completion = backend.prepare(request)
    return list(backend.decode(completion.prompt, request, completion.max_tokens))


def _text(tokens: list[Token]) -> str:
    return "".join(t.text for t in tokens)


def _check_closed_at(tokens: list[Token], budget: int, free: list[Token]) -> None:
    """Thinking ran unchanged for `budget` tokens, then the close marker, then an answer."""
    assert _text(tokens[:budget]) == _text(free[:budget])
    assert CLOSE not in _text(free), "the model alone never closes its thinking"
    assert _text(tokens[budget:]).startswith(CLOSE)
    assert len(tokens) == MAX, "the forced tokens count as completion tokens"
    assert _text(tokens).split(CLOSE, 1)[1], "the answer follows the thinking"


def test_budget_closes_thinking(engine: Backend) -> None:
    free = _alone(engine, _request(engine, None))
    assert len(free) == MAX
    _check_closed_at(_alone(engine, _request(engine, 6)), 6, free)


def test_greedy_output_unchanged_below_the_budget(engine: Backend) -> None:
    free = _alone(engine, _request(engine, None))
    assert _text(_alone(engine, _request(engine, 1000))) == _text(free)


def test_budget_zero_closes_at_once(engine: Backend) -> None:
    tokens = _alone(engine, _request(engine, 0))
    assert _text(tokens).startswith(CLOSE)


def test_budget_in_a_batch(engine: Backend) -> None:
    free = _alone(engine, _request(engine, None))
    capped, other = batched(engine, [_request(engine, 5), _request(engine, None)])
    _check_closed_at(capped, 5, free)
    assert CLOSE not in _text(other), "a neighbour without a budget keeps thinking"
    assert _text(other[:5]) == _text(free[:5])


def test_usage_counts_forced_tokens(engine: Backend) -> None:
    engine.reset_prefix_cache()
    chunks = list(engine.stream(_request(engine, 3)))
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == MAX
    assert CLOSE in "".join(c.text for c in chunks)


def test_thinking_switch_reaches_the_template(engine: Backend) -> None:
    on = engine.detokenize(engine.tokens(_request(engine, None)))
    off = engine.detokenize(engine.tokens(_request(engine, 0, thinking=False)))
    assert on.rstrip().endswith("<think>") and off.rstrip().endswith("</think>")
    # The probe (template default) opens the block; this request's own prompt does not, so a
    # budget of 0 forces nothing: the answer is the model's own, after the empty block.
    info = engine.info().reasoning
    assert info is not None and info.opened_by_prompt
    assert (info.opened_if_on, info.opened_if_off) == (True, False), "the probe rendered both switches"
    tokens = _alone(engine, _request(engine, 0, thinking=False))
    assert not _text(tokens).startswith(CLOSE) and len(tokens) == MAX


def test_template_kwargs_reach_the_template(engine: Backend) -> None:
    request = _request(engine, None)
    kwargs = GenerationRequest(messages=request.messages, template_kwargs=(("enable_thinking", False),))
    assert engine.detokenize(engine.tokens(kwargs)).rstrip().endswith("</think>")
