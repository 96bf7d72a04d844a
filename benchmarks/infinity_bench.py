"""Infinity's side-by-side bench (DESIGN.md, "Infinity"): one artifacts directory, every backend
opened once and warmed up, then the backends alternate for `repeats` rounds; medians per image
and per scale, the process's peak RSS.

The prompt is seeded random T5 states of `text_tokens` tokens (padded to the preset's length as
always): the text graph runs inside scale 0's time, the T5 encoder itself is not timed (it runs
once per request, on the host, and is not part of what we export).

`run_infinity_bench(InfinityBenchConfig)` -> InfinityBenchResult; `.summary()` is the last line.
"""
from __future__ import annotations

import resource
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from var_ssg.common.errors import ConfigError


@dataclass(frozen=True)
class InfinityBenchConfig:
    artifacts: str
    backends: Tuple[str, ...] = ("eager", "onnxruntime")
    repeats: int = 3
    aspect_ratio: float = 1.0
    ssg_beta: str = "0.5"
    text_tokens: int = 16

    def __post_init__(self):
        if not self.backends:
            raise ConfigError("--backends is empty")
        bad = [b for b in self.backends if b not in ("eager", "onnxruntime")]
        if bad:
            raise ConfigError(f"--backends {','.join(bad)}: the Infinity bench runs eager and onnxruntime")
        if self.repeats < 1:
            raise ConfigError("--repeats must be >= 1")
        if self.text_tokens < 1:
            raise ConfigError("the prompt needs at least one token")


@dataclass
class InfinityTiming:
    per_image_s: float
    per_scale_s: List[float]         # scale 0 includes the text graph
    decode_s: float                  # median of each run's rest: the decoder (and the copies out)
    runs_s: List[float]


@dataclass
class InfinityBenchResult:
    artifacts: str
    model: str
    batch: int
    schedule: List[Tuple[int, int]]
    backends: Dict[str, InfinityTiming]
    repeats: int
    threads: int
    peak_rss_gib: float

    def summary(self) -> str:
        parts = [f"{n}={t.per_image_s:.3f}s/image" for n, t in self.backends.items()]
        if "eager" in self.backends and "onnxruntime" in self.backends:
            parts.append(f"onnxruntime/eager={self.backends['onnxruntime'].per_image_s / self.backends['eager'].per_image_s:.2f}")
        return "summary: " + " ".join(parts)

    def to_json(self) -> Dict:
        return dict(asdict(self), schedule=[list(hw) for hw in self.schedule])


def _rows(cfg, batch: int, tokens: int, beta: str):
    from var_ssg.runtime.infinity import PromptRow
    if tokens > cfg.text_maxlen:
        raise ConfigError(f"the prompt has {tokens} tokens; {cfg.name} takes at most {cfg.text_maxlen}")
    rng = np.random.default_rng(0)
    text = rng.standard_normal((tokens, cfg.text_dim)).astype(np.float32)
    return [PromptRow(text, np.ones(tokens, np.float32), seed=i, ssg_beta=beta) for i in range(batch)]


def timed_run(pipe, rows, aspect_ratio: float) -> Tuple[float, List[float]]:
    marks = [time.perf_counter()]
    pipe.run(rows, aspect_ratio, progress=lambda k: marks.append(time.perf_counter()))
    return time.perf_counter() - marks[0], [b - a for a, b in zip(marks, marks[1:])]


def run_infinity_bench(config: InfinityBenchConfig,
                       progress: Optional[Callable[[str], None]] = None) -> InfinityBenchResult:
    import torch
    from var_ssg.runtime.infinity import open_infinity
    pipes = {n: open_infinity(artifacts=config.artifacts, backend=n)[0] for n in config.backends}
    cfg = next(iter(pipes.values())).info.cfg
    # the exported batch, whichever backend comes first (eager's info has none: it takes any)
    B = next((p.info.batch for p in pipes.values() if p.info.batch), None)
    if B is None:
        from var_ssg.contract.filecheck import read_manifest
        B = int(read_manifest(config.artifacts)["batch"])
    sched = cfg.schedule(config.aspect_ratio)
    rows = _rows(cfg, B, config.text_tokens, config.ssg_beta)
    for n, pipe in pipes.items():                       # warm-up
        if progress:
            progress(f"warm-up {n}")
        timed_run(pipe, rows, config.aspect_ratio)
    res: Dict[str, Dict[str, list]] = {n: dict(total=[], per=[], rest=[]) for n in pipes}
    for r in range(config.repeats):                     # alternate the backends every round
        for n, pipe in pipes.items():
            if progress:
                progress(f"round {r + 1}/{config.repeats} {n}")
            t, per = timed_run(pipe, rows, config.aspect_ratio)
            res[n]["total"].append(t)
            res[n]["per"].append(per)
            res[n]["rest"].append(t - sum(per))         # this run's decoder (and copies out)
    out = {}
    for n, d in res.items():
        tot = statistics.median(d["total"])
        per = [statistics.median(x) for x in zip(*d["per"])]
        # the decoder's median over the runs (not the median total less the per-scale medians:
        # medians do not add, and that difference may even be negative)
        out[n] = InfinityTiming(per_image_s=tot / B, per_scale_s=per, decode_s=statistics.median(d["rest"]),
                                runs_s=d["total"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    return InfinityBenchResult(artifacts=config.artifacts, model=cfg.name, batch=B, schedule=list(sched.hw),
                               backends=out, repeats=config.repeats, threads=torch.get_num_threads(),
                               peak_rss_gib=peak)
