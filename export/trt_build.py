"""TensorRT engines from the exported ONNX (`--target trt`), written against the TensorRT 10/11
Python API. Guarded: importing this module never needs tensorrt; building does.

Layout:
  step_all.plan   ONE engine for all K scales, built from step_all.onnx (dynamic token axis)
                  with one optimization profile per scale, min = opt = max = that scale's
                  shapes, the last scale first (contract.tensorrt.profile_scales: the first
                  profile's weight layouts are unconstrained); the others get
                  extra_memory_target = 0, a hint to add no weight memory (not a promise).
  decoder.plan    the decoder (static shapes).
Infinity artifacts (manifest family "infinity", DESIGN.md "Infinity") get three:
  text.plan       text.onnx (static: prompts are padded to the preset's text length, masked)
  step_all.plan   one profile per scale as VAR's, last scale first, but every aspect ratio shares
                  the graph: profile k spans (min, max) the shapes of scale k over every template's
                  schedule, opt = the 1:1 schedule's (`plan_infinity`)
  decoder.plan    one profile over the final grids of every template (H, W dynamic)
  timing.cache    shared by both builds, saved next to the engines and reused on rebuilds when
                  it was written by this TensorRT version (TensorRT takes only its own version's
                  caches) and TensorRT accepts it for this GPU; else a fresh one replaces it. The
                  file is a one-line header naming the TensorRT version, then TensorRT's bytes.
Networks are strongly typed (TensorRT 11 has no precision flags): half precision comes from the
ONNX (the transformer and KV cache of fp16/bf16 artifacts) while the DSE/SSG arithmetic, the
logits and the sampler stay fp32 because the graph says so. BuilderFlag.TF32 is ON by default
in TensorRT ("Allow (but not require) computations on tensors of type DataType.FLOAT to use
TF32 ... Enabled by default", the flag's docstring), strongly typed or not: it is cleared unless
the plan asks for it (`tf32=True`, an opt-in), so fp32 stays fp32 (DESIGN.md "Precision").
Quantized graphs (int8, fp8) need no INT8/FP8 flag either: a strongly typed network takes its
precision from the graph's QuantizeLinear/DequantizeLinear (those flags are for weakly typed
networks, and TensorRT 11 has none). fp8 needs FP8 tensor cores: compute capability 8.9 (Ada) or
later; `check_precision` refuses it on older GPUs before anything is built (DESIGN.md "Low precision").

`plan` and `engines_stale` are plain Python over the manifest, so they are tested without
TensorRT; the version rules live in contract.tensorrt.
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

from var_ssg.common.files import atomic_path
from var_ssg.contract.tensorrt import engine_cache_key, import_tensorrt, profile_scales, version_tuple
from var_ssg.common.errors import ConfigError

log = logging.getLogger(__name__)
TIMING_CACHE = "timing.cache"


def require_gpu():
    """TensorRT and a CUDA GPU, or a clear error."""
    trt = import_tensorrt()
    import torch
    if not torch.cuda.is_available():
        raise ConfigError("--target trt needs an NVIDIA GPU visible to PyTorch (engines are built for the GPU they run on)")
    return trt


def this_machine(device: int = 0) -> Tuple[str, str, str]:
    """(TensorRT version, GPU name, compute capability) that engines built here are for."""
    trt = require_gpu()
    import torch
    p = torch.cuda.get_device_properties(device)
    return trt.__version__, p.name, f"{p.major}.{p.minor}"


# precision -> the lowest compute capability whose GPUs run it in TensorRT
MIN_COMPUTE_CAPABILITY = {"fp8": (8, 9)}


def check_precision(precision: str, machine: Tuple[str, str, str]) -> None:
    """A clear error if this GPU (machine: TensorRT version, GPU name, compute capability) cannot
    run `precision`'s engines."""
    need = MIN_COMPUTE_CAPABILITY.get(precision)
    have = tuple(int(x) for x in machine[2].split("."))
    if need is not None and have < need:
        raise ConfigError(f"--precision {precision} engines need a GPU of compute capability "
                          f"{need[0]}.{need[1]} or later (FP8 tensor cores: Ada, Hopper, Blackwell); {machine[1]} "
                          f"is {machine[2]}: export --precision int8, fp16 or bf16 for it")


@dataclass(frozen=True)
class EnginePlan:
    """What will be built for one engine, flags included (testable without TensorRT); the
    manifest's `engines[name]` entry."""
    name: str
    onnx: str
    file: str
    profiles: List[Dict[str, List[int]]]  # per scale: dynamic input -> shape (min = opt = max)
    profile_scales: List[int]             # engine profile i serves scale profile_scales[i]
    extra_memory_target: List[float]      # per engine profile
    tf32: bool = False                    # BuilderFlag.TF32 (cleared unless asked for)
    hardware_compatible: bool = False     # HardwareCompatibilityLevel.AMPERE_PLUS
    version_compatible: bool = False      # BuilderFlag.VERSION_COMPATIBLE

    def shapes(self, k: int) -> Dict[str, Tuple[List[int], List[int], List[int]]]:
        """Scale k's profile: dynamic input -> (min, opt, max)."""
        return {name: (shape, shape, shape) for name, shape in self.profiles[k].items()}


@dataclass(frozen=True)
class RangedEnginePlan(EnginePlan):
    """An engine whose profiles span shapes (Infinity: every aspect ratio's schedule in one
    graph): `profiles` holds the opt shapes, `profile_min` / `profile_max` the bounds."""
    profile_min: List[Dict[str, List[int]]] = ()
    profile_max: List[Dict[str, List[int]]] = ()

    def shapes(self, k: int) -> Dict[str, Tuple[List[int], List[int], List[int]]]:
        return {name: (self.profile_min[k][name], opt, self.profile_max[k][name])
                for name, opt in self.profiles[k].items()}


def plan(man_data: Dict, tf32: bool = False, hardware_compat: bool = False,
         version_compat: bool = False) -> List[EnginePlan]:
    """The engines `--target trt` builds: the all-scales step engine and the decoder (and for
    Infinity artifacts the text engine: `plan_infinity`)."""
    if man_data.get("family") == "infinity":
        return plan_infinity(man_data, tf32=tf32, hardware_compat=hardware_compat, version_compat=version_compat)
    step, dec = man_data["graphs"]["step"], man_data["graphs"]["decoder"]
    dyn = set(step["dynamic_inputs"])
    profiles = [{name: list(shape) for name, shape in prof.items() if name in dyn} for prof in step["profiles"]]
    flags = dict(tf32=tf32, hardware_compatible=hardware_compat, version_compatible=version_compat)
    return [EnginePlan(name="step", onnx=step["file"], file="step_all.plan", profiles=profiles,
                       profile_scales=profile_scales(len(profiles)),
                       extra_memory_target=[1.0] + [0.0] * (len(profiles) - 1), **flags),
            EnginePlan(name="decoder", onnx=dec["file"], file="decoder.plan", profiles=[], profile_scales=[],
                       extra_memory_target=[], **flags)]


def plan_infinity(man_data: Dict, tf32: bool = False, hardware_compat: bool = False,
                  version_compat: bool = False) -> List[EnginePlan]:
    """Infinity's engines: text (static), step (one profile per scale spanning every aspect
    ratio's shapes at that scale, graphs.infinity_io.InfinityStepIO.profile_span; the text
    inputs keep the preset's padded length, static in the graph), decoder (one profile spanning
    every template's final grid)."""
    from var_ssg.graphs.infinity_config import get_infinity_preset
    from var_ssg.graphs.infinity_io import InfinityDecoderIO, InfinityStepIO
    cfg, B = get_infinity_preset(man_data["preset"]), int(man_data["batch"])
    g = man_data["graphs"]
    io = InfinityStepIO(cfg, B)
    K = cfg.schedule(1.0).num_scales
    spans = [io.profile_span(k) for k in range(K)]
    dec = InfinityDecoderIO(cfg, B).summed_span()
    flags = dict(tf32=tf32, hardware_compatible=hardware_compat, version_compatible=version_compat)

    def ranged(name: str, file: str, sp: List, order: List[int]) -> RangedEnginePlan:
        return RangedEnginePlan(name=name, onnx=g[name]["file"], file=file, profiles=[{n: v[1] for n, v in s.items()} for s in sp],
                                profile_scales=order, extra_memory_target=[1.0] + [0.0] * (len(sp) - 1),
                                profile_min=[{n: v[0] for n, v in s.items()} for s in sp],
                                profile_max=[{n: v[2] for n, v in s.items()} for s in sp], **flags)
    return [EnginePlan(name="text", onnx=g["text"]["file"], file="text.plan", profiles=[], profile_scales=[],
                       extra_memory_target=[], **flags),
            ranged("step", "step_all.plan", spans, profile_scales(K)),
            ranged("decoder", "decoder.plan", [dec], [0])]


def engines_stale(man_data: Dict, machine: Tuple[str, str, str], tf32: bool = False, hardware_compat: bool = False,
                  version_compat: bool = False) -> Optional[str]:
    """None if the manifest's engines were built for these graphs on this machine (TensorRT
    version, GPU) with these options; else why they must be rebuilt."""
    sec = man_data.get("tensorrt")
    if not man_data.get("engines") or not sec:
        return "there are no TensorRT engines yet"
    key = engine_cache_key(man_data["cache_key"], *machine, hardware_compat, version_compat, tf32)
    if sec.get("key") == key:
        return None
    old = (f"TensorRT {sec.get('version')} on {sec.get('gpu')} ({sec.get('compute_capability')}), "
           f"tf32={sec.get('tf32', True)} hw={sec.get('hardware_compatible')} vc={sec.get('version_compatible')}")
    new = f"TensorRT {machine[0]} on {machine[1]} ({machine[2]}), tf32={tf32} hw={hardware_compat} vc={version_compat}"
    return f"the engines were built with {old}; this build is for {new}"


def configure(trt, config, p: EnginePlan) -> None:
    """Apply the plan's flags to a builder config."""
    if p.tf32:
        config.set_flag(trt.BuilderFlag.TF32)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)
    if p.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if p.hardware_compatible:
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS


class TimingCache:
    """The builds' shared timing cache. TensorRT takes a cache only from its own version (ITimingCache
    docs: "must be generated by a TensorRT build of exact same version") and, with
    ignore_mismatch=False, only from the same device (`set_timing_cache` returns False). The file
    starts with a header line naming the TensorRT version that wrote it: a cache of another
    version (or without the header) is not handed to TensorRT at all. Whatever is refused, the
    build starts from a fresh cache, and only a cache that a finished build used is written back."""
    HEADER = b"var-ssg timing cache, TensorRT "

    def __init__(self, path: str, version: str):
        self.path, self.version, self.cache, self.used = path, version, None, False

    def attach(self, config) -> None:
        if self.cache is None:
            self.cache = self._first(config)
        elif not config.set_timing_cache(self.cache, ignore_mismatch=False):
            raise ConfigError("TensorRT refused the timing cache it accepted for the previous engine")

    def _read(self) -> bytes:
        """TensorRT's bytes from the file if this TensorRT version wrote it, else b"" (logged)."""
        if not os.path.isfile(self.path):
            return b""
        with open(self.path, "rb") as f:
            head, data = f.readline(), f.read()
        made_by = head[len(self.HEADER):].strip().decode(errors="replace") if head.startswith(self.HEADER) else None
        if made_by != self.version:
            log.warning("the timing cache %s was written by %s; TensorRT %s reuses only its own version's caches: "
                        "building with a fresh one, which replaces it", self.path,
                        f"TensorRT {made_by}" if made_by else "an unknown TensorRT", self.version)
            return b""
        return data

    def _first(self, config):
        data = self._read()
        if data:
            cache = config.create_timing_cache(data)
            if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
                log.info("reusing the timing cache %s (TensorRT %s)", self.path, self.version)
                return cache
            log.warning("TensorRT rejected the timing cache %s (made on another GPU): building with a "
                        "fresh one, which replaces it", self.path)
        cache = config.create_timing_cache(b"")
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            raise ConfigError("TensorRT could not create a timing cache")
        return cache

    def save(self) -> None:
        if self.cache is None or not self.used:
            return
        with atomic_path(self.path) as tmp:
            with open(tmp, "wb") as f:
                f.write(self.HEADER + self.version.encode() + b"\n")
                f.write(memoryview(self.cache.serialize()))


def _network_flags(trt) -> int:
    # TensorRT 10: strongly typed is opt-in; 11: always on, the flag deprecated and ignored
    if version_tuple(trt.__version__) >= (11,):
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def _build_one(trt, builder, logger, onnx_dir: str, out_dir: str, p: EnginePlan, cache: TimingCache) -> None:
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.path.join(onnx_dir, p.onnx)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ConfigError(f"TensorRT could not parse {p.onnx}: {errs}")
    config = builder.create_builder_config()
    cache.attach(config)
    configure(trt, config, p)
    for i, (k, extra) in enumerate(zip(p.profile_scales, p.extra_memory_target)):
        prof = builder.create_optimization_profile()
        for name, (mn, opt, mx) in p.shapes(k).items():
            prof.set_shape(name, mn, opt, mx)
        prof.extra_memory_target = extra
        if config.add_optimization_profile(prof) != i:
            raise ConfigError(f"TensorRT refused optimization profile {i} (scale {k}) of {p.onnx}: {p.profiles[k]}")
    log.info("building %s from %s (tf32=%s)", p.file, p.onnx, p.tf32)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise ConfigError(f"TensorRT failed to build an engine for {p.onnx} (see the log above)")
    cache.used = True
    with atomic_path(os.path.join(out_dir, p.file)) as tmp:
        with open(tmp, "wb") as f:
            f.write(memoryview(blob))


def build_engines(onnx_dir: str, man_data: Dict, out_dir: Optional[str] = None, tf32: bool = False,
                  hardware_compat: bool = False, version_compat: bool = False, device: int = 0) -> Tuple[Dict, Dict]:
    """Build the engines of `plan` from the graphs in `onnx_dir` into `out_dir` (default: the
    same), reusing `out_dir`'s timing cache; returns the manifest's `engines` and `tensorrt`."""
    trt = require_gpu()
    machine = this_machine(device)
    check_precision(man_data["precision"], machine)
    out_dir = out_dir or onnx_dir
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    cache = TimingCache(os.path.join(out_dir, TIMING_CACHE), machine[0])
    plans = plan(man_data, tf32=tf32, hardware_compat=hardware_compat, version_compat=version_compat)
    for p in plans:
        _build_one(trt, builder, logger, onnx_dir, out_dir, p, cache)
    cache.save()
    version, gpu, cc = machine
    return {p.name: asdict(p) for p in plans}, dict(
        version=version, gpu=gpu, compute_capability=cc, hardware_compatible=hardware_compat,
        version_compatible=version_compat, tf32=tf32, timing_cache=TIMING_CACHE,
        key=engine_cache_key(man_data["cache_key"], version, gpu, cc, hardware_compat, version_compat, tf32))
