"""A grid of SSG beta schedules x DSE transforms: every point sampled (resumable) and scored,
then one table (rows of dicts), its JSON and one plot. The points share one executor: this
process's pipelines, or a Ray pool whose workers keep theirs across points (the schedule is a
per-row tunable, so one exported artifact set serves every beta) and take chunks of any point.

    OUT_DIR/<dse>_<schedule>/samples.npz (+ .partial/ while running), samples.timing.json, metrics.json
    OUT_DIR/sweep.json, sweep.png (or the paths given)
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from var_ssg.common.files import atomic_path, check_outputs, write_json
from var_ssg.graphs.config import DSE_TRANSFORMS
from var_ssg.common.errors import ConfigError
from var_ssg.runtime.opener import PipelineSource

from .run import JobRequest, check_job
from .samples import NpzBatch, read_timing
from .sampling import PartialRun, check_output, executor_for, sample_runs


@dataclass(frozen=True)
class SweepConfig:
    betas: Tuple[str, ...]
    out_dir: str
    transforms: Tuple[str, ...] = ()         # () : dct, or what the artifacts bake
    ref: Optional[str] = None                # reference batch; None: only the latency is measured
    extractor: str = "inception"             # 'pixels': 8x8 block means, plumbing tests only
    inception_weights: Optional[str] = None
    device: str = "cpu"
    metric: Optional[str] = None             # the plotted metric (default fid / fd_pixels)
    json_path: Optional[str] = None
    plot_path: Optional[str] = None


@dataclass
class SweepResult:
    rows: List[Dict]
    json_path: str
    plot_path: str
    source: str
    workers: list = field(default_factory=list)


def parse_betas(spec: str) -> Tuple[str, ...]:
    betas = tuple(s.strip() for s in spec.split(";") if s.strip())
    if not betas:
        raise ConfigError("--betas is empty; give ';'-separated schedules like \"0;linear:0.1,0.3\"")
    return betas


def sweep_sources(base: PipelineSource, transforms: Sequence[str]) -> List[PipelineSource]:
    """--artifacts A,B: one source per directory (each bakes its transform); else the eager
    backend builds every transform asked for."""
    bad = [t for t in transforms if t not in DSE_TRANSFORMS]
    if bad:
        raise ConfigError(f"--dse {','.join(transforms)}: each transform must be one of {', '.join(DSE_TRANSFORMS)}")
    if not base.artifacts:
        return [replace(base, transforms=tuple(transforms) or ("dct",))]
    return [replace(base, artifacts=d, backend=base.backend or "onnxruntime", transforms=())
            for d in base.artifacts.split(",")]


def run_sweep(sources: Sequence[PipelineSource], request: JobRequest, cfg: SweepConfig, pool=None,
              progress: Optional[Callable[[int, int], None]] = None) -> SweepResult:
    check_outputs(("--json", cfg.json_path, ".json"), ("--plot", cfg.plot_path, ".png"))
    request.check(cfg.betas)
    if not os.path.isdir(cfg.out_dir):
        raise ConfigError(f"--out-dir {cfg.out_dir}: no such directory")
    extractor = None
    if cfg.ref:
        from .score import make_extractor
        NpzBatch(cfg.ref)                                      # readable, before any sampling
        extractor = make_extractor(cfg.extractor, cfg.inception_weights, cfg.device)
    with executor_for(sources, pool) as (ex, pipes, source):
        have = [p.info.transform for p in pipes]
        missing = [t for t in cfg.transforms if t not in have]
        if missing:
            raise ConfigError(f"--dse {missing[0]}: none of --artifacts {sources[0].artifacts} bakes it "
                              f"(they bake {have})")
        pipes = [p for p in pipes if not cfg.transforms or p.info.transform in cfg.transforms]
        jobs = [(pipe, request.job(pipe, b)) for pipe in pipes for b in cfg.betas]
        points = [os.path.join(cfg.out_dir, f"{job.ssg.transform}_{_slug(job.ssg.spec)}") for _, job in jobs]
        for (pipe, job), point in zip(jobs, points):         # every point's conflicts before any work
            check_job(pipe, job)
            if os.path.isdir(point):
                check_output(os.path.join(point, "samples.npz"), job.settings(pipe, source), resume=True)
        runs = []
        try:
            for (pipe, job), point in zip(jobs, points):
                os.makedirs(point, exist_ok=True)
                runs.append(PartialRun(os.path.join(point, "samples.npz"), job, job.settings(pipe, source)))
                runs[-1].open(resume=True)
            sample_runs(ex, runs, progress=progress)
        finally:
            for r in runs:
                r.close()
        workers = list(getattr(ex, "stats", []))
    rows = []
    for (_, job), run, point in zip(jobs, runs, points):
        seconds, rows_run = read_timing(run.out) or (float("nan"), 1.0)
        row = {"dse": job.ssg.transform, "beta": job.ssg.spec, "n_images": job.num_images,
               "s_per_img": seconds / rows_run}
        if extractor is not None:
            row.update(_metrics(point, run.out, cfg.ref, extractor, cfg.out_dir))
        rows.append(row)
    out_json = cfg.json_path or os.path.join(cfg.out_dir, "sweep.json")
    write_json(out_json, {"settings_of_first_point": runs[0].settings, "reference": cfg.ref,
                          "extractor": cfg.extractor if cfg.ref else None, "rows": rows}, indent=1)
    from .plots import plot_sweep
    out_png = cfg.plot_path or os.path.join(cfg.out_dir, "sweep.png")
    info = pipes[0].info
    metric = cfg.metric or ("fd_pixels" if cfg.extractor == "pixels" else "fid")
    plot_sweep(out_png, rows, metric if cfg.ref else None,
               title=f"{info.cfg.name} [{info.name}], {jobs[0][1].num_images} images per point; {source}")
    return SweepResult(rows, out_json, out_png, source, workers)


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", spec).strip("_") or "x"


def _metrics(point, samples, ref, extractor, cache_dir):
    """metrics.json of a point, recomputed only when the samples, reference or extractor changed."""
    from .score import evaluate_files
    st, rst = os.stat(samples), os.stat(ref)
    key = [st.st_size, st.st_mtime_ns, os.path.abspath(ref), rst.st_size, rst.st_mtime_ns, extractor.key]
    path = os.path.join(point, "metrics.json")
    if os.path.exists(path):
        try:
            with open(path) as f:
                old = json.load(f)
            if isinstance(old, dict) and old.get("key") == key:
                return old["metrics"]
        except ValueError:
            pass                                            # damaged: recomputed
    m = evaluate_files(samples, ref, extractor, cache_dir=cache_dir)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump({"key": key, "metrics": m}, f, indent=1)
    return m
