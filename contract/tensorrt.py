"""TensorRT rules both sides need: the guarded import, version parsing, the engine cache key
and the engine/machine compatibility check (export/ builds engines, runtime/ loads them)."""
from __future__ import annotations

import hashlib
import json
from typing import Dict, Tuple

from graphs.config import ConfigError

MIN_TRT = (10, 0)


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise ConfigError("TensorRT is not installed: pip install 'var-ssg[trt]' (tensorrt>=10 from NVIDIA's "
                          "index, on a machine with an NVIDIA GPU), or use --backend onnxruntime") from None
    if version_tuple(trt.__version__) < MIN_TRT:
        raise ConfigError(f"TensorRT {trt.__version__} is too old: var-ssg needs >= {MIN_TRT[0]}.{MIN_TRT[1]}")
    return trt


def version_tuple(v: str) -> Tuple[int, ...]:
    out = []
    for x in v.split(".")[:2]:
        if not x.isdigit():
            break
        out.append(int(x))
    return tuple(out)


def engine_cache_key(artifacts_key: str, trt_version: str, gpu: str, cc: str,
                     hardware_compat: bool = False, version_compat: bool = False) -> str:
    """Engines are valid for these artifacts, this TensorRT, this GPU and these options."""
    blob = json.dumps(dict(cache_key=artifacts_key, trt=trt_version, gpu=gpu, cc=cc,
                           hw=hardware_compat, vc=version_compat), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def check_compat(sec: Dict, trt_version: str, gpu: str, cc: str) -> None:
    """Refuse engines built for another TensorRT or GPU unless built compatible."""
    if sec["version"] != trt_version:
        same_major = version_tuple(sec["version"])[:1] == version_tuple(trt_version)[:1]
        if not (sec.get("version_compatible") and same_major):
            raise ConfigError(f"the engines were built with TensorRT {sec['version']} and this is TensorRT {trt_version}: "
                              f"re-export with --target trt here (or build with --trt-version-compatible)")
    if sec["compute_capability"] != cc:
        ok = sec.get("hardware_compatible") and version_tuple(cc) >= (8, 0)
        if not ok:
            raise ConfigError(f"the engines were built for {sec['gpu']} (compute capability {sec['compute_capability']}) "
                              f"and this GPU is {gpu} ({cc}): re-export with --target trt on this GPU "
                              f"(or build with --trt-hardware-compatible for Ampere and newer)")
