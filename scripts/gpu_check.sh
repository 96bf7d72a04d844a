#!/usr/bin/env bash
# The GPU check, from any directory, no network, no install: the GPU machine this project
# borrows has a bare `python3` (PyTorch with CUDA, CPU-only onnxruntime, no TensorRT), so the
# packages come from this checkout (PYTHONPATH). One markdown table on stdout, row by row, and
# in $GPU_CHECK_LOG (default build/gpu_check.log); a `summary:` line last.
#   bash scripts/gpu_check.sh                         TensorRT / ONNX Runtime CUDA rows first where installed,
#                                                     then eager CUDA fp32/fp16/bf16, var-d16 + var-d24, batch 1 and 8
#   bash scripts/gpu_check.sh --models var-d16        any scripts/gpu_check.py option ($PYTHON: another interpreter)
# Budget: 6 minutes. gpu_check.py skips a row whose estimate does not fit what is left of 320 s; `timeout`
# stops it at 360 s, and the rows printed so far stay. Without a CUDA GPU every row is skipped
# with its reason (exit 0).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
log=${GPU_CHECK_LOG:-build/gpu_check.log}
mkdir -p "$(dirname "$log")"
timeout -k 10 360 "${PYTHON:-python3}" scripts/gpu_check.py --budget 320 "$@" 2>&1 \
    | grep --line-buffered -v "Skipping torchvision" | tee "$log"
rc=${PIPESTATUS[0]}
if [ "$rc" = 124 ]; then
    echo "gpu_check.sh: stopped by the 6-minute timeout; the rows above were measured" | tee -a "$log"
fi
exit "$rc"
