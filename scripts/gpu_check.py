#!/usr/bin/env python3
"""The GPU check (run by scripts/gpu_check.sh): what a borrowed GPU can actually run, as one
markdown table printed row by row (TensorRT and ONNX Runtime CUDA first where installed, then
eager fp32/fp16/bf16), inside a time budget, and a `summary:` line last. Details:
tools/commands/gpu_check.py; the library is benchmarks/gpu_check.py.

  bash scripts/gpu_check.sh                                   (on the GPU machine; < 6 min)
  python3 scripts/gpu_check.py --device cpu --models var-d2-tiny --exported var-d2-tiny --top-k 64
"""
from var_ssg.tools.cli import script_main

script_main(__file__)
