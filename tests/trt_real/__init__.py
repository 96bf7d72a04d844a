"""TensorRT's real Python bindings (10.x and 11.x) without TensorRT or a GPU: setup_bindings.py
installs and links them, strict.py + sim.py make a strict fake of them, fake_cuda.py a CUDA
device on the CPU. `run_under_real_trt(version, "module:function", *args)` runs a function in a
child Python where `import tensorrt` is that fake (one child per version: the two bindings cannot
share a process); other tests use it to reach TensorRT code paths."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from .setup_bindings import BINDINGS, ROOT, compiler, ensure

VERSIONS = list(BINDINGS)          # '10.8' (the oldest taken), '10', '11'


def skip_reason():
    """Why the real bindings cannot be used here, or None."""
    return None if compiler() else "no C compiler (cc) to build the TensorRT stub libraries"


def run_under_real_trt(version: str, target: str, *args, gpu: str = "NVIDIA H200", cc: str = "9.0",
                       timeout: float = 600):
    """Run `target` ('package.module:function') with JSON arguments in a child Python whose
    `tensorrt` is the strict fake over the real bindings of TensorRT `version` (a key of
    setup_bindings.BINDINGS: '10.8', '10', '11'), on a faked CUDA
    device (`gpu`, compute capability `cc`); returns its JSON result. A failure in the child
    (a strict-fake refusal included) raises AssertionError with the child's traceback."""
    ensure(version)
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "result.json")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
        r = subprocess.run([sys.executable, "-m", "tests.trt_real.child", version, target, json.dumps(list(args)), out,
                            gpu, cc], capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
        if r.returncode != 0:
            raise AssertionError(f"{target} under TensorRT {version} failed:\n{r.stdout[-4000:]}\n{r.stderr[-8000:]}")
        with open(out) as f:
            return json.load(f)
