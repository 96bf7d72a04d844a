"""Flags the evaluation scripts share (the generic sampling flags come from tools.cli)."""
from __future__ import annotations

import argparse
from typing import Optional

from graphs.config import BACKENDS, ConfigError, SamplerConfig, make_ssg

from .run import Job, batch_size_for, open_pipeline
from .samples import parse_classes


def add_source_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what runs")
    g.add_argument("--artifacts", help="artifacts directory (scripts/export.py); or --model for the eager backend")
    g.add_argument("--backend", choices=BACKENDS, default=None,
                   help="default: onnxruntime with --artifacts, eager with --model")
    g.add_argument("--device", default="cpu", help="eager/onnxruntime device: cpu or cuda")


def add_job_args(p: argparse.ArgumentParser, per_class: int) -> None:
    g = p.add_argument_group("which images")
    g.add_argument("--classes", dest="class_spec", metavar="SPEC",
                   help="class ids and ranges, e.g. '0-999' or '1,5,7-9' (overrides --class)")
    g.add_argument("--per-class", type=int, default=per_class, help="images per class")
    g.add_argument("--batch", type=int, help="rows per run (artifacts: their exported batch; eager: default 8)")


def open_from_args(a: argparse.Namespace, transforms=None):
    backend = a.backend or ("onnxruntime" if a.artifacts else "eager")
    return open_pipeline(backend, a.artifacts, a.model, a.ckpt, a.vae_ckpt, a.random_init,
                         transforms or ((a.dse,) if a.dse else None), a.top_k, a.device)


def job_from_args(a: argparse.Namespace, pipe, ssg_beta: Optional[str] = None) -> Job:
    cfg = pipe.info.cfg
    classes = parse_classes(a.class_spec, cfg.num_classes) if a.class_spec else list(a.classes)
    return Job(classes=tuple(classes), per_class=a.per_class, seed=a.seed, guidance=a.guidance,
               sampler=SamplerConfig(top_k=a.top_k, top_p=a.top_p, temperature=a.temperature),
               ssg=make_ssg(a.ssg_beta if ssg_beta is None else ssg_beta, pipe.info.transform, cfg.num_scales),
               batch=batch_size_for(pipe, a.batch), more_smooth=bool(getattr(a, "more_smooth", False)))


def precheck(a: argparse.Namespace, betas=()) -> None:
    """Fail on malformed flags before a model is loaded (the full check runs once it is)."""
    from graphs.config import PATCH_NUMS_256, check_guidance
    SamplerConfig(top_k=a.top_k, top_p=a.top_p, temperature=a.temperature)
    check_guidance(a.guidance)
    for spec in (a.ssg_beta, *betas):
        make_ssg(spec, "dct", len(PATCH_NUMS_256))
    if a.class_spec:
        parse_classes(a.class_spec)
    if a.per_class < 1:
        raise ConfigError(f"--per-class must be >= 1, got {a.per_class}")
    if a.batch is not None and a.batch < 1:
        raise ConfigError(f"--batch must be >= 1, got {a.batch}")
