"""TensorRT backend over the engines the manifest lists (`--target trt`). Guarded: without
tensorrt it raises a clear error; nothing here is imported by the other backends.

* One engine for every scale (step_all.plan) with one optimization profile per scale (in the
  manifest's `profile_scales` order: the last scale first); one execution context per profile,
  created USER_MANAGED and all pointed at ONE scratch buffer (the scales run one after another
  on one stream, so they can share it). TensorRT's boolean results (profile selection, input
  shapes, addresses) are checked where they are returned, so a mismatched engine fails there
  with its name, not later as a generic execution failure.
* The KV cache is owned by the backend (`alloc_kv`), so its address is stable across runs;
  every input and output of a scale is bound once to a static torch tensor (the cache prefix as
  past_kv, the cache slice as new_kv), and feeds are copied into those tensors before a run.
* CUDA graphs: the first run of a scale executes normally, the second captures
  `execute_async_v3` into a torch.cuda.CUDAGraph, later runs replay it. Capture uses the
  thread-local capture mode (as trtexec does): serving runs replicas in threads, and the global
  mode would make another thread's CUDA calls fail during a capture. If capture fails, that
  scale runs plain `execute_async_v3` from then on (one warning); a real execution error then
  surfaces from the plain run, not hidden behind a capture error.
* Before loading: the manifest's TensorRT version and GPU against this machine
  (contract.tensorrt.check_compat). Version-compatible plans embed TensorRT's lean runtime
  (host code): the runtime is allowed to load it (`engine_host_code_allowed`, default False)
  only for those; the plan's sha256 was checked against the manifest. After loading: every I/O
  tensor's mode, dtype and per-profile shapes against the manifest (`check_engine_io`).

Tested on the CPU against the real TensorRT 10.8, 10.16 and 11.4 Python bindings through a strict
fake (tests/trt_real: every call bound against the real signatures, execution by ONNX Runtime);
never yet run on a GPU with TensorRT. scripts/gpu_check.sh exercises it where both exist.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional

import numpy as np
import torch

from var_ssg.contract.dtypes import name_of_trt, torch_dtype
from var_ssg.contract.manifest import Manifest
from var_ssg.contract.tensorrt import check_compat, check_profile_scales, import_tensorrt
from var_ssg.common.errors import ConfigError

from .base import BackendInfo, to_torch, torch_host

log = logging.getLogger(__name__)



def _enum_name(v) -> str:
    return v.name


def make_runtime(trt, sec: Dict):
    """A trt.Runtime that may load these engines: version-compatible plans carry host code."""
    rt = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    if sec.get("version_compatible"):
        rt.engine_host_code_allowed = True
    return rt


def deserialize(rt, path: str, sec: Dict):
    with open(path, "rb") as f:
        engine = rt.deserialize_cuda_engine(f.read())
    if engine is None:          # the version/GPU check passed already: TensorRT's log says why
        raise ConfigError(f"{path}: TensorRT could not deserialize the engine (TensorRT's log above says why; it was "
                          f"built with TensorRT {sec['version']} for {sec['gpu']}, which this machine may load); "
                          f"if the log names no cause, re-export with --target trt --force")
    return engine


def check_engine_io(engine, path: str, inputs: List[Dict], outputs: List[Dict],
                    profiles: List[Dict[str, list]], output_shapes: List[Dict[str, list]]) -> None:
    """The engine's I/O tensors are the manifest's: names, direction, dtype, and per profile the
    shapes (inputs: min = opt = max = the manifest's; outputs: every static dimension)."""
    _check_io(engine, path, inputs, outputs, len(profiles), lambda k, name: [list(profiles[k][name])] * 3,
              lambda k, name, mode: list((profiles if mode == "INPUT" else output_shapes)[k][name]))


def check_ranged_engine_io(engine, path: str, graph: Dict, entry: Dict) -> None:
    """check_engine_io for engines whose profiles span shapes (Infinity's: the manifest's
    `engines[name]` profile_min / profiles (opt) / profile_max, one per engine profile in
    `profile_scales` order; none for a static engine). A dimension the graph declares symbolic
    may be anything where the engine reports it static."""
    order = entry.get("profile_scales") or []
    ranges = [[entry[key][k] for key in ("profile_min", "profiles", "profile_max")] for k in order]
    declared = {t["name"]: [d if isinstance(d, int) else -1 for d in t["shape"]]
                for t in graph["inputs"] + graph["outputs"]}
    _check_io(engine, path, graph["inputs"], graph["outputs"], max(len(ranges), 1),
              lambda k, name: [list(r[name]) for r in ranges[k]] if ranges and name in ranges[k][1] else None,
              lambda k, name, mode: declared[name])


def _check_io(engine, path: str, inputs: List[Dict], outputs: List[Dict], n_profiles: int, want_range, want_static):
    """want_range(profile, input) -> [min, opt, max] (None: in no profile) for the inputs the engine
    has dynamic; want_static(profile, name, mode) -> the shape every static dimension must have
    (-1: any)."""
    def fail(what):
        raise ConfigError(f"{path}: {what}; the engine does not belong to these artifacts: re-export with "
                          f"--target trt --force")
    have = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    want = {t["name"]: ("INPUT", t) for t in inputs}
    want.update({t["name"]: ("OUTPUT", t) for t in outputs})
    if sorted(have) != sorted(want):
        fail(f"engine tensors {sorted(have)} differ from the manifest's {sorted(want)}")
    if engine.num_optimization_profiles != n_profiles:
        fail(f"{engine.num_optimization_profiles} optimization profiles, the manifest has {n_profiles}")
    for name, (mode, t) in want.items():
        got_mode, got_dt = _enum_name(engine.get_tensor_mode(name)), _enum_name(engine.get_tensor_dtype(name))
        if got_mode != mode:
            fail(f"{name} is an {got_mode.lower()} of the engine, an {mode.lower()} in the manifest")
        got_dt = name_of_trt(got_dt) or got_dt          # the one dtype table (contract.dtypes.DTYPES)
        if got_dt != t["dtype"]:
            fail(f"{name} is {got_dt} in the engine, {t['dtype']} in the manifest")
        static = list(engine.get_tensor_shape(name))           # -1 = dynamic
        for k in range(n_profiles):
            if mode == "INPUT" and -1 in static:
                expect = want_range(k, name)
                if expect is None:
                    fail(f"{name} is dynamic in the engine ({static}) but in no profile of the manifest")
                got = [list(s) for s in engine.get_tensor_profile_shape(name, k)]
                if got != expect:
                    fail(f"{name} has (min, opt, max) shapes {got} in profile {k}, the manifest says "
                         f"{expect[0] if expect[0] == expect[1] == expect[2] else expect}")
                continue
            expect = want_static(k, name, mode)
            if len(static) != len(expect) or any(e != -1 and g not in (-1, e) for g, e in zip(static, expect)):
                fail(f"{name} has shape {static} in the engine, the manifest says {expect} (profile {k})")


class _Engine:
    """One deserialized engine, a context per profile sharing `scratch`, static I/O tensors."""

    def __init__(self, trt, engine, path: str, n_profiles: int, stream: torch.cuda.Stream,
                 scratch: Optional[torch.Tensor] = None):
        """`scratch`: a buffer shared with other engines run on the same stream (at least
        `scratch_size` bytes); default: one of this engine's own."""
        self.engine = engine
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        n = max(n_profiles, 1)
        self.contexts = [self.engine.create_execution_context(strategy) for _ in range(n)]
        size = self.scratch_size(engine, n_profiles)
        if scratch is not None and scratch.numel() < size:
            raise RuntimeError(f"{path}: a shared scratch buffer of {scratch.numel()} bytes for an engine that "
                               f"needs {size}")
        self.scratch = torch.empty(size, dtype=torch.uint8, device="cuda") if scratch is None else scratch
        for i, ctx in enumerate(self.contexts):
            if n_profiles and not ctx.set_optimization_profile_async(i, stream.cuda_stream):
                raise ConfigError(f"{path}: TensorRT refused to select optimization profile {i}; the engine does "
                                  f"not belong to these artifacts: re-export with --target trt --force")
            ctx.set_device_memory(self.scratch.data_ptr(), self.scratch.numel())
        stream.synchronize()

    @staticmethod
    def scratch_size(engine, n_profiles: int) -> int:
        """Bytes of device memory the engine's largest profile needs (at least 1)."""
        return max(1, max(int(engine.get_device_memory_size_for_profile_v2(i)) for i in range(max(n_profiles, 1))))


def open_tensorrt(man: Manifest, device: str):
    """(tensorrt, the manifest's `tensorrt` section, a Runtime that may load its engines), after
    the checks every TensorRT backend makes before loading: TensorRT installed (>= 10.8), a GPU,
    engines in the manifest (artifacts exported without --target trt have none), the engines built
    for this TensorRT version and GPU (contract.tensorrt.check_compat)."""
    trt = import_tensorrt()
    man.engines                             # noqa: B018 - raises the clear error when there are none
    sec = man.data["tensorrt"]
    if device != "cuda" or not torch.cuda.is_available():
        raise ConfigError("the tensorrt backend needs an NVIDIA GPU visible to PyTorch (--device cuda)")
    props = torch.cuda.get_device_properties(0)
    check_compat(sec, trt.__version__, props.name, f"{props.major}.{props.minor}")
    return trt, sec, make_runtime(trt, sec)


class TrtRunner:
    """What the TensorRT backends share (VAR's TrtBackend, Infinity's InfinityTrtBackend): one
    stream; per key (a scale, or a negative key for the decoder / text engine) a context whose
    inputs and outputs are bound once to static tensors (`bound`); runs as the module docstring
    says (first plain, second captured into a CUDA graph, then replayed; a failed capture runs
    plainly from then on)."""
    NAMES = {-1: "the decoder", -2: "the text encoder"}

    def __init__(self, cuda_graphs: bool = True):
        self.cuda_graphs = cuda_graphs
        self.stream = torch.cuda.Stream()
        self.bound: Dict[int, Dict[str, torch.Tensor]] = {}     # key -> static tensors
        self.graphs: Dict[int, torch.cuda.CUDAGraph] = {}
        self.no_graph: set = set()                              # keys whose capture failed: plain runs
        self.runs: Dict[int, int] = {}

    def _what(self, key: int) -> str:
        return self.NAMES.get(key, f"scale {key}")

    def _forget(self, keys=None) -> None:
        """Drop the bindings, CUDA graphs and run counts of `keys` (default: all): their next run
        binds again, runs plainly, and captures on the run after."""
        for d in (self.bound, self.graphs, self.runs):
            for key in list(d if keys is None else keys):
                d.pop(key, None)
        self.no_graph -= set(self.no_graph if keys is None else keys)

    def _bind_static(self, key: int, ctx, tensors: Dict[str, torch.Tensor], shaped: Dict[str, list]):
        what = self._what(key)
        for name, shape in shaped.items():
            if not ctx.set_input_shape(name, tuple(shape)):
                raise ConfigError(f"TensorRT refused the shape {list(shape)} of {name} for {what} (outside the engine's "
                                  f"profile): the engines do not belong to these artifacts: re-export with --target trt "
                                  f"--force")
        for name, t in tensors.items():
            if not ctx.set_tensor_address(name, t.data_ptr()):
                raise RuntimeError(f"TensorRT refused the address of {name} for {what}")
        self.bound[key] = tensors

    def _run_plain(self, ctx) -> None:
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed (TensorRT's log above says why)")

    def _capture(self, key: int, ctx) -> Optional["torch.cuda.CUDAGraph"]:
        """One execute_async_v3 captured into a CUDA graph, or None (with a warning) if capture
        fails: the caller then runs plainly, so a real execution error shows as itself."""
        try:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, stream=self.stream, capture_error_mode="thread_local"):
                ok = ctx.execute_async_v3(self.stream.cuda_stream)   # no raise inside: capture_end would mask it
            if not ok:
                raise RuntimeError("execute_async_v3 returned False during capture")
            return g
        except Exception as e:      # noqa: BLE001 - any capture failure means "run without a graph"
            log.warning("CUDA graph capture failed for %s (%s: %s); it runs without a CUDA graph from now on",
                        self._what(key), type(e).__name__, e)
            return None

    def _execute(self, key: int, ctx):
        n = self.runs.get(key, 0)
        self.runs[key] = n + 1
        if key in self.graphs:
            with torch.cuda.stream(self.stream):
                self.graphs[key].replay()
            return
        if self.cuda_graphs and n >= 1 and key not in self.no_graph:   # first run plain, second captures
            g = self._capture(key, ctx)
            if g is not None:
                self.graphs[key] = g
                with torch.cuda.stream(self.stream):
                    g.replay()
                return
            self.no_graph.add(key)
        self._run_plain(ctx)


class TrtBackend(TrtRunner):
    def __init__(self, man: Manifest, device: str = "cuda", cuda_graphs: bool = True):
        trt, sec, rt = open_tensorrt(man, device)
        engines = man.engines
        super().__init__(cuda_graphs)
        self.man, self.trt = man, trt
        self.K = len(engines["step"]["profiles"])
        order = check_profile_scales(engines["step"].get("profile_scales"), self.K)    # engine profile -> scale
        step, dec = man.graph("step"), man.graph("decoder")
        path = man.path(engines["step"]["file"])
        e = deserialize(rt, path, sec)
        check_engine_io(e, path, step["inputs"], step["outputs"], [step["profiles"][k] for k in order],
                        [step["output_shapes"][k] for k in order])
        eng = _Engine(trt, e, path, self.K, self.stream)
        self.step_contexts = {k: eng.contexts[i] for i, k in enumerate(order)}        # scale -> its context
        self.step_engine = eng
        path = man.path(engines["decoder"]["file"])
        e = deserialize(rt, path, sec)
        check_engine_io(e, path, dec["inputs"], dec["outputs"], [{i["name"]: i["shape"] for i in dec["inputs"]}],
                        [{o["name"]: o["shape"] for o in dec["outputs"]}])
        self.dec_engine = _Engine(trt, e, path, 0, self.stream)
        self.consts = [{n: to_torch(a, "cuda") for n, a in c.items()} for c in man.scale_consts()]
        self.dynamic = set(man.graph("step")["dynamic_inputs"])
        self.in_dtype = {n: torch_dtype(dt) for n, dt in man.input_dtypes("step").items()}
        self.kv: Optional[torch.Tensor] = None
        self.info = BackendInfo(name="tensorrt", cfg=man.cfg, k_max=man.k_max, transform=man.transform,
                                kv_dtype=man.kv_dtype, batch=man.batch, device="cuda")
        self.source_note = man.source_note

    # the pipeline asks for the cache: one persistent buffer, so bound addresses stay valid
    def alloc_kv(self, shape, dtype: str) -> torch.Tensor:
        dtype = torch_dtype(dtype)
        if self.kv is None or tuple(self.kv.shape) != tuple(shape) or self.kv.dtype != dtype:
            self.kv = torch.empty(shape, dtype=dtype, device="cuda")
            self._forget()
        return self.kv

    def step(self, k: int, feeds: Dict[str, object], kv_out: torch.Tensor) -> Dict[str, torch.Tensor]:
        if self.kv is None or kv_out.untyped_storage().data_ptr() != self.kv.untyped_storage().data_ptr():
            raise ConfigError("the tensorrt backend owns the KV cache: run it through runtime.pipeline.Pipeline")
        ctx = self.step_contexts[k]
        full = dict(feeds, **self.consts[k])
        prof = self.man.profile(k)
        if k not in self.bound:
            tensors = {}
            for name, shape in prof.items():
                src = full[name]
                if name == "past_kv" or name.startswith("scale_"):
                    tensors[name] = src              # cache prefix view / constants: stable addresses
                else:
                    tensors[name] = torch.empty(shape, dtype=self.in_dtype[name], device="cuda")
            tensors.update({n: (kv_out if n == "new_kv" else torch.empty(shape, dtype=torch_dtype(dt), device="cuda"))
                            for n, (shape, dt) in self.man.output_specs("step", k).items()})
            self._bind_static(k, ctx, tensors, {n: s for n, s in prof.items() if n in self.dynamic})
        t = self.bound[k]
        cur = torch.cuda.current_stream()
        self.stream.wait_stream(cur)
        with torch.cuda.stream(self.stream):
            for name in prof:
                if name == "past_kv" or name.startswith("scale_"):
                    continue
                src = to_torch(full[name], "cpu") if isinstance(full[name], np.ndarray) else full[name]
                if t[name].data_ptr() != src.data_ptr():
                    t[name].copy_(src, non_blocking=True)
        self._execute(k, ctx)
        cur.wait_stream(self.stream)
        return {n: (t[n] if n == "new_kv" else t[n].clone()) for n in ("tokens", "logits", "logits_cfg", "f_hat_out", "new_kv")}

    def decode(self, f_hat) -> torch.Tensor:
        ctx = self.dec_engine.contexts[0]
        if -1 not in self.bound:
            tensors = {i["name"]: torch.empty(i["shape"], dtype=torch_dtype(dt), device="cuda")
                       for i, dt in zip(self.man.graph("decoder")["inputs"], self.man.input_dtypes("decoder").values())}
            tensors.update({n: torch.empty(shape, dtype=torch_dtype(dt), device="cuda")
                            for n, (shape, dt) in self.man.output_specs("decoder").items()})
            self._bind_static(-1, ctx, tensors, {})
        t = self.bound[-1]
        cur = torch.cuda.current_stream()
        self.stream.wait_stream(cur)
        with torch.cuda.stream(self.stream):
            t["f_hat"].copy_(to_torch(f_hat, "cpu") if isinstance(f_hat, np.ndarray) else f_hat, non_blocking=True)
        self._execute(-1, ctx)
        cur.wait_stream(self.stream)
        return t["image"].clone()

    def host(self, x):
        return torch_host(x)

    def zeros(self, shape):
        return torch.zeros(tuple(shape), device="cuda")
