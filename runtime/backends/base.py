"""What every backend is: a `BackendInfo` describing it and the `Backend` protocol the pipeline
drives. Backends import this module, never the pipeline."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Optional, Protocol, Sequence

from graphs.config import VARConfig

if TYPE_CHECKING:           # torch is imported where a tensor is made (ONNX Runtime starts before it)
    import torch


@dataclass(frozen=True)
class BackendInfo:
    name: str
    cfg: VARConfig
    k_max: int                 # TopK K the backend's sampler bakes in (0 = bisection)
    transform: str             # DSE transform
    kv_dtype: torch.dtype
    batch: Optional[int]       # None = any (eager); artifacts: the exported batch (static shapes)
    device: str = "cpu"        # where the pipeline keeps the KV cache and f_hat


class Backend(Protocol):
    info: BackendInfo
    source_note: str           # where the weights came from (written into PNGs and reports)

    def alloc_kv(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """The run's KV cache (L, depth, 2, 2B, H, hd). Backends that bind fixed addresses
        (TensorRT) return their own buffer; the others a fresh tensor on `info.device`."""

    def step(self, k: int, feeds: Dict[str, torch.Tensor], kv_out: torch.Tensor) -> Dict[str, torch.Tensor]:
        """One scale: the step graph's outputs; the new keys/values are written into kv_out."""

    def decode(self, f_hat: torch.Tensor) -> torch.Tensor:
        """f_hat (B Cv P P) -> images (B 3 H W) in [0, 1]."""


def fresh_kv(info: BackendInfo, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """The KV cache of a backend that does not pin addresses: allocated per run."""
    import torch
    return torch.empty(tuple(shape), dtype=dtype, device=info.device)
