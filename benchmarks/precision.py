"""Precisions side by side in one process (DESIGN.md "Low precision"): per image and per scale,
eager fp32 / bf16 (weights cast) / bf16 autocast, ONNX Runtime fp32 / int8 (QDQ), and, given a
checkout of FoundationVision/VAR, the official code in fp32 and under bf16 autocast on the same
weights; our rows also split off the decoder's time (what follows the last scale; int8
artifacts quantize its convs). Every row is opened and warmed up once, then the rows alternate for `repeats` rounds;
medians. The CPU's features are detected and printed: the ratios depend on them (AVX2 vs
AVX-512 / AVX512-BF16 / AMX).

Our rows run with SSG on (the default schedule); the official code has no SSG (its cost here is
~1 %: bench.py's ssg_overhead).
"""
from __future__ import annotations

import importlib
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from var_ssg.export.ensure import ModelSource, ensure_artifacts
from var_ssg.export.onnx_export import ExportConfig
from var_ssg.common.errors import ConfigError
from var_ssg.graphs.config import DEFAULT_GUIDANCE, DEFAULT_SSG_BETA, make_ssg

from .bench import timed_run

ROWS = ("eager-fp32", "eager-bf16", "eager-bf16-autocast", "onnxruntime-fp32", "onnxruntime-int8",
        "official-fp32", "official-bf16-autocast")
FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")
Runner = Callable[[], Tuple[float, List[float]]]


def cpu_features(cpuinfo: str = "/proc/cpuinfo") -> Dict[str, object]:
    """The CPU's model name and which of FEATURES its flags list (Linux), in FEATURES' order."""
    model, flags = "unknown", set()
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, val = line.partition(":")
                if key.strip() == "model name" and model == "unknown":
                    model = val.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(val.split())
    except OSError:
        pass
    return dict(model=model, features=[f for f in FEATURES if f in flags])


@dataclass(frozen=True)
class PrecisionBenchConfig:
    source: ModelSource
    rows: Tuple[str, ...] = ROWS[:5]
    official: Optional[str] = None       # a FoundationVision/VAR checkout (the folder holding models/ and dist.py)
    repeats: int = 3
    class_id: int = 207
    seed: int = 0

    def __post_init__(self):
        bad = [r for r in self.rows if r not in ROWS]
        if bad or not self.rows:
            raise ConfigError(f"--rows: {(bad or [''])[0]!r} is not one of {', '.join(ROWS)}")
        if any(r.startswith("official") for r in self.rows):
            if not self.official or not os.path.isfile(os.path.join(self.official, "models", "var.py")):
                raise ConfigError("the official rows need --official DIR, a checkout of FoundationVision/VAR "
                                  "(the folder that holds models/var.py and dist.py)")
        if self.repeats < 1:
            raise ConfigError("--repeats must be >= 1")


@dataclass
class PrecisionRow:
    name: str
    per_image_s: float
    per_scale_s: List[float]            # empty for the official code (one call, no per-scale hook)
    runs_s: List[float]
    decoder_s: Optional[float] = None   # after the last scale: the decoder (int8 artifacts: its int8 convs);
                                        # None for the official code


@dataclass
class PrecisionBenchResult:
    model: str
    cpu: Dict[str, object]
    threads: int
    rows: Dict[str, PrecisionRow] = field(default_factory=dict)

    def table(self) -> str:
        ref = self.rows.get("official-bf16-autocast") or self.rows.get("eager-bf16-autocast") or \
            next(iter(self.rows.values()))
        lines = [f"{self.model}, batch 1, {self.threads} threads; CPU: {self.cpu['model']}; "
                 f"features: {' '.join(self.cpu['features']) or 'none of ' + ', '.join(FEATURES)}",
                 f"{'row':<24} {'s/image':>8} {'vs ' + ref.name:>28} {'decoder s':>9}  per scale (ms)"]
        for r in self.rows.values():
            scales = " ".join(f"{s * 1e3:.0f}" for s in r.per_scale_s)
            dec = "" if r.decoder_s is None else f"{r.decoder_s:.3f}"
            lines.append(f"{r.name:<24} {r.per_image_s:>8.3f} {r.per_image_s / ref.per_image_s:>28.2f} {dec:>9}  "
                         f"{scales}")
        return "\n".join(lines)


def _ours(row: str, cfg: PrecisionBenchConfig, models) -> Runner:
    from var_ssg.runtime.backends.eager import EagerBackend
    from var_ssg.runtime.opener import open_artifacts
    from var_ssg.runtime.pipeline import Pipeline
    backend, prec = row.split("-", 1)
    src = cfg.source
    if backend == "onnxruntime":
        if prec == "fp32":
            out = ensure_artifacts(src, 1)
        else:
            q = ModelSource(src.model, os.path.join(src.root, prec), src.ckpt, src.vae_ckpt, src.random_init)
            out = ensure_artifacts(q, 1, ExportConfig(precision=prec))
        _, b = open_artifacts(out, "onnxruntime")
    else:
        var, vae, note = models()
        b = EagerBackend(var, vae, source_note=note, **EagerBackend.run_precision(prec))    # as --precision runs it
    pipe, ssg = Pipeline(b), make_ssg(DEFAULT_SSG_BETA, b.info.transform)
    return lambda: timed_run(pipe, [cfg.class_id], cfg.seed, ssg)


def _official(row: str, cfg: PrecisionBenchConfig, models) -> Runner:
    """FoundationVision/VAR's own model and sampler, loaded with our weights (same state dict)."""
    import torch
    sys.path.insert(0, os.path.abspath(cfg.official))
    try:
        off = importlib.import_module("models")
    finally:
        sys.path.pop(0)
    var, vae, _ = models()
    c = var.cfg
    ovae, ovar = off.build_vae_var(device="cpu", patch_nums=c.patch_nums, V=c.V, Cvae=c.Cvae, ch=vae.cfg.ch,
                                   share_quant_resi=4, num_classes=c.num_classes, depth=c.depth,
                                   shared_aln=c.shared_aln, attn_l2_norm=True)
    ovae.load_state_dict(vae.state_dict(), strict=True)
    ovar.load_state_dict(var.state_dict(), strict=True)
    ovar.eval()
    auto = row.endswith("autocast")
    label = torch.tensor([cfg.class_id])

    def run():
        t = time.perf_counter()
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=auto):
            ovar.autoregressive_infer_cfg(B=1, label_B=label, g_seed=cfg.seed, cfg=DEFAULT_GUIDANCE, top_k=900,
                                          top_p=0.96)
        return time.perf_counter() - t, []
    return run


def run_precision_bench(cfg: PrecisionBenchConfig, progress: Optional[Callable[[str], None]] = None) \
        -> PrecisionBenchResult:
    import torch
    from var_ssg.graphs.config import get_preset
    from var_ssg.graphs.weights import load_models
    src = cfg.source
    cache = {}

    def models():
        if "m" not in cache:
            var, vae, w = load_models(get_preset(src.model), src.ckpt, src.vae_ckpt, src.random_init)
            cache["m"] = (var, vae, w.describe())
        return cache["m"]
    runners: Dict[str, Runner] = {}
    for row in cfg.rows:
        if progress:
            progress(f"open {row}")
        runners[row] = (_official if row.startswith("official") else _ours)(row, cfg, models)
        runners[row]()                                  # warm-up
    times: Dict[str, List[Tuple[float, List[float]]]] = {r: [] for r in cfg.rows}
    for i in range(cfg.repeats):
        for row in cfg.rows:
            if progress:
                progress(f"round {i + 1}/{cfg.repeats}: {row}")
            times[row].append(runners[row]())
    res = PrecisionBenchResult(model=src.model, cpu=cpu_features(), threads=torch.get_num_threads())
    for row, ts in times.items():
        res.rows[row] = precision_row(row, ts)
    return res


def precision_row(name: str, ts: List[Tuple[float, List[float]]]) -> PrecisionRow:
    """Medians of the rounds' (seconds, per-scale seconds): per image, per scale, and the decoder's
    time, which is what follows the last scale (the decoder and the host copies of the result)."""
    total = [t for t, _ in ts]
    scales = [statistics.median(s[k] for _, s in ts) for k in range(len(ts[0][1]))] if ts[0][1] else []
    dec = statistics.median(t - sum(s) for t, s in ts) if ts[0][1] else None
    return PrecisionRow(name, statistics.median(total), scales, total, dec)
