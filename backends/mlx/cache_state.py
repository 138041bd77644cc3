"""An mlx-lm prompt cache as a value the prompt cache tiers (`backends.prompt_cache`) can hold.

`snapshot` takes a sequence's cache (a list of per-layer caches) as its classes and the leaves of
their `state` (arrays, made contiguous and evaluated on the decode thread, plus the ints that go
with them); `restore` builds fresh cache objects from one. The arrays are shared, never written:
mlx-lm writes into a cache's arrays in place, so `restore` hands out new array objects.
`MlxStateCodec` writes a snapshot as one JSON layout blob and one blob per array (raw bytes, any
dtype, bfloat16 included) on the writer thread, and reads it back.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import cache as mlx_cache
from mlx_lm.models.cache import can_trim_prompt_cache

log = logging.getLogger(__name__)
LAYOUT_VERSION = 1
_SCALARS = (bool, int, float, str)


@dataclass(frozen=True, slots=True)
class MlxState:
    """The per-layer cache classes and the flattened leaves of their states."""

    classes: tuple[str, ...]
    leaves: tuple[tuple[str, Any], ...]  # (tree path, mx.array | int | float | bool | str | None)

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for _, v in self.leaves if isinstance(v, mx.array))


def snapshot(cache: list[Any]) -> MlxState | None:
    """`cache` as an `MlxState`; None (said in a debug log) when it cannot stand in for its prefixes
    (a sliding-window cache past its window cannot be trimmed) or has a state we cannot write."""
    if not can_trim_prompt_cache(cache):
        log.debug("Prompt cache: skipping an MLX cache that cannot be trimmed (a sliding window past its size)")
        return None
    classes = tuple(type(c).__name__ for c in cache)
    if not all(isinstance(getattr(mlx_cache, name, None), type) for name in classes):
        log.debug("Prompt cache: skipping an MLX cache of classes %s", sorted(set(classes)))
        return None
    leaves = []
    flat = tree_flatten([_trimmed_state(c) for c in cache])
    assert isinstance(flat, list)  # a list of (path, leaf) unless a destination dict is given
    for path, value in flat:
        if isinstance(value, mx.array):
            value = mx.contiguous(value)
        elif value is not None and not isinstance(value, _SCALARS):
            log.debug("Prompt cache: skipping an MLX cache with a %s in its state", type(value).__name__)
            return None
        leaves.append((path, value))
    mx.eval([v for _, v in leaves if isinstance(v, mx.array)])
    return MlxState(classes, tuple(leaves))


def _trimmed_state(layer: Any) -> Any:
    """The layer's state, a plain KV cache's arrays cut to the tokens it holds (they are allocated
    in steps of 256)."""
    if type(layer) is mlx_cache.KVCache and layer.keys is not None:
        keys, values, offset = layer.state
        return keys[..., :offset, :], values[..., :offset, :], offset
    return layer.state


def restore(state: MlxState) -> list[Any]:
    """Fresh cache objects holding `state` (new array objects over the shared buffers)."""
    leaves = [(path, mx.array(v) if isinstance(v, mx.array) else v) for path, v in state.leaves]
    states = tree_unflatten(leaves)
    return [getattr(mlx_cache, name).from_state(layer) for name, layer in zip(state.classes, states, strict=True)]


class MlxStateCodec:
    """`MlxState` <-> blobs: a JSON layout (classes, and per leaf its path and either a scalar or an
    array's dtype and shape), then the arrays' bytes in order."""

    def nbytes(self, state: MlxState) -> int:
        return state.nbytes

    def dump(self, state: MlxState) -> list[bytes]:
        arrays: list[bytes] = []
        leaves: list[dict[str, Any]] = []
        for path, value in state.leaves:
            if isinstance(value, mx.array):
                # The snapshot's arrays are evaluated and contiguous: their buffers are read as they are.
                arrays.append(memoryview(value).tobytes())  # type: ignore[arg-type]  # mx.array is a buffer
                leaves.append({"path": path, "dtype": str(value.dtype).rsplit(".", 1)[-1], "shape": value.shape})
            else:
                leaves.append({"path": path, "value": value})
        layout = {"version": LAYOUT_VERSION, "classes": state.classes, "leaves": leaves}
        return [json.dumps(layout).encode(), *arrays]

    def load(self, blobs: list[bytes]) -> MlxState:
        layout = json.loads(blobs[0])
        if not isinstance(layout, dict) or layout.get("version") != LAYOUT_VERSION:
            raise ValueError("another MLX cache layout")
        classes = tuple(str(c) for c in layout["classes"])
        if not all(isinstance(getattr(mlx_cache, name, None), type) for name in classes):
            raise ValueError(f"unknown MLX cache classes {classes}")
        arrays = iter(blobs[1:])
        leaves: list[tuple[str, Any]] = []
        for leaf in layout["leaves"]:
            if "dtype" not in leaf:
                leaves.append((str(leaf["path"]), leaf["value"]))
                continue
            dtype = getattr(mx, str(leaf["dtype"]), None)
            if not isinstance(dtype, mx.Dtype):
                raise ValueError(f"unknown dtype {leaf['dtype']!r}")
            shape = tuple(int(n) for n in leaf["shape"])
            raw = np.frombuffer(next(arrays), dtype=np.uint8)
            if raw.size != int(np.prod(shape, dtype=np.int64)) * dtype.size:
                raise ValueError(f"{raw.size} bytes for a {leaf['dtype']} array of shape {shape}")
            leaves.append((str(leaf["path"]), mx.array(raw).view(dtype).reshape(shape)))
        if next(arrays, None) is not None:
            raise ValueError("more arrays than the layout names")
        return MlxState(classes, tuple(leaves))
