"""Running the pipeline for evaluation: open a backend, generate batches, and the seed rule.

Seed rule (deterministic, so a resumed run redraws nothing differently): image i (class-major
order) uses seed S + i. Noise is drawn per row (SPEC §3), so an image does not depend on the
batch size or its batch mates; batch b holds images b·B .. b·B+B-1 (the pipeline pads the last).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from graphs.config import ConfigError, SamplerConfig, SSGConfig, check_guidance, get_preset, topk_bake
from runtime.pipeline import Pipeline, Row, to_uint8

log = logging.getLogger(__name__)


def open_pipeline(backend: str = "eager", artifacts: Optional[str] = None, model: Optional[str] = None,
                  ckpt: Optional[str] = None, vae_ckpt: Optional[str] = None, random_init: Optional[int] = None,
                  transforms: Optional[Sequence[str]] = None, top_k: Optional[int] = None,
                  device: str = "cpu") -> Tuple[List[Pipeline], str]:
    """One Pipeline per DSE transform, and a note on the weights. Artifacts bake one transform;
    the eager backend over --model builds any (that is how a sweep compares dct with dft)."""
    if artifacts:
        from runtime.backends import open_backend
        b = open_backend(backend, artifacts, device=device)
        if model and model != b.info.cfg.name:
            raise ConfigError(f"--model {model} but the artifacts in {artifacts} are {b.info.cfg.name}")
        bad = [t for t in (transforms or ()) if t != b.info.transform]
        if bad:
            raise ConfigError(f"--dse {bad[0]} but {artifacts} bakes DSE transform {b.info.transform}: "
                              f"give artifacts exported with --dse {bad[0]} (or use --model with the eager backend)")
        return [Pipeline(b)], b.source_note
    if backend != "eager":
        raise ConfigError(f"--backend {backend} needs --artifacts DIR (run scripts/export.py first)")
    if not model:
        raise ConfigError("give --artifacts DIR, or --model (e.g. var-d16) for the eager backend")
    cfg = get_preset(model)
    from graphs.weights import load_models
    from runtime.backends.eager import EagerBackend
    var, vae, src = load_models(cfg, ckpt, vae_ckpt, random_init)
    pipes = [Pipeline(EagerBackend(var, vae, transform=t, k_max=topk_bake(top_k, cfg.V), device=device,
                                   source_note=src.describe())) for t in (transforms or ("dct",))]
    return pipes, src.describe()


def generate(pipe: Pipeline, classes: Sequence[int], seed: int, guidance: float, sampler: SamplerConfig,
             ssg: SSGConfig, keep_fhat: bool = False, more_smooth: bool = False):
    """One batch (image j uses seed + j); with keep_fhat the result has `f_hats`: K tensors
    B Cv P P, f_hat after each scale."""
    return pipe.run(list(classes), seed, guidance=guidance, sampler=sampler, ssg=ssg, keep_fhat=keep_fhat,
                    more_smooth=more_smooth)


@dataclass(frozen=True)
class Job:
    """What to sample: `per_class` images of every class (class-major order)."""
    classes: Tuple[int, ...]
    per_class: int
    seed: int
    guidance: float
    sampler: SamplerConfig
    ssg: SSGConfig
    batch: int
    more_smooth: bool = False

    def __post_init__(self):
        if self.per_class < 1:
            raise ConfigError(f"--per-class must be >= 1, got {self.per_class}")
        if self.batch < 1:
            raise ConfigError(f"--batch must be >= 1, got {self.batch}")
        check_guidance(self.guidance)

    @property
    def labels(self) -> np.ndarray:
        return np.repeat(np.asarray(self.classes, dtype=np.int64), self.per_class)

    @property
    def num_batches(self) -> int:
        return -(-len(self.labels) // self.batch)

    def batch_rows(self, b: int) -> Tuple[List[int], int, int]:
        """(classes of batch b, the seed of its first image, number of images)."""
        labels = self.labels[b * self.batch:(b + 1) * self.batch].tolist()
        return labels, self.seed + b * self.batch, len(labels)

    def settings(self, pipe: Pipeline, source: str) -> dict:
        info = pipe.info
        return {"format": "var-ssg samples v1", "model": info.cfg.name, "weights": source,
                "backend": info.name, "image_size": info.cfg.vae.image_size,
                "classes": list(self.classes), "per_class": self.per_class, "seed": self.seed,
                "seed_rule": "image i uses seed S + i", "batch": self.batch,
                "guidance": self.guidance, **asdict(self.sampler),
                "ssg_beta": self.ssg.spec, "betas": list(self.ssg.betas), "dse": self.ssg.transform,
                "more_smooth": self.more_smooth}


def batch_size_for(pipe: Pipeline, requested: Optional[int], default: int = 8) -> int:
    fixed = pipe.info.batch
    if fixed is not None:
        if requested not in (None, fixed):
            raise ConfigError(f"--batch {requested} but the artifacts are exported for batch {fixed}")
        return fixed
    return requested or default


def check_job(pipe: Pipeline, job: Job) -> None:
    """Everything Pipeline.run would refuse, checked before any output is written."""
    if job.ssg.transform != pipe.info.transform:
        raise ConfigError(f"--dse {job.ssg.transform} but the pipeline bakes DSE transform {pipe.info.transform}")
    last = job.seed + len(job.labels) - 1
    for c in sorted(set(job.classes)):
        pipe.check_row(Row(c, last, job.guidance, job.ssg.betas, job.sampler.top_k, job.sampler.top_p,
                           job.sampler.temperature, job.more_smooth))


def run_batches(pipe: Pipeline, job: Job, todo: Sequence[int], keep_fhat: bool = False
                ) -> Iterator[Tuple[int, np.ndarray, Optional[List[torch.Tensor]], float]]:
    """Yield (batch index, N H W 3 uint8 real images, f_hats of the real rows or None, seconds)."""
    import time
    for b in todo:
        rows, seed, n = job.batch_rows(b)
        t0 = time.perf_counter()
        res = generate(pipe, rows, seed, job.guidance, job.sampler, job.ssg, keep_fhat=keep_fhat,
                       more_smooth=job.more_smooth)
        dt = time.perf_counter() - t0
        f_hats = [f[:n].float().cpu() for f in res.f_hats] if keep_fhat else None
        yield b, to_uint8(res.images[:n]), f_hats, dt
