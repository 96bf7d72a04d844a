"""Export-if-missing: the artifacts a command needs for a model and batch, exported into
`<root>/<model>-b<batch>` unless that directory already holds them (the export's cache key
decides; files verified). Used by the benchmarks (bench, bench_serve) that take `--model`.

It never replaces anything: a directory holding other artifacts (another model, weights or
options) is refused with the ways out; replacing is `scripts/export.py --force`'s job.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

from var_ssg.common.errors import ConfigError

from .onnx_export import ExportConfig, OutTaken, export_artifacts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from and where their artifacts go."""
    model: str                          # preset name
    root: str = "build"                 # artifacts go to <root>/<model>-b<batch>
    ckpt: Optional[str] = None
    vae_ckpt: Optional[str] = None
    random_init: Optional[int] = None   # seed; None: the checkpoints (or the Hugging Face cache)

    def out(self, batch: int) -> str:
        return os.path.join(self.root, f"{self.model}-b{batch}")


def ensure_artifacts(src: ModelSource, batch: int, ec: Optional[ExportConfig] = None) -> str:
    """The artifacts directory for `src` at `batch`: reused when up to date, else exported.
    `ec` defaults to ExportConfig(batch=batch); its batch must be `batch`."""
    from var_ssg.graphs.config import get_preset
    from var_ssg.graphs.weights import load_models
    ec = ec or ExportConfig(batch=batch)
    if ec.batch != batch:
        raise ValueError(f"ExportConfig batch {ec.batch} != {batch}")
    out = src.out(batch)
    var, vae, weights = load_models(get_preset(src.model), src.ckpt, src.vae_ckpt, src.random_init)
    log.info("artifacts %s (exported unless up to date)", out)
    try:
        export_artifacts(var, vae, weights, out, ec)
    except OutTaken:
        raise ConfigError(f"{out} holds other artifacts (another model, weights or options): use them with "
                          f"--artifacts {out}, choose another --artifacts-root, or replace them with "
                          f"scripts/export.py --force --out {out}") from None
    return out
