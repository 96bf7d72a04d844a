"""A CUDA device on the CPU, for driving runtime/backends/trt.py without a GPU: `cuda` tensors
are CPU tensors (a TorchFunctionMode rewrites the device), streams are handles, and a CUDA graph
records what was launched on its stream while capturing (nothing runs then, as on a GPU) and
runs it again on replay. The strict TensorRT fake asks `STATE.capturing` whether a launch is
being captured."""
from __future__ import annotations

import contextlib
import itertools
from types import SimpleNamespace
from typing import Callable, List, Optional

import torch
from torch.overrides import TorchFunctionMode

_handles = itertools.count(0x7000)


class Stream:
    def __init__(self, device=None, priority=0, cuda_stream: Optional[int] = None):
        self.cuda_stream = next(_handles) if cuda_stream is None else cuda_stream

    def synchronize(self):
        pass

    def wait_stream(self, other):
        pass


class Graph:
    def __init__(self, *a, **kw):
        self.launches: List[Callable[[], None]] = []
        self.captured = False
        self.replays = 0

    def replay(self):
        if not self.captured:
            raise RuntimeError("replay of a CUDA graph that was not captured")
        self.replays += 1
        for fn in self.launches:
            fn()


STATE = SimpleNamespace(capturing=None, capture_stream=None, capture_modes=[], default=Stream(cuda_stream=0),
                        current=None)


@contextlib.contextmanager
def graph(g: Graph, pool=None, stream: Optional[Stream] = None, capture_error_mode: str = "global"):
    if capture_error_mode not in ("global", "thread_local", "relaxed"):
        raise ValueError(capture_error_mode)
    if STATE.capturing is not None:
        raise RuntimeError("nested CUDA graph capture")
    stream = stream or Stream()
    STATE.capturing, STATE.capture_stream = g, stream
    STATE.capture_modes.append(capture_error_mode)
    prev, STATE.current = STATE.current, stream
    try:
        yield
        g.captured = True
    finally:
        STATE.capturing, STATE.capture_stream, STATE.current = None, None, prev


@contextlib.contextmanager
def use_stream(s):
    prev, STATE.current = STATE.current, s
    try:
        yield
    finally:
        STATE.current = prev


def _cpu(d):
    return "cpu" if d is not None and str(d).startswith("cuda") else d


class CudaAsCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _cpu(kwargs["device"])
        if func in (torch.Tensor.cuda,):
            return args[0]
        if func is torch.Tensor.to:
            args = tuple(_cpu(a) if isinstance(a, (str, torch.device)) else a for a in args)
        return func(*args, **kwargs)


def install(monkey, gpu: str = "NVIDIA H200", cc=(9, 0)) -> None:
    """Fake a CUDA device for the rest of the process; `monkey(obj, name, value)` sets attributes."""
    props = SimpleNamespace(name=gpu, major=cc[0], minor=cc[1], total_memory=141 << 30, multi_processor_count=132)
    monkey(torch.cuda, "is_available", lambda: True)
    monkey(torch.cuda, "device_count", lambda: 1)
    monkey(torch.cuda, "get_device_properties", lambda d=0: props)
    monkey(torch.cuda, "get_device_name", lambda d=0: gpu)
    monkey(torch.cuda, "Stream", Stream)
    monkey(torch.cuda, "current_stream", lambda device=None: STATE.current or STATE.default)
    monkey(torch.cuda, "stream", use_stream)
    monkey(torch.cuda, "CUDAGraph", Graph)
    monkey(torch.cuda, "graph", graph)
    monkey(torch.cuda, "synchronize", lambda device=None: None)
    CudaAsCpu().__enter__()
