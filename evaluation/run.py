"""Running the pipeline for evaluation: what to sample (JobRequest → Job), batches, the seed rule.

Seed rule (deterministic, so a resumed or distributed run redraws nothing differently): image i
(class-major order) uses seed S + i. Noise is drawn per row (DESIGN.md "Sampling"), so an image
does not depend on the batch size or its batch mates; batch b holds images b·B .. b·B+B-1 (the
pipeline pads the last). Pipelines are opened by runtime.opener (the one opener).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Iterator, List, Optional, Protocol, Sequence, Tuple

import numpy as np

from var_ssg.graphs.config import (DEFAULT_GUIDANCE, DEFAULT_SSG_BETA, DEFAULT_TEMPERATURE, DEFAULT_TOP_P, PATCH_NUMS_256,
                           SamplerConfig, SSGConfig, check_guidance, make_ssg)
from var_ssg.common.errors import ConfigError
from var_ssg.runtime.images import to_uint8
from var_ssg.runtime.noise import VERSION as NOISE
from var_ssg.runtime.pipeline import Pipeline, Row

from .samples import parse_classes

log = logging.getLogger(__name__)


def generate(pipe: Pipeline, classes: Sequence[int], seed: int, guidance: float, sampler: SamplerConfig,
             ssg: SSGConfig, keep_fhat: bool = False, more_smooth: bool = False):
    """One batch (image j uses seed + j); with keep_fhat the result has `f_hats`: K arrays
    B Cv P P, f_hat after each scale."""
    return pipe.run(list(classes), seed, guidance=guidance, sampler=sampler, ssg=ssg, keep_fhat=keep_fhat,
                    more_smooth=more_smooth)


@dataclass(frozen=True)
class JobRequest:
    """What the user asked for, before a pipeline is open (the CLI fills it from its flags)."""
    classes: Tuple[int, ...] = (207,)
    class_spec: Optional[str] = None         # '0-999', '1,5,7-9': overrides `classes`
    per_class: int = 50
    seed: int = 0
    guidance: float = DEFAULT_GUIDANCE
    top_k: Optional[int] = None
    top_p: float = DEFAULT_TOP_P
    temperature: float = DEFAULT_TEMPERATURE
    ssg_beta: str = DEFAULT_SSG_BETA
    batch: Optional[int] = None              # None: the artifacts' batch, or 8 (eager)
    more_smooth: bool = False

    def check(self, betas: Sequence[str] = ()) -> None:
        """Fail on malformed values before a model is loaded (the full check runs once it is)."""
        SamplerConfig(top_k=self.top_k, top_p=self.top_p, temperature=self.temperature)
        check_guidance(self.guidance)
        for spec in (self.ssg_beta, *betas):
            make_ssg(spec, "dct", len(PATCH_NUMS_256))
        if self.class_spec:
            parse_classes(self.class_spec)
        if self.per_class < 1:
            raise ConfigError(f"--per-class must be >= 1, got {self.per_class}")
        if self.batch is not None and self.batch < 1:
            raise ConfigError(f"--batch must be >= 1, got {self.batch}")

    def job(self, pipe: Pipeline, ssg_beta: Optional[str] = None) -> "Job":
        """The Job on `pipe` (its classes, baked transform and batch); `ssg_beta` overrides the
        schedule (a sweep's point)."""
        cfg = pipe.info.cfg
        classes = parse_classes(self.class_spec, cfg.num_classes) if self.class_spec else list(self.classes)
        return Job(classes=tuple(classes), per_class=self.per_class, seed=self.seed, guidance=self.guidance,
                   sampler=SamplerConfig(top_k=self.top_k, top_p=self.top_p, temperature=self.temperature),
                   ssg=make_ssg(self.ssg_beta if ssg_beta is None else ssg_beta, pipe.info.transform,
                                cfg.num_scales),
                   batch=batch_size_for(pipe, self.batch), more_smooth=self.more_smooth)


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
    def num_images(self) -> int:
        return len(self.classes) * self.per_class

    @property
    def labels(self) -> np.ndarray:
        return np.repeat(np.asarray(self.classes, dtype=np.int64), self.per_class)

    @property
    def num_batches(self) -> int:
        return -(-self.num_images // self.batch)

    def batch_len(self, b: int) -> int:
        return min(self.batch, self.num_images - b * self.batch)

    def batch_rows(self, b: int) -> Tuple[List[int], int, int]:
        """(classes of batch b, the seed of its first image, number of images)."""
        first = b * self.batch
        n = self.batch_len(b)
        labels = [self.classes[i // self.per_class] for i in range(first, first + n)]
        return labels, self.seed + first, n

    def settings(self, pipe: Pipeline, source: str) -> dict:
        info = pipe.info
        return {"format": "var-ssg samples v1", "model": info.cfg.name, "weights": source,
                "backend": info.name, "image_size": info.cfg.vae.image_size,
                "classes": list(self.classes), "per_class": self.per_class, "seed": self.seed,
                "seed_rule": "image i uses seed S + i", "noise": NOISE, "batch": self.batch,
                "guidance": self.guidance, **asdict(self.sampler),
                "ssg_beta": self.ssg.spec, "betas": list(self.ssg.betas), "dse": self.ssg.transform,
                "more_smooth": self.more_smooth}


class PipelineView:
    """A pipeline that runs elsewhere (a worker), seen from the driver: its BackendInfo, and the
    one row validation (Pipeline.check_row reads nothing but the info)."""

    def __init__(self, info):
        self.info = info

    check_row = Pipeline.check_row


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
    last = job.seed + job.num_images - 1
    for c in sorted(set(job.classes)):
        pipe.check_row(Row(c, last, job.guidance, job.ssg.betas, job.sampler.top_k, job.sampler.top_p,
                           job.sampler.temperature, job.more_smooth))


def run_batches(pipe: Pipeline, job: Job, todo: Sequence[int], keep_fhat: bool = False
                ) -> Iterator[Tuple[int, np.ndarray, Optional[List[np.ndarray]], float]]:
    """Yield (batch index, N H W 3 uint8 real images, f_hats of the real rows or None, seconds)."""
    import time
    for b in todo:
        rows, seed, n = job.batch_rows(b)
        t0 = time.perf_counter()
        res = generate(pipe, rows, seed, job.guidance, job.sampler, job.ssg, keep_fhat=keep_fhat,
                       more_smooth=job.more_smooth)
        dt = time.perf_counter() - t0
        f_hats = [f[:n] for f in res.f_hats] if keep_fhat else None
        yield b, to_uint8(res.images[:n]), f_hats, dt


@dataclass(frozen=True)
class Work:
    """Batches of one job for whoever runs them (evaluation.sampling's LocalExecutor,
    evaluation.distributed's pool): `key` says which output they belong to."""
    key: int
    job: Job
    batches: Tuple[int, ...]


class Executor(Protocol):
    def run(self, work: Sequence[Work]) -> Iterator[Tuple[int, int, np.ndarray, float]]:
        """Yield (key, batch index, images, seconds) for every batch of `work`, in any order."""
