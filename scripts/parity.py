#!/usr/bin/env python
"""Prove a backend matches eager PyTorch scale by scale; exit 1 past the parity bounds (DESIGN.md, "Parity bounds").

  python scripts/parity.py --artifacts build/var-d2 --backends eager,onnxruntime --class 1 2 --seeds 0-5
  python scripts/parity.py --artifacts build/var-d2 --free-running        (a report: images equal, PSNR)

Teacher-forced by default: the backend follows the reference's tokens, so every scale compares
like with like, and every token it draws differently must be a near-tie (runtime/parity.py).
"""
from var_ssg.tools.cli import script_main

script_main(__file__)
