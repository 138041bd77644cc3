"""The `llmservice` command: serve, pull, ls, ps, rm, run, config.

Commands that need a server (ps, run) talk to the one at --host/--port or LLMSERVICE_URL (default
http://127.0.0.1:$PORT from .env); `run` starts one in the background when none answers. `pull` and
`rm` go through a running server (it refuses to delete a loaded model) and work on MODELS_DIR
directly when there is none. Exit codes: 0 ok, 1 error (one line on stderr), 2 usage.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec

from kernel.errors import LLMServiceError
from service.settings import Settings, SettingsError, load_settings

ENV_FILE = ".env"
_START_WAIT = 180.0  # seconds `run` waits for a server it started to answer /health (a first load)
_SECRET_WORDS = ("key", "token", "secret", "password")


class CliError(Exception):
    """One clear line for stderr, exit code 1."""


def _settings() -> Settings:
    try:
        return load_settings(ENV_FILE)
    except SettingsError as exc:
        raise CliError(str(exc)) from exc


def _base_url(args: argparse.Namespace, settings: Settings) -> str:
    if args.host or args.port:
        host = args.host or settings.host
        return f"http://{host}:{args.port or settings.port}"
    if url := os.environ.get("LLMSERVICE_URL"):
        return url.rstrip("/")
    port = settings.port
    with contextlib.suppress(OSError, ValueError):  # the port a server bound (PORT_AUTO_INCREMENT may move it)
        port = int(Path(settings.port_file).read_text().strip())
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    return f"http://{host}:{port}"


def _key(settings: Settings) -> str | None:
    """LLMSERVICE_API_KEY, else an admin key, else a user key from the settings."""
    for given in (os.environ.get("LLMSERVICE_API_KEY", ""), settings.admin_api_keys, settings.api_keys):
        if key := given.split(",")[0].strip():
            return key
    return None


class Client:
    def __init__(self, url: str, key: str | None) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.url = url
        self.http = httpx.Client(base_url=url, headers=headers, timeout=httpx.Timeout(10.0, read=None))

    def up(self) -> bool:
        try:
            return self.http.get("/health", timeout=2.0).status_code in (200, 503)
        except httpx.HTTPError:
            return False

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.http.request(method, path, **kwargs)
        if response.is_error:
            raise CliError(_message(response.read()) or f"{method} {path}: HTTP {response.status_code}")
        return response.json()

    def events(self, path: str, body: dict[str, Any], *, wait_load: float = 0.0) -> Iterator[dict[str, Any]]:
        """The SSE events of a POST; while the model is still loading (503 with Retry-After), asked
        again for up to `wait_load` seconds, as `ollama run` waits for its model."""
        deadline = time.monotonic() + wait_load
        while True:
            with self.http.stream("POST", path, json=body) as response:
                retry = response.headers.get("retry-after", "")
                if response.status_code == 503 and retry.isdigit() and time.monotonic() < deadline:
                    response.read()
                    time.sleep(min(float(retry), 1.0, max(0.0, deadline - time.monotonic())))
                    continue
                if response.is_error:
                    raise CliError(_message(response.read()) or f"POST {path}: HTTP {response.status_code}")
                for line in response.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        yield json.loads(line[6:])
                return


def _message(body: bytes) -> str:
    try:
        error = json.loads(body).get("error", {})
        return str(error.get("message") if isinstance(error, dict) else error)
    except (ValueError, AttributeError):
        return body.decode(errors="replace")[:200]


def _client(args: argparse.Namespace, settings: Settings) -> Client:
    return Client(_base_url(args, settings), _key(settings))


# -- commands ------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from service.__main__ import main

    return main()


def cmd_pull(args: argparse.Namespace) -> int:
    settings = _settings()
    client = _client(args, settings)
    show = _Progress(sys.stderr)
    if client.up():
        body = {"model": args.model, **({"revision": args.revision} if args.revision else {})}
        for event in client.events("/v1/models/pull", body):
            if event.get("status") == "error":
                raise CliError(_message(json.dumps(event).encode()))
            if event.get("status") == "success":
                show.done()
                print(event["id"])
                return 0
            show(event)
        raise CliError("the server ended the pull without a result")
    from service.serving import hub

    model_id = hub.pull(hub.plan(args.model, args.revision), settings.models_dir, show)
    show.done()
    print(model_id)
    return 0


class _Progress:
    """A bar redrawn in place on a TTY; otherwise one line a file when it completes."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.last = ""

    def __call__(self, event: dict[str, Any]) -> None:
        file, done, total = event.get("file", ""), event.get("completed", 0), event.get("total", 0) or 1
        if self.tty:
            width = 30
            fill = int(width * done / total)
            rate = event.get("rate", 0) / 1e6
            self.stream.write(
                f"\rpulling {file} [{'#' * fill}{'.' * (width - fill)}] {done / 1e6:.1f}/{total / 1e6:.1f} MB"
                f" {rate:.1f} MB/s "
            )
            self.stream.flush()
        elif done >= total and file != self.last:
            self.stream.write(f"pulled {file} ({total} bytes)\n")
        if done >= total:
            self.last = file

    def done(self) -> None:
        if self.tty:
            self.stream.write("\n")


def cmd_ls(args: argparse.Namespace) -> int:
    settings = _settings()
    client = _client(args, settings)
    rows: list[tuple[str, ...]] = []
    if client.up():
        for card in client.json("GET", "/v1/models")["data"]:
            size = card.get("size_bytes")
            rows.append((card["id"], card.get("tier", ""), card.get("status", ""), _size(size)))
    else:
        for name, tier in settings.tiers.items():
            if tier.model_path:
                rows.append((f"{name}/{Path(tier.model_path).name}", name, "stopped", ""))
    listed = {row[0] for row in rows}
    from service.tiers.catalogue import scan  # what the server would list: sound models only, split sets once

    for model_id, entry in sorted(scan(os.path.expanduser(settings.models_dir)).items() if settings.models_dir else []):
        if model_id not in listed:
            rows.append((model_id, "", "on disk", _size(entry.size_bytes)))
    _table(("ID", "TIER", "STATUS", "SIZE"), rows)
    return 0


def _size(size: int | None) -> str:
    if not size:
        return ""
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size = size / 1000  # type: ignore[assignment]
    return ""


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def cmd_ps(args: argparse.Namespace) -> int:
    settings = _settings()
    client = _client(args, settings)
    if not client.up():
        raise CliError(f"no llmservice server answers at {client.url}")
    rows: list[tuple[str, ...]] = []
    for card in client.json("GET", "/v1/models")["data"]:
        if card.get("status") in ("loaded", "loading"):
            size = _size(card.get("size_bytes"))
            rows.append((card["id"], card.get("tier", ""), card["status"], size, card.get("device") or ""))
    _table(("ID", "TIER", "STATUS", "SIZE", "DEVICE"), rows)
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    settings = _settings()
    client = _client(args, settings)
    if client.up():
        client.json("DELETE", f"/v1/models/{args.model}")
    else:
        from service.serving import hub

        hub.remove(hub.model_files(settings.models_dir, args.model))
    print(f"deleted {args.model}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    settings = _settings()
    client = _client(args, settings)
    if not client.up():
        client = _start_server(args, settings)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    body = {"model": args.model, "stream": True, "messages": [{"role": "user", "content": prompt}]}
    for chunk in client.events("/v1/chat/completions", body, wait_load=_START_WAIT):
        if "error" in chunk:
            raise CliError(_message(json.dumps(chunk).encode()))
        for choice in chunk.get("choices", []):
            sys.stdout.write(choice.get("delta", {}).get("content") or "")
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _start_server(args: argparse.Namespace, settings: Settings) -> Client:
    """Start `llmservice serve` in the background (its log in llmservice.log) and wait for /health."""
    with Path("llmservice.log").open("ab") as log:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            [sys.executable, "-m", "service"], stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
        )
    print(f"started llmservice in the background (pid {process.pid}, log llmservice.log)", file=sys.stderr)
    deadline = time.monotonic() + _START_WAIT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise CliError(f"the server exited with code {process.returncode}; see llmservice.log")
        client = _client(args, settings)  # re-read .port: the server may have moved to a free port
        if client.up():
            return client
        time.sleep(0.25)
    raise CliError(f"the server did not answer /health within {_START_WAIT:.0f} s; see llmservice.log")


def cmd_config(args: argparse.Namespace) -> int:
    settings = _settings()
    print(json.dumps(_masked(msgspec.to_builtins(settings)), indent=2, sort_keys=True))
    return 0


def _masked(value: Any, name: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _masked(v, k) for k, v in value.items()}
    if value and isinstance(value, str) and any(word in name.lower() for word in _SECRET_WORDS):
        return "********"
    return value


# -- parsing -------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="llmservice",
        description="A local OpenAI/Anthropic-compatible model server. Settings come from .env.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--host", help="server host (default: HOST, or LLMSERVICE_URL)")
    common.add_argument("--port", type=int, help="server port (default: the running server's, or PORT)")
    commands = top.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, run: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        command = commands.add_parser(name, parents=[common], help=help, description=help)
        command.set_defaults(run=run)
        return command

    add("serve", cmd_serve, "Start the server (what start_service.sh runs)")
    pull = add("pull", cmd_pull, "Pull a model from the Hugging Face hub into MODELS_DIR")
    pull.add_argument("model", metavar="REPO[:QUANT]", help="e.g. Qwen/Qwen3-0.6B-GGUF:Q4_K_M, or repo:file.gguf")
    pull.add_argument("--revision", help="branch, tag or commit (default: main)")
    add("ls", cmd_ls, "List the tiers and the models in MODELS_DIR")
    add("ps", cmd_ps, "List the models loaded in the running server")
    rm = add("rm", cmd_rm, "Delete a pulled model from MODELS_DIR")
    rm.add_argument("model", metavar="ID")
    run = add("run", cmd_run, "Send a prompt to a model and stream the answer (starts a server if none runs)")
    run.add_argument("model", metavar="MODEL", help="a tier (light), a model id, or a catalogue id")
    run.add_argument("prompt", nargs="?", help="the prompt (default: read stdin)")
    add("config", cmd_config, "Print the effective settings (secrets masked)")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)  # usage errors exit 2
    try:
        result: int = args.run(args)
        return result
    except (CliError, LLMServiceError) as exc:
        print(f"llmservice: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"llmservice: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
