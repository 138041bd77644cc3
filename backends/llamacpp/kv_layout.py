"""How the llama.cpp engine lays out and sizes its KV cache, and what it then holds.

One pool of `KV_TOKENS` cells split into `MAX_BATCH` streams (llama.cpp's non-unified KV, as
llama-server's `-np N` without `-kvu`): each sequence attends over its own stream only, so a decode
step costs what each sequence's own length costs, not what the whole pool holds (a unified cache
builds one `n_tokens x n_kv` mask and attends over every used cell of the pool for every token).
The price: a prefix moves between sequences only by copying a whole stream (see `kv_slots`), and
llama.cpp evaluates only consecutive streams in one graph (see `LlamaCppBatch._order`).

Measured on this 2-core CPU (`bench/bench_kv_layout.py`, random 2-layer 32k-vocabulary GGUF, one
thread, prompts spread up to 1024 tokens; the machine is shared, so ±30%): a decode step with
16 sequences 14-20 ms in streams against 13-26 ms unified, 32: 38-68 against 51-100 ms,
64: 43-56 against 430-630 ms; with prompts up to 4096 tokens, 16: 30 against 51 ms, 32: 57
against 147 ms. The unified mask and attention span every sequence's cells, so they grow with
the pool; the streams' with the longest sequence.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import llama_cpp

from kernel.config import TierSettings

log = logging.getLogger(__name__)

KV_TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0, "q4_0": llama_cpp.GGML_TYPE_Q4_0}
# Bytes per element of each type: ggml's block sizes (q8_0: 34 bytes per 32, q4_0: 18 per 32).
_TYPE_BYTES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
FLASH_ATTN = {
    "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}
STREAM_ALIGN = 256  # llama.cpp pads each stream to a multiple of 256 cells
_HEADROOM = 0.9  # share of the free memory the KV may take by default (compute buffers need the rest)


def default_kv_tokens(tier: TierSettings, model: Any, slots: int, gpu_free: int | None) -> int:
    """`KV_TOKENS` when unset: `N_CTX` per sequence, lowered (and logged) to what fits the free
    memory of the device the KV lives on. The estimate counts every layer as full attention, so
    it errs high for sliding-window and recurrent models (their KV is smaller)."""
    wanted = tier.n_ctx * slots
    free = gpu_free if gpu_free is not None else _host_free(tier, model)
    per_token = kv_bytes_per_token(tier, model)
    if free is None or per_token <= 0 or wanted * per_token <= free * _HEADROOM:
        return wanted
    step = STREAM_ALIGN * slots
    fits = max(step, int(free * _HEADROOM / per_token) // step * step)
    if fits >= wanted:
        return wanted
    log.warning(
        "Tier %s: %d sequences x %d tokens of KV (%.1f GiB) do not fit the %.1f GiB free: the KV pool is %d tokens"
        " (%d per sequence); set %s_KV_TOKENS to choose",
        tier.name,
        slots,
        tier.n_ctx,
        wanted * per_token / 2**30,
        free / 2**30,
        fits,
        fits // slots,
        tier.name.upper(),
    )
    return fits


def kv_bytes_per_token(tier: TierSettings, model: Any) -> float:
    """An upper bound of one token's K and V over all layers, from the model's hyperparameters."""
    n_head = max(1, llama_cpp.llama_model_n_head(model))
    head = llama_cpp.llama_model_n_embd(model) // n_head
    arch = model_meta(model, "general.architecture") or ""
    k = _int(model_meta(model, f"{arch}.attention.key_length")) or head
    v = _int(model_meta(model, f"{arch}.attention.value_length")) or head
    per_layer = llama_cpp.llama_model_n_head_kv(model) * (
        k * _TYPE_BYTES[tier.kv_type_k] + v * _TYPE_BYTES[tier.kv_type_v]
    )
    return float(llama_cpp.llama_model_n_layer(model) * per_layer)


def _host_free(tier: TierSettings, model: Any) -> int | None:
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None
    # Mapped weights count as available page cache, yet every step reads them.
    return max(0, available - (int(llama_cpp.llama_model_size(model)) if tier.use_mmap else 0))


# -- what llama.cpp allocated ----------------------------------------------------------------

# llama.cpp states each cache it allocates, e.g. "llama_kv_cache: size =  144.00 MiB (  4096 cells, ...".
_SIZE_LINE = re.compile(r"^(?:llama_kv_cache|llama_memory_recurrent): size = +([0-9.]+) MiB")


class LlamaLog:
    """llama.cpp's log callback, forwarded to llama-cpp-python's, which can also collect the lines
    that one thread's llama.cpp calls print (the sizes of the caches a context allocates)."""

    def __init__(self) -> None:
        from llama_cpp import _logger  # its callback: prints what passes its logger's level

        self._forward = _logger.llama_log_callback
        self._local = threading.local()
        self._callback = llama_cpp.llama_log_callback(self._log)  # kept alive as long as we are

    def install(self) -> None:
        llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))

    def _log(self, level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines = getattr(self._local, "lines", None)
        if lines is not None:
            lines.append(text.decode("utf-8", errors="replace"))
        self._forward(level, text, user_data)

    @contextmanager
    def capture(self) -> Iterator[list[str]]:
        lines: list[str] = []
        self._local.lines = lines
        try:
            yield lines
        finally:
            self._local.lines = None


def kv_bytes(lines: list[str]) -> int | None:
    """Bytes of every KV/recurrent cache a context allocated, from llama.cpp's load log lines
    (to 0.01 MiB); None when it printed none."""
    sizes = [float(m.group(1)) for line in lines if (m := _SIZE_LINE.match(line.strip()))]
    return round(sum(sizes) * 2**20) if sizes else None


def model_meta(model: Any, key: str) -> str | None:
    """A GGUF metadata value of a loaded model, None if absent."""
    size = 1 << 16
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_model_meta_val_str(model, key.encode("utf-8"), buf, size)
    if n < 0:
        return None
    if n >= size:
        buf = ctypes.create_string_buffer(n + 1)
        llama_cpp.llama_model_meta_val_str(model, key.encode("utf-8"), buf, n + 1)
    return buf.value.decode("utf-8", errors="replace")


def _int(text: str | None) -> int:
    try:
        return int(text) if text is not None else 0
    except ValueError:
        return 0
