"""Side-by-side benchmarks in one process: for each artifacts directory (one per batch size),
every backend is opened once, warmed up, then the backends alternate (and SSG on / beta = 0
alternate) for `repeats` rounds; medians per image and per scale. SSG's cost is measured in
isolation (`ssg_cost`), one DSE call three ways (`bench_dse`), the roofline floor where peaks
are known (benchmarks.roofline.choose_floor), and the process's peak RSS.

`run_bench(BenchConfig)` -> BenchResult; `BenchResult.summary()` is the last line scripts parse.
"""
from __future__ import annotations

import os
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from var_ssg.export.ensure import ModelSource, ensure_artifacts
from var_ssg.graphs.config import DEFAULT_GUIDANCE, DEFAULT_SSG_BETA, SamplerConfig, make_ssg
from var_ssg.common.errors import ConfigError

from .roofline import FloorChoice, choose_floor


@dataclass(frozen=True)
class BenchConfig:
    backends: Tuple[str, ...] = ("eager", "onnxruntime")
    artifacts: Optional[str] = None          # one existing directory (its batch), or
    source: Optional[ModelSource] = None     # a model: <root>/<model>-b<batch> per batch, exported if missing
    batches: Optional[Tuple[int, ...]] = None    # with `source`; default (1,)
    repeats: int = 3
    device: str = "cpu"
    peak_tflops: Optional[float] = None      # roofline peaks (default on a known GPU: its data sheet)
    bandwidth_gbs: Optional[float] = None

    def __post_init__(self):
        if not self.backends:
            raise ConfigError("--backends is empty")
        if self.repeats < 1:
            raise ConfigError("--repeats must be >= 1")
        if self.artifacts and self.batches:
            raise ConfigError("--batch chooses artifacts per batch; with --artifacts the batch is the exported one")
        if self.batches is not None and (not self.batches or min(self.batches) < 1):
            raise ConfigError("--batch sizes must be >= 1")
        if not self.artifacts and not self.source:
            raise ConfigError("give --model (with --ckpt/--vae-ckpt or --random-init) or --artifacts DIR")

    def directories(self) -> List[Callable[[], str]]:
        """One artifacts directory per batch, resolved (exported) when its turn comes."""
        if self.artifacts:
            return [lambda: self.artifacts]
        return [lambda b=b: ensure_artifacts(self.source, b) for b in (self.batches or (1,))]


@dataclass
class BackendTiming:
    per_image_s: float
    total_s: float                   # median seconds per batch, SSG on
    beta0_s: float                   # median with beta = 0 (same arithmetic: the difference is noise)
    per_scale_s: List[float]
    beta0_delta_pct: float
    runs_s: List[float]
    ssg_s: Optional[float]           # SSG's isolated cost per batch (None: not measurable for this backend)
    ssg_overhead_pct: Optional[float]
    x_floor: Optional[float] = None  # total_s / the roofline floor


@dataclass
class BatchResult:
    artifacts: str
    batch: int
    model: str
    precision: str
    backends: Dict[str, BackendTiming]
    floor: Optional[FloorChoice]
    num_scales: int
    threads: int
    cpu_count: int
    device: str
    repeats: int


@dataclass
class BenchResult:
    runs: List[BatchResult]
    dse: Dict[str, float]            # one DSE call: folded / chain / fft seconds
    peak_rss_gib: float
    backends: Tuple[str, ...] = field(default=())

    def summary(self) -> str:
        """`summary: onnxruntime/eager=R ssg_overhead=P% dse_speedup=Sx` (first batch size)."""
        first = self.runs[0].backends
        parts = []
        if "eager" in first and "onnxruntime" in first:
            parts.append(f"onnxruntime/eager={first['onnxruntime'].total_s / first['eager'].total_s:.2f}")
        exported = first.get("onnxruntime") or first[self.backends[-1]]
        if exported.ssg_overhead_pct is not None:
            parts.append(f"ssg_overhead={exported.ssg_overhead_pct:.1f}%")
        parts.append(f"dse_speedup={self.dse['fft'] / self.dse['folded']:.1f}x")
        return "summary: " + " ".join(parts)

    def to_json(self) -> Dict:
        runs = []
        for r in self.runs:
            b = {n: {k: v for k, v in asdict(t).items() if k != "x_floor" or v is not None}
                 for n, t in r.backends.items()}
            runs.append(dict(batch=r.batch, model=r.model, precision=r.precision, backends=b))
        return dict(runs=runs, dse=self.dse, peak_rss_gib=self.peak_rss_gib)


def timed_run(pipe, classes, seed: int, ssg) -> Tuple[float, List[float]]:
    """One image batch: (seconds, per-scale seconds from the pipeline's progress callback)."""
    marks = [time.perf_counter()]
    pipe.run(classes, seed, DEFAULT_GUIDANCE, SamplerConfig(), ssg, progress=lambda k: marks.append(time.perf_counter()))
    total = time.perf_counter() - marks[0]          # the decoder included
    return total, [b - a for a, b in zip(marks, marks[1:])]


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def ssg_cost(man, backend, repeats: int = 20) -> Optional[float]:
    """Seconds per batch that SSG adds, measured in isolation (end-to-end on/off differences are
    below run-to-run noise, and beta = 0 runs the same arithmetic): for every scale k >= 1, the
    prior (DSE of the previous CFG logits) plus the fusion l + beta (l - prior), computed the way
    the backend does it. eager: its own step's prior (torch.fft reference); onnxruntime: the
    folded MatMul + fusion in an ONNX Runtime session (benchmarks.ssg_graph). None otherwise."""
    import numpy as np
    import torch
    from var_ssg.graphs.dse import dse_matrix
    from var_ssg.runtime.backends.eager import EagerBackend
    name = backend.info.name
    if not (isinstance(backend, EagerBackend) or name == "onnxruntime"):
        return None
    cfg, B, V = man.cfg, man.batch, man.cfg.V
    total = 0.0
    for k in range(1, cfg.num_scales):
        n, m = cfg.patch_nums[k] ** 2, cfg.patch_nums[k - 1] ** 2
        l, prev, beta = torch.randn(B, n, V), torch.randn(B, m, V), torch.tensor([0.3])
        if isinstance(backend, EagerBackend):
            step = backend.steps[k]
            with torch.inference_mode():
                total += median_time(lambda: l + beta * (l - step.prior(prev)), repeats)
        else:
            from .ssg_graph import SsgSession
            M = dse_matrix((cfg.patch_nums[k - 1],) * 2, (cfg.patch_nums[k],) * 2, man.transform).astype(np.float32)
            total += median_time(SsgSession(M, l, prev, beta).run, repeats)
    return total


def bench_dse(repeats: int = 50, V: int = 4096, src: int = 13, dst: int = 16) -> Dict[str, float]:
    """One DSE call (src x src -> dst x dst over V channels, batch 1; by default 13x13 -> 16x16,
    V = 4096) three ways: the folded matrix, the unfolded chain, torch.fft. Median seconds each.
    The three results are compared first: timing forms that compute different things is refused."""
    import torch
    from var_ssg.graphs.dse import dse_chain_matrices, dse_fft, dse_matrix
    h, H = src, dst
    l = torch.randn(1, h * h, V, generator=torch.Generator().manual_seed(0))
    M = torch.tensor(dse_matrix((h, h), (H, H), "dct"), dtype=torch.float32)
    c = {k: torch.tensor(v, dtype=torch.float32) for k, v in dse_chain_matrices((h, h), (H, H), "dct").items()}

    def folded():
        return M @ l

    def chain():
        I = c["interp"] @ l
        Sr = c["fwd_re"] @ I * c["keep"][:, None] + c["coarse_re"] @ l
        Si = c["fwd_im"] @ I * c["keep"][:, None] + c["coarse_im"] @ l
        return c["inv_re"] @ Sr - c["inv_im"] @ Si

    def fft():
        return dse_fft(l.transpose(1, 2).reshape(1, V, h, h), (H, H), "dct").reshape(1, V, H * H).transpose(1, 2)
    ref = fft()
    for name, fn in (("folded", folded), ("chain", chain)):
        got = fn()
        err = float((got - ref).abs().max() / ref.abs().max())
        if tuple(got.shape) != tuple(ref.shape) or not err < 1e-4:
            raise RuntimeError(f"bench_dse: the {name} form differs from torch.fft (max rel {err:.2e})")
    return {name: median_time(fn, repeats) for name, fn in (("folded", folded), ("chain", chain), ("fft", fft))}


def bench_batch(art: str, config: BenchConfig) -> BatchResult:
    """Every backend over one artifacts directory: warm-up, then `repeats` alternating rounds."""
    import torch
    from var_ssg.contract.manifest import load_manifest
    from var_ssg.runtime.backends import open_backend
    from var_ssg.runtime.pipeline import Pipeline
    man = load_manifest(art)
    cfg, names = man.cfg, config.backends
    pipes = {n: Pipeline(open_backend(n, man, device=config.device)) for n in names}
    classes = [(7 * i + 1) % cfg.num_classes for i in range(man.batch)]
    on, off = make_ssg(DEFAULT_SSG_BETA, man.transform), make_ssg("0", man.transform)
    for pipe in pipes.values():          # warm-up
        timed_run(pipe, classes, 0, on)
    res = {n: dict(total=[], per=[], off=[]) for n in names}
    for r in range(config.repeats):      # alternate backends, and beta on/0, every repeat
        for n, pipe in pipes.items():
            t, per = timed_run(pipe, classes, r, on)
            res[n]["total"].append(t)
            res[n]["per"].append(per)
            res[n]["off"].append(timed_run(pipe, classes, r, off)[0])
    gpu = torch.cuda.get_device_name(0) if config.device == "cuda" else None
    fl = choose_floor(cfg, man.batch, man.precision, gpu, config.peak_tflops and config.peak_tflops * 1e12,
                      config.bandwidth_gbs and config.bandwidth_gbs * 1e9)
    out = {}
    for n in names:
        tot, toff = statistics.median(res[n]["total"]), statistics.median(res[n]["off"])
        cost = ssg_cost(man, pipes[n].backend)
        out[n] = BackendTiming(per_image_s=tot / man.batch, total_s=tot, beta0_s=toff,
                               per_scale_s=[statistics.median(x) for x in zip(*res[n]["per"])],
                               beta0_delta_pct=100 * (tot - toff) / toff, runs_s=res[n]["total"], ssg_s=cost,
                               ssg_overhead_pct=None if cost is None else 100 * cost / tot,
                               x_floor=tot / fl.seconds if fl else None)
    return BatchResult(artifacts=art, batch=man.batch, model=cfg.name, precision=man.precision, backends=out,
                       floor=fl, num_scales=cfg.num_scales, threads=torch.get_num_threads(),
                       cpu_count=os.cpu_count() or 0, device=config.device, repeats=config.repeats)


def run_bench(config: BenchConfig, on_batch: Optional[Callable[[BatchResult], None]] = None) -> BenchResult:
    """Each batch size in turn (its artifacts exported when missing), then the DSE comparison."""
    runs = []
    for resolve in config.directories():
        runs.append(bench_batch(resolve(), config))
        if on_batch:
            on_batch(runs[-1])
    dse = bench_dse()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    return BenchResult(runs=runs, dse=dse, peak_rss_gib=peak, backends=tuple(config.backends))


def per_scale_figure(result: BenchResult, names: Sequence[str]):
    """One panel per batch size: per-scale latency of each backend (log scale)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(result.runs), figsize=(6 * len(result.runs), 4), squeeze=False)
    for ax, run in zip(axes[0], result.runs):
        for n in names:
            per = run.backends[n].per_scale_s
            ax.plot(range(len(per)), [x * 1000 for x in per], marker="o", label=n)
        ax.set_xlabel("scale k")
        ax.set_ylabel("ms")
        ax.set_yscale("log")
        ax.set_title(f"{run.model} batch {run.batch} per-scale latency")
        ax.legend()
    fig.tight_layout()
    return fig
