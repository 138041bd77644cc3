"""The embedding engine contract: neutral types, one small ABC, and the helpers built on it.

Engines implement `load`, `info`, `embed` (one forward pass for every requested output),
`count_tokens` and `decode_tokens`; the shared helpers do the request rules so every engine
behaves the same at the HTTP surface:

- `prepare()`: token-id inputs are decoded to text, empty strings are rejected where the model
  cannot embed them, outputs the model cannot produce are refused naming what it can produce,
  `dimensions` is range-checked;
- `embed_jobs()`: the micro-batcher's `run_batch`: one `embed` call for the union of outputs wanted
  by the coalesced requests;
- `finish()`: `dimensions` = truncate then L2-normalise, and usage.

Token ids are decoded with the model's *own* tokenizer (what OpenAI does for its models and what a
client that tokenised with our `/tokenize`-style tokenizer sends). LangChain's `OpenAIEmbeddings`
by default sends tiktoken `cl100k_base` ids instead: those decode to unrelated text here, so such
clients should set `check_embedding_ctx_length=False` (send text).

Embedders are not thread-safe (HF tokenizers raise "Already borrowed" and llama.cpp crashes when
two threads share one object): every call goes through one worker thread, and the helpers hold
`self.lock` so a reranker sharing the embedder (`tier:embedding`) cannot interleave with it.
"""

from __future__ import annotations

import abc
import copy
import json
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from kernel.errors import InvalidRequestError, ModelUnavailableError

Output = Literal["dense", "sparse", "colbert"]
OUTPUTS: tuple[Output, ...] = ("dense", "sparse", "colbert")
Vector = npt.NDArray[np.float32]
Matrix = npt.NDArray[np.float32]  # rows of vectors (ColBERT: one per token)


@dataclass(frozen=True, slots=True)
class EmbedderInfo:
    engine: str
    dimension: int
    max_tokens: int  # longer inputs are truncated to this many tokens (special tokens included)
    capabilities: frozenset[Output]
    embeds_empty: bool  # False: "" is rejected with a 400 instead of reaching the model
    device: str = "cpu"
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class EmbeddingOutput:
    """One text's embeddings; only the requested fields are set.

    `dense` is a float32 vector and `colbert` a float32 matrix, one row per token (`.tolist()` for
    JSON, `.tobytes()` for base64: kept as arrays so neither costs Python floats until encoded);
    `sparse` maps token-id strings to plain floats, JSON-safe.
    """

    tokens: int
    dense: Vector | None = None
    sparse: dict[str, float] | None = None
    colbert: Matrix | None = None


@dataclass(frozen=True, slots=True)
class EmbeddingJob:
    """One text and the outputs its request wants: the unit the micro-batcher coalesces.

    `ids`: the text's tokens (truncated, special tokens included) when the engine tokenises on the
    request side (`PreTokenizing`); the batcher then packs by their number."""

    text: str
    dense: bool = True
    sparse: bool = False
    colbert: bool = False
    ids: list[int] | None = None

    @property
    def cost(self) -> int:
        """Tokens this job adds to a padded batch; about 4 characters a token when not tokenised."""
        return len(self.ids) if self.ids is not None else len(self.text) // 4 + 2


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    inputs: Sequence[str] | Sequence[Sequence[int]]
    dense: bool = True
    sparse: bool = False
    colbert: bool = False
    dimensions: int | None = None


@dataclass(frozen=True, slots=True)
class EmbeddingBatch:
    outputs: list[EmbeddingOutput]
    prompt_tokens: int


class Embedder(abc.ABC):
    """A loaded embedding model. Call it from one worker thread (see the module docstring)."""

    name: str = "embedder"

    def __init__(self) -> None:
        self.lock = threading.RLock()

    @abc.abstractmethod
    def load(self) -> None:
        """Load weights; raise `ModelUnavailableError` with a clear message on failure."""

    @abc.abstractmethod
    def info(self) -> EmbedderInfo: ...

    @abc.abstractmethod
    def embed(
        self, texts: list[str], *, dense: bool = True, sparse: bool = False, colbert: bool = False
    ) -> list[EmbeddingOutput]:
        """Embed `texts` in one forward pass producing every requested output, in input order.

        Dense vectors are L2-normalised at full dimension; inputs past `max_tokens` are truncated."""

    @abc.abstractmethod
    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens per text as the model sees them (special tokens included, before truncation)."""

    @abc.abstractmethod
    def decode_tokens(self, ids: list[int]) -> str:
        """Turn token ids of this model's tokenizer back into text."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free the model's memory."""

    # -- helpers built on the core ------------------------------------------------------------

    def check_outputs(self, *, dense: bool, sparse: bool, colbert: bool) -> None:
        wanted = [o for o, on in zip(OUTPUTS, (dense, sparse, colbert), strict=True) if on]
        can = self.info().capabilities
        can_text = ", ".join(o for o in OUTPUTS if o in can)
        if not wanted:
            raise InvalidRequestError(
                f"No embedding output requested; this model can produce: {can_text}", param="embedding_type"
            )
        missing = [o for o in wanted if o not in can]
        if missing:
            raise InvalidRequestError(
                f"This model cannot produce {' or '.join(missing)} embeddings; it can produce: {can_text}",
                param="embedding_type",
            )

    def check_dimensions(self, dimensions: int | None) -> None:
        full = self.info().dimension
        if dimensions is not None and not 1 <= dimensions <= full:
            raise InvalidRequestError(
                f"dimensions must be between 1 and {full} for this model, got {dimensions}", param="dimensions"
            )

    def prepare(self, request: EmbeddingRequest) -> list[str]:
        """Validate a request and return its texts (token-id inputs decoded). Raises 400s."""
        self.check_outputs(dense=request.dense, sparse=request.sparse, colbert=request.colbert)
        self.check_dimensions(request.dimensions)
        if len(request.inputs) == 0:
            raise InvalidRequestError("input must not be empty", param="input")
        texts: list[str] = []
        for item in request.inputs:
            if isinstance(item, str):
                texts.append(item)
            elif not item:
                raise InvalidRequestError("input contains an empty list of token ids", param="input")
            else:
                # Only the tokenizer needs the model's lock: plain strings never wait for a forward pass.
                with self.lock:
                    texts.append(self.decode_tokens([int(t) for t in item]))
        if not self.info().embeds_empty and any(not t for t in texts):
            raise InvalidRequestError("input contains an empty string, which this model cannot embed", param="input")
        return texts

    def embed_jobs(self, jobs: list[EmbeddingJob]) -> list[EmbeddingOutput]:
        """Embed coalesced jobs in one pass (union of their outputs); each gets only what it asked."""
        dense = any(j.dense for j in jobs)
        sparse = any(j.sparse for j in jobs)
        colbert = any(j.colbert for j in jobs)
        with self.lock:
            if isinstance(self, PreTokenizing) and self.pretokenizes and all(j.ids is not None for j in jobs):
                ids = [j.ids for j in jobs if j.ids is not None]
                outputs = self.embed_tokens(ids, dense=dense, sparse=sparse, colbert=colbert)
            else:
                outputs = self.embed([j.text for j in jobs], dense=dense, sparse=sparse, colbert=colbert)
        return [
            replace(
                out,
                dense=out.dense if job.dense else None,
                sparse=out.sparse if job.sparse else None,
                colbert=out.colbert if job.colbert else None,
            )
            for job, out in zip(jobs, outputs, strict=True)
        ]

    def finish(self, outputs: list[EmbeddingOutput], dimensions: int | None = None) -> EmbeddingBatch:
        if dimensions is not None:
            outputs = [
                replace(o, dense=apply_dimensions(o.dense, dimensions)) if o.dense is not None else o for o in outputs
            ]
        return EmbeddingBatch(outputs, sum(o.tokens for o in outputs))

    def jobs(self, request: EmbeddingRequest, texts: list[str]) -> list[EmbeddingJob]:
        """The batcher's units for a prepared request, tokenised here when the engine allows it
        (`PreTokenizing`): the caller's thread pays for it, not the model's."""
        pre = isinstance(self, PreTokenizing) and self.pretokenizes
        ids = self.tokenize(texts) if isinstance(self, PreTokenizing) and pre else [None] * len(texts)
        return [
            EmbeddingJob(t, dense=request.dense, sparse=request.sparse, colbert=request.colbert, ids=i)
            for t, i in zip(texts, ids, strict=True)
        ]

    def embed_request(self, request: EmbeddingRequest) -> EmbeddingBatch:
        """prepare + embed + finish in one call, without a micro-batcher."""
        texts = self.prepare(request)
        outputs = self.embed_jobs(self.jobs(request, texts))
        return self.finish(outputs, request.dimensions)

    def check_configured_dimension(self, configured: int | None, actual: int, model: str) -> None:
        """EMBEDDING_DIMENSION, when set, must match the model: catch a wrong model at load."""
        if configured is not None and configured != actual:
            raise ModelUnavailableError(
                f"EMBEDDING_DIMENSION={configured} but the model {model} produces {actual}-dimensional "
                "embeddings; fix the setting or the model path"
            )


class PreTokenizing(abc.ABC):
    """An embedder whose tokenizer may run on request threads, beside the model's forward pass.

    `tokenize` must be safe to call from several threads at once and must not touch the tokenizer
    the model thread uses (HF tokenizers raise "Already borrowed" when shared): engines keep their
    own copy, configured once. Fast tokenizers release the GIL, so this overlaps with the model."""

    @property
    def pretokenizes(self) -> bool:
        """False where this loaded model must tokenise itself after all (a fallback path)."""
        return True

    @abc.abstractmethod
    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text as the model will see them: special tokens added, truncated."""

    @abc.abstractmethod
    def embed_tokens(
        self, ids: list[list[int]], *, dense: bool = True, sparse: bool = False, colbert: bool = False
    ) -> list[EmbeddingOutput]:
        """`embed` for texts already tokenised by `tokenize`."""


def request_tokenizer(tokenizer: Any, max_tokens: int) -> Any:
    """A private copy of a fast HF tokenizer's Rust backend that truncates to `max_tokens` and
    never pads: set up once, then only read, so request threads can share it."""
    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    backend.enable_truncation(max_tokens)
    backend.no_padding()
    return backend


def passes(lengths: Sequence[int], batch_size: int, max_tokens: int = 0) -> Iterator[list[int]]:
    """Forward passes over inputs of these token lengths, longest first, so rows of similar length
    share a pass and padding stays small: at most `batch_size` rows and, when `max_tokens` is set,
    at most that many padded tokens (rows x longest row; a longer input goes alone)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    start = 0
    while start < len(order):
        rows = batch_size if not max_tokens else min(batch_size, max(1, max_tokens // max(1, lengths[order[start]])))
        yield order[start : start + rows]
        start += rows


def padded_batches(
    ids: list[list[int]], batch_size: int, pad_id: int, max_tokens: int = 0
) -> Iterator[tuple[list[int], npt.NDArray[np.int64], npt.NDArray[np.int64]]]:
    """`passes` over tokenised texts: (indices into `ids`, input ids, mask) for each."""
    for chunk in passes([len(row) for row in ids], batch_size, max_tokens):
        yield chunk, *pad_batch([ids[i] for i in chunk], pad_id)


def pad_batch(ids: list[list[int]], pad_id: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Right-padded input ids and attention mask for one forward pass."""
    return pad_rows(ids, pad_id), pad_rows([[1] * len(row) for row in ids], 0)


def pad_rows(rows: Sequence[Sequence[int]], pad: int) -> npt.NDArray[np.int64]:
    """Rows of token-level values right-padded with `pad` to the longest."""
    out = np.full((len(rows), max(len(row) for row in rows)), pad, dtype=np.int64)
    for r, row in enumerate(rows):
        out[r, : len(row)] = row
    return out


def apply_dimensions(vector: Vector, dimensions: int) -> Vector:
    """OpenAI `dimensions`: keep the first `dimensions` values, then L2-normalise again."""
    cut = np.asarray(vector[:dimensions], dtype=np.float32)
    norm = float(np.linalg.norm(cut))
    return cut / norm if norm > 0 else cut


def l2_normalize(matrix: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """Row-wise L2 normalisation; zero rows stay zero."""
    arr = np.asarray(matrix, dtype=np.float32)
    norms = np.linalg.norm(arr, axis=-1, keepdims=True)
    out: npt.NDArray[np.float32] = np.divide(arr, norms, out=np.zeros_like(arr), where=norms > 0)
    return out


def hf_max_tokens(model_dir: str | Path, cap: int | None = None) -> int:
    """The longest input a Hugging Face model folder accepts, from its config files (no imports).

    RoBERTa-family position ids start after `pad_token_id`, so they lose two positions."""
    root = Path(model_dir)
    limits: list[int] = []
    config = _read_json(root / "config.json")
    positions = config.get("max_position_embeddings")
    if isinstance(positions, int) and positions > 0:
        roberta = str(config.get("model_type", "")).replace("_", "-") in ("roberta", "xlm-roberta", "camembert")
        limits.append(positions - 2 if roberta else positions)
    for name in ("tokenizer_config.json", "sentence_bert_config.json"):
        data = _read_json(root / name)
        for key in ("model_max_length", "max_seq_length"):
            value = data.get(key)
            if isinstance(value, int) and 0 < value < 1_000_000:  # HF writes 1e30 for "unset"
                limits.append(value)
    if cap is not None:
        limits.append(cap)
    return min(limits) if limits else 512


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def require_local_model(path: str, engine: str) -> str:
    """FlagEmbedding and sentence-transformers take a missing folder for a hub id and, offline,
    retry the network for ~46 s: fail at once unless it is a repo id and downloads are allowed."""
    if Path(path).exists():
        return path
    parts = path.split("/")
    repo_id = len(parts) == 2 and all(parts) and not path.startswith((".", "~", "/"))
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if repo_id and not offline:
        return path
    raise ModelUnavailableError(f"The {engine} model folder does not exist: {path}")
