"""TensorRT backend over the engines the manifest lists (`--target trt`). Guarded: without
tensorrt it raises a clear error; nothing here is imported by the other backends.

* One engine for every scale (step_all.plan) with one optimization profile per scale; one
  execution context per profile, created USER_MANAGED and all pointed at ONE scratch buffer
  (the scales run one after another on one stream, so they can share it).
* The KV cache is owned by the backend (`alloc_kv`), so its address is stable across runs;
  every input and output of a scale is bound once to a static torch tensor (the cache prefix as
  past_kv, the cache slice as new_kv), and feeds are copied into those tensors before a run.
* CUDA graphs: the first run of a scale executes normally, the second captures
  `execute_async_v3` into a torch.cuda.CUDAGraph, later runs replay it.
* The manifest's TensorRT version and GPU are checked against this machine first
  (contract.tensorrt.check_compat).

Not run on the build machines (no GPU, no TensorRT); scripts/gpu_check.sh exercises it.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from contract.manifest import Manifest
from contract.tensorrt import check_compat, import_tensorrt
from graphs.config import ConfigError

from ..pipeline import BackendInfo


class _Engine:
    """One deserialized engine, a context per profile sharing `scratch`, static I/O tensors."""

    def __init__(self, trt, rt, path: str, n_profiles: int, stream: torch.cuda.Stream):
        with open(path, "rb") as f:
            self.engine = rt.deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise ConfigError(f"{path}: TensorRT could not deserialize the engine (built for another TensorRT/GPU?); "
                              f"re-export with --target trt")
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        self.contexts = [self.engine.create_execution_context(strategy) for _ in range(max(n_profiles, 1))]
        size = self._scratch_bytes(max(n_profiles, 1))
        self.scratch = torch.empty(max(size, 1), dtype=torch.uint8, device="cuda")
        for i, ctx in enumerate(self.contexts):
            if n_profiles:
                ctx.set_optimization_profile_async(i, stream.cuda_stream)
            if hasattr(ctx, "set_device_memory"):
                ctx.set_device_memory(self.scratch.data_ptr(), self.scratch.numel())
            else:                                        # TensorRT 10.0
                ctx.device_memory = self.scratch.data_ptr()
        stream.synchronize()

    def _scratch_bytes(self, n: int) -> int:
        e = self.engine
        if hasattr(e, "get_device_memory_size_for_profile_v2"):
            return max(int(e.get_device_memory_size_for_profile_v2(i)) for i in range(n))
        return int(getattr(e, "device_memory_size_v2", e.device_memory_size))


class TrtBackend:
    def __init__(self, man: Manifest, device: str = "cuda", cuda_graphs: bool = True):
        trt = import_tensorrt()
        engines = man.engines
        sec = man.data["tensorrt"]
        if device != "cuda" or not torch.cuda.is_available():
            raise ConfigError("the tensorrt backend needs an NVIDIA GPU visible to PyTorch (--device cuda)")
        props = torch.cuda.get_device_properties(0)
        check_compat(sec, trt.__version__, props.name, f"{props.major}.{props.minor}")
        self.man, self.trt, self.cuda_graphs = man, trt, cuda_graphs
        self.K = len(engines["step"]["profiles"])
        self.stream = torch.cuda.Stream()
        rt = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.step_engine = _Engine(trt, rt, man.path(engines["step"]["file"]), self.K, self.stream)
        self.dec_engine = _Engine(trt, rt, man.path(engines["decoder"]["file"]), 0, self.stream)
        self.consts = man.scale_consts("cuda")
        self.dynamic = set(man.graph("step")["dynamic_inputs"])
        self.in_dtype = man.input_dtypes("step")
        self.kv: Optional[torch.Tensor] = None
        self.bound: Dict[int, Dict[str, torch.Tensor]] = {}     # scale (or -1: decoder) -> static tensors
        self.graphs: Dict[int, torch.cuda.CUDAGraph] = {}
        self.runs: Dict[int, int] = {}
        self.info = BackendInfo(name="tensorrt", cfg=man.cfg, k_max=man.k_max, transform=man.transform,
                                kv_dtype=man.kv_dtype, batch=man.batch, device="cuda")
        self.source_note = man.source_note

    # the pipeline asks for the cache: one persistent buffer, so bound addresses stay valid
    def alloc_kv(self, shape, dtype) -> torch.Tensor:
        if self.kv is None or tuple(self.kv.shape) != tuple(shape) or self.kv.dtype != dtype:
            self.kv = torch.empty(shape, dtype=dtype, device="cuda")
            self.bound.clear()
            self.graphs.clear()
            self.runs.clear()
        return self.kv

    def _bind_static(self, key: int, ctx, tensors: Dict[str, torch.Tensor], shaped: Dict[str, list]):
        for name, shape in shaped.items():
            ctx.set_input_shape(name, tuple(shape))
        for name, t in tensors.items():
            if not ctx.set_tensor_address(name, t.data_ptr()):
                raise RuntimeError(f"TensorRT refused the address of {name}")
        self.bound[key] = tensors

    def _execute(self, key: int, ctx):
        s = self.stream
        if not self.cuda_graphs:
            if not ctx.execute_async_v3(s.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
            return
        n = self.runs.get(key, 0)
        self.runs[key] = n + 1
        if key in self.graphs:
            with torch.cuda.stream(s):
                self.graphs[key].replay()
        elif n == 0:                              # first run: plain (also updates TensorRT's state)
            if not ctx.execute_async_v3(s.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
        else:                                     # second run: capture, then replay from now on
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, stream=s):
                if not ctx.execute_async_v3(s.cuda_stream):
                    raise RuntimeError("TensorRT execution failed during CUDA graph capture")
            self.graphs[key] = g
            with torch.cuda.stream(s):
                g.replay()

    def step(self, k: int, feeds: Dict[str, torch.Tensor], kv_out: torch.Tensor) -> Dict[str, torch.Tensor]:
        if self.kv is None or kv_out.untyped_storage().data_ptr() != self.kv.untyped_storage().data_ptr():
            raise ConfigError("the tensorrt backend owns the KV cache: run it through runtime.pipeline.Pipeline")
        ctx = self.step_engine.contexts[k]
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
            tensors.update({n: (kv_out if n == "new_kv" else torch.empty(shape, dtype=dt, device="cuda"))
                            for n, (shape, dt) in self.man.output_specs("step", k).items()})
            self._bind_static(k, ctx, tensors, {n: s for n, s in prof.items() if n in self.dynamic})
        t = self.bound[k]
        cur = torch.cuda.current_stream()
        self.stream.wait_stream(cur)
        with torch.cuda.stream(self.stream):
            for name in prof:
                if name == "past_kv" or name.startswith("scale_"):
                    continue
                if t[name].data_ptr() != full[name].data_ptr():
                    t[name].copy_(full[name], non_blocking=True)
        self._execute(k, ctx)
        cur.wait_stream(self.stream)
        return {n: (t[n] if n == "new_kv" else t[n].clone()) for n in ("tokens", "logits", "logits_cfg", "f_hat_out", "new_kv")}

    def decode(self, f_hat: torch.Tensor) -> torch.Tensor:
        ctx = self.dec_engine.contexts[0]
        if -1 not in self.bound:
            tensors = {i["name"]: torch.empty(i["shape"], dtype=dt, device="cuda")
                       for i, dt in zip(self.man.graph("decoder")["inputs"], self.man.input_dtypes("decoder").values())}
            tensors.update({n: torch.empty(shape, dtype=dt, device="cuda")
                            for n, (shape, dt) in self.man.output_specs("decoder").items()})
            self._bind_static(-1, ctx, tensors, {})
        t = self.bound[-1]
        cur = torch.cuda.current_stream()
        self.stream.wait_stream(cur)
        with torch.cuda.stream(self.stream):
            t["f_hat"].copy_(f_hat, non_blocking=True)
        self._execute(-1, ctx)
        cur.wait_stream(self.stream)
        return t["image"].clone()
