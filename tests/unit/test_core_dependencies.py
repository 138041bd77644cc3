"""What a plain install (`./start_service.sh` with no extras) must bring for the routes every
configuration serves: the extras only add engines and client tools."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower() for r in requirements}


def test_the_websocket_route_needs_no_extra() -> None:
    """uvicorn answers every WebSocket handshake with 404 ("Unsupported upgrade request") when no
    implementation is installed; websockets came only with the dev and mlx-vlm extras before."""
    assert "websockets" in _names(PYPROJECT["project"]["dependencies"])
