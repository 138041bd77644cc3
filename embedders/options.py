"""Engine options that need more than the typed settings give: the torch device and thread count."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kernel.config import TierSettings


def torch_device(tier: TierSettings) -> str:
    """<TIER>_DEVICE; `auto` picks the best device present: cuda, then mps, then cpu."""
    if tier.device != "auto":
        return tier.device
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def set_torch_threads(n_threads: int) -> None:
    """Honour N_THREADS for torch engines. torch's pool is process-wide: the last tier loaded wins."""
    if n_threads > 0:
        import torch

        torch.set_num_threads(n_threads)
