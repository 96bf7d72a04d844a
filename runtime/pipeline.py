"""The K-scale loop over any backend, with one preallocated KV cache per run.

    noise  = one seeded host generator, u_k (B x n_k) drawn in scale order (shared by backends)
    cache  = empty(L, depth, 2, 2B, H, hd)            allocated once per run (or owned by the
                                                       backend: TensorRT keeps its addresses fixed)
    for k: feeds = the step graph's (graphs.components.STEP_FEEDS): past_kv = cache[:L_k] (a
                   contiguous prefix view); k = 0: empty past, one zero prior row, beta 0
           outs  = backend.step(k, feeds, kv_out=cache[L_k:L_k+n_k])  (written in place / one copy)
    image  = backend.decode(f_hat)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from graphs.config import ConfigError, SamplerConfig, SSGConfig, VARConfig, check_guidance
from graphs.unified import prev_rows

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    images: torch.Tensor                    # B 3 H W in [0, 1]
    tokens: List[torch.Tensor]              # K x (B, n_k) int64
    logits: List[torch.Tensor] = field(default_factory=list)      # after CFG + SSG (on request)
    logits_cfg: List[torch.Tensor] = field(default_factory=list)  # after CFG only (on request)


@dataclass(frozen=True)
class BackendInfo:
    name: str
    cfg: VARConfig
    k_max: int                 # TopK K the backend's sampler bakes in (0 = bisection)
    transform: str             # DSE transform
    kv_dtype: torch.dtype
    batch: Optional[int]       # None = any (eager); artifacts: the exported batch (static shapes)
    device: str = "cpu"        # where the pipeline keeps the KV cache and f_hat


def draw_noise(seed: int, batch: int, patch_nums: Sequence[int]) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(int(seed))
    return [torch.rand(batch, p * p, generator=g) for p in patch_nums]


def check_classes(classes: Sequence[int], num_classes: int) -> List[int]:
    out = []
    for c in classes:
        if int(c) != c or not 0 <= int(c) < num_classes:
            raise ConfigError(f"class id {c} is outside 0..{num_classes - 1}")
        out.append(int(c))
    if not out:
        raise ConfigError("give at least one class id")
    return out


class Pipeline:
    def __init__(self, backend):
        self.backend = backend
        self.info: BackendInfo = backend.info

    def check(self, batch: int, sampler: SamplerConfig, ssg: SSGConfig) -> None:
        info = self.info
        if info.batch is not None and batch != info.batch:
            raise ConfigError(f"batch {batch} does not match the artifacts, exported for batch {info.batch}: "
                              f"give {info.batch} class ids, or re-export with --batch {batch}")
        if ssg.transform != info.transform:
            raise ConfigError(f"--dse {ssg.transform} but the artifacts bake DSE transform {info.transform}: "
                              f"use --dse {info.transform} or re-export with --dse {ssg.transform}")
        V = info.cfg.V
        want_all = sampler.top_k == 0 or sampler.top_k >= V
        if want_all:
            if 0 < info.k_max < V:
                raise ConfigError(f"--top-k {sampler.top_k} (no top-k) but the artifacts bake top-k {info.k_max}: "
                                  f"use --top-k <= {info.k_max} or re-export with --top-k 0")
        elif info.k_max == 0:
            raise ConfigError(f"these artifacts sample without top-k (bisection sampler); --top-k {sampler.top_k} "
                              f"needs artifacts exported with --top-k {sampler.top_k} or more")
        elif sampler.top_k > info.k_max:
            raise ConfigError(f"--top-k {sampler.top_k} exceeds the top-k of {info.k_max} baked into the artifacts: "
                              f"use --top-k <= {info.k_max} or re-export with a larger --top-k")
        if len(ssg.betas) != info.cfg.num_scales - 1:
            raise ConfigError(f"SSG schedule has {len(ssg.betas)} values, expected {info.cfg.num_scales - 1}")

    def run(self, classes: Sequence[int], seed: int, guidance: float = 1.5,
            sampler: SamplerConfig = SamplerConfig(), ssg: Optional[SSGConfig] = None,
            keep_logits: bool = False, progress: Optional[Callable[[int], None]] = None) -> RunResult:
        info = self.info
        mc = info.cfg
        labels = torch.tensor(check_classes(classes, mc.num_classes), dtype=torch.int64)
        check_guidance(guidance)
        if ssg is None:
            ssg = SSGConfig(betas=(0.0,) * (mc.num_scales - 1), transform=info.transform)
        B = labels.shape[0]
        self.check(B, sampler, ssg)
        dev = info.device
        noise = [u.to(dev) for u in draw_noise(seed, B, mc.patch_nums)]
        shape = (mc.L, mc.depth, 2, 2 * B, mc.num_heads, mc.head_dim)
        alloc_kv = getattr(self.backend, "alloc_kv", None)      # backends that bind fixed addresses own it
        kv = alloc_kv(shape, info.kv_dtype) if alloc_kv else torch.empty(shape, dtype=info.kv_dtype, device=dev)
        f_hat = torch.zeros(B, mc.Cvae, mc.patch_nums[-1], mc.patch_nums[-1], device=dev)
        labels = labels.to(dev)
        top_k = sampler.top_k if 0 < sampler.top_k < mc.V else max(info.k_max, 1)
        scalars = dict(guidance=torch.tensor([guidance], dtype=torch.float32, device=dev),
                       temperature=torch.tensor([sampler.temperature], dtype=torch.float32, device=dev),
                       top_k=torch.tensor([top_k], dtype=torch.int64, device=dev),
                       top_p=torch.tensor([sampler.top_p_threshold], dtype=torch.float32, device=dev))
        res = RunResult(images=torch.empty(0), tokens=[])
        prev = torch.zeros(B, prev_rows(mc, 0), mc.V, device=dev)      # scale 0: one zero prior row
        for k, (b, e) in enumerate(mc.begin_ends):
            feeds: Dict[str, torch.Tensor] = dict(
                label=labels, f_hat=f_hat, noise=noise[k], **scalars,
                beta=torch.tensor([ssg.beta(k)], dtype=torch.float32, device=dev), past_kv=kv[:b], prev_logits=prev)
            out = self.backend.step(k, feeds, kv[b:e])
            f_hat, prev = out["f_hat_out"], out["logits_cfg"]
            res.tokens.append(out["tokens"])
            if keep_logits:
                res.logits.append(out["logits"])
                res.logits_cfg.append(out["logits_cfg"])
            if progress:
                progress(k)
        res.images = self.backend.decode(f_hat)
        return res


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """B 3 H W in [0, 1] -> B H W 3 uint8."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: torch.Tensor, path: str, note: str = "") -> None:
    """Save a PNG grid (one row, up to 8 per row) atomically; `note` goes into a tEXt chunk."""
    import os
    from PIL import Image, PngImagePlugin
    arr = to_uint8(images)
    B, H, W, _ = arr.shape
    cols = min(B, 8)
    rows = (B + cols - 1) // cols
    grid = np.zeros((rows * H, cols * W, 3), dtype=np.uint8)
    for i in range(B):
        r, c = divmod(i, cols)
        grid[r * H:(r + 1) * H, c * W:(c + 1) * W] = arr[i]
    meta = PngImagePlugin.PngInfo()
    if note:
        meta.add_text("var-ssg", note)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        Image.fromarray(grid).save(tmp, format="PNG", pnginfo=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
