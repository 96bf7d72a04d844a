#!/usr/bin/env bash
# The GPU check: run on the GPU machine from the repository root, no network needed.
#   bash scripts/gpu_check.sh            -> a markdown table on stdout (and build/gpu_check.log)
# Eager CUDA fp32/fp16 for var-d16 and var-d24 (random weights), ONNX Runtime's CUDA provider
# and TensorRT (where installed) for var-d16, parity against eager fp32, per-image latency and
# ratios. Finishes in under 8 minutes: stages that would not fit are skipped and listed.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p build
timeout 470 python scripts/gpu_check.py --budget 420 "$@" 2>&1 | grep -v "Skipping torchvision" | tee build/gpu_check.log
