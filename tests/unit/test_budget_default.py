"""MEMORY_BUDGET's default: the GPUs' memory where a tier offloads to one (CUDA), the unified memory
on Apple Silicon, else the RAM, each less a margin; the GPU probe is injected (no GPU here)."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from service.settings import parse_settings
from service.testing import fake_engines
from service.tiers import budget
from service.tiers.budget import budget_total, default_budget, parse_nvidia_smi
from service.tiers.registry import Registry

GiB = 2**30


def test_nvidia_smi_output_is_read_as_the_sum_of_the_gpus() -> None:
    assert parse_nvidia_smi("81559\n") == 81559 * 2**20
    assert parse_nvidia_smi("81559\n 81559 \n\n") == 2 * 81559 * 2**20
    assert parse_nvidia_smi("") is None
    assert parse_nvidia_smi("[N/A]\n") is None
    assert parse_nvidia_smi("NVIDIA-SMI has failed because it couldn't communicate with the driver.") is None


def test_the_gpu_memory_is_the_default_where_a_tier_offloads_to_a_gpu() -> None:
    def no_probe() -> int | None:
        raise AssertionError("the GPU is probed only where a tier offloads to one")

    gpu = lambda: 80 * GiB  # noqa: E731
    assert budget_total(None, True, gpu, unified=False, ram=512 * GiB) == 72 * GiB
    assert budget_total(None, False, no_probe, unified=False, ram=512 * GiB) == default_budget(512 * GiB)
    assert budget_total(None, True, no_probe, unified=True, ram=64 * GiB) == default_budget(64 * GiB)  # Apple
    assert budget_total(12 * GiB, True, no_probe, unified=False, ram=512 * GiB) == 12 * GiB  # MEMORY_BUDGET wins


def test_no_gpu_or_a_failing_probe_falls_back_to_the_ram_saying_so(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> int | None:
        raise OSError("driver gone")

    with caplog.at_level(logging.DEBUG, logger="service.tiers.budget"):
        assert budget_total(None, True, lambda: None, unified=False, ram=100 * GiB) == 90 * GiB
        assert budget_total(None, True, lambda: 0, unified=False, ram=100 * GiB) == 90 * GiB
        assert budget_total(None, True, broken, unified=False, ram=100 * GiB) == 90 * GiB
    assert "no GPU found" in caplog.text and "driver gone" in caplog.text


def test_the_registry_asks_the_gpu_only_for_tiers_that_offload(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(budget, "_unified_memory", lambda: False)
    engines = dataclasses.replace(fake_engines(), gpu_memory=lambda: 24 * GiB)
    assert Registry(parse_settings({"LIGHT_MODEL_PATH": "fake/light"}), engines).budget.total == default_budget(
        24 * GiB
    )
    cpu_only = parse_settings({"LIGHT_MODEL_PATH": "fake/light", "LIGHT_N_GPU_LAYERS": "0"})
    assert Registry(cpu_only, engines).budget.total == default_budget()
    explicit = parse_settings({"LIGHT_MODEL_PATH": "fake/light", "MEMORY_BUDGET": "8GiB"})
    assert Registry(explicit, engines).budget.total == 8 * GiB


def test_nvidia_smi_missing_is_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(budget, "_NVIDIA_SMI", ("/nonexistent/nvidia-smi", "--query-gpu=memory.total"))
    assert budget.nvidia_smi_memory() is None
