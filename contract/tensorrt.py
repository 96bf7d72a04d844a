"""TensorRT rules both sides need: the guarded import, version parsing, the engine cache key
and the engine/machine compatibility check (export/ builds engines, runtime/ loads them).

Which TensorRT may load an engine (NVIDIA, "Engine Compatibility", TensorRT 11.1 docs:
https://docs.nvidia.com/deeplearning/tensorrt/11.1.0/inference-library/engine-compatibility.html
and the TensorRT 11.4 support matrix, "Engine Portability":
https://docs.nvidia.com/deeplearning/tensorrt/11.4.1/getting-started/support-matrix.html):
  * by default, only the TensorRT version that built it;
  * built with BuilderFlag.VERSION_COMPATIBLE: that version or a LATER one, never an older one:
    later releases of the same major, and across majors only TensorRT 10 -> 11 (and 8 -> 10);
    such a plan carries TensorRT's lean runtime (host code), which the runtime must be allowed
    to load (IRuntime.engine_host_code_allowed; runtime.backends.trt sets it);
  * built with HardwareCompatibilityLevel.AMPERE_PLUS: any Ampere or newer GPU (cc >= 8.0);
    otherwise only the GPU model that built it: by default an engine is promised to run only
    on the type of device it was built on (the same compute capability is not enough; TensorRT
    10.16 and 11.4 have HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY for that, 10.8 does not, which var-ssg
    does not build).

The oldest TensorRT taken is 10.8: the sampler's cumulative sums (CumSum over the top-k set, or
over V without top-k) become one ICumulativeLayer from 10.8 on (addCumulative); older ONNX
parsers unroll them into a loop of K or V iterations per token.

Engine optimization profiles (DESIGN.md "TensorRT runtime"): the step engine has one profile per
scale, and the FIRST profile is the last scale, where the time goes. What TensorRT promises
(IOptimizationProfile.extra_memory_target, the bindings' docstring): the builder "aims" to add a
profile with extra_memory_target 0.0 "without allocating any additional weight memory"; it is
"only a hint, and TensorRT does not guarantee" it; it "is ignored for the first (default)
optimization profile". So the first profile gets the weight layouts it wants and the later ones
are steered (not forced) to reuse them: the first one is the one whose speed matters most.
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Dict, List, Tuple

from var_ssg.common.errors import ConfigError

MIN_TRT = (10, 8)
CROSS_MAJOR = {(8, 10), (10, 11)}     # (build major, runtime major) pairs NVIDIA supports


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise ConfigError("TensorRT is not installed: pip install 'var-ssg[trt-cu12]' (CUDA 12 driver) or "
                          "'var-ssg[trt-cu13]' (CUDA 13) with --extra-index-url https://pypi.nvidia.com, on a machine "
                          "with an NVIDIA GPU (README \"TensorRT\"), or use --backend onnxruntime") from None
    if version_tuple(trt.__version__) < MIN_TRT:
        raise ConfigError(f"TensorRT {trt.__version__} is too old: var-ssg needs >= {MIN_TRT[0]}.{MIN_TRT[1]} (older "
                          f"ONNX parsers turn the sampler's CumSum into a loop of up to V iterations); pip install "
                          f"'tensorrt-cu12>={MIN_TRT[0]}.{MIN_TRT[1]}' (CUDA 12) or 'tensorrt-cu13' (CUDA 13)")
    return trt


def profile_scales(num_scales: int) -> List[int]:
    """Engine profile i of the step engine serves scale profile_scales[i]: the last scale first
    (its layouts are the unconstrained ones, see above), then 0, 1, ..., K-2."""
    return [num_scales - 1] + list(range(num_scales - 1))


def check_profile_scales(order, num_scales: int) -> List[int]:
    """The manifest's profile order (engines built before it was recorded: scale order)."""
    if order is None:
        return list(range(num_scales))
    if sorted(order) != list(range(num_scales)):
        raise ConfigError(f"engines.step.profile_scales {order} is not an order of the {num_scales} scales: "
                          f"re-export with --target trt --force")
    return list(order)


def version_tuple(v: str) -> Tuple[int, ...]:
    """major.minor.patch as integers: '10.13.0.35' -> (10, 13, 0); '10.0.0b6' -> (10, 0, 0)."""
    out = []
    for x in v.split(".")[:3]:
        m = re.match(r"\d+", x)
        if not m:
            break
        out.append(int(m.group()))
        if m.end() < len(x):          # '0b6': a pre-release tag ends the version
            break
    return tuple(out)


def engine_cache_key(artifacts_key: str, trt_version: str, gpu: str, cc: str, hardware_compat: bool = False,
                     version_compat: bool = False, tf32: bool = False) -> str:
    """Engines are valid for these graphs (the artifacts' cache key), this TensorRT, this GPU and
    these build options. export/ rebuilds the engines when the stored key differs."""
    blob = json.dumps(dict(cache_key=artifacts_key, trt=trt_version, gpu=gpu, cc=cc,
                           hw=hardware_compat, vc=version_compat, tf32=tf32), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def version_ok(built: str, here: str, version_compatible: bool) -> bool:
    """May TensorRT `here` load an engine that TensorRT `built` made? (rules above)"""
    b, h = version_tuple(built), version_tuple(here)
    if not version_compatible:
        return b == h
    return h >= b and (h[:1] == b[:1] or (b[0], h[0]) in CROSS_MAJOR)


def check_compat(sec: Dict, trt_version: str, gpu: str, cc: str) -> None:
    """Refuse engines this TensorRT or this GPU cannot load, with the way out."""
    if not version_ok(sec["version"], trt_version, bool(sec.get("version_compatible"))):
        if sec.get("version_compatible"):
            raise ConfigError(f"the engines were built with TensorRT {sec['version']} (version-compatible) and this is "
                              f"TensorRT {trt_version}: such engines run only on the same or a later TensorRT "
                              f"(same major, or 10 -> 11); re-export with --target trt here")
        raise ConfigError(f"the engines were built with TensorRT {sec['version']} and this is TensorRT {trt_version}: "
                          f"re-export with --target trt here (or build with --trt-version-compatible to run them "
                          f"on later TensorRT versions)")
    if sec["gpu"] != gpu or sec["compute_capability"] != cc:
        ok = sec.get("hardware_compatible") and version_tuple(cc) >= (8, 0)
        if not ok:
            raise ConfigError(f"the engines were built for {sec['gpu']} (compute capability {sec['compute_capability']}) "
                              f"and this GPU is {gpu} ({cc}): TensorRT promises an engine only to the GPU model that "
                              f"built it; re-export with --target trt on this GPU "
                              f"(or build with --trt-hardware-compatible for Ampere and newer)")
