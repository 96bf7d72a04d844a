"""Flags the evaluation commands share (sample, sweep, spectrum), and their translation into
the library's config dataclasses: runtime.opener.PipelineSource, evaluation.run.JobRequest,
cluster.RayConfig with the worker count (evaluation.distributed.PoolConfig)."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from var_ssg.graphs.config import BACKENDS
from var_ssg.tools.cli import add_precision_arg


def add_source_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what runs")
    g.add_argument("--artifacts", help="artifacts directory (scripts/export.py); or --model for the eager backend")
    g.add_argument("--backend", choices=BACKENDS, default=None,
                   help="default: onnxruntime with --artifacts, eager with --model")
    g.add_argument("--device", default="cpu", help="eager/onnxruntime device: cpu or cuda")
    add_precision_arg(g)


def add_job_args(p: argparse.ArgumentParser, per_class: int) -> None:
    g = p.add_argument_group("which images")
    g.add_argument("--classes", dest="class_spec", metavar="SPEC",
                   help="class ids and ranges, e.g. '0-999' or '1,5,7-9' (overrides --class)")
    g.add_argument("--per-class", type=int, default=per_class, help="images per class")
    g.add_argument("--batch", type=int, help="rows per run (artifacts: their exported batch; eager: default 8)")


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workers (Ray); without --address everything runs in this process")
    g.add_argument("--address", metavar="ADDR",
                   help="'local': a Ray instance started and stopped by this command; 'auto' or HOST:PORT: "
                        "an existing cluster (artifacts at the same path on every node)")
    g.add_argument("--workers", type=int, metavar="N",
                   help="pipelines, one per worker (default: one per GPU Ray sees with --device cuda, "
                        "else one per node; CPU threads are split between the workers of a node)")
    g.add_argument("--chunk", type=int, metavar="BATCHES", default=None,
                   help="batches per work item handed to a worker (default: enough for ~4 items per worker)")


def source_from_args(a: argparse.Namespace, transforms: Sequence[str] = (), artifacts: Optional[str] = None):
    from var_ssg.runtime.opener import PipelineSource
    return PipelineSource(artifacts=artifacts if artifacts is not None else a.artifacts, backend=a.backend,
                          model=a.model, ckpt=a.ckpt, vae_ckpt=a.vae_ckpt, random_init=a.random_init,
                          transforms=tuple(transforms), top_k=a.top_k, device=a.device,
                          precision=a.precision)


def request_from_args(a: argparse.Namespace):
    from var_ssg.evaluation.run import JobRequest
    return JobRequest(classes=tuple(a.classes), class_spec=a.class_spec, per_class=a.per_class, seed=a.seed,
                      guidance=a.guidance, top_k=a.top_k, top_p=a.top_p, temperature=a.temperature,
                      ssg_beta=a.ssg_beta, batch=a.batch, more_smooth=bool(getattr(a, "more_smooth", False)))


def pool_from_args(a: argparse.Namespace):
    """None without --address (one process, as always); else the pool's config."""
    from var_ssg.common.errors import ConfigError
    if a.address is None:
        if a.workers is not None or a.chunk is not None:
            raise ConfigError("--workers and --chunk need --address (local, auto or HOST:PORT)")
        return None
    from var_ssg.cluster import RayConfig
    from var_ssg.evaluation.distributed import PoolConfig
    ray = RayConfig(address=a.address)
    ray.check()                         # --address checked before any work
    return PoolConfig(ray=ray, workers=a.workers, chunk=a.chunk, device=a.device)


def print_workers(workers) -> None:
    """Per-worker throughput of a pooled run (stderr: stdout keeps the command's result)."""
    for w in workers:
        print(f"worker {w.index} ({w.node}): {w.images} images, {w.images_per_s:.3g} img/s, "
              f"idle {100 * w.idle_share:.0f}%" + (f", died {w.deaths}x (its chunks redone)" if w.deaths else ""),
              file=sys.stderr)
