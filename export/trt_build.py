"""TensorRT engines from the exported ONNX (`--target trt`), written against the TensorRT 10/11
Python API. Guarded: importing this module never needs tensorrt; building does.

Layout:
  step_all.plan   ONE engine for all K scales, built from step_all.onnx (dynamic token axis)
                  with one optimization profile per scale, min = opt = max = that scale's
                  shapes; profiles after the first get extra_memory_target = 0 so the weights
                  are not duplicated per profile.
  decoder.plan    the decoder (static shapes).
  timing.cache    shared by both builds, saved next to the engines and reused on rebuilds.
Networks are strongly typed (TensorRT 11 has no precision flags): half precision comes from the
ONNX (the transformer and KV cache of fp16/bf16 artifacts) while the DSE/SSG arithmetic, the
logits and the sampler stay fp32 because the graph says so.

Everything up to `build_engines` is plain Python over the manifest, so the plan, cache keys and
version guards are tested without TensorRT.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

from graphs.config import ConfigError

MIN_TRT = (10, 0)
HALF = ("float16", "bfloat16")


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise ConfigError("TensorRT is not installed: pip install 'var-ssg[trt]' (tensorrt>=10 from NVIDIA's "
                          "index, on a machine with an NVIDIA GPU), or use --backend onnxruntime") from None
    if version_tuple(trt.__version__) < MIN_TRT:
        raise ConfigError(f"TensorRT {trt.__version__} is too old: var-ssg needs >= {MIN_TRT[0]}.{MIN_TRT[1]}")
    return trt


def require_gpu():
    """TensorRT and a CUDA GPU, or a clear error."""
    trt = import_tensorrt()
    import torch
    if not torch.cuda.is_available():
        raise ConfigError("--target trt needs an NVIDIA GPU visible to PyTorch (engines are built for the GPU they run on)")
    return trt


def version_tuple(v: str) -> Tuple[int, ...]:
    out = []
    for x in v.split(".")[:2]:
        if not x.isdigit():
            break
        out.append(int(x))
    return tuple(out)


@dataclass(frozen=True)
class EnginePlan:
    """What will be built for one engine (testable without TensorRT)."""
    name: str
    onnx: str
    engine: str
    profiles: List[Dict[str, List[int]]]  # per profile: dynamic input -> shape (min = opt = max)
    extra_memory_target: List[float]      # per profile
    fp32_tensors: List[str]               # float I/O that stays fp32 (logits, DSE/SSG inputs, ...)
    half_tensors: List[str]               # I/O in the artifacts' half precision (KV cache)
    scales: List[int] = field(default_factory=list)   # profile index -> scale k (the step engine)


def _dtypes(g: Dict) -> Tuple[List[str], List[str]]:
    io = g["inputs"] + g["outputs"]
    return ([t["name"] for t in io if t["dtype"] in ("float", "float32")],
            [t["name"] for t in io if t["dtype"] in HALF])


def plan(man_data: Dict) -> List[EnginePlan]:
    """The engines `--target trt` builds from a manifest: the all-scales step engine and the decoder."""
    uni = man_data.get("unified")
    if not uni:
        raise ConfigError("these artifacts have no step_all.onnx (the one-engine layout needs it): "
                          "re-export without --no-unified (or with --target trt)")
    dyn = set(uni["dynamic_inputs"])
    profiles = [{name: list(shape) for name, shape in prof.items() if name in dyn} for prof in uni["profiles"]]
    f32, half = _dtypes(uni["graph"])
    step = EnginePlan(name="step_all", onnx=uni["graph"]["file"], engine="step_all.plan", profiles=profiles,
                      extra_memory_target=[1.0] + [0.0] * (len(profiles) - 1), fp32_tensors=f32,
                      half_tensors=half, scales=list(range(len(profiles))))
    dec = man_data["graphs"][-1]
    f32, half = _dtypes(dec)
    decoder = EnginePlan(name=dec["name"], onnx=dec["file"], engine=dec["name"] + ".plan", profiles=[],
                         extra_memory_target=[], fp32_tensors=f32, half_tensors=half)
    return [step, decoder]


def engine_cache_key(man_data: Dict, trt_version: str, gpu: str, cc: str,
                     hardware_compat: bool = False, version_compat: bool = False) -> str:
    """Engines are valid for these artifacts, this TensorRT, this GPU and these options."""
    blob = json.dumps(dict(cache_key=man_data["cache_key"], trt=trt_version, gpu=gpu, cc=cc,
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


def _load_cache(config, path: str):
    data = b""
    if os.path.exists(path):
        with open(path, "rb") as f:
            data = f.read()
    return config.create_timing_cache(data)


def _build_one(trt, builder, logger, root: str, p: EnginePlan, cache, hardware_compat: bool, version_compat: bool):
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.path.join(root, p.onnx)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ConfigError(f"TensorRT could not parse {p.onnx}: {errs}")
    config = builder.create_builder_config()
    config.set_timing_cache(cache, ignore_mismatch=False)
    if hardware_compat:
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    if version_compat:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    for shapes, extra in zip(p.profiles, p.extra_memory_target):
        prof = builder.create_optimization_profile()
        for name, shape in shapes.items():
            prof.set_shape(name, shape, shape, shape)
        if hasattr(prof, "extra_memory_target"):
            prof.extra_memory_target = extra
        config.add_optimization_profile(prof)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise ConfigError(f"TensorRT failed to build an engine for {p.onnx} (see the log above)")
    path = os.path.join(root, p.engine)
    with open(path + ".tmp", "wb") as f:
        f.write(memoryview(blob))
    os.replace(path + ".tmp", path)


def build_engines(root: str, man_data: Dict, hardware_compat: bool = False, version_compat: bool = False,
                  device: Optional[int] = 0) -> Dict:
    """Build the engines of `plan` into `root`; returns the manifest's `tensorrt` section."""
    trt = require_gpu()
    import torch
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    cache_path = os.path.join(root, "timing.cache")
    cache = _load_cache(builder.create_builder_config(), cache_path)
    plans = plan(man_data)
    for p in plans:
        _build_one(trt, builder, logger, root, p, cache, hardware_compat, version_compat)
    with open(cache_path + ".tmp", "wb") as f:
        f.write(memoryview(cache.serialize()))
    os.replace(cache_path + ".tmp", cache_path)
    props = torch.cuda.get_device_properties(device)
    cc = f"{props.major}.{props.minor}"
    return dict(version=trt.__version__, gpu=props.name, compute_capability=cc,
                hardware_compatible=hardware_compat, version_compatible=version_compat,
                engines=[asdict(p) for p in plans], timing_cache="timing.cache",
                key=engine_cache_key(man_data, trt.__version__, props.name, cc, hardware_compat, version_compat))
