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


# Padded tokens per forward pass on a CPU, per thread. With 2 threads, 32 MiniLM rows of ~27 tokens
# in one pass ran 1.25x slower on onnxruntime than passes of 64-256 tokens, and 1.15x slower on
# torch than 256-512 (the activations outgrow the caches); GPUs want full passes.
CPU_PASS_TOKENS_PER_THREAD = 128


def pass_tokens(device: str, n_threads: int) -> int:
    """Padded tokens a forward pass may hold (0: no limit but BATCH_SIZE rows)."""
    if device != "cpu":
        return 0
    import torch

    return CPU_PASS_TOKENS_PER_THREAD * (n_threads if n_threads > 0 else torch.get_num_threads())


def set_torch_threads(n_threads: int) -> None:
    """Honour N_THREADS for torch engines. torch's pool is process-wide: the last tier loaded wins."""
    if n_threads > 0:
        import torch

        torch.set_num_threads(n_threads)
