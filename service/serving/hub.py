"""Pulling models from the Hugging Face hub into MODELS_DIR (`POST /v1/models/pull`, `llmservice pull`).

`repo:Q4_K_M` picks the one GGUF file (or split set) of that quantisation, `repo:file.gguf` one file,
and a repo without GGUFs (MLX, safetensors) is pulled whole into MODELS_DIR/<repo name>. The listing
comes from huggingface_hub (HF_ENDPOINT, HF_TOKEN); the download is ours, because hf_hub_download
at the locked version neither verifies the sha256 nor writes outside its cache layout atomically:
each file goes to a `.partial` beside its target, continues from there with a Range request after a
cut, is checked against the hub's sha256 (LFS) or git blob id, and only then is renamed into place.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from kernel.errors import InvalidRequestError, NotFoundError, PermissionDeniedError, UpstreamError

DEFAULT_ENDPOINT = "https://huggingface.co"
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
_CHUNK = 1 << 20
_PARTIAL = ".partial"

Progress = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class RemoteFile:
    path: str  # inside the repo
    size: int
    sha256: str | None  # LFS files
    blob_id: str  # git blob sha1, checked when there is no sha256


@dataclass(frozen=True)
class Plan:
    repo: str
    revision: str
    files: list[RemoteFile]
    id: str  # the catalogue id: GGUF name without .gguf (split suffix dropped), or the repo's name
    folder: bool  # a whole repo into MODELS_DIR/<id>/

    def target(self, base: Path, file: RemoteFile) -> Path:
        """Where `file` goes: under `base`, the folder being filled, or MODELS_DIR for a GGUF."""
        return base / file.path if self.folder else base / Path(file.path).name


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or DEFAULT_ENDPOINT


def _token() -> str | None:
    return os.environ.get("HF_TOKEN") or None


def parse_spec(spec: str) -> tuple[str, str | None]:
    """`owner/name[:quant or file]` -> (repo, selector); repo ids that could leave MODELS_DIR are refused."""
    repo, _, selector = spec.strip().partition(":")
    if not _REPO.match(repo) or ".." in repo:
        raise InvalidRequestError(f"Not a hub repo id: {repo!r} (expected owner/name)", param="model")
    if selector and (".." in selector or selector.startswith("/") or "\\" in selector):
        raise InvalidRequestError(f"Not a quantisation or file name: {selector!r}", param="model")
    return repo, selector or None


def safe_name(name: str, param: str = "model") -> str:
    """A plain file or folder name directly inside MODELS_DIR."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith(".") or "\0" in name:
        raise PermissionDeniedError(f"{name!r} would leave MODELS_DIR", param=param)
    return name


def root_dir(models_dir: str) -> Path:
    if not models_dir:
        raise InvalidRequestError("Pulling models is disabled: set MODELS_DIR to the folder they go to", param="model")
    root = Path(os.path.abspath(Path(models_dir).expanduser()))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _inside(root: Path, path: Path) -> Path:
    """`path` with no symlink anywhere below `root` and no way out of it."""
    relative = path.relative_to(root)
    current = root
    for part in relative.parts:
        if part in ("", ".", ".."):
            raise PermissionDeniedError(f"{relative} would leave MODELS_DIR", param="model")
        current = current / part
        if current.is_symlink():
            raise PermissionDeniedError(f"{relative} goes through a symlink in MODELS_DIR", param="model")
    return path


def _list(repo: str, revision: str) -> list[RemoteFile]:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.hf_api import RepoFile

    api = HfApi(endpoint=endpoint(), token=_token())
    try:
        entries = list(api.list_repo_tree(repo, revision=revision, recursive=True))
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        if status in (401, 404):
            raise NotFoundError(f"No such repo or revision on the hub: {repo}@{revision}", param="model") from exc
        raise UpstreamError(f"The hub answered {status} listing {repo}") from exc
    except (httpx.HTTPError, OSError) as exc:
        raise UpstreamError(f"The hub at {endpoint()} cannot be reached: {exc}") from exc
    return [
        RemoteFile(e.path, e.size, e.lfs.sha256 if e.lfs else None, e.blob_id)
        for e in entries
        if isinstance(e, RepoFile)
    ]


def catalogue_id(name: str) -> str:
    return _SPLIT.sub("", name) if _SPLIT.search(name) else name[: -len(".gguf")]


def _quant_matches(name: str, quant: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(quant)}(?=[-.])", name, re.IGNORECASE) is not None


def plan(spec: str, revision: str | None = None) -> Plan:
    repo, selector = parse_spec(spec)
    revision = revision or "main"
    files = _list(repo, revision)
    ggufs = [f for f in files if f.path.lower().endswith(".gguf") and "mmproj" not in Path(f.path).name.lower()]
    if selector and selector.lower().endswith(".gguf"):
        chosen = [f for f in files if selector in (f.path, Path(f.path).name)]
        if not chosen:
            raise NotFoundError(f"{repo} has no file {selector}", param="model")
        name = Path(chosen[0].path).name
        if _SPLIT.search(name):  # a named part of a split set brings the whole set
            chosen = [f for f in ggufs if catalogue_id(Path(f.path).name) == catalogue_id(name)]
    elif ggufs:
        groups: dict[str, list[RemoteFile]] = {}
        for f in ggufs:
            groups.setdefault(catalogue_id(Path(f.path).name), []).append(f)
        if selector:
            keys = [k for k in groups if _quant_matches(k + ".gguf", selector)]
        else:
            keys = list(groups) if len(groups) == 1 else [k for k in groups if _quant_matches(k + ".gguf", "Q4_K_M")]
        if len(keys) != 1:
            raise InvalidRequestError(
                f"{repo}{':' + selector if selector else ''} matches {len(keys)} GGUF models; name one: "
                + ", ".join(sorted(groups)),
                param="model",
            )
        chosen = sorted(groups[keys[0]], key=lambda f: f.path)
    elif selector:
        raise NotFoundError(f"{repo} has no GGUF file matching {selector}", param="model")
    else:
        name = safe_name(repo.split("/")[1])
        return Plan(repo, revision, files, name, folder=True)
    return Plan(repo, revision, chosen, safe_name(catalogue_id(Path(chosen[0].path).name)), folder=False)


def _free_bytes(root: Path) -> int:
    return shutil.disk_usage(root).free


def _partial(path: Path) -> Path:
    return path.with_name(path.name + _PARTIAL)


def _hasher(file: RemoteFile) -> Any:
    if file.sha256:
        return hashlib.sha256()
    blob = hashlib.sha1(usedforsecurity=False)
    blob.update(b"blob %d\0" % file.size)  # git's blob id: sha1 over a header and the content
    return blob


class PullStopped(Exception):
    """The pull was stopped (its client went away); what was downloaded stays, to be resumed."""


def pull(plan: Plan, models_dir: str, progress: Progress, stop: threading.Event | None = None) -> str:
    """Download `plan` into MODELS_DIR (blocking: run it in a thread); returns the catalogue id.
    `stop` set: the download ends at its next chunk, raising PullStopped (the `.partial` file stays)."""
    root = root_dir(models_dir)
    final, staging, base = root / plan.id, root / f".{plan.id}{_PARTIAL}", root
    if plan.folder:  # a new folder is filled under a hidden name and renamed whole: never half a repo
        base = _inside(root, final) if final.exists() else _inside(root, staging)
    targets = [(f, _inside(root, plan.target(base, f))) for f in plan.files]
    missing = sum(f.size - (_partial(t).stat().st_size if _partial(t).exists() else 0) for f, t in targets)
    missing -= sum(f.size for f, t in targets if t.exists() and t.stat().st_size == f.size)
    free = _free_bytes(root)
    if missing > free:
        raise InvalidRequestError(
            f"{plan.repo} needs {missing / 1e9:.2f} GB more and MODELS_DIR has {free / 1e9:.2f} GB free",
            param="model",
            code="insufficient_storage",
        )
    headers = {"Authorization": f"Bearer {_token()}"} if _token() else {}
    with httpx.Client(headers=headers, follow_redirects=True, timeout=httpx.Timeout(30.0, read=300.0)) as client:
        for file, target in targets:
            if target.exists() and target.stat().st_size == file.size:
                progress({"status": "downloading", "file": file.path, "completed": file.size, "total": file.size})
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            _download(client, plan, file, target, progress, stop)
    if plan.folder and base == staging:
        os.replace(staging, final)
    return plan.id


def _download(
    client: httpx.Client, plan: Plan, file: RemoteFile, target: Path, progress: Progress, stop: threading.Event | None
) -> None:
    url = f"{endpoint()}/{plan.repo}/resolve/{quote(plan.revision, safe='')}/{quote(file.path)}"
    partial = _partial(target)
    digest = _hasher(file)
    for attempt in range(3):  # a cut connection continues from the partial file
        done = partial.stat().st_size if partial.exists() else 0
        if done > file.size:
            partial.unlink()
            done = 0
        digest = _hasher(file)
        if done:
            with partial.open("rb") as existing:
                while chunk := existing.read(_CHUNK):
                    digest.update(chunk)
        if done == file.size:
            break
        started, at_start = time.monotonic(), done
        try:
            with client.stream("GET", url, headers={"Range": f"bytes={done}-"} if done else {}) as response:
                if response.status_code == 404:
                    raise NotFoundError(f"The hub has no {file.path} in {plan.repo}@{plan.revision}", param="model")
                if response.status_code not in (200, 206):
                    raise UpstreamError(f"The hub answered {response.status_code} for {file.path}")
                if response.status_code == 200 and done:  # the server ignored the Range: start over
                    done, digest = 0, _hasher(file)
                with partial.open("ab" if done else "wb") as out:
                    for chunk in response.iter_bytes():
                        if stop is not None and stop.is_set():
                            raise PullStopped(f"Pull of {plan.repo} stopped at {done} bytes of {file.path}")
                        out.write(chunk)
                        digest.update(chunk)
                        done += len(chunk)
                        rate = (done - at_start) / max(time.monotonic() - started, 1e-6)
                        progress(
                            {
                                "status": "downloading",
                                "file": file.path,
                                "completed": done,
                                "total": file.size,
                                "rate": round(rate),
                            }
                        )
            if done >= file.size:
                break
        except (httpx.TransportError, httpx.RemoteProtocolError) as exc:
            if attempt == 2:
                raise UpstreamError(f"Download of {file.path} failed: {exc}; pull again to resume") from exc
    expected = file.sha256 or file.blob_id
    if (partial.stat().st_size if partial.exists() else 0) != file.size or digest.hexdigest() != expected:
        partial.unlink(missing_ok=True)
        raise UpstreamError(
            f"{file.path} from {plan.repo} does not match the hub's checksum; nothing was kept",
            code="checksum_mismatch",
        )
    os.replace(partial, target)  # atomic: the name only ever holds a whole, verified file


def model_files(models_dir: str, model_id: str) -> list[Path]:
    """What catalogue id `model_id` names in MODELS_DIR: a GGUF, a split set's parts, or a folder."""
    root = root_dir(models_dir)
    name = safe_name(model_id)
    found = [root / f"{name}.gguf"] if (root / f"{name}.gguf").is_file() else []
    found += sorted(p for p in root.glob(f"{glob_escape(name)}-*-of-*.gguf") if catalogue_id(p.name) == name)
    if (root / name).is_dir():
        found.append(root / name)
    for path in found:
        _inside(root, path)
    if not found:
        raise NotFoundError(f"No model {model_id!r} in MODELS_DIR", param="model", code="model_not_found")
    return found


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def remove(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
