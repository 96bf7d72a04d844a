"""`scripts/lint.py`: TensorRT-compatibility lint of an artifacts directory (or .onnx files); exit 1 on findings.

  python scripts/lint.py build/var-d24
"""
from __future__ import annotations

import glob
import os

from var_ssg.tools.cli import parser
from var_ssg.common.errors import ConfigError


MAX_GRAPH_BYTES = 2 << 30      # protobuf's limit: larger files are not ONNX graphs (weights live in external data)


def load_graph(path: str):
    """The ONNX model at `path` without its external data, or a one-line error."""
    import onnx
    from google.protobuf.message import DecodeError
    from var_ssg.common.files import open_regular
    try:
        with open_regular(path) as f:          # a FIFO or device is refused, never read
            if os.fstat(f.fileno()).st_size > MAX_GRAPH_BYTES:
                raise ConfigError(f"{path}: larger than 2 GiB, not an ONNX graph file")
            m = onnx.load_model_from_string(f.read())     # external data is never read
    except (DecodeError, ValueError, RuntimeError) as e:
        raise ConfigError(f"{path}: not an ONNX model ({type(e).__name__})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror})") from None
    if not m.ir_version or not m.graph.node:
        raise ConfigError(f"{path}: not an ONNX model (no IR version or no nodes)")
    return m


def main(argv=None) -> int:
    p = parser("TensorRT-compatibility lint for ONNX graphs.")
    p.add_argument("paths", nargs="+", help="artifacts directories or .onnx files")
    p.add_argument("--max-opset", type=int, default=20)
    a = p.parse_args(argv)
    from var_ssg.contract.manifest import MANIFEST, load_manifest
    from var_ssg.export.lint import lint_model
    files, dynamic = [], {}
    for path in a.paths:
        if os.path.isdir(path) and os.path.lexists(os.path.join(path, MANIFEST)):
            man = load_manifest(path, verify_hashes=False)      # a bad manifest is a one-line error
            for name in ("step", "decoder"):
                files.append(man.path(man.graph(name)["file"]))
            # step_all.onnx: dynamic inputs pinned by per-scale profiles
            dynamic[files[-2]] = set(man.graph("step")["dynamic_inputs"])
        elif os.path.isdir(path):
            files += sorted(glob.glob(os.path.join(path, "*.onnx")))
        elif os.path.lexists(path):
            files.append(path)
        else:
            raise ConfigError(f"{path}: no such file or directory")
    if not files:
        raise ConfigError(f"no .onnx files in {' '.join(a.paths)}")
    issues = []
    for f in files:
        issues += lint_model(load_graph(f), name=os.path.basename(f), max_opset=a.max_opset,
                             dynamic=dynamic.get(f, frozenset()))
    for i in issues:
        print(i)
    print(f"{len(files)} graphs, {len(issues)} issues")
    return 1 if issues else 0

