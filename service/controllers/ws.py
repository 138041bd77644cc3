"""`/v1/ws`: chat and legacy completions over one WebSocket (the protocol: service/serving/websocket.py).
Host and Origin are checked at the handshake by the app's guard."""

from __future__ import annotations

from typing import Any

from litestar import WebSocket, websocket

from service.serving.websocket import ROUTE, WebSocketSessions


@websocket(ROUTE, opt={"websocket": True})
async def ws(socket: WebSocket[Any, Any, Any], sessions: WebSocketSessions) -> None:
    await sessions.serve(socket)
