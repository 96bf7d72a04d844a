#!/usr/bin/env python
"""Sample class-conditional images into an ADM-format .npz (arr_0 uint8 N H W 3, labels, settings).

  python scripts/sample.py --artifacts build/var-d16 --classes 0-999 --per-class 50 --seed 0 \
      --ssg-beta linear:0.1,0.3 --out samples.npz [--resume] [--png-dir DIR]
  python scripts/sample.py --model var-d2-tiny --random-init 0 --classes 0-3 --per-class 2 --out s.npz

Resumable: finished batches live in OUT.partial/ until OUT is written; rerun with --resume after
an interruption (same settings) and nothing finished is redone. Image i is row i mod B of batch
i // B, which runs with seed S + (i // B)·B: images depend on the batch size B until the
pipeline draws noise per row, so --resume refuses a different B.
Exit codes: 0 done, 2 bad input (one line), 3 stopped early by --max-batches (rerun with --resume).
"""
from var_ssg.tools.cli import script_main

script_main(__file__)
