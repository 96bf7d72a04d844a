"""TensorRT engines from the exported ONNX (`--target trt`), written against the TensorRT 10/11
Python API. Guarded: importing this module never needs tensorrt; building does.

What is built today: one strongly typed engine per scale graph (static shapes, so each engine
has one implicit profile) plus the decoder, sharing one timing cache saved next to them.
Precision comes from the ONNX itself (TensorRT 11 has no precision flags): fp16 artifacts give
fp16 transformer layers while DSE/SSG/sampling stay fp32 because the graph says so.
NOT built yet: the single engine for all ten scales with one profile per scale (it needs one
graph with a dynamic token axis; see DESIGN.md).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Dict, List

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


def version_tuple(v: str):
    return tuple(int(x) for x in v.split(".")[:2] if x.isdigit())


@dataclass(frozen=True)
class EnginePlan:
    """What will be built for one graph (testable without TensorRT)."""
    graph: str
    onnx: str
    engine: str
    shapes: Dict[str, List[int]]          # every input: min = opt = max (static per scale)
    fp32_outputs: List[str]               # outputs that must stay fp32 (logits: DSE/SSG arithmetic)
    half_inputs: List[str]                # inputs that carry the artifacts' half precision (KV cache)


def plan(man_data: Dict) -> List[EnginePlan]:
    out = []
    for g in man_data["graphs"]:
        out.append(EnginePlan(
            graph=g["name"], onnx=g["file"], engine=g["name"] + ".plan",
            shapes={i["name"]: list(i["shape"]) for i in g["inputs"]},
            fp32_outputs=[o["name"] for o in g["outputs"] if o["dtype"] == "float" and o["name"].startswith("logits")],
            half_inputs=[i["name"] for i in g["inputs"] if i["dtype"] in ("float16", "bfloat16")]))
    return out


def engine_cache_key(man_data: Dict, trt_version: str, gpu: str, cc: str) -> str:
    import hashlib
    import json
    blob = json.dumps(dict(cache_key=man_data["cache_key"], trt=trt_version, gpu=gpu, cc=cc), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def build_engines(root: str, man_data: Dict, hardware_compat: bool = False, version_compat: bool = False) -> Dict:
    """Build one engine per graph in `root`; returns the manifest's `tensorrt` section."""
    trt = import_tensorrt()
    import torch
    if not torch.cuda.is_available():
        raise ConfigError("--target trt needs an NVIDIA GPU visible to PyTorch")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    cache_path = os.path.join(root, "timing.cache")
    config0 = builder.create_builder_config()
    cache = config0.create_timing_cache(open(cache_path, "rb").read() if os.path.exists(cache_path) else b"")
    built = []
    for p in plan(man_data):
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
        blob = builder.build_serialized_network(network, config)
        if blob is None:
            raise ConfigError(f"TensorRT failed to build an engine for {p.onnx} (see the log above)")
        with open(os.path.join(root, p.engine), "wb") as f:
            f.write(memoryview(blob))
        built.append(asdict(p))
    with open(cache_path, "wb") as f:
        f.write(memoryview(cache.serialize()))
    props = torch.cuda.get_device_properties(0)
    cc = f"{props.major}.{props.minor}"
    return dict(version=trt.__version__, gpu=props.name, compute_capability=cc,
                hardware_compatible=hardware_compat, version_compatible=version_compat,
                engines=built, key=engine_cache_key(man_data, trt.__version__, props.name, cc))
