"""The speed floor of one image batch: max(FLOPs / peak rate, weight bytes read / bandwidth),
summed over the K scales (each scale is one pass that reads every transformer weight once).

FLOPs count multiply-adds as 2 and cover the matrix products (projections, attention, FFN,
AdaLN, head, the DSE prior); element-wise work, the sampler and the decoder are left out.
`choose_floor` is the one place that picks the peaks (given, or a known GPU's data sheet) and
the bytes per weight for a precision; bench and the GPU check both use it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

from var_ssg.graphs.config import VARConfig

# dense (no sparsity) peak rates and memory bandwidth from the vendors' data sheets
GPU_PEAKS: Dict[str, Dict[str, float]] = {
    "H200": dict(fp32=67e12, tf32=495e12, fp16=989e12, bandwidth=4.8e12),
    "H100": dict(fp32=67e12, tf32=495e12, fp16=989e12, bandwidth=3.35e12),
    "A100": dict(fp32=19.5e12, tf32=156e12, fp16=312e12, bandwidth=2.0e12),
    "L4": dict(fp32=30.3e12, tf32=60e12, fp16=121e12, bandwidth=0.3e12),
}


def step_flops(cfg: VARConfig, k: int, batch: int) -> float:
    """FLOPs of scale k for `batch` images (2*batch rows through the transformer, for CFG)."""
    C, V, D = cfg.width, cfg.V, cfg.depth
    b, e = cfg.begin_ends[k]
    n, rows = e - b, 2 * batch
    hidden = round(C * cfg.mlp_ratio)
    per_block = (2 * n * C * 3 * C          # qkv
                 + 2 * 2 * n * e * C         # q k^T and attn v over past + this scale
                 + 2 * n * C * C             # proj
                 + 2 * 2 * n * C * hidden    # fc1, fc2
                 + (0 if cfg.shared_aln else 2 * C * 6 * C))   # AdaLN modulation (once per row)
    shared = 2 * C * 6 * C if cfg.shared_aln else 0                  # var-d36: one AdaLN for all blocks
    flops = rows * (D * per_block + shared + 2 * n * C * V + 2 * C * 2 * C)    # + head, head AdaLN
    flops += rows * 2 * cfg.Cvae * C * n if k else 0                  # word_embed
    if k:
        flops += batch * 2 * n * cfg.patch_nums[k - 1] ** 2 * V       # DSE prior (folded matrix)
    return float(flops)


def transformer_bytes(cfg: VARConfig, bytes_per_param: int) -> float:
    C, D = cfg.width, cfg.depth
    hidden = round(C * cfg.mlp_ratio)
    ada = 6 * C if cfg.shared_aln else C * 6 * C + 6 * C          # shared AdaLN: each block keeps ada_gss
    block = 3 * C * C + 2 * C + C * C + C + 2 * C * hidden + hidden + C + ada + cfg.num_heads
    other = cfg.V * C + cfg.V + C * 2 * C + 2 * C + (cfg.num_classes + 1) * C + cfg.Cvae * C + C
    if cfg.shared_aln:
        other += C * 6 * C + 6 * C
    return float((D * block + other) * bytes_per_param)


@dataclass(frozen=True)
class Floor:
    seconds: float           # per batch
    flops: float
    weight_bytes: float
    compute_bound_scales: List[int]


def floor(cfg: VARConfig, batch: int, peak_flops: float, bandwidth: float, bytes_per_param: int = 4) -> Floor:
    wb = transformer_bytes(cfg, bytes_per_param)
    total, fl, cb = 0.0, 0.0, []
    for k in range(cfg.num_scales):
        f = step_flops(cfg, k, batch)
        t_c, t_m = f / peak_flops, wb / bandwidth
        total += max(t_c, t_m)
        fl += f
        if t_c >= t_m:
            cb.append(k)
    return Floor(seconds=total, flops=fl, weight_bytes=wb * cfg.num_scales, compute_bound_scales=cb)


def gpu_peaks(name: str) -> Optional[Dict[str, float]]:
    for key, v in GPU_PEAKS.items():
        if key in name:
            return v
    return None


@dataclass(frozen=True)
class FloorChoice:
    """The floor of one batch and where its peaks came from."""
    floor: Floor
    peak_flops: float
    bandwidth: float
    source: str              # "given" | "<GPU name> data sheet, fp32|fp16"

    @property
    def seconds(self) -> float:
        return self.floor.seconds

    def describe(self, num_scales: int) -> str:
        f = self.floor
        return (f"floor {f.seconds * 1000:.2f} ms per batch = sum over scales of max(FLOPs/{self.peak_flops / 1e12:.0f} "
                f"TFLOP/s, weights {f.weight_bytes / num_scales / 2**20:.0f} MiB/{self.bandwidth / 1e9:.0f} GB/s) "
                f"({self.source}); {f.flops / 1e9:.1f} GFLOP, compute-bound scales {f.compute_bound_scales}")


def choose_floor(cfg: VARConfig, batch: int, precision: str, gpu: Optional[str] = None,
                 peak_flops: Optional[float] = None, bandwidth: Optional[float] = None) -> Optional[FloorChoice]:
    """The roofline floor of one batch at `precision` (fp32 weights 4 bytes, fp16/bf16 2): with
    both peaks given, those; else, on a GPU named in GPU_PEAKS, its data sheet (fp32, or the
    fp16 tensor rate for half precision); else None (no floor)."""
    source = "given"
    if not (peak_flops and bandwidth):
        peaks = gpu_peaks(gpu) if gpu else None
        if not peaks:
            return None
        key = "fp32" if precision == "fp32" else "fp16"
        peak_flops, bandwidth, source = peaks[key], peaks["bandwidth"], f"{gpu} data sheet, {key}"
    bpp = 4 if precision == "fp32" else 2
    return FloorChoice(floor(cfg, batch, peak_flops, bandwidth, bpp), peak_flops, bandwidth, source)
