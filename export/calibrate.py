"""Calibration feeds for a quantized step graph: the model's own runs (DESIGN.md "Low precision").

The eager fp32 reference runs the calibration rows through the runtime's pipeline (the one loop:
the same noise, KV cache and feeds every backend gets); a recording backend keeps what each
scale was fed, plus that scale's constants, i.e. exactly the step graph's inputs.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np

from var_ssg.graphs.io import scale_constants
from var_ssg.runtime.backends.eager import EagerBackend
from var_ssg.runtime.pipeline import Pipeline, Row

from .quantize import CalibrationConfig


class _Recorder:
    """A backend that runs `inner` and records every step's feeds as the step graph takes them."""

    def __init__(self, inner: EagerBackend, batch: int):
        self.inner, self.source_note = inner, inner.source_note
        self.info = type(inner.info)(**{**inner.info.__dict__, "batch": batch})
        self.feeds: List[Dict[str, np.ndarray]] = []

    def alloc_kv(self, shape, dtype):
        return self.inner.alloc_kv(shape, dtype)

    def step(self, k, feeds, kv_out):
        rec = {n: np.array(self.inner.host(v) if not isinstance(v, np.ndarray) else v, copy=True)
               for n, v in feeds.items()}
        rec.update(scale_constants(self.info.cfg, self.info.transform, k))
        self.feeds.append(rec)
        return self.inner.step(k, feeds, kv_out)

    def decode(self, f_hat):
        return self.inner.decode(f_hat)

    def host(self, x):
        return self.inner.host(x)

    def zeros(self, shape):
        return self.inner.zeros(shape)


def calibration_feeds(var, vae, transform: str, k_max: int, batch: int,
                      cc: CalibrationConfig) -> tuple[List[Dict[str, np.ndarray]], Dict]:
    """(feeds of every scale of every calibration run, the record the manifest keeps)."""
    rec = _Recorder(EagerBackend(var, vae, transform=transform, k_max=k_max), batch)
    pipe = Pipeline(rec)
    rows = [Row(c, s, g) for c, s, g in cc.rows(var.cfg.num_classes)]
    for i in range(0, len(rows), batch):
        pipe.run_rows(rows[i:i + batch], decode=False)
    record = dict(method="MinMax", rows=[dict(class_id=r.class_id, seed=r.seed, guidance=r.guidance) for r in rows],
                  ssg_beta=str(Row(0, 0).ssg_beta), batch=batch, scales=list(range(var.cfg.num_scales)),
                  feeds=len(rec.feeds))
    return rec.feeds, record
