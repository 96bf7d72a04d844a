#!/usr/bin/env python
"""TensorRT-compatibility lint of an artifacts directory (or .onnx files); exit 1 on findings.

  python scripts/lint.py build/var-d24
"""
from __future__ import annotations

import glob
import json
import os
import sys

from tools.cli import parser, run_main  # first: keeps scripts/ from shadowing the packages
from graphs.config import ConfigError


def main() -> int:
    p = parser("TensorRT-compatibility lint for ONNX graphs.")
    p.add_argument("paths", nargs="+", help="artifacts directories or .onnx files")
    p.add_argument("--max-opset", type=int, default=20)
    a = p.parse_args()
    from export.lint import lint_files
    files, dynamic = [], {}
    for path in a.paths:
        if os.path.isdir(path):
            files += sorted(glob.glob(os.path.join(path, "*.onnx")))
            man = os.path.join(path, "manifest.json")
            if os.path.isfile(man):       # step_all.onnx: dynamic inputs pinned by per-scale profiles
                with open(man) as f:
                    step = (json.load(f).get("graphs") or {}).get("step")
                if step:
                    dynamic[os.path.join(path, step["file"])] = set(step["dynamic_inputs"])
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise ConfigError(f"{path}: no such file or directory")
    if not files:
        raise ConfigError(f"no .onnx files in {' '.join(a.paths)}")
    issues = []
    for f in files:
        issues += lint_files([f], max_opset=a.max_opset, dynamic=dynamic.get(f, frozenset()))
    for i in issues:
        print(i)
    print(f"{len(files)} graphs, {len(issues)} issues")
    return 1 if issues else 0


if __name__ == "__main__":
    run_main(main)
