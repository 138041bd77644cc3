"""Reasoning models' thinking in `reasoning_content`/`reasoning` (never in content) and in the
Messages and Responses APIs, and `n` choices, on both engines through the openai and anthropic
SDKs. The template opens a thinking block at the end of the generation prompt, as DeepSeek-R1's
does, so the model's own text begins as thinking."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests.live import LiveServer, live_server

THINKING_TEMPLATE = (
    "{# a reasoning model's answer ends its thinking with </think> #}"
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: <think>\n{% endif %}"
)
MSG = [{"role": "user", "content": "Count from one to ten."}]


@pytest.fixture(scope="module", params=["llamacpp", "mlx"])
def server(request: pytest.FixtureRequest) -> Iterator[LiveServer]:
    engine = request.param
    path = (
        request.getfixturevalue("gemma_gguf")
        if engine == "llamacpp"
        else str(request.getfixturevalue("tiny_mlx_model"))
    )
    env = {
        "LIGHT_MODEL_PATH": path,
        "LIGHT_BACKEND": engine,
        "LIGHT_N_CTX": "1024",
        "LIGHT_MAX_TOKENS": "12",
        "LIGHT_TEMPERATURE": "0",
        "LIGHT_REPEAT_PENALTY": "1.1",  # without one, greedy Gemma 270M repeats the template's "<think>"
        "LIGHT_CHAT_TEMPLATE": THINKING_TEMPLATE,
        # Greedy answers replay from the cache, so every endpoint splits the very same text
        # (llama.cpp's logits shift slightly with prefix reuse, so two live runs may differ).
        "ENABLE_CACHE": "true",
    }
    with live_server(env, wait_for=("light",)) as live:
        yield live


def _client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)


def test_thinking_goes_to_reasoning_content(server: LiveServer) -> None:
    message = _client(server).chat.completions.create(model="light", messages=MSG).choices[0].message  # type: ignore[arg-type]
    extra = message.model_extra or {}
    thinking, content = extra["reasoning_content"], message.content or ""
    assert extra["reasoning"] == thinking
    assert thinking, "the prompt opened a thinking block: the answer starts in it"
    assert "<think>" not in content and "</think>" not in content + thinking


def test_streamed_thinking_matches(server: LiveServer) -> None:
    whole = _client(server).chat.completions.create(model="light", messages=MSG).choices[0].message  # type: ignore[arg-type]
    stream = _client(server).chat.completions.create(model="light", messages=MSG, stream=True)  # type: ignore[arg-type]
    thinking, content = [], []
    for chunk in stream:
        for choice in chunk.choices:
            extra = choice.delta.model_extra or {}
            if extra.get("reasoning_content"):
                assert extra["reasoning"] == extra["reasoning_content"]
                thinking.append(extra["reasoning_content"])
            content.append(choice.delta.content or "")
    assert "".join(thinking) == (whole.model_extra or {})["reasoning_content"]
    assert "".join(content) == (whole.content or "")


def test_n_choices(server: LiveServer) -> None:
    client = _client(server)
    one = client.chat.completions.create(model="light", messages=MSG, temperature=0.9, seed=7)  # type: ignore[arg-type]
    reply = client.chat.completions.create(model="light", messages=MSG, n=3, temperature=0.9, seed=7)  # type: ignore[arg-type]
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert all(c.finish_reason in ("stop", "length") for c in reply.choices)
    assert reply.usage is not None and one.usage is not None
    assert reply.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once
    texts = [(c.message.model_extra or {}).get("reasoning_content") or "" for c in reply.choices]
    assert reply.usage.completion_tokens >= 3 and all(texts)
    assert len(set(texts)) > 1, "seeds move on per choice: sampled choices differ"

    stream = client.chat.completions.create(
        model="light", messages=MSG, n=3, temperature=0.9, seed=7, stream=True, stream_options={"include_usage": True}
    )  # type: ignore[arg-type]
    finished, usage = {}, None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert sorted(finished) == [0, 1, 2]
    assert usage is not None and usage.prompt_tokens == one.usage.prompt_tokens


def test_n_legacy_completions(server: LiveServer) -> None:
    reply = _client(server).completions.create(model="light", prompt="One, two,", n=2, max_tokens=4)
    assert [c.index for c in reply.choices] == [0, 1]
    assert all(c.text for c in reply.choices)
    assert reply.usage is not None and 2 <= reply.usage.completion_tokens <= 8  # both choices' tokens


def test_thinking_in_messages_and_responses(server: LiveServer) -> None:
    import anthropic

    thinking = (
        _client(server).chat.completions.create(model="light", messages=MSG).choices[0].message.model_extra or {}
    )["reasoning_content"]  # type: ignore[arg-type]
    claude = anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0)
    msg = claude.messages.create(model="light", max_tokens=12, messages=MSG)  # type: ignore[arg-type]
    assert msg.content[0].type == "thinking" and msg.content[0].thinking == thinking
    with claude.messages.stream(model="light", max_tokens=12, messages=MSG) as stream:  # type: ignore[arg-type]
        final = stream.get_final_message()
    assert final.content[0].type == "thinking" and final.content[0].thinking == thinking
    # Sent back in the history, thinking stays out of the prompt.
    history = [*MSG, {"role": "assistant", "content": msg.content}, {"role": "user", "content": "Go on."}]
    assert claude.messages.create(model="light", max_tokens=2, messages=history).usage.input_tokens > 0  # type: ignore[arg-type]

    res = _client(server).responses.create(model="light", input=MSG, max_output_tokens=12)  # type: ignore[arg-type]
    assert res.output[0].type == "reasoning" and res.output[0].content[0].text == thinking  # type: ignore[index]
    events = list(_client(server).responses.create(model="light", input=MSG, max_output_tokens=12, stream=True))  # type: ignore[arg-type]
    deltas = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert deltas == thinking and "<think>" not in deltas


def test_effort_none_closes_the_opened_block(server: LiveServer) -> None:
    # The template opens a block the model never closes by itself: a budget of 0 closes it at once.
    client = _client(server)
    for extra in ({"reasoning_effort": "none"}, {"extra_body": {"chat_template_kwargs": {"enable_thinking": False}}}):
        reply = client.chat.completions.create(model="light", messages=MSG, **extra)  # type: ignore[arg-type]
        message = reply.choices[0].message
        assert not (message.model_extra or {}).get("reasoning_content"), extra
        assert message.content, "the answer follows the closed block"
        assert reply.usage is not None and reply.usage.completion_tokens == 12  # the forced tokens count


def test_effort_levels_within_max_tokens_change_nothing(server: LiveServer) -> None:
    client = _client(server)
    default = client.chat.completions.create(model="light", messages=MSG).choices[0].message  # type: ignore[arg-type]
    # `low` allows 1024 thinking tokens, more than max_tokens; an unknown level is a hint.
    # (llama.cpp's logits shift slightly with prefix reuse: a near-tie late in the text may flip,
    # so the opening is compared; the engine tests compare whole greedy outputs on a cold cache.)
    thinking = (default.model_extra or {})["reasoning_content"]
    for effort in ("low", "a-level-from-the-future"):
        reply = client.chat.completions.create(model="light", messages=MSG, reasoning_effort=effort)  # type: ignore[arg-type]
        assert (reply.choices[0].message.model_extra or {})["reasoning_content"][:12] == thinking[:12]
        assert reply.usage is not None and reply.usage.completion_tokens == 12


def test_image_parts_are_refused(server: LiveServer) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}]
    with pytest.raises(openai.BadRequestError) as err:
        _client(server).chat.completions.create(model="light", messages=messages)  # type: ignore[arg-type]
    assert err.value.param == "messages[0].content[1]"  # type: ignore[attr-defined]
