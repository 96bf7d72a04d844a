"""TensorRT backend: one engine per scale graph (from `--target trt`), inputs and outputs bound
to torch tensors with `set_tensor_address` (the KV cache prefix and slice in place), run with
`execute_async_v3` on one CUDA stream. Guarded: without tensorrt it raises a clear error.
Untested here (no GPU/TensorRT on the build machines); see the closing note of issue 5."""
from __future__ import annotations

from typing import Dict

import torch

from export.trt_build import import_tensorrt
from graphs.config import ConfigError

from ..manifest import TORCH_DTYPES, Manifest
from ..pipeline import BackendInfo



class TrtBackend:
    def __init__(self, man: Manifest, device: str = "cuda"):
        trt = import_tensorrt()
        sec = man.data.get("tensorrt")
        if not sec:
            raise ConfigError(f"{man.root} has no TensorRT engines: re-export with --target trt on this GPU")
        if not torch.cuda.is_available():
            raise ConfigError("the tensorrt backend needs an NVIDIA GPU visible to PyTorch")
        props = torch.cuda.get_device_properties(0)
        cc = f"{props.major}.{props.minor}"
        if sec["version"] != trt.__version__ and not sec.get("version_compatible"):
            raise ConfigError(f"engines were built with TensorRT {sec['version']}, this is {trt.__version__}: re-export with --target trt")
        if sec["compute_capability"] != cc and not sec.get("hardware_compatible"):
            raise ConfigError(f"engines were built for {sec['gpu']} (sm {sec['compute_capability']}), "
                              f"this GPU is {props.name} (sm {cc}): re-export with --target trt here")
        self.man, self.trt = man, trt
        rt = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines, self.contexts = [], []
        for e in sec["engines"]:
            with open(man.path(e["engine"]), "rb") as f:
                eng = rt.deserialize_cuda_engine(f.read())
            self.engines.append(eng)
            self.contexts.append(eng.create_execution_context())
        self.stream = torch.cuda.Stream()
        self.info = BackendInfo(name="tensorrt", cfg=man.cfg, k_max=man.k_max, transform=man.transform,
                                kv_dtype=man.kv_dtype, batch=man.batch, device="cuda")
        self.source_note = man.source_note

    def _run(self, idx: int, feeds: Dict[str, torch.Tensor], outs: Dict[str, torch.Tensor]):
        g = self.man.data["graphs"][idx]
        ctx = self.contexts[idx]
        alive = []
        for spec in g["inputs"]:
            t = feeds[spec["name"]].to(device="cuda", dtype=TORCH_DTYPES[spec["dtype"]]).contiguous()
            alive.append(t)
            ctx.set_tensor_address(spec["name"], t.data_ptr())
        for name, t in outs.items():
            ctx.set_tensor_address(name, t.data_ptr())
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution failed for {g['name']}")
        self.stream.synchronize()
        return outs

    def step(self, k: int, feeds: Dict[str, torch.Tensor], kv_out: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self._run(k, feeds, self.man.alloc_outputs(k, "cuda", kv_out))

    def decode(self, f_hat: torch.Tensor) -> torch.Tensor:
        idx = len(self.engines) - 1
        return self._run(idx, {"f_hat": f_hat}, self.man.alloc_outputs(idx, "cuda"))["image"]
