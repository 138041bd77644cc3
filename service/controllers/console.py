"""The web console at `/` and the package's static files at `/static` (the console's own assets and
the vendored OpenAPI UIs): everything a page needs comes from this server, nothing from the internet.

The console is a same-origin client like any other: its data calls carry the key the user types and
pass `Security.guard` as any request does. Only the page and its files are public (a browser cannot
send a bearer key for them). The page names its assets with a hash of their content, so they can be
cached for good and a new version is never served from an old cache; the page itself is revalidated.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from litestar import Request, Response, Router, get
from litestar.datastructures import CacheControlHeader
from litestar.exceptions import NotFoundException
from litestar.static_files import create_static_files_router

from kernel.errors import NotFoundError

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
CONSOLE_DIR = STATIC_DIR / "console"  # the page's script and style
PAGE = STATIC_DIR / "console.html"  # a template, outside the served folders: only `/` serves it, with its CSP
_PUBLIC = {"public": True, "observe": False}  # no key to load a page; loading it is not traffic

# No inline script or style anywhere, and the page talks only to this server.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def asset_version(folder: Path = CONSOLE_DIR) -> str:
    """A hash of the console's files: their URLs change whenever one of them does."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def console_routes(*, keys_required: bool) -> list[Router]:
    """`/` (the console page) and `/static/...`; the files are read once, when the app is made.
    `keys_required` (API_KEYS are set, which cannot change while the server runs) tells the page to
    ask for a key before its first data call rather than make the browser log a 401 for each."""
    page = PAGE.read_text()
    page = page.replace("{{version}}", asset_version()).replace("{{keys}}", "required" if keys_required else "optional")
    body = page.encode()

    @get(
        "/", include_in_schema=False, opt=_PUBLIC, sync_to_thread=False, cache_control=CacheControlHeader(no_cache=True)
    )
    def console() -> Response[bytes]:
        return Response(body, media_type="text/html; charset=utf-8", headers=_PAGE_HEADERS)

    static = [
        create_static_files_router(
            f"/static/{folder}",
            directories=[STATIC_DIR / folder],
            name=f"static-{folder}",
            opt=_PUBLIC,
            # Every reference to a file carries a version (the console's hash, the vendored UIs' release).
            cache_control=CacheControlHeader(public=True, max_age=31536000, immutable=True),
            include_in_schema=False,
            exception_handlers={NotFoundException: _no_such_file},
        )
        for folder in ("console", "openapi")
    ]
    return [Router("/", route_handlers=[console]), *static]


def _no_such_file(request: Request[Any, Any, Any], exc: NotFoundException) -> Response[dict[str, object]]:
    """Litestar's own message names the folder on disk: not for a client."""
    return Response(NotFoundError("Not found: no such file").envelope(), status_code=404)
