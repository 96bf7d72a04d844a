"""The real TensorRT Python bindings on a machine without TensorRT or a GPU (DESIGN.md "TensorRT
runtime"): NVIDIA's binding wheels are installed from PyPI without dependencies into
build/trt-bindings/<name>/site, and stand-ins for the nine C entry points they link
(stubs.c) are compiled with `cc` into build/trt-bindings/<name>/lib under the real SONAMEs.
The real module then imports (every class, enum, property and pybind signature is NVIDIA's);
only what needs a GPU (the Builder, Runtime and OnnxParser constructors) fails.

Idempotent and cached: a stamp file names the wheel and the stub source's hash; a directory
without a matching stamp is rebuilt. .ci/run calls this before the tests; the tests call
`ensure` themselves too.

    python tests/trt_real/setup_bindings.py [NAME ...]      (default: every BINDINGS entry)
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from typing import Dict, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CACHE = os.path.join(ROOT, "build", "trt-bindings")          # git-ignored (build/)

# name -> (wheel, version): the oldest TensorRT var-ssg takes (contract.tensorrt.MIN_TRT), the
# newest 10.x (CUDA 12 wheels) and the newest 11.x (CUDA 13 wheels)
BINDINGS: Dict[str, Tuple[str, str]] = {"10.8": ("tensorrt-cu12-bindings", "10.8.0.43"),
                                        "10": ("tensorrt-cu12-bindings", "10.16.1.11"),
                                        "11": ("tensorrt-cu13-bindings", "11.4.0.106")}
LIBS = {"NVINFER": "libnvinfer", "PLUGIN": "libnvinfer_plugin", "PARSER": "libnvonnxparser"}
STUBS = os.path.join(HERE, "stubs.c")


def compiler() -> Optional[str]:
    return shutil.which(os.environ.get("CC", "cc"))


def paths(name: str) -> Tuple[str, str]:
    """(site, lib): where the bindings and the stub libraries of TensorRT `name` live."""
    return os.path.join(CACHE, name, "site"), os.path.join(CACHE, name, "lib")


def soname_major(name: str) -> str:
    """The major version in the libraries' SONAMEs (libnvinfer.so.10, ...)."""
    return BINDINGS[name][1].split(".")[0]


def _stamp(name: str) -> str:
    wheel, version = BINDINGS[name]
    with open(STUBS, "rb") as f:
        stubs = hashlib.sha256(f.read()).hexdigest()[:16]
    return f"{wheel}=={version} stubs={stubs}\n"


def ensure(name: str, quiet: bool = True) -> Tuple[str, str]:
    """Install (once) the bindings of TensorRT `name` (a key of BINDINGS) and their stub
    libraries; (site, lib)."""
    from var_ssg.common.files import atomic_path
    site, lib = paths(name)
    stamp_file = os.path.join(CACHE, name, "ready")
    want = _stamp(name)
    try:
        with open(stamp_file) as f:
            if f.read() == want:
                return site, lib
    except FileNotFoundError:
        pass
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc) to build the TensorRT stub libraries")
    shutil.rmtree(os.path.join(CACHE, name), ignore_errors=True)
    os.makedirs(lib)
    wheel, version = BINDINGS[name]
    major = soname_major(name)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check",
                    *(["-q"] if quiet else []), "--target", site, f"{wheel}=={version}"], check=True)
    for macro, lib_name in LIBS.items():
        soname = f"{lib_name}.so.{major}"
        subprocess.run([cc, "-shared", "-fPIC", f"-D{macro}", "-o", os.path.join(lib, soname),
                        f"-Wl,-soname,{soname}", STUBS], check=True)
    with atomic_path(stamp_file) as tmp:          # the stamp last: a half-built directory is redone
        with open(tmp, "w") as f:
            f.write(want)
    return site, lib


def main(argv) -> int:
    if compiler() is None:          # the tests skip with this reason; CI goes on without them
        print("no C compiler (cc): the TensorRT binding tests will be skipped")
        return 0
    for name in argv or BINDINGS:
        t = time.time()
        site, lib = ensure(name, quiet=True)
        print(f"TensorRT {name} bindings ({' '.join(BINDINGS[name])}): {site} + stubs {lib} "
              f"({time.time() - t:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main(sys.argv[1:]))
