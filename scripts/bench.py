#!/usr/bin/env python
"""Side-by-side benchmarks in one process: backends alternate after warm-up, medians over
repeats. Prints per-image and per-scale latency, SSG on vs off, DSE folded vs chain vs
torch.fft, peak memory, and a last `summary:` line.

  python scripts/bench.py --model var-d16 --random-init 0 --backends eager,onnxruntime --batch 1,4 \
      --repeats 3 --json build/bench.json --plot build/bench.png
  python scripts/bench.py --artifacts build/var-d24 --repeats 1        (one existing artifacts dir)

On a GPU (--device cuda) it also prints the roofline floor and each backend's distance from it.
"""
from var_ssg.tools.cli import script_main

script_main(__file__)
