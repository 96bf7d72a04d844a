"""ONNX Runtime backend: one session per scale graph plus the decoder (or, with
graph="unified", one session over step_all.onnx fed each scale's constants).

* Weights: every session's external initializers are OrtValues over one read-only memory map
  of weights.bin (`SessionOptions.add_initializer`), so ten sessions hold one copy; weight
  pre-packing (a per-session copy) is off unless `prepack=True`.
* IO binding: inputs and outputs are bound to torch tensors (the KV cache prefix view as
  `past_kv`, the cache slice for this scale as `new_kv`), so no per-scale copies are made.
* CUDA: `device="cuda"` requires the CUDA provider to be active on every session; a silent
  fall back to the CPU is an error.
"""
from __future__ import annotations

import logging
import mmap
import os
from typing import Dict

import numpy as np
import onnx
import torch

from graphs.config import ConfigError

from ..manifest import TORCH_DTYPES, Manifest
from ..pipeline import BackendInfo

log = logging.getLogger(__name__)
_ONNX_NP = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
            onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32,
            onnx.TensorProto.DOUBLE: np.float64, onnx.TensorProto.BOOL: np.bool_}


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError("the onnxruntime backend needs the onnxruntime package: pip install onnxruntime-gpu "
                          "(or onnxruntime for CPU only)") from None
    return ort


class OrtBackend:
    def __init__(self, man: Manifest, device: str = "cpu", threads: int = 0,
                 share_weights: bool = True, trt_provider: bool = False, graph: str = "auto",
                 prepack: bool = None):
        ort = _import_ort()
        self.ort, self.man, self.device = ort, man, device
        if device not in ("cpu", "cuda"):
            raise ConfigError(f"--device must be cpu or cuda, got {device!r}")
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ConfigError("--device cuda: this onnxruntime has no CUDAExecutionProvider; "
                                  "pip install onnxruntime-gpu (and a CUDA 12 runtime)")
            if not torch.cuda.is_available():
                raise ConfigError("--device cuda: PyTorch sees no CUDA device (it holds the I/O buffers)")
            providers = (["TensorrtExecutionProvider"] if trt_provider else []) + ["CUDAExecutionProvider", "CPUExecutionProvider"]
        self._mm = None
        wpath = man.path(man.data["external_data"]["file"])
        if share_weights and os.path.getsize(wpath) > 0:
            with open(wpath, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if graph not in ("auto", "static", "unified"):
            raise ConfigError(f"graph must be auto, static or unified, got {graph!r}")
        if graph == "auto":
            graph = "unified" if man.data.get("unified") else "static"
        if prepack is None:          # one session holds the step weights: pre-pack them once
            prepack = graph == "unified"
        self._so_args = (threads, prepack, providers)
        self.graph = graph
        graphs = man.data["graphs"]
        self.decoder_graph = graphs[-1]
        self.step_graphs = [man.unified["graph"]] if graph == "unified" else graphs[:-1]
        self.sessions = {g["name"]: self._session(g) for g in self.step_graphs + [self.decoder_graph]}
        if graph == "unified":
            self.consts = man.scale_consts(device)
        cfg = man.cfg
        self.info = BackendInfo(name="onnxruntime", cfg=cfg, k_max=man.k_max, transform=man.transform,
                                kv_dtype=man.kv_dtype, batch=man.batch, device=device)
        self.source_note = man.source_note

    def _session(self, g: Dict):
        ort, man = self.ort, self.man
        threads, prepack, providers = self._so_args
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            so.intra_op_num_threads = threads
        if not prepack:
            so.add_session_config_entry("session.disable_prepacking", "1")
        keep = []
        if self._mm is not None:
            keep = self._share(so, man.path(g["file"]))
        sess = ort.InferenceSession(man.path(g["file"]), sess_options=so, providers=providers)
        if self.device == "cuda" and "CUDAExecutionProvider" not in sess.get_providers():
            raise ConfigError(f"{g['file']}: onnxruntime fell back to the CPU (providers {sess.get_providers()}); "
                              f"check the CUDA/cuDNN libraries that onnxruntime-gpu needs")
        sess._var_ssg_keep = keep     # the OrtValues must outlive the session
        return sess

    def _share(self, so, path: str) -> list:
        """Point this session's external initializers at the shared memory map."""
        m = onnx.load(path, load_external_data=False)
        keep = []
        for t in m.graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL or t.data_type not in _ONNX_NP:
                continue
            ext = {e.key: e.value for e in t.external_data}
            arr = np.frombuffer(self._mm, dtype=_ONNX_NP[t.data_type], count=int(ext["length"]) // np.dtype(_ONNX_NP[t.data_type]).itemsize,
                                offset=int(ext.get("offset", 0))).reshape(tuple(t.dims))
            ov = self.ort.OrtValue.ortvalue_from_numpy(arr)
            so.add_initializer(t.name, ov)
            keep.append((arr, ov))
        return keep

    def _bind(self, binding, name: str, t: torch.Tensor, output: bool):
        t = t if t.is_contiguous() else t.contiguous()
        dev = "cuda" if t.is_cuda else "cpu"
        dt = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32}[t.dtype]
        fn = binding.bind_output if output else binding.bind_input
        fn(name, dev, t.device.index or 0, dt, tuple(t.shape), t.data_ptr())
        return t

    def _run(self, g: Dict, feeds: Dict[str, torch.Tensor], outs: Dict[str, torch.Tensor]):
        sess = self.sessions[g["name"]]
        b = sess.io_binding()
        alive = []
        for spec in g["inputs"]:
            t = feeds[spec["name"]]
            if len(t.shape) != len(spec["shape"]) or any(
                    isinstance(d, int) and d != s for d, s in zip(spec["shape"], t.shape)):
                raise ConfigError(f"{g['file']}: input {spec['name']} has shape {list(t.shape)}, "
                                  f"the graph was exported for {spec['shape']}")
            want = TORCH_DTYPES[spec["dtype"]]
            alive.append(self._bind(b, spec["name"], t.to(want), False))
        for spec in g["outputs"]:
            alive.append(self._bind(b, spec["name"], outs[spec["name"]], True))
        sess.run_with_iobinding(b)
        return outs

    def step(self, k: int, feeds: Dict[str, torch.Tensor], kv_out: torch.Tensor) -> Dict[str, torch.Tensor]:
        # new_kv is bound to the cache slice: written in place
        if self.graph == "unified":
            return self._run(self.step_graphs[0], self.man.unified_feeds(k, feeds, kv_out, self.consts[k]),
                             self.man.alloc_unified_outputs(k, kv_out.device, kv_out))
        return self._run(self.step_graphs[k], feeds, self.man.alloc_outputs(k, kv_out.device, kv_out))

    def decode(self, f_hat: torch.Tensor) -> torch.Tensor:
        idx = len(self.man.data["graphs"]) - 1
        return self._run(self.decoder_graph, {"f_hat": f_hat}, self.man.alloc_outputs(idx, f_hat.device))["image"]
