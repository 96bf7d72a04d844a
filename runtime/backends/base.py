"""What every backend is: a `BackendInfo` describing it and the `Backend` protocol the pipeline
drives. Backends import this module, never the pipeline.

The pipeline's host side is numpy: the feeds it makes (noise, per-row tunables, the first
f_hat and prior, forced tokens, Gumbel noise) are numpy arrays; a step's outputs are the
backend's own arrays (numpy on the CPU, device tensors on a GPU) and are fed back as they are;
`host` copies what a result keeps to numpy."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Protocol, Sequence

import numpy as np

from var_ssg.graphs.config import VARConfig


@dataclass(frozen=True)
class BackendInfo:
    name: str
    cfg: VARConfig
    k_max: int                 # TopK K the backend's sampler bakes in (0 = bisection)
    transform: str             # DSE transform
    kv_dtype: str              # the KV cache's dtype name (contract.dtypes.DTYPE_NAMES)
    batch: Optional[int]       # None = any (eager); artifacts: the exported batch (static shapes)
    device: str = "cpu"        # where the backend keeps the KV cache and f_hat


@dataclass(frozen=True)
class InfinityInfo:
    """An Infinity backend (runtime.infinity drives it): encode(text feeds), step(sched, k, feeds,
    kv_out), decode(summed), alloc_kv(shape), host(x)."""
    name: str
    cfg: Any                   # graphs.infinity_config.InfinityConfig
    transform: str
    batch: Optional[int]       # None: any (eager)
    device: str = "cpu"


class Backend(Protocol):
    info: BackendInfo
    source_note: str           # where the weights came from (written into PNGs and reports)

    def alloc_kv(self, shape: Sequence[int], dtype: str) -> Any:
        """The run's KV cache (L, depth, 2, 2B, H, hd). Backends that bind fixed addresses
        (TensorRT) return their own buffer; the others a fresh array on `info.device`."""

    def step(self, k: int, feeds: Dict[str, Any], kv_out: Any) -> Dict[str, Any]:
        """One scale: the step graph's outputs; the new keys/values are written into kv_out.
        Feeds are numpy arrays or this backend's own outputs."""

    def decode(self, f_hat: Any) -> Any:
        """f_hat (B Cv P P) -> images (B 3 H W) in [0, 1]."""

    def host(self, x: Any) -> np.ndarray:
        """One of this backend's arrays on the host, as numpy."""

    def zeros(self, shape: Sequence[int]) -> Any:
        """A float32 zero feed where this backend computes (no host-to-device copy of zeros)."""


def torch_host(x) -> np.ndarray:
    """A torch tensor (or a numpy array) on the host, as numpy: the torch backends' `host`."""
    if isinstance(x, np.ndarray):
        return x
    return x.detach().cpu().numpy()


def to_torch(x, device):
    """A feed for a torch backend: numpy arrays become tensors on `device` (a CPU tensor shares
    the array's memory); tensors move to `device` if they are elsewhere."""
    import torch
    t = torch.from_numpy(x) if isinstance(x, np.ndarray) else x
    return t.to(device)
