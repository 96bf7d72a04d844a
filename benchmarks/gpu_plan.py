"""The GPU check's plan, pure (no torch, no GPU): from what the machine has (`Env`) and what is
already on disk, the rows in the order the budget is spent on them, each with the stages it
still needs and their estimated seconds, or the reason it cannot run.

Order, per model: TensorRT, then ONNX Runtime CUDA (fp32, batch 1, for the `exported` models,
where their packages and a GPU exist), then eager fp32 / fp16 / bf16 per batch. The exported
rows come first because their export and engine build are the long stages: placed after the
eager rows they would find the budget spent.

A row's cost is what it still needs when its turn comes (`row_stages`): the model's random
weights if not built yet; for an exported row the export (unless the graphs on disk are up to
date), the TensorRT engines (the TensorRT row, unless up to date), one eager fp32 reference run
(the parity baseline) and its timed runs; for an eager row its timed runs. `plan` walks the
rows with a simulated clock; the check (benchmarks.gpu_check) asks `row_stages` again, with what
it has measured, against the budget actually left before each row (DESIGN.md "Decisions": the
GPU check spends its budget on TensorRT first).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple

from var_ssg.graphs.config import DEFAULT_TOP_K, EAGER_PRECISIONS
from var_ssg.common.errors import ConfigError

CLASSES = (207, 360, 387, 974, 88, 979, 417, 279)        # batch b uses the first b
EXPORTED = ("tensorrt", "onnxruntime")                   # their order in the table
# Guesses (seconds per 1e9 transformer parameters) used until this run has measured something.
BUILD_S_PER_GPARAM = 30       # random weights on the host (var-d24: ~1 G parameters)
RUN_S_PER_GPARAM = 3.0        # one batch-1 eager run, first one (CUDA start-up) included
EXPORT_S_PER_GPARAM = 120     # ONNX export + checker + lint + hashes (var-d16, 0.31 G: 29 s on 2 CPU cores here)
TRT_BUILD_S_PER_GPARAM = 800  # step engine (10 profiles) + decoder; never measured
ROW_OVERHEAD_S = 5            # an eager row: backend set-up, cast, freeing


@dataclass(frozen=True)
class GpuCheckConfig:
    models: Tuple[str, ...] = ("var-d16", "var-d24")
    precisions: Tuple[str, ...] = EAGER_PRECISIONS             # eager precisions (fp32 first: the reference)
    batches: Tuple[int, ...] = (1, 8)
    device: str = "cuda"
    repeats: int = 3                                     # timed runs per row (after 2 warm-ups)
    budget_s: float = 320.0
    exported: Tuple[str, ...] = ("var-d16",)             # models that also get TensorRT / ONNX Runtime rows
    artifacts_root: str = "build/gpu_check"
    top_k: int = DEFAULT_TOP_K

    def __post_init__(self):
        for prec in self.precisions:
            if prec not in EAGER_PRECISIONS:
                raise ConfigError(f"--precisions: {prec!r} is not one of {', '.join(EAGER_PRECISIONS)}")
        if any(not 1 <= b <= len(CLASSES) for b in self.batches):
            raise ConfigError(f"--batches must be in 1..{len(CLASSES)}")
        if self.device not in ("cuda", "cpu"):
            raise ConfigError(f"--device must be cuda or cpu, got {self.device!r}")
        if self.repeats < 0:
            raise ConfigError("--repeats must be >= 0")


@dataclass(frozen=True)
class Env:
    """What the machine has (benchmarks.gpu_check.probe fills it in)."""
    cuda: bool = False
    gpu: str = "cpu"                       # the CUDA device's name when --device cuda finds one
    ort: Optional[str] = None              # onnxruntime version
    providers: Tuple[str, ...] = ()
    trt: Optional[str] = None              # tensorrt version
    torch: str = ""
    torch_cuda: Optional[str] = None

    def describe(self, device: str, budget_s: float) -> str:
        dev = "cpu" if device == "cpu" else self.gpu if self.cuda else "cuda requested, none visible"
        return (f"device: {dev}; torch {self.torch} (cuda {self.torch_cuda}, available: {self.cuda}); onnxruntime "
                f"{self.ort or 'not installed'} {list(self.providers)}; tensorrt {self.trt or 'not installed'}; "
                f"budget {budget_s:.0f} s")


@dataclass(frozen=True)
class OnDisk:
    """An exported model's artifacts under --artifacts-root, before the check starts."""
    graphs: bool = False                   # up to date (cache key)
    engines: bool = False                  # TensorRT engines up to date for this machine


@dataclass(frozen=True)
class RowKey:
    model: str
    backend: str
    precision: str
    batch: int


@dataclass(frozen=True)
class PlannedRow:
    key: RowKey
    blocked: Optional[str] = None          # why it cannot run on this machine at all
    stages: Tuple[Tuple[str, float], ...] = ()   # what it still needs when its turn comes, estimated
    start_s: float = 0.0                   # when it starts, on the plan's clock
    fits: bool = False                     # the estimates put it inside the budget

    @property
    def estimate_s(self) -> float:
        return sum(s for _, s in self.stages)


@dataclass
class Progress:
    """What is done: the plan simulates it, the check records it."""
    weights: Set[str] = field(default_factory=set)       # models whose random weights are built
    graphs: Set[str] = field(default_factory=set)        # models exported (ONNX up to date on disk)
    engines: Set[str] = field(default_factory=set)       # models with TensorRT engines up to date
    reference: Set[str] = field(default_factory=set)     # models with an eager fp32 batch-1 result

    @classmethod
    def from_disk(cls, disk: Dict[str, OnDisk]) -> "Progress":
        return cls(graphs={m for m, d in disk.items() if d.graphs}, engines={m for m, d in disk.items() if d.engines})

    def record(self, key: RowKey) -> None:
        """`key`'s row ran: what it built is built."""
        self.weights.add(key.model)
        if key.backend in EXPORTED:
            self.graphs.add(key.model)
            self.reference.add(key.model)
        if key.backend == "tensorrt":
            self.engines.add(key.model)
        if (key.backend, key.precision, key.batch) == ("eager", "fp32", 1):
            self.reference.add(key.model)


class Estimates:
    """Seconds for each stage: the guesses above, scaled by model size, replaced by this run's
    measurements as they come (`measured`)."""

    def __init__(self, gparams: Dict[str, float], repeats: int):
        self.gparams, self.repeats = gparams, repeats
        self.run_s: Dict[str, Dict[int, float]] = {}          # model -> batch -> seconds of one run, measured

    def measured(self, model: str, batch: int, seconds: float) -> None:
        self.run_s.setdefault(model, {})[batch] = seconds

    def run(self, model: str, batch: int) -> float:
        runs = self.run_s.get(model, {})
        if batch in runs:
            return runs[batch]
        if runs:                                    # linear in batch: an upper bound on a GPU
            b0 = max(runs)
            return runs[b0] * batch / b0
        return RUN_S_PER_GPARAM * self.gparams[model] * batch

    def timed_runs(self, model: str, batch: int) -> float:
        return self.run(model, batch) * (self.repeats + 2)


def row_stages(key: RowKey, done: Progress, est: Estimates) -> Tuple[Tuple[str, float], ...]:
    """The stages `key`'s row still needs, given what is done, with their estimated seconds."""
    m, gp = key.model, est.gparams[key.model]
    stages = []
    if m not in done.weights:
        stages.append(("random weights", BUILD_S_PER_GPARAM * gp))
    if key.backend in EXPORTED:
        if m not in done.graphs:
            stages.append(("export", EXPORT_S_PER_GPARAM * gp))
        if key.backend == "tensorrt" and m not in done.engines:
            stages.append(("TensorRT engines", TRT_BUILD_S_PER_GPARAM * gp))
        if m not in done.reference:
            stages.append(("eager fp32 reference", est.run(m, 1) * 3))
        stages.append(("runs", est.timed_runs(m, key.batch)))
    else:
        stages.append(("runs", est.timed_runs(m, key.batch) + ROW_OVERHEAD_S))
    return tuple(stages)


def choose_exported(device: str, env: Env) -> Tuple[List[str], Dict[str, str]]:
    """([exported backends this machine can run], {backend: why not}), before anything is exported."""
    ok, why = [], {}
    no_gpu = device == "cuda" and not env.cuda
    if env.trt is None:
        why["tensorrt"] = "tensorrt is not installed"
    elif device != "cuda" or no_gpu:
        why["tensorrt"] = "needs a CUDA GPU"
    else:
        ok.append("tensorrt")
    if env.ort is None:
        why["onnxruntime"] = "onnxruntime is not installed"
    elif device == "cuda" and "CUDAExecutionProvider" not in env.providers:
        why["onnxruntime"] = (f"onnxruntime {env.ort} has no CUDAExecutionProvider (a CPU build; "
                              f"onnxruntime-gpu is not installed)")
    elif no_gpu:
        why["onnxruntime"] = "no CUDA device visible to PyTorch"
    else:
        ok.append("onnxruntime")
    if no_gpu:
        why = {b: w if w.startswith("no CUDA") else f"no CUDA device visible to PyTorch; {w}" for b, w in why.items()}
    return ok, why


def rows_in_order(config: GpuCheckConfig) -> List[RowKey]:
    keys = []
    for m in config.models:
        if m in config.exported:
            keys += [RowKey(m, b, "fp32", 1) for b in EXPORTED]
        keys += [RowKey(m, "eager", prec, b) for b in config.batches for prec in config.precisions]
    return keys


def model_gparams(models: Sequence[str]) -> Dict[str, float]:
    """Each model's transformer parameters, in units of 1e9 (what the guesses scale with)."""
    from var_ssg.graphs.config import get_preset
    from .roofline import transformer_bytes
    return {m: transformer_bytes(get_preset(m), 1) / 1e9 for m in models}


def plan(config: GpuCheckConfig, env: Env, disk: Optional[Dict[str, OnDisk]] = None,
         est: Optional[Estimates] = None) -> List[PlannedRow]:
    """Every row in order: blocked (with the reason), or its stages and estimates on a clock
    that starts at 0 and advances only by the rows that fit `config.budget_s`. `disk`: what the
    artifacts root already holds per exported model; `est`: the guesses unless given."""
    ok, why = choose_exported(config.device, env)
    no_gpu = config.device == "cuda" and not env.cuda
    done = Progress.from_disk(disk or {})
    est = est or Estimates(model_gparams(config.models), config.repeats)
    clock, rows = 0.0, []
    for key in rows_in_order(config):
        if key.backend in EXPORTED and key.backend not in ok:
            rows.append(PlannedRow(key, blocked=why[key.backend]))
            continue
        if no_gpu:
            rows.append(PlannedRow(key, blocked="no CUDA device visible to PyTorch"))
            continue
        stages = row_stages(key, done, est)
        cost = sum(s for _, s in stages)
        fits = clock + cost <= config.budget_s
        rows.append(PlannedRow(key, stages=stages, start_s=clock, fits=fits))
        if fits:
            clock += cost
            done.record(key)
    return rows


def budget_reason(stages: Sequence[Tuple[str, float]], left: float) -> str:
    parts = ", ".join(f"{name} {s:.0f} s" for name, s in stages)
    return f"budget: needs ~{sum(s for _, s in stages):.0f} s ({parts}), {max(left, 0):.0f} s left"
