#!/usr/bin/env python
"""Generate class-conditional images with VAR + SSG on any backend.

  python scripts/generate.py --model var-d16 --random-init 0 --class 207 88 --out grid.png
  python scripts/generate.py --backend onnxruntime --artifacts build/var-d16 --class 207 --out a.png
"""
from var_ssg.tools.cli import script_main

script_main(__file__)
