"""Turn Infinity + its BSQ VAE into ONNX artifacts (DESIGN.md, "Infinity"):

    text.onnx        graphs.infinity_step.InfinityText: T5 states + mask -> cond, text K/V (once
                     per request; the T5 encoder itself stays eager: graphs.infinity_text)
    step_all.onnx    graphs.infinity_step.InfinityUnifiedStep: every scale of every aspect ratio
                     (dynamic n, m, Lp, F); the per-scale constants are computed by the runtime
                     from the schedule (graphs.infinity_io.scale_constants), not stored
    decoder.onnx     summed codes (B d H W, H and W dynamic) -> image in [0, 1]
    weights.bin      every initializer once (export.store)
    manifest.json    family "infinity" (contract.infinity_schema)
    text.plan, step_all.plan, decoder.plan, timing.cache   with --target trt (export.trt_build:
                     one step profile per scale spanning every aspect ratio's shapes)

Published as VAR's artifacts are (export.publish: lock, temporary directory, swap, --force rules).
The decoder is exported in this process (VAR's runs in a child beside the step export: the
Infinity decoder of the presets exported here is small).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Optional

import torch

from var_ssg.common.errors import ConfigError
from var_ssg.contract import stamp
from var_ssg.contract.infinity_schema import build_infinity_manifest, infinity_config_to_json, validate_infinity
from var_ssg.contract.manifest import MANIFEST, MAX_BATCH, MAX_OPSET, MIN_OPSET, FORMAT_VERSION, load_manifest, write_manifest
from var_ssg.graphs.config import DSE_TRANSFORMS
from var_ssg.graphs.infinity import Infinity
from var_ssg.graphs.infinity_config import ASPECT_TEMPLATES, InfinityConfig
from var_ssg.graphs.infinity_io import (DYNAMIC_AXES, InfinityDecoderIO, InfinityStepIO, InfinityTextIO,
                                        heads_per_chunk, table_bytes)
from var_ssg.graphs.infinity_step import (InfinityDecoder, InfinityText, InfinityUnifiedStep, example_feeds,
                                  text_example_feeds)
from var_ssg.graphs.infinity_vae import BSQVAE
from var_ssg.graphs.weights import WeightSource

from .dynamo import export_one
from .lint import lint_files
from .onnx_export import ExportResult, StageClock, _save, _trt_options, _versions, publish, weights_id
from .publish import ExportError
from .store import SharedWeights

log = logging.getLogger(__name__)

FILES = dict(text="text.onnx", step="step_all.onnx", decoder="decoder.onnx")


@dataclass(frozen=True)
class InfinityExportConfig:
    precision: str = "fp32"
    batch: int = 1
    transform: str = "dct"
    opset: int = 18
    target: str = "onnx"                    # "onnx" | "trt" (as VAR's ExportConfig)
    trt_hardware_compatible: bool = False
    trt_version_compatible: bool = False
    trt_tf32: bool = False
    # the step graph's self-attention runs in head chunks whose score table at the largest
    # scale stays within this many bytes (graphs.infinity_io.heads_per_chunk)
    attn_table_bytes: int = 512 * 2 ** 20

    def __post_init__(self):
        if self.precision != "fp32":
            raise ConfigError(f"--precision {self.precision}: Infinity exports fp32 only for now (the text, step and "
                              f"decoder graphs); use --precision fp32")
        if not 1 <= self.batch <= MAX_BATCH:
            raise ConfigError(f"--batch must be in 1..{MAX_BATCH}, got {self.batch}")
        if self.transform not in DSE_TRANSFORMS:
            raise ConfigError(f"--dse must be dct or dft, got {self.transform!r}")
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise ConfigError(f"--opset must be in {MIN_OPSET}..{MAX_OPSET}")
        if self.target not in ("onnx", "trt"):
            raise ConfigError(f"--target must be onnx or trt, got {self.target!r}")
        if not isinstance(self.attn_table_bytes, int) or self.attn_table_bytes < 1:
            raise ConfigError(f"attn_table_bytes must be an integer >= 1, got {self.attn_table_bytes!r}")


def infinity_cache_key(cfg: InfinityConfig, ec: InfinityExportConfig, wid: str) -> str:
    """The graphs' key; the TensorRT options make the engines' key (as VAR's cache_key)."""
    graph_opts = {k: v for k, v in asdict(ec).items() if k not in ("target", "attn_table_bytes")
                  and not k.startswith("trt_")}
    graph_opts["attn_heads_per_chunk"] = heads_per_chunk(cfg, ec.batch, ec.attn_table_bytes)   # what the graph holds
    blob = json.dumps(dict(family="infinity", config=infinity_config_to_json(cfg), export=graph_opts, weights=wid,
                           format=FORMAT_VERSION, torch=torch.__version__), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _dims(cfg: InfinityConfig):
    """torch.export dims shared by name, bounded by the largest schedule of the preset."""
    from torch.export import Dim
    scheds = [cfg.schedule(t) for t in ASPECT_TEMPLATES]
    n = max(h * w for s in scheds for h, w in s.hw)
    F = max(cfg.vae_hw(s.hw[-1])[0] * cfg.vae_hw(s.hw[-1])[1] for s in scheds)
    L = max(s.L for s in scheds)
    return dict(n=Dim("n", min=1, max=n), m=Dim("m", min=1, max=n), Lp=Dim("Lp", min=0, max=L), F=Dim("F", min=1, max=F))


def export_infinity(model: Infinity, vae: BSQVAE, src: WeightSource, out: str, ec: InfinityExportConfig,
                    force: bool = False, progress: Optional[Callable[[str], None]] = None) -> ExportResult:
    """Export everything into `out` atomically; reuses up-to-date artifacts unless `force`."""
    key = infinity_cache_key(model.cfg, ec, weights_id(src))
    machine = None
    if ec.target == "trt":            # TensorRT and a GPU, or a clear error before a long export
        from .trt_build import this_machine
        machine = this_machine()
    return publish(out, key, force, machine, ec, lambda tmp: _export_into(model, vae, src, tmp, ec, key, progress))


def _export_into(model, vae, src, tmp, ec: InfinityExportConfig, key, progress) -> Dict:
    import onnx
    cfg: InfinityConfig = model.cfg
    B = ec.batch
    clock = StageClock(progress)
    store = SharedWeights(tmp)
    graphs = {}
    step_io, text_io = InfinityStepIO(cfg, B), InfinityTextIO(cfg, B)
    try:
        clock.start("text_export")
        m = export_one(InfinityText(model).eval(), text_example_feeds(cfg, B), text_io.inputs, text_io.outputs, ec.opset)
        graphs["text"] = _save(m, store, tmp, FILES["text"], "text")
        clock.start("step_export")
        # traced at a scale where n, m, Lp and F all differ and exceed 1 (no axis specialised)
        sched = cfg.schedule(0.75)
        dims = _dims(cfg)
        shapes = {name: None for name in step_io.inputs}
        shapes.update({name: {a: dims[d] for a, d in axes.items()} for name, axes in DYNAMIC_AXES.items()})
        hpc = heads_per_chunk(cfg, B, ec.attn_table_bytes)
        if hpc and table_bytes(cfg, B, hpc) > ec.attn_table_bytes:
            log.warning("one head's attention scores at the largest scale take %.2f GiB (batch %d), over the "
                        "%.2f GiB budget: the step graph computes one head at a time", table_bytes(cfg, B, 1) / 2 ** 30,
                        B, ec.attn_table_bytes / 2 ** 30)
        m = export_one(InfinityUnifiedStep(model, hpc).eval(), example_feeds(cfg, B, sched, min(3, sched.num_scales - 1),
                                                                         ec.transform),
                       step_io.inputs, step_io.outputs, ec.opset, dynamic_shapes=shapes)
        graphs["step"] = _save(m, store, tmp, FILES["step"], "step")
        clock.start("decoder")
        from torch.export import Dim
        dec_io = InfinityDecoderIO(cfg, B)
        fh, fw = cfg.vae_hw(sched.hw[-1])
        H, W = Dim("H", min=1, max=4 * cfg.rope_grid), Dim("W", min=1, max=4 * cfg.rope_grid)
        m = export_one(InfinityDecoder(vae).eval(), dict(summed=torch.zeros(B, cfg.vae.bits, fh, fw)),
                       dec_io.inputs, dec_io.outputs, ec.opset, dynamic_shapes=dict(summed={2: H, 3: W}))
        graphs["decoder"] = _save(m, store, tmp, FILES["decoder"], "decoder")
        del m
        clock.start("flush")
    finally:
        store.close()
    clock.start("check")
    for g in graphs.values():
        onnx.checker.check_model(os.path.join(tmp, g["file"]), full_check=True)
    issues = lint_files([os.path.join(tmp, FILES["text"])], max_opset=MAX_OPSET)
    issues += lint_files([os.path.join(tmp, FILES["step"])], max_opset=MAX_OPSET, dynamic=set(step_io.dynamic_inputs))
    issues += lint_files([os.path.join(tmp, FILES["decoder"])], max_opset=MAX_OPSET, dynamic={"summed"})
    if issues:
        raise ExportError("TensorRT-compatibility lint failed:\n  " + "\n  ".join(map(str, issues)))
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) + \
        sum(p.numel() * p.element_size() for n, p in vae.named_parameters() if n.startswith("decoder."))
    data = build_infinity_manifest(
        cfg, batch=ec.batch, precision=ec.precision, opset=ec.opset, transform=ec.transform, weights=src.to_json(),
        external_data=dict(file=store.filename, bytes=store.bytes_written, referenced_bytes=store.bytes_referenced,
                           parameter_bytes=param_bytes),
        graphs=graphs, tools=_versions(), cache_key=key, export=dict(asdict(ec), attn_heads_per_chunk=hpc))
    if ec.target == "trt":
        from .trt_build import build_engines
        clock.start("engines")
        data["engines"], data["tensorrt"] = build_engines(tmp, data, **_trt_options(ec))
        validate_infinity("the manifest being written", data, listed=False)
    clock.stop()
    data["export"]["stage_seconds"] = dict(clock.seconds)
    written = write_manifest(tmp, data, hashed={store.filename: store.sha256})
    stamp.record(tmp, MANIFEST, [(n, stamp.file_key(os.lstat(os.path.join(tmp, n))), m_["sha256"])
                                 for n, m_ in written["files"].items()])
    load_manifest(tmp)              # the runtime's own check of what was just written
    return data
