"""`scripts/gpu_check.py`: The GPU check (run by scripts/gpu_check.sh): what a borrowed GPU can actually run, as one
markdown table printed row by row (a row the moment it is measured, a skipped row with its
reason, a `summary:` line last), for var-d16 and var-d24 with random weights. No network.
The work is benchmarks.gpu_check (the plan: benchmarks.gpu_plan).

Rows, in the order the budget is spent on them (per model):
  1. TensorRT and ONNX Runtime's CUDA provider (fp32, batch 1, --exported models), only where
     their packages and a GPU exist: export (or reuse) and engine build are the long stages, so
     they come first; nothing is exported when neither can run.
  2. eager PyTorch fp32 / fp16 / bf16 at batch 1 and 8.
Each row: latency per image, ratio to eager fp32, distance from the roofline floor (data-sheet
peaks), and parity against eager fp32 on the same noise (share of equal tokens, the first scale
whose tokens differ, per-scale max|d logits| / max|ref| on the rows whose tokens still agree,
checked against runtime.parity.BOUNDS). The strict, teacher-forced check is scripts/parity.py.
Budget: before each row, what it still needs (weights, export, engines, reference, runs) is
estimated (guesses until something was measured, then scaled from measurements) and the row
runs only if that fits what is left; repeats stop early when time runs short; SIGTERM
(gpu_check.sh's `timeout`) ends the table with the summary line.

  bash scripts/gpu_check.sh                                   (on the GPU machine; < 6 min)
  python3 scripts/gpu_check.py --device cpu --models var-d2-tiny --exported var-d2-tiny --top-k 64
"""
from __future__ import annotations

import logging
import signal

from var_ssg.tools.cli import parser
from var_ssg.graphs.config import DEFAULT_TOP_K
from var_ssg.common.errors import ConfigError


def _names(s: str) -> tuple:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def main(argv=None) -> int:
    p = parser("GPU check: TensorRT / ONNX Runtime CUDA where installed, then eager CUDA fp32/fp16/bf16; one table.")
    p.add_argument("--models", default="var-d16,var-d24")
    p.add_argument("--precisions", default="fp32,fp16,bf16", help="eager precisions (fp32 first: the reference)")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row (after 2 warm-ups), fewer when short of time")
    p.add_argument("--budget", type=float, default=320, help="seconds; a row whose estimate does not fit is skipped")
    p.add_argument("--exported", default="var-d16", help="models that also get TensorRT / ONNX Runtime rows (batch 1)")
    p.add_argument("--artifacts-root", default="build/gpu_check")
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K)
    a = p.parse_args(argv)
    from var_ssg.benchmarks.gpu_check import Budget, GpuCheck, Stopped, markdown_header, probe
    from var_ssg.benchmarks.gpu_plan import GpuCheckConfig
    budget = Budget(a.budget)

    def on_term(signum, frame):
        raise Stopped()
    signal.signal(signal.SIGTERM, on_term)
    logging.getLogger().setLevel(logging.WARNING)      # keep INFO lines out of the table
    try:
        batches = tuple(int(x) for x in _names(a.batches))
    except ValueError:
        raise ConfigError(f"--batches must be comma-separated integers, got {a.batches!r}") from None
    config = GpuCheckConfig(models=_names(a.models), precisions=_names(a.precisions), batches=batches,
                            device=a.device, repeats=a.repeats, budget_s=a.budget, exported=_names(a.exported),
                            artifacts_root=a.artifacts_root, top_k=a.top_k)
    env = probe(a.device)
    print(env.describe(a.device, a.budget), flush=True)
    check = GpuCheck(config, env, budget, on_row=lambda row: print(row.markdown(), flush=True))
    print(markdown_header(), flush=True)
    result = check.run()
    print(result.summary(), flush=True)
    return 1 if result.count("failed") else 0
