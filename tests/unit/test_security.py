"""API keys, the rate limiter and the load endpoint's path restriction, without a server."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from kernel.errors import AuthenticationError, InvalidRequestError, PermissionDeniedError
from service.security import ApiKeys, RateLimiter, allowed_model_path, read_keys_file
from service.settings import SettingsError, parse_settings

if TYPE_CHECKING:
    from tests.conftest import StartService


def test_no_keys_means_open() -> None:
    keys = ApiKeys([], [])
    assert keys.check(None, admin=False) is None and keys.check(None, admin=True) is None


def test_user_and_admin_keys() -> None:
    keys = ApiKeys(["user-1", "user-2"], ["admin-1"])
    assert keys.check("Bearer user-2", admin=False) == "user-2"
    assert keys.check("bearer admin-1", admin=False) == "admin-1"  # admin keys are user keys too
    assert keys.check("Bearer admin-1", admin=True) == "admin-1"
    with pytest.raises(PermissionDeniedError):
        keys.check("Bearer user-1", admin=True)
    for header in (None, "", "Bearer", "Bearer ", "Basic dXNlcg==", "user-1"):
        with pytest.raises(AuthenticationError) as err:
            keys.check(header, admin=False)
        assert err.value.code == "missing_api_key"
    with pytest.raises(AuthenticationError) as err:
        keys.check("Bearer user-3", admin=False)
    assert err.value.code == "invalid_api_key" and "user-3" not in err.value.message


def test_only_admin_keys_leave_user_routes_open() -> None:
    keys = ApiKeys([], ["admin-1"])
    assert keys.check(None, admin=False) is None
    with pytest.raises(AuthenticationError):
        keys.check(None, admin=True)
    assert keys.check("Bearer admin-1", admin=True) == "admin-1"


def test_admin_routes_are_closed_with_user_keys_only() -> None:
    keys = ApiKeys(["user-1"], [])
    with pytest.raises(PermissionDeniedError, match="set ADMIN_API_KEYS"):
        keys.check("Bearer user-1", admin=True)
    with pytest.raises(AuthenticationError):
        keys.check(None, admin=True)
    assert keys.check("Bearer user-1", admin=False) == "user-1"


def test_keys_file(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# team keys\nalpha\n\n  beta  \n#gamma\n")
    assert read_keys_file(str(path)) == ["alpha", "beta"]
    with pytest.raises(SettingsError, match="API_KEYS_FILE"):
        read_keys_file(str(tmp_path / "missing"))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_windows_per_identity() -> None:
    clock = Clock()
    limiter = RateLimiter(2, clock)
    assert (limiter.hit("a").remaining, limiter.hit("a").remaining) == (1, 0)
    over = limiter.hit("a")
    assert over.remaining < 0 and over.reset == 60
    assert limiter.hit("b").remaining == 1  # another identity has its own window
    clock.now += 59.2
    assert limiter.hit("a").remaining < 0 and limiter.hit("a").reset == 1
    clock.now += 0.8
    assert limiter.hit("a").remaining == 1  # a new minute


def test_rate_limiter_is_constant_time_per_request() -> None:
    clock = Clock()
    limiter = RateLimiter(5, clock)

    def hits(identities: range) -> float:
        started = time.perf_counter()
        for i in identities:
            limiter.hit(f"ip:10.{i}")
        return (time.perf_counter() - started) / len(identities)

    few = hits(range(1000))
    many = hits(range(1000, 50_000))  # spoofed identities pile up within one minute
    assert len(limiter) == 50_000
    assert many < few * 5 + 20e-6  # no table rebuild per request (that was 9 -> 40 ms at 10k)
    clock.now += 61
    limiter.hit("ip:late")
    assert len(limiter) == 1  # ended windows are forgotten


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    (root / "sub").mkdir(parents=True)
    (root / "a.gguf").write_bytes(b"x")
    (root / "sub" / "b.gguf").write_bytes(b"x")
    (tmp_path / "secret.txt").write_text("secret")
    os.symlink(tmp_path / "secret.txt", root / "linked.gguf")  # placed by the operator
    return root


def test_paths_inside_models_dir(models_dir: Path) -> None:
    assert allowed_model_path(str(models_dir), "a.gguf") == str(models_dir / "a.gguf")
    assert allowed_model_path(str(models_dir), "sub/b.gguf") == str(models_dir / "sub" / "b.gguf")
    assert allowed_model_path(str(models_dir), str(models_dir / "sub")) == str(models_dir / "sub")
    assert allowed_model_path(str(models_dir), "linked.gguf") == str(models_dir / "linked.gguf")


@pytest.mark.parametrize(
    "given",
    [
        "../secret.txt",
        "sub/../../secret.txt",
        "/etc/passwd",
        "~/.bashrc",
        "..",
        ".",
        "",
        "a.gguf\x00.txt",
        "sub/../a.gguf",
    ],
)
def test_paths_outside_models_dir_are_refused(models_dir: Path, given: str) -> None:
    with pytest.raises(PermissionDeniedError):
        allowed_model_path(str(models_dir), given)


def test_absolute_path_elsewhere_and_missing_files(models_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(PermissionDeniedError):
        allowed_model_path(str(models_dir), str(tmp_path / "secret.txt"))
    with pytest.raises(InvalidRequestError):
        allowed_model_path(str(models_dir), "nope.gguf")


def test_loading_by_path_is_off_without_models_dir() -> None:
    with pytest.raises(PermissionDeniedError, match="MODELS_DIR"):
        allowed_model_path("", "a.gguf")


def test_tier_max_tokens_above_the_server_limit_is_a_settings_error() -> None:
    assert parse_settings({"MAX_TOKENS_LIMIT": "64", "LIGHT_MAX_TOKENS": "64"}).max_tokens_limit == 64
    with pytest.raises(SettingsError, match=r"LIGHT_MAX_TOKENS='65'.*MAX_TOKENS_LIMIT=64"):
        parse_settings({"MAX_TOKENS_LIMIT": "64", "LIGHT_MAX_TOKENS": "65"})


def test_lifecycle_settings_parse() -> None:
    s = parse_settings(
        {"LIGHT_PRELOAD": "no", "LIGHT_KEEP_ALIVE": "300", "LIGHT_PIN": "yes", "RATE_LIMIT_PER_MINUTE": "5"}
    )
    light = s.tier("light")
    assert (light.preload, light.keep_alive, light.pin, s.rate_limit_per_minute) == (False, 300, True, 5)
    assert s.tier("medium").pin is False and s.tier("medium").keep_alive == 0 and s.max_batch_inputs == 2048
    with pytest.raises(SettingsError, match="LIGHT_KEEP_ALIVE"):
        parse_settings({"LIGHT_KEEP_ALIVE": "-1"})


def test_operations_settings_are_documented() -> None:
    text = (Path(__file__).resolve().parents[2] / ".env.example").read_text()
    server = ["API_KEYS", "API_KEYS_FILE", "ADMIN_API_KEYS", "RATE_LIMIT_PER_MINUTE", "MAX_TOKENS_LIMIT",
              "MAX_BATCH_INPUTS", "MODELS_DIR", "STATS_WINDOW_SECONDS", "ENABLE_CACHE", "CACHE_DIR"]  # fmt: skip
    tiers = [
        f"{t}_{f}"
        for t in ("LIGHT", "MEDIUM", "HEAVY", "EMBEDDING", "RERANKER")
        for f in ("PRELOAD", "KEEP_ALIVE", "PIN")
    ]
    for name in server + tiers:
        assert f"{name}=" in text, f"{name} is not in .env.example"


def test_unreadable_keys_file_stops_start_up_with_one_line(start_service: StartService) -> None:
    proc = start_service({"LIGHT_MODEL_PATH": "/x.gguf", "API_KEYS_FILE": "/nonexistent/keys"})
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == "llmservice: Invalid setting API_KEYS_FILE='/nonexistent/keys': No such file or directory"
    )
