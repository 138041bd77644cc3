"""Loading within MEMORY_BUDGET, on fake engines of declared sizes: the least recently used idle
model leaves first, pinned and busy ones stay, a load that cannot fit is a 503 naming the holders,
concurrent first requests load once, and requests in random order never overrun the budget."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import gc
import logging
import random
import re
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from backends.base import GenerationRequest
from backends.fake import FakeBackend
from kernel.config import TierSettings
from kernel.errors import ModelLoadingError, ModelUnavailableError
from service.settings import SettingsError, parse_settings
from service.testing import counting, fake_engines
from service.tiers.families import GENERATION, EngineFactories
from service.tiers.registry import Registry
from service.tiers.slots import TierState
from tests.live import fake_app

GiB = 2**30
SIZES = {"fake/light": 4 * GiB, "fake/medium": 5 * GiB, "fake/heavy": 6 * GiB}


class Ledger:
    """The fake engines' memory as the machine would see it: added on load, freed on close."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.held: dict[int, int] = {}
        self.peak = 0
        self.loads: list[str] = []

    def engines(self, **kwargs: object) -> EngineFactories:
        ledger = self

        class Sized(FakeBackend):
            def load(self) -> None:
                super().load()
                with ledger.lock:
                    ledger.held[id(self)] = SIZES[self.model_path]
                    ledger.peak = max(ledger.peak, sum(ledger.held.values()))
                    ledger.loads.append(self.model_path)

            def close(self) -> None:
                with ledger.lock:
                    ledger.held.pop(id(self), None)
                super().close()

        base = fake_engines(sizes=SIZES)
        return EngineFactories(
            backend=functools.partial(Sized, **kwargs),  # type: ignore[arg-type]
            embedder=base.embedder,
            reranker=base.reranker,
            estimate=base.estimate,
            gpu_memory=base.gpu_memory,
        )


def registry(budget: int, engines: EngineFactories, **extra: str) -> Registry:
    env: Mapping[str, str] = {
        "MEMORY_BUDGET": str(budget),
        **{f"{t.upper()}_MODEL_PATH": f"fake/{t}" for t in ("light", "medium", "heavy")},
        **{f"{t.upper()}_PRELOAD": "false" for t in ("light", "medium", "heavy")},
        **extra,
    }
    return Registry(parse_settings(env), engines)


async def use(reg: Registry, tier: str, prompt: str = "hi") -> str:
    slot = await reg.ensure_loaded(reg.slots[tier])
    text = ""
    async for chunk in GENERATION.generate(slot, GenerationRequest(prompt=prompt, max_tokens=8)):
        text += chunk.text
    return text


def loaded(reg: Registry) -> list[str]:
    return sorted(s.name for s in reg.slots.values() if s.state is TierState.LOADED)


def test_budget_setting_takes_sizes_with_units() -> None:
    assert parse_settings({"MEMORY_BUDGET": "12GiB"}).memory_budget == 12 * GiB
    assert parse_settings({"MEMORY_BUDGET": "1.5GB"}).memory_budget == 1_500_000_000
    assert parse_settings({}).memory_budget is None
    with pytest.raises(ValueError, match="MEMORY_BUDGET"):
        parse_settings({"MEMORY_BUDGET": "lots"})


def test_least_recently_used_idle_model_leaves_first() -> None:
    async def run() -> None:
        reg = registry(10 * GiB, Ledger().engines())
        await use(reg, "light")
        await use(reg, "medium")
        assert loaded(reg) == ["light", "medium"] and reg.budget.used == 9 * GiB
        await use(reg, "light")  # light is now the more recent one
        await use(reg, "heavy")  # 6 GiB: medium (least recent) goes, light stays
        assert loaded(reg) == ["heavy", "light"] and reg.budget.used == 10 * GiB
        await reg.close()

    asyncio.run(asyncio.wait_for(run(), 30))


def test_pinned_model_is_kept_and_the_next_one_goes() -> None:
    async def run() -> None:
        reg = registry(10 * GiB, Ledger().engines(), LIGHT_PIN="true")
        await use(reg, "light")
        await use(reg, "medium")
        await use(reg, "heavy")  # light is older but pinned: medium goes
        assert loaded(reg) == ["heavy", "light"]
        await reg.close()

    asyncio.run(asyncio.wait_for(run(), 30))


def test_model_with_work_in_flight_is_kept_and_nothing_else_fits_503() -> None:
    async def run() -> None:
        ledger = Ledger()
        reg = registry(11 * GiB, ledger.engines(reply=counting, token_seconds=0.01), MEDIUM_PIN="true")
        await use(reg, "medium")
        slot = await reg.ensure_loaded(reg.slots["light"])
        stream = GENERATION.generate(slot, GenerationRequest(prompt="count", max_tokens=100))
        await anext(stream)  # light is generating: neither it nor pinned medium can go
        with pytest.raises(ModelUnavailableError) as refused:
            await reg.ensure_loaded(reg.slots["heavy"])
        message = refused.value.message
        assert "heavy" in message and "light 4.00 GiB (busy)" in message and "medium 5.00 GiB (pinned)" in message
        assert refused.value.status == 503 and refused.value.code == "memory_budget_exceeded"
        assert reg.slots["heavy"].state is TierState.AVAILABLE  # a later request may load it
        assert loaded(reg) == ["light", "medium"] and ledger.loads == ["fake/medium", "fake/light"]
        async for _ in stream:  # once light is idle again, heavy loads in its place
            pass
        await use(reg, "heavy")
        assert loaded(reg) == ["heavy", "medium"]
        await reg.close()

    asyncio.run(asyncio.wait_for(run(), 30))


def test_a_model_larger_than_the_budget_is_refused_saying_so() -> None:
    async def run() -> None:
        reg = registry(3 * GiB, Ledger().engines())
        with pytest.raises(ModelUnavailableError, match="more than the whole MEMORY_BUDGET"):
            await use(reg, "light")
        assert reg.budget.used == 0
        await reg.close()

    asyncio.run(asyncio.wait_for(run(), 30))


def test_concurrent_first_requests_load_once() -> None:
    async def run() -> None:
        ledger = Ledger()
        reg = registry(10 * GiB, ledger.engines(load_seconds=0.2))  # LOAD_WAIT_SECONDS left at its default, 0
        answers = await asyncio.gather(*(use(reg, "light", f"q{i}") for i in range(8)))
        assert answers == [f"q{i}" for i in range(8)]
        assert ledger.loads == ["fake/light"]
        await reg.close()

    asyncio.run(asyncio.wait_for(run(), 30))


def test_concurrent_first_requests_over_http_wait_for_one_load(tmp_path: Path) -> None:
    """A lazy tier and a catalogue id, each asked by 6 clients at once while its slow load runs:
    one load each, every answer a 200 (not a 503 model_loading for all but the first)."""
    from tests.unit.test_catalogue import write_gguf

    write_gguf(tmp_path / "alpha-q4.gguf")
    loads: list[str] = []

    class Counted(FakeBackend):
        def load(self) -> None:
            loads.append(self.model_path)
            super().load()

    engines = EngineFactories(backend=functools.partial(Counted, load_seconds=0.5), gpu_memory=lambda: None)  # type: ignore[arg-type]
    env = {"MODELS_DIR": str(tmp_path), "LIGHT_MODEL_PATH": "fake/light", "LIGHT_PRELOAD": "false"}
    with fake_app(env, engines=engines) as http, ThreadPoolExecutor(12) as pool:

        def ask(model: str) -> int:
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
            return http.post("/v1/chat/completions", json=body).status_code

        codes = list(pool.map(ask, ["light", "alpha-q4"] * 6))
    assert codes == [200] * 12
    assert sorted(loads) == sorted(["fake/light", str(tmp_path / "alpha-q4.gguf")])


def test_a_request_during_a_start_up_load_gets_503_after_load_wait_seconds() -> None:
    async def run() -> None:
        reg = registry(10 * GiB, Ledger().engines(load_seconds=0.3), LIGHT_PRELOAD="true")
        await reg.start()
        with pytest.raises(ModelLoadingError):  # the server is starting: Retry-After, as before
            await reg.ready(reg.slots["light"])
        await reg.preloaded()
        assert await use(reg, "light") == "hi"
        await reg.close()

    asyncio.run(asyncio.wait_for(run(), 30))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_requests_never_overrun_the_budget(seed: int) -> None:
    rng = random.Random(seed)

    async def run() -> None:
        ledger = Ledger()
        budget = 10 * GiB  # any two of 4, 5, 6 GiB but heavy+medium fit; never all three
        reg = registry(budget, ledger.engines(reply=counting, token_seconds=0.001), LOAD_WAIT_SECONDS="30")
        refused = 0

        async def one(tier: str, delay: float) -> None:
            nonlocal refused
            await asyncio.sleep(delay)
            try:
                await use(reg, tier)
            except ModelUnavailableError:
                refused += 1  # everything that could go was busy: a 503 is the right answer
            assert reg.budget.used <= budget

        tiers = [rng.choice(["light", "medium", "heavy"]) for _ in range(40)]
        await asyncio.gather(*(one(t, rng.random() * 0.2) for t in tiers))
        assert refused < len(tiers)
        for tier in ("light", "medium", "heavy"):  # once idle, each one loads in turn, evicting others
            await use(reg, tier)
            assert reg.budget.used <= budget
        assert ledger.peak <= budget and set(ledger.loads) == set(SIZES) and len(ledger.loads) > 3
        await reg.close()

    asyncio.run(asyncio.wait_for(run(), 60))


def test_settings_without_a_budget_default_to_the_device_memory_less_a_margin() -> None:
    from service.tiers.budget import default_budget

    assert default_budget(100 * GiB) == 90 * GiB
    assert default_budget(4 * GiB) == 3 * GiB  # at least 1 GiB stays free
    reg = Registry(parse_settings({}), EngineFactories())
    assert reg.budget.total == default_budget()
    assert TierSettings().n_ctx  # the estimate reads the tier's settings


def test_http_shows_the_budget_and_answers_503_naming_the_holder() -> None:
    env = {
        "MEMORY_BUDGET": "8GiB",
        "LIGHT_MODEL_PATH": "fake/light",
        "LIGHT_PIN": "true",
        "HEAVY_MODEL_PATH": "fake/heavy",
        "HEAVY_PRELOAD": "false",
    }
    with fake_app(env, engines=fake_engines(sizes=SIZES)) as http:
        memory = http.get("/health").json()["memory"]
        assert memory == {"budget_bytes": 8 * GiB, "used_bytes": 4 * GiB, "models": {"light": 4 * GiB}}
        res = http.post(
            "/v1/chat/completions", json={"model": "heavy", "messages": [{"role": "user", "content": "hi"}]}
        )
        assert res.status_code == 503
        error = res.json()["error"]
        assert error["code"] == "memory_budget_exceeded" and "light 4.00 GiB (pinned)" in error["message"]
        samples = {
            (m.name, tuple(m.labels.items())): m.value
            for family in text_string_to_metric_families(http.get("/metrics").text)
            for m in family.samples
        }
        assert samples[("llmservice_memory_budget_bytes", ())] == 8 * GiB
        assert samples[("llmservice_memory_held_bytes", (("tier", "light"),))] == 4 * GiB


def test_a_catalogue_model_loads_on_first_use_within_the_budget(tmp_path: Path) -> None:
    from tests.unit.test_catalogue import write_gguf

    for name in ("alpha-q4", "beta-q4", "unused"):
        write_gguf(tmp_path / f"{name}.gguf")
    sizes = {str(tmp_path / "alpha-q4.gguf"): 3 * GiB, str(tmp_path / "beta-q4.gguf"): 3 * GiB, **SIZES}
    env = {"MODELS_DIR": str(tmp_path), "MEMORY_BUDGET": "8GiB", "LIGHT_MODEL_PATH": "fake/light"}
    with fake_app(env, engines=fake_engines(sizes=sizes)) as http:
        listed = {m["id"]: m for m in http.get("/v1/models").json()["data"]}  # every entry, before any use
        assert {i: m["status"] for i, m in listed.items()} == {
            "light/light": "loaded",
            "alpha-q4": "available",
            "beta-q4": "available",
            "unused": "available",
        }
        assert listed["alpha-q4"]["catalogue"]["kind"] == "generation"
        assert listed["alpha-q4"]["catalogue"]["format"] == "gguf"

        def ask(model: str) -> httpx.Response:
            return http.post(
                "/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "hi"}]}
            )

        res = ask("alpha-q4")
        assert res.status_code == 200 and res.json()["choices"][0]["message"]["content"] == "hi"
        assert http.get("/health").json()["memory"]["models"] == {"light": 4 * GiB, "alpha-q4": 3 * GiB}
        assert ask("light").status_code == 200
        assert ask("beta-q4").status_code == 200  # alpha (idle, least recently used) makes room
        assert http.get("/health").json()["memory"]["models"] == {"light": 4 * GiB, "beta-q4": 3 * GiB}
        models = {m["id"]: m["status"] for m in http.get("/v1/models").json()["data"]}
        assert models["alpha-q4"] == "available" and models["beta-q4"] == "loaded" and models["unused"] == "available"
        assert ask("gamma").status_code == 404


def test_model_settings_give_a_catalogue_model_its_own_settings(tmp_path: Path) -> None:
    from tests.unit.test_catalogue import write_gguf

    models = tmp_path / "models"
    models.mkdir()
    write_gguf(models / "alpha-q4.gguf")
    table = tmp_path / "models.toml"
    table.write_text('[alpha-q4]\nN_CTX = 1234\nmax_batch = 2\nSPECULATIVE = "ngram"\nKEEP_ALIVE = "60"\n')
    env = {"MODELS_DIR": str(models), "MODEL_SETTINGS": str(table), "LIGHT_MODEL_PATH": "fake/light"}
    with fake_app(env) as http:
        assert http.post("/v1/completions", json={"model": "alpha-q4", "prompt": "hi"}).status_code == 200
        settings = http.app.state.registry.slots["alpha-q4"].settings
        assert (settings.n_ctx, settings.max_batch, settings.speculative, settings.keep_alive) == (1234, 2, "ngram", 60)
        assert settings.model_path == str(models / "alpha-q4.gguf") and not settings.preload

    for text, why in [
        ("[alpha-q4]\nN_CTXX = 1", "alpha-q4.N_CTXX is not a tier setting"),
        ('[alpha-q4]\nMODEL_PATH = "/etc"', "the catalogue says where it lies"),
        ("[alpha-q4]\nN_CTX = -5", "alpha-q4.N_CTX"),
        ("not toml [", "MODEL_SETTINGS="),
    ]:
        table.write_text(text)
        with pytest.raises(SettingsError, match=re.escape(why)):
            parse_settings(env)


def test_a_first_use_resolves_model_path_once_per_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A `package:` MODEL_PATH locates (or assembles) its files: the card, the estimate and the load
    of one first use share one resolution; a later load resolves afresh."""
    (tmp_path / "counted_model_pkg.py").write_text(
        "CALLS = []\ndef get_model_path():\n    CALLS.append(1)\n    return 'fake/light'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import counted_model_pkg  # type: ignore[import-not-found]

    async def run() -> None:
        reg = registry(10 * GiB, Ledger().engines(), LIGHT_MODEL_PATH="package:counted_model_pkg")
        slot = reg.slots["light"]
        await reg.read_card(slot)  # what a request does first (a cached answer needs only the card)
        assert await use(reg, "light") == "hi"
        assert len(counted_model_pkg.CALLS) == 1 and slot.path == "fake/light"
        await reg.unload(slot)
        await use(reg, "light")
        assert len(counted_model_pkg.CALLS) == 2
        await reg.close()

    asyncio.run(asyncio.wait_for(run(), 30))


def test_an_admin_replace_is_admitted_beside_the_model_it_replaces() -> None:
    """Both models are in memory until the swap: one that does not fit beside the old one (and the
    pinned one) is a 503 before anything loads, and the old model keeps serving."""
    import msgspec

    loads: list[str] = []

    class Counted(FakeBackend):
        def load(self) -> None:
            loads.append(self.model_path)
            super().load()

    sizes = {**SIZES, "fake/big": 2 * GiB}
    engines = dataclasses.replace(fake_engines(sizes=sizes), backend=Counted)  # type: ignore[arg-type]

    async def run() -> None:
        reg = registry(11 * GiB, engines, MEDIUM_PIN="true")
        await use(reg, "light")
        await use(reg, "medium")  # 4 + 5 of 11 GiB held
        slot = reg.slots["light"]
        heavy = msgspec.structs.replace(slot.settings, model_path="fake/heavy")  # 6 GiB: no room beside light
        with pytest.raises(ModelUnavailableError, match="memory budget") as refused:
            await reg.replace(slot, heavy)
        assert refused.value.code == "memory_budget_exceeded"
        assert loads == ["fake/light", "fake/medium"] and reg.budget.holdings() == {"light": 4 * GiB, "medium": 5 * GiB}
        assert await use(reg, "light") == "hi"  # the old model keeps serving
        assert await reg.replace(slot, msgspec.structs.replace(slot.settings, model_path="fake/big")) == "light/light"
        assert reg.budget.holdings() == {"light": 2 * GiB, "medium": 5 * GiB}  # the new model's bytes
        await reg.close()

    asyncio.run(asyncio.wait_for(run(), 30))


def test_a_reranker_keeps_the_embedding_tier_it_scores_with() -> None:
    sizes = {**SIZES, "fake/embed": 4 * GiB}
    extra = {
        "EMBEDDING_MODEL_PATH": "fake/embed",
        "EMBEDDING_PRELOAD": "false",
        "RERANKER_MODEL_PATH": "tier:embedding",
        "RERANKER_PRELOAD": "false",
    }

    async def run() -> None:
        reg = registry(10 * GiB, fake_engines(sizes=sizes), **extra)
        await reg.ensure_loaded(reg.slots["reranker"])  # loads the embedding tier first (4 GiB)
        await use(reg, "light")  # 8 of 10 GiB; the embedding tier is the least recently used
        await use(reg, "medium")  # 5 GiB: light goes, not the embedding tier the reranker needs
        assert loaded(reg) == ["embedding", "medium", "reranker"]
        await reg.unload(reg.slots["reranker"])
        await use(reg, "light")  # with the reranker gone, the embedding tier may leave
        assert loaded(reg) == ["light", "medium"]
        await reg.close()

    asyncio.run(asyncio.wait_for(run(), 30))


def test_a_preload_refused_by_the_budget_logs_one_error(caplog: pytest.LogCaptureFixture) -> None:
    async def run() -> None:
        reg = registry(3 * GiB, Ledger().engines(), LIGHT_PRELOAD="true")
        await reg.start()
        await reg.preloaded()
        assert reg.slots["light"].state is TierState.AVAILABLE  # a request later tries (and says why)
        # Drop every reference to the start-up load: an exception never retrieved is printed then.
        reg.slots["light"].load_task = None
        vars(reg).get("_startup", set()).clear()
        gc.collect()
        await reg.close()

    with caplog.at_level(logging.INFO):
        asyncio.run(asyncio.wait_for(run(), 30))
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "MEMORY_BUDGET" in errors[0].getMessage(), [r.getMessage() for r in errors]
    assert "never retrieved" not in caplog.text
