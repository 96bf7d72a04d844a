#!/usr/bin/env python
"""Export VAR + SSG to ONNX artifacts (and TensorRT engines with --target trt).

  python scripts/export.py --model var-d24 --random-init 0 --out build/var-d24
  python scripts/export.py --model var-d16 --ckpt var_d16.pth --vae-ckpt vae_ch160v4096z32.pth --out build/d16
"""
from var_ssg.tools.cli import script_main

script_main(__file__)
