#!/usr/bin/env python3
"""The GPU check (run by scripts/gpu_check.sh): what a borrowed GPU can actually run, as one
markdown table printed row by row (a row the moment it is measured, a skipped row with its
reason, a `summary:` line last), for var-d16 and var-d24 with random weights. No network.

Rows, in the order the budget is spent on them:
  1. eager PyTorch fp32 / fp16 / bf16 at batch 1 and 8: latency per image, ratio to eager fp32,
     distance from the roofline floor (tools/roofline.py, data-sheet peaks), and parity against
     eager fp32 with the same noise: share of equal tokens, the first scale whose tokens differ,
     and per scale max|d logits| / max|ref|, checked against SPEC section 6's bound up to and
     including that scale (past it the two runs sample different token paths, so their logits
     are no longer comparable). The strict, teacher-forced rule is runtime/parity.py's.
  2. ONNX Runtime's CUDA provider and TensorRT (fp32, batch 1, --exported models), only where
     their packages exist: the backends are chosen before anything is exported, and nothing
     is exported when none of them can run.
Budget: a stage starts only when its estimate (a guess until something was measured, then
scaled from measurements) fits what is left; repeats stop early when time runs short; SIGTERM
(gpu_check.sh's `timeout`) ends the table with the summary line.

  bash scripts/gpu_check.sh                                   (on the GPU machine; < 6 min)
  python3 scripts/gpu_check.py --device cpu --models var-d2-tiny --exported var-d2-tiny --top-k 64
"""
from tools.cli import script_main

script_main(__file__)
