"""`python -m service`: serve on HOST:PORT, write the bound port to `.port`, exit when idle."""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from service.app import create_app
from service.http_protocol import CheckedHttpToolsProtocol
from service.serving.drain import Drain
from service.settings import Settings, SettingsError, load_settings

log = logging.getLogger("service")

_PORT_TRIES = 20
ENV_FILE = ".env"  # read at start; PATCH /v1/config {"persist": true} writes changes back to it


def bind(settings: Settings) -> socket.socket:
    """Bind HOST:PORT, or the next free port when PORT_AUTO_INCREMENT is on."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    last_error: OSError | None = None
    tries = _PORT_TRIES if settings.port_auto_increment and settings.port else 1
    for port in range(settings.port, settings.port + tries):
        # proto=IPPROTO_TCP lets asyncio set TCP_NODELAY on accepted connections (it checks the
        # protocol); with proto 0, Nagle + delayed ACKs add ~40 ms to every keep-alive response.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((settings.host, port))
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE:
                raise
            last_error = exc
            log.warning("Port %d is in use%s", port, ", trying the next one" if tries > 1 else "")
            continue
        sock.listen(2048)
        sock.set_inheritable(True)
        return sock
    raise SystemExit(
        f"Port {settings.port} is in use ({last_error}); set PORT to a free port"
        + ("" if tries > 1 else " or PORT_AUTO_INCREMENT=true")
    )


def _watch_idle(server: uvicorn.Server, state: object, timeout: int) -> None:
    while not server.should_exit:
        time.sleep(min(1.0, timeout / 4))
        idle = time.monotonic() - getattr(state, "last_activity", time.monotonic())
        if idle > timeout:
            log.info("No request for %d s (SHUTDOWN_TIMEOUT): shutting down", timeout)
            server.should_exit = True


def configure_logging(level: str) -> None:
    """The process log format; set here, not in `create_app`, so an embedding app keeps its own logging."""
    logging.basicConfig(format="%(asctime)s - %(name)s - %(levelname)s - %(message)s", level=level, force=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)


def server_config(app: Any, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """uvicorn's settings for `app`; proxy headers (X-Forwarded-For/-Proto) are trusted only from
    FORWARDED_ALLOW_IPS. uvicorn's own default trusts 127.0.0.1, so every local client could pick
    the address it is rate-limited by."""
    options: dict[str, Any] = {
        "log_config": None,
        "log_level": settings.log_level.lower(),
        "timeout_graceful_shutdown": settings.drain_seconds,
        "access_log": settings.log_level == "DEBUG",
        "proxy_headers": bool(settings.forwarded_allow_ips),
        # Given explicitly: with None uvicorn would read its own FORWARDED_ALLOW_IPS variable.
        "forwarded_allow_ips": settings.forwarded_allow_ips or "127.0.0.1",
        # The WebSocket protocol layer refuses larger frames before buffering them (close 1009).
        "ws_max_size": settings.max_body_bytes,
        # httptools' parser with h11's refusals (service/http_protocol.py); the loop stays uvicorn's
        # "auto": uvloop where it is installed (not on Windows), else asyncio.
        "http": CheckedHttpToolsProtocol,
        # A request head still incomplete past this is refused (h11's default; both parsers read it).
        "h11_max_incomplete_event_size": 16 * 1024,
    }
    return uvicorn.Config(app, **{**options, **overrides})


class Server(uvicorn.Server):
    """uvicorn's server, telling the app's streams when shutdown begins (they end cleanly in time)."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.drain.begin(self.config.timeout_graceful_shutdown or 0)
        super().handle_exit(sig, frame)


def write_port_file(path: Path, port: int) -> None:
    """Replace the file atomically: a reader never sees it half-written, and one left behind by a
    killed server (kill -9 runs no clean-up) is simply overwritten."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(f"{port}\n")
    os.replace(temporary, path)


def remove_port_file(path: Path, port: int) -> None:
    """Remove the file only while it still names our port (another server may have taken it over)."""
    try:
        if path.read_text().strip() == str(port):
            path.unlink()
    except OSError:
        pass


def main() -> int:
    try:
        settings = load_settings(ENV_FILE)
        configure_logging(settings.log_level)
        app = create_app(settings, env_file=ENV_FILE)  # may still refuse a setting, e.g. an unreadable API_KEYS_FILE
    except SettingsError as exc:
        print(f"llmservice: {exc}", file=sys.stderr)
        return 2
    sock = bind(settings)
    host, port = sock.getsockname()[:2]
    port_file = Path(settings.port_file)
    write_port_file(port_file, port)
    url = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"
    app.state.url = url
    log.info("llmservice listening on %s (port written to %s)", url, port_file)
    server = Server(server_config(app, settings), app.state.drain)
    # uvicorn drains, restores these handlers and re-raises the signal: exit without a traceback.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
    if settings.shutdown_timeout:
        app.state.last_activity = time.monotonic()
        threading.Thread(target=_watch_idle, args=(server, app.state, settings.shutdown_timeout), daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        remove_port_file(port_file, port)
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
