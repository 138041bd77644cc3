"""State and load steps shared by the torch engines (BGE-M3, sentence-transformers, cross-encoder,
FlagReranker). A mixin beside the family ABC, so embedders and rerankers use the same code:

    class BgeM3Embedder(TorchEngine[EmbedderInfo], Embedder): ...
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from embedders.base import require_local_model
from embedders.options import pass_tokens, set_torch_threads, torch_device
from kernel.errors import ModelUnavailableError

if TYPE_CHECKING:
    from kernel.config import TierSettings

InfoT = TypeVar("InfoT")


class TorchEngine(Generic[InfoT]):
    """A torch model for one tier: <TIER>_DEVICE, <TIER>_BATCH_SIZE, the loaded model and its info."""

    model_kind: ClassVar[str]  # "embedding" or "reranker": names the model in the not-loaded error

    def __init__(self, tier: TierSettings, model_path: str) -> None:
        super().__init__()  # the family ABC's own state (the embedder lock)
        self.tier = tier
        self.model_path = model_path
        self._device = torch_device(tier)
        self._batch_size = tier.batch_size
        self._pass_tokens = 0  # padded tokens per forward pass, set at load (embedders.options)
        self._model: Any = None
        self._info: InfoT | None = None

    def _begin_load(self, engine: str) -> str:
        """The model folder, checked before the library sees it (it takes a missing path for a hub
        download), with N_THREADS applied to torch."""
        path = require_local_model(self.model_path, engine)
        set_torch_threads(self.tier.n_threads)
        self._pass_tokens = pass_tokens(self._device, self.tier.n_threads)
        return path

    def info(self) -> InfoT:
        if self._info is None:
            raise ModelUnavailableError(f"The {self.model_kind} model is not loaded")
        return self._info

    def close(self) -> None:
        self._model = None
        self._info = None
