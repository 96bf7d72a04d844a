#!/usr/bin/env python
"""TensorRT-compatibility lint of an artifacts directory (or .onnx files); exit 1 on findings.

  python scripts/lint.py build/var-d24
"""
from var_ssg.tools.cli import script_main

script_main(__file__)
