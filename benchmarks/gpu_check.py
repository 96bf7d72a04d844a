"""The GPU check: what a borrowed GPU can actually run, row by row, inside a time budget, for
var-d16 and var-d24 with random weights (no network). The rows and their order come from
benchmarks.gpu_plan (TensorRT and ONNX Runtime CUDA first where present, eager after); before
each row its remaining stages are estimated again (guesses until this run measured something,
then scaled from measurements) and checked against the budget actually left.

Each measured row: seconds per image (median of the timed runs after 2 warm-ups; repeats stop
early when time runs short), the ratio to eager fp32, the distance from the roofline floor
(benchmarks.roofline), and parity against eager fp32 on the same noise, free-running
(runtime.parity.compare: its bounds, its near-tie rule; logits compared on the rows whose tokens
still agree). The strict, teacher-forced check is scripts/parity.py's.

`GpuCheck(config, env).run()` -> GpuCheckResult; `on_row` sees each row the moment it is decided.
SIGTERM handling is the caller's: raise `Stopped` from the handler and the result comes back
with the rows so far and `stopped` set.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from var_ssg.graphs.config import (DEFAULT_GUIDANCE, DEFAULT_SSG_BETA, DEFAULT_TOP_P, SamplerConfig, get_preset,
                           make_ssg, topk_bake)
from var_ssg.common.errors import ConfigError

from .gpu_plan import (CLASSES, EXPORTED, Env, Estimates, GpuCheckConfig, OnDisk, PlannedRow, Progress, RowKey,
                       budget_reason, choose_exported, model_gparams, plan, row_stages)
from .roofline import choose_floor

COLUMNS = ("model", "backend", "precision", "batch", "ms / image", "vs eager fp32", "x roofline floor",
           "tokens = fp32", "first token diff", "logits rel err, k = 0..K-1", "within bound", "note")


class Stopped(Exception):
    """SIGTERM (the shell's timeout): finish with what was measured."""


class Budget:
    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.seconds, self.clock, self.t0 = seconds, clock, clock()

    def used(self) -> float:
        return self.clock() - self.t0

    def left(self) -> float:
        return self.seconds - self.used()

    def short(self, stages) -> Optional[str]:
        """None if the stages' estimated seconds fit what is left, else the reason to skip."""
        return None if sum(s for _, s in stages) <= self.left() else budget_reason(stages, self.left())


@dataclass
class ParitySummary:
    tokens_equal: float                    # share of equal tokens over all scales
    first_diff: Optional[int]              # first scale where a token differs
    logits_rel: List[Optional[float]]      # per scale max|d|/max|ref|, None where no row's tokens still agree
    bound: float                           # runtime.parity.BOUNDS[precision]
    within: bool                           # CFG and post-SSG logits within the bound
    unexplained_flips: int                 # differing tokens the near-tie rule does not explain


def parity_summary(ref, got, precision: str, k_max: int, transform: str, patch_nums) -> ParitySummary:
    import torch
    from var_ssg.runtime.parity import BOUNDS, compare
    rep = compare(ref, got, "backend", precision, k_max, transform, patch_nums, mode="free-running")
    same = [torch.from_numpy(a == b) for a, b in zip(ref.tokens, got.tokens)]
    live = torch.ones(same[0].shape[0], dtype=torch.bool)
    rel = []
    for k, r in enumerate(rep.rows):
        rel.append(r["logits_rel"] if live.any() else None)
        live &= same[k].all(dim=1)
    bound = BOUNDS[precision]
    first = next((k for k, s in enumerate(same) if not bool(s.all())), None)
    return ParitySummary(tokens_equal=sum(int(s.sum()) for s in same) / sum(s.numel() for s in same),
                         first_diff=first, logits_rel=rel, bound=bound,
                         within=all(r["logits_rel"] <= bound and r["logits_cfg_rel"] <= bound for r in rep.rows),
                         unexplained_flips=sum(1 for f in rep.flips if not f["explained"]))


@dataclass
class RowResult:
    key: RowKey
    status: str                            # "measured" | "skipped" | "failed"
    note: str = ""
    seconds: Optional[float] = None        # per batch, median of the timed runs
    runs: int = 0                          # timed runs (0: one warm run)
    vs_fp32: Optional[float] = None        # seconds / eager fp32's at the same batch
    x_floor: Optional[float] = None        # seconds / the roofline floor
    reference: bool = False                # eager fp32: the parity reference itself
    parity: Optional[ParitySummary] = None

    @property
    def ms_per_image(self) -> Optional[float]:
        return None if self.seconds is None else self.seconds / self.key.batch * 1000

    def cells(self) -> List[str]:
        k = self.key
        head = [k.model, k.backend, k.precision, str(k.batch)]
        if self.status != "measured":
            return head + ["-"] * (len(COLUMNS) - 5) + [("FAILED: " if self.status == "failed" else "skipped: ")
                                                         + self.note]
        cells = [f"{self.ms_per_image:.1f}", f"{self.vs_fp32:.2f}x" if self.vs_fp32 else "-",
                 f"{self.x_floor:.1f}x" if self.x_floor else "-"]
        p = self.parity
        if self.reference:
            cells += ["reference"] * 4
        elif p:
            ok = f"{'yes' if p.within else 'NO'} (<= {p.bound:g})"
            cells += [f"{p.tokens_equal * 100:.2f}%", "none" if p.first_diff is None else f"k={p.first_diff}",
                      " ".join("-" if r is None else f"{r:.0e}" for r in p.logits_rel),
                      ok + (f", {p.unexplained_flips} unexplained token flips" if p.unexplained_flips else "")]
        else:
            cells += ["-"] * 4
        note = (self.note + "; " if self.note else "") + (f"median of {self.runs}" if self.runs else "one warm run")
        return head + cells + [note]

    def markdown(self) -> str:
        return "| " + " | ".join(self.cells()) + " |"


def markdown_header() -> str:
    return "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)


@dataclass
class GpuCheckResult:
    env: Env
    plan: List[PlannedRow]
    rows: List[RowResult] = field(default_factory=list)
    used_s: float = 0.0
    budget_s: float = 0.0
    stopped: bool = False

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.rows)

    def summary(self) -> str:
        note = " stopped by SIGTERM (timeout): the rows above are what was measured;" if self.stopped else ""
        return (f"summary: {self.count('measured')} measured, {self.count('skipped')} skipped, "
                f"{self.count('failed')} failed;{note} {self.used_s:.0f} s of a {self.budget_s:.0f} s budget")


def probe(device: str) -> Env:
    """What this machine can run: CUDA, the GPU, onnxruntime's providers, tensorrt."""
    import torch
    cuda = torch.cuda.is_available()
    env = dict(cuda=cuda, gpu=torch.cuda.get_device_name(0) if device == "cuda" and cuda else "cpu",
               torch=torch.__version__, torch_cuda=torch.version.cuda)
    try:
        import onnxruntime as ort
        env.update(ort=ort.__version__, providers=tuple(ort.get_available_providers()))
    except ImportError:
        pass
    try:
        import tensorrt
        env.update(trt=tensorrt.__version__)
    except ImportError:
        pass
    return Env(**env)


def artifacts_dir(config: GpuCheckConfig, model: str) -> str:
    return os.path.join(config.artifacts_root, f"{model}-b1-fp32")


def export_config(config: GpuCheckConfig, target: str = "onnx"):
    from var_ssg.export.onnx_export import ExportConfig
    return ExportConfig(top_k=config.top_k, target=target)


def on_disk(config: GpuCheckConfig, env: Env) -> Dict[str, OnDisk]:
    """Per exported model: are the graphs (and engines, where TensorRT can run) up to date?"""
    usable, _ = choose_exported(config.device, env)
    if not usable:                       # nothing to export: not even the exporter is imported
        return {}
    from var_ssg.contract.manifest import load_manifest
    from var_ssg.export.onnx_export import cache_key, weights_id
    from var_ssg.graphs.weights import WeightSource
    disk = {}
    for m in (m for m in config.models if m in config.exported):
        try:
            data = load_manifest(artifacts_dir(config, m), verify_hashes=False).data
        except (ConfigError, OSError):
            continue
        graphs = data.get("cache_key") == cache_key(get_preset(m), export_config(config),
                                                    weights_id(WeightSource(kind="random", seed=0)))
        engines = False
        if graphs and "tensorrt" in usable:
            try:
                from var_ssg.export.trt_build import engines_stale, this_machine
                engines = engines_stale(data, this_machine()) is None
            except (ConfigError, ImportError, RuntimeError):
                pass
        disk[m] = OnDisk(graphs=graphs, engines=engines)
    return disk


class _Model:
    """One model's state: its weights (built on first need), sampler, eager fp32 results."""

    def __init__(self, name: str, top_k: int):
        self.cfg = get_preset(name)
        self.k_max = topk_bake(top_k, self.cfg.V)           # the sampler K an export bakes too
        self.sampler = SamplerConfig(top_k=min(top_k, self.k_max) if self.k_max else 0, top_p=DEFAULT_TOP_P)
        self.ssg = make_ssg(DEFAULT_SSG_BETA, "dct")
        self.var = self.vae = None
        self.ref, self.base = {}, {}                         # batch -> eager fp32 result / seconds per batch


class GpuCheck:
    def __init__(self, config: GpuCheckConfig, env: Env, budget: Optional[Budget] = None,
                 on_row: Callable[[RowResult], None] = lambda row: None, disk: Optional[Dict[str, OnDisk]] = None):
        self.config, self.env, self.on_row = config, env, on_row
        self.budget = budget or Budget(config.budget_s)
        self.est = Estimates(model_gparams(config.models), config.repeats)
        self.disk = on_disk(config, env) if disk is None else disk
        self.plan = plan(config, env, self.disk, Estimates(self.est.gparams, config.repeats))
        self.done = Progress.from_disk(self.disk)
        self.model: Optional[_Model] = None

    def run(self) -> GpuCheckResult:
        res = GpuCheckResult(self.env, self.plan, budget_s=self.config.budget_s)
        try:
            for p in self.plan:
                if self.model is None or self.model.cfg.name != p.key.model:
                    self._free()
                    self.model = _Model(p.key.model, self.config.top_k)
                res.rows.append(self._row(p))
                self.on_row(res.rows[-1])
        except Stopped:
            res.stopped = True
        finally:
            self._free()
        res.used_s = self.budget.used()
        return res

    # ------------------------------------------------------------------ one row
    def _row(self, p: PlannedRow) -> RowResult:
        key = p.key
        if p.blocked:
            return RowResult(key, "skipped", p.blocked)
        stages = row_stages(key, self.done, self.est)
        why = self.budget.short(stages)
        if why:
            return RowResult(key, "skipped", why)
        m, notes = self.model, []
        try:
            if key.model not in self.done.weights:
                self._weights()
            if key.backend in EXPORTED:
                if key.model not in self.done.graphs or (key.backend == "tensorrt" and key.model not in self.done.engines):
                    notes.append(self._export(key.backend))
                if key.model not in self.done.reference:
                    self._reference()
                pipe = self._pipeline(key.backend)
            else:
                pipe = self._eager(key.precision)
            sec, result, n = self._measure(pipe, key.batch)
        except (ConfigError, RuntimeError, OSError) as e:
            return RowResult(key, "failed", f"{type(e).__name__}: {str(e)[:160]}")
        finally:
            pipe = None
            self._empty_cache()
        self.done.record(key)
        row = RowResult(key, "measured", "; ".join(notes), seconds=sec, runs=n,
                        vs_fp32=sec / m.base[key.batch] if key.batch in m.base else None)
        if self.config.device == "cuda":
            fl = choose_floor(m.cfg, key.batch, key.precision, self.env.gpu)
            row.x_floor = sec / fl.seconds if fl else None
        if (key.backend, key.precision) == ("eager", "fp32"):
            m.ref[key.batch], m.base[key.batch] = result, sec
            row.vs_fp32, row.reference = 1.0, True
        elif key.batch in m.ref:
            row.parity = parity_summary(m.ref[key.batch], result, key.precision, m.k_max, "dct", m.cfg.patch_nums)
        return row

    # ------------------------------------------------------------------ stages
    def _weights(self) -> None:
        from var_ssg.graphs.weights import random_models
        m = self.model
        m.var, m.vae = random_models(m.cfg, 0)
        self.done.weights.add(m.cfg.name)

    def _export(self, backend: str) -> str:
        """Export the artifacts `backend`'s row needs (export_artifacts reuses what is up to date)."""
        m, name = self.model, self.model.cfg.name
        from var_ssg.export.onnx_export import OutTaken, export_artifacts
        from var_ssg.graphs.weights import WeightSource
        ec = export_config(self.config, "trt" if backend == "tensorrt" else "onnx")
        out, src = artifacts_dir(self.config, name), WeightSource(kind="random", seed=0)
        m.var.to("cpu")                                  # the exporter traces on the host
        m.vae.to("cpu")
        t = time.monotonic()
        try:
            export_artifacts(m.var, m.vae, src, out, ec)
        except OutTaken:                                 # our own scratch directory: older artifacts
            export_artifacts(m.var, m.vae, src, out, ec, force=True)
        self.done.graphs.add(name)
        if ec.target == "trt":
            self.done.engines.add(name)
        return f"export ({ec.target}) {time.monotonic() - t:.0f} s"

    def _reference(self) -> None:
        """Eager fp32 at batch 1 (1 timed run): the parity reference and the speed baseline of
        the exported rows, which come before the eager rows."""
        m = self.model
        sec, m.ref[1], _ = self._measure(self._eager("fp32"), 1, repeats=1)
        m.base[1] = sec
        self.done.reference.add(m.cfg.name)
        self._empty_cache()

    def _eager(self, precision: str):
        import torch
        from var_ssg.runtime.backends.eager import EagerBackend
        from var_ssg.runtime.pipeline import Pipeline
        m = self.model
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        return Pipeline(EagerBackend(m.var, m.vae, transform="dct", k_max=m.k_max, dtype=dtype,
                                     device=self.config.device))

    def _pipeline(self, backend: str):
        from var_ssg.runtime.backends import open_backend
        from var_ssg.runtime.pipeline import Pipeline
        return Pipeline(open_backend(backend, artifacts_dir(self.config, self.model.cfg.name),
                                     device=self.config.device))

    def _measure(self, pipe, batch: int, repeats: Optional[int] = None):
        """2 warm-ups (TensorRT captures its CUDA graphs on the 2nd), then up to `repeats` timed
        runs while the budget lasts. (seconds per batch, the first run's result, timed runs)."""
        m, repeats = self.model, self.config.repeats if repeats is None else repeats
        classes = list(CLASSES[:batch])
        res = pipe.run(classes, 0, guidance=DEFAULT_GUIDANCE, sampler=m.sampler, ssg=m.ssg, keep_logits=True)
        self._sync()
        ts = []
        for r in range(repeats + 1):
            if r > 1 and self.budget.left() < 2 * max(ts):
                break
            t = time.perf_counter()
            pipe.run(classes, r + 1, guidance=DEFAULT_GUIDANCE, sampler=m.sampler, ssg=m.ssg)
            self._sync()
            ts.append(time.perf_counter() - t)
            self.est.measured(m.cfg.name, batch, ts[-1])
        timed = ts[1:] or ts                             # ts[0] is the second warm-up
        return statistics.median(timed), res, len(ts) - 1

    def _sync(self) -> None:
        if self.config.device == "cuda":
            import torch
            torch.cuda.synchronize()

    def _empty_cache(self) -> None:
        if self.config.device == "cuda":
            import torch
            torch.cuda.empty_cache()

    def _free(self) -> None:
        """Drop the current model's weights and results (the rows of one model are consecutive)."""
        if self.model is not None:
            self.model.var = self.model.vae = None
            self.model.ref.clear()
            self.done.weights.discard(self.model.cfg.name)
            self.done.reference.discard(self.model.cfg.name)
        self._empty_cache()
