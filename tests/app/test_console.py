"""The console's page and files as HTTP (issue 29; tests/browser drive them in Chromium): public but
still behind the Host check, a strict CSP, versioned assets within budget, and OpenAPI UIs that
name no other host."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from service.controllers.console import CONSOLE_DIR, CONTENT_SECURITY_POLICY, PAGE, asset_version
from tests.live import error_of, fake_app

LIGHT = {"LIGHT_MODEL_PATH": "fake/gemma-3-270m", "LIGHT_N_CTX": "256"}
BUDGET = 300 * 1024  # the console's own files; the vendored OpenAPI UIs are apart


def test_the_console_is_public_and_says_whether_keys_are_needed() -> None:
    with fake_app({**LIGHT, "API_KEYS": "k1"}) as http:
        page = http.get("/")
        assert page.status_code == 200
        assert '<meta name="llmservice-keys" content="required">' in page.text
        assert http.get("/v1/stats").status_code == 401  # the data is not
        for asset in re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text):
            assert http.get(asset).status_code == 200, asset
    with fake_app(LIGHT) as http:
        assert '<meta name="llmservice-keys" content="optional">' in http.get("/").text


def test_the_page_is_locked_down() -> None:
    with fake_app(LIGHT) as http:
        page = http.get("/")
        headers = page.headers
        assert headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        policy = dict(d.strip().split(" ", 1) for d in CONTENT_SECURITY_POLICY.split(";"))
        assert policy["script-src"] == policy["style-src"] == policy["connect-src"] == "'self'"
        assert policy["default-src"] == "'none'" and policy["frame-ancestors"] == "'none'"
        assert headers["x-content-type-options"] == "nosniff" and headers["cache-control"] == "no-cache"
        assert "<script>" not in page.text and "style=" not in page.text and "<style" not in page.text
        # DNS rebinding: a page on another name cannot read the console either.
        error_of(http.get("/", headers={"Host": "evil.example"}), 400)
        error_of(http.get("/static/console/console.js", headers={"Host": "evil.example"}), 400)
        # The page's template is not a file to fetch: served from there, it would run without the CSP.
        for path in (
            "/static/console.html",
            "/static/console/",
            "/static/console/%2e%2e/console.html",
            "/static/nope.js",
        ):
            error = error_of(http.get(path), 404)  # nothing outside the folder, and no path on disk in the answer
            assert error["message"] in ("Not found: no such file", "Not found: no such route"), error
        assert http.get("/v1/stats").json()["requests"]["total"] == 0  # loading the console is not traffic


def test_assets_are_versioned_by_content_and_within_budget(tmp_path: Path) -> None:
    with fake_app(LIGHT) as http:
        page = http.get("/").text
        version = asset_version()
        assert page.count(f"?v={version}") == 2
        asset = http.get(f"/static/console/console.js?v={version}")
        assert asset.status_code == 200 and "immutable" in asset.headers["cache-control"]
        assert asset.headers["content-type"].startswith(("text/javascript", "application/javascript"))
    copy = Path(shutil.copytree(CONSOLE_DIR, tmp_path / "console"))
    assert asset_version(copy) == version
    (copy / "console.js").write_text((copy / "console.js").read_text() + "\n// changed\n")
    assert asset_version(copy) != version  # a new release gets new URLs: no stale file from a cache
    size = PAGE.stat().st_size + sum(p.stat().st_size for p in CONSOLE_DIR.iterdir())
    assert size <= BUDGET, f"the console's own assets are {size} bytes"


def test_openapi_uis_load_nothing_from_the_internet() -> None:
    with fake_app(LIGHT) as http:
        for path in ("/schema", "/schema/swagger"):
            page = http.get(path)
            assert page.status_code == 200
            assert not re.search(r"https?://", page.text), page.text
            for asset in re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text):
                assert http.get(asset).status_code == 200, asset
