"""MODEL_ALIASES: the model names coding agents ask for (Claude Code's own for side tasks, Codex's
default) routed onto tiers, listed in /v1/models; other unknown names stay a 404 that lists
what exists. In-process on the fake engines, through the openai SDK."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from litestar.testing import TestClient

from service.settings import SettingsError, parse_settings
from tests.live import fake_app

ENV = {
    "LIGHT_MODEL_PATH": "fake/light-echo",
    "MEDIUM_MODEL_PATH": "fake/medium-echo",
    "EMBEDDING_MODEL_PATH": "fake/words",
    # `medium=light` never applies: exact tier and model names come first.
    "MODEL_ALIASES": "claude-3-5-haiku*=medium, Claude-*=light,gpt-5*=medium,medium=light,*-7b=light",
}


@pytest.fixture(scope="module")
def http() -> Iterator[TestClient]:  # type: ignore[type-arg]
    with fake_app(ENV) as client:
        yield client


def sdk(http: TestClient) -> openai.OpenAI:  # type: ignore[type-arg]
    return openai.OpenAI(base_url=f"{http.base_url}/v1", api_key="unused", http_client=http, max_retries=0)


@pytest.mark.parametrize(
    ("model", "tier"),
    [
        ("claude-3-5-haiku-20241022", "medium"),  # the first matching pattern wins
        ("claude-sonnet-4-5-20250929", "light"),  # case does not matter
        ("gpt-5.1-codex-max", "medium"),
        ("medium", "medium"),  # an exact tier name before any alias
        ("light/light-echo", "light"),
        ("mistral-7b", "light"),  # an alias before the built-in size pattern
        ("text-embedding-3-small", "embedding"),  # no alias: the built-in patterns still apply
    ],
)
def test_aliases_route_after_exact_names(http: TestClient, model: str, tier: str) -> None:  # type: ignore[type-arg]
    card = http.get(f"/v1/models/{model}").json()
    assert card["tier"] == tier
    if tier != "embedding":
        before = {c["tier"]: c.get("usage_count", 0) for c in http.get("/v1/models").json()["data"]}
        answer = sdk(http).chat.completions.create(model=model, messages=[{"role": "user", "content": "ping"}])
        assert answer.choices[0].message.content == "ping"
        after = {c["tier"]: c.get("usage_count", 0) for c in http.get("/v1/models").json()["data"]}
        assert {t: after[t] - before[t] for t in after} == {t: int(t == tier) for t in after}  # served there


def test_models_list_shows_each_tiers_aliases(http: TestClient) -> None:  # type: ignore[type-arg]
    models = {m.id: m for m in sdk(http).models.list()}
    aliases = {m.model_extra["tier"]: m.model_extra.get("aliases") for m in models.values() if m.model_extra}
    assert aliases == {
        "light": ["claude-*", "medium", "*-7b"],
        "medium": ["claude-3-5-haiku*", "gpt-5*"],
        "embedding": None,
    }
    assert all(m.object == "model" for m in models.values())


def test_unknown_name_is_404_listing_models_and_aliases(http: TestClient) -> None:  # type: ignore[type-arg]
    with pytest.raises(openai.NotFoundError) as caught:
        sdk(http).chat.completions.create(model="o3-mini", messages=[{"role": "user", "content": "hi"}])
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "o3-mini" in error["message"]
    assert "light/light-echo" in error["message"] and "medium/medium-echo" in error["message"]
    assert "claude-*=light" in error["message"]


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("claude-*", "expected pattern=tier pairs"),
        ("claude-*=huge", "got 'claude-*=huge'"),
        ("=light", "expected pattern=tier pairs"),
        ("claude *=light", "expected pattern=tier pairs"),
        ("gpt-5*=light,claude-*=heavy", "claude-* names tier heavy, which has no HEAVY_MODEL_PATH"),
    ],
)
def test_bad_aliases_stop_start_up_naming_the_variable(value: str, fragment: str) -> None:
    with pytest.raises(SettingsError) as caught:
        parse_settings({"LIGHT_MODEL_PATH": "fake/light", "MODEL_ALIASES": value})
    message = str(caught.value)
    assert message.startswith("Invalid setting MODEL_ALIASES=") and "\n" not in message
    assert fragment in message


def test_empty_aliases_by_default() -> None:
    assert parse_settings({"LIGHT_MODEL_PATH": "fake/light"}).model_aliases == ""
    assert parse_settings({"LIGHT_MODEL_PATH": "fake/light", "MODEL_ALIASES": " , "}).model_aliases == " , "
