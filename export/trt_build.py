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

Everything up to `build_engines` is plain Python over the manifest, so the plan is tested
without TensorRT; the version rules live in contract.tensorrt.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

from contract.tensorrt import engine_cache_key, import_tensorrt
from graphs.config import ConfigError


def require_gpu():
    """TensorRT and a CUDA GPU, or a clear error."""
    trt = import_tensorrt()
    import torch
    if not torch.cuda.is_available():
        raise ConfigError("--target trt needs an NVIDIA GPU visible to PyTorch (engines are built for the GPU they run on)")
    return trt


@dataclass(frozen=True)
class EnginePlan:
    """What will be built for one engine (testable without TensorRT); the manifest's
    `engines[name]` entry."""
    name: str
    onnx: str
    file: str
    profiles: List[Dict[str, List[int]]]  # per profile (= scale): dynamic input -> shape (min = opt = max)
    extra_memory_target: List[float]      # per profile


def plan(man_data: Dict) -> List[EnginePlan]:
    """The engines `--target trt` builds: the all-scales step engine and the decoder."""
    step, dec = man_data["graphs"]["step"], man_data["graphs"]["decoder"]
    dyn = set(step["dynamic_inputs"])
    profiles = [{name: list(shape) for name, shape in prof.items() if name in dyn} for prof in step["profiles"]]
    return [EnginePlan(name="step", onnx=step["file"], file="step_all.plan", profiles=profiles,
                       extra_memory_target=[1.0] + [0.0] * (len(profiles) - 1)),
            EnginePlan(name="decoder", onnx=dec["file"], file="decoder.plan", profiles=[], extra_memory_target=[])]


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
    path = os.path.join(root, p.file)
    with open(path + ".tmp", "wb") as f:
        f.write(memoryview(blob))
    os.replace(path + ".tmp", path)


def build_engines(root: str, man_data: Dict, hardware_compat: bool = False, version_compat: bool = False,
                  device: Optional[int] = 0) -> Tuple[Dict, Dict]:
    """Build the engines of `plan` into `root`; returns the manifest's `engines` and `tensorrt`."""
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
    engines = {p.name: asdict(p) for p in plans}
    return engines, dict(version=trt.__version__, gpu=props.name, compute_capability=cc,
                         hardware_compatible=hardware_compat, version_compatible=version_compat,
                         timing_cache="timing.cache",
                         key=engine_cache_key(man_data["cache_key"], trt.__version__, props.name, cc,
                                              hardware_compat, version_compat))
