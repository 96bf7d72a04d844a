"""ONNX Runtime backend: one session over the step graph (step_all.onnx, fed each scale's
constants) and one over the decoder.

* Weights: external initializers are OrtValues over one read-only memory map of the
  manifest's weights file (`SessionOptions.add_initializer`); the step session pre-packs them
  once (MLAS), which speeds up the small scales.
* IO binding: inputs and outputs are bound to torch tensors (the KV cache prefix view as
  `past_kv`, this scale's cache slice as `new_kv`), so no per-scale copies are made.
* CUDA: `device="cuda"` requires the CUDA provider on every session; a silent fall back to
  the CPU is an error.
"""
from __future__ import annotations

import logging
import mmap
import os
from typing import Dict

import numpy as np
import onnx
import torch

from contract.graphcheck import check_graph, check_values
from contract.manifest import Manifest, ManifestError
from graphs.config import ConfigError

from .base import BackendInfo, fresh_kv

log = logging.getLogger(__name__)
_ONNX_NP = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
            onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32,
            onnx.TensorProto.DOUBLE: np.float64, onnx.TensorProto.BOOL: np.bool_}
_TORCH_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32,
             torch.bool: np.bool_}


def import_ort():
    """onnxruntime, or a one-line ConfigError naming the package to install."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError("the onnxruntime backend needs the onnxruntime package: pip install onnxruntime-gpu "
                          "(or onnxruntime for CPU only)") from None
    return ort


class OrtBackend:
    def __init__(self, man: Manifest, device: str = "cpu", threads: int = 0, prepack: bool = True,
                 trt_provider: bool = False):
        ort = import_ort()
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
        if man.kv_dtype == torch.bfloat16:
            raise ConfigError("the onnxruntime backend does not bind bf16 tensors here: use fp32/fp16 artifacts "
                              "with onnxruntime, or --backend tensorrt / eager for bf16")
        self._weights = man.data["external_data"]["file"]
        self._mm = None
        wpath = man.path(self._weights)
        if os.path.getsize(wpath) > 0:
            with open(wpath, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._so_args = (threads, providers)
        self._in_dtypes = {n: man.input_dtypes(n) for n in ("step", "decoder")}
        self.sessions = {name: self._session(name, prepack=(name == "step" and prepack)) for name in ("step", "decoder")}
        self.consts = man.scale_consts(device)
        self.info = BackendInfo(name="onnxruntime", cfg=man.cfg, k_max=man.k_max, transform=man.transform,
                                kv_dtype=man.kv_dtype, batch=man.batch, device=device)
        self.source_note = man.source_note

    def _session(self, name: str, prepack: bool):
        ort, man = self.ort, self.man
        threads, providers = self._so_args
        g = man.graph(name)
        path = man.path(g["file"])
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            so.intra_op_num_threads = threads
        if not prepack:
            so.add_session_config_entry("session.disable_prepacking", "1")
        keep = self._share(so, path, name)
        try:
            sess = ort.InferenceSession(path, sess_options=so, providers=providers)
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            raise ManifestError(f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0][:200]}); "
                                f"re-export with --force") from None
        if self.device == "cuda" and "CUDAExecutionProvider" not in sess.get_providers():
            raise ConfigError(f"{g['file']}: onnxruntime fell back to the CPU (providers {sess.get_providers()}); "
                              f"check the CUDA/cuDNN libraries that onnxruntime-gpu needs")
        sess._var_ssg_keep = keep     # the OrtValues must outlive the session
        return sess

    def _share(self, so, path: str, name: str) -> list:
        """Point this session's external initializers at the shared memory map of the weights
        file; ONNX Runtime then opens no data file itself."""
        try:
            m = onnx.load(path, load_external_data=False)
        except Exception as e:  # noqa: BLE001 - protobuf/onnx decode errors
            raise ManifestError(f"{path}: not a readable ONNX graph ({type(e).__name__}); re-export with --force") from None
        check_graph(self.man, name, m, path)     # io, external data, stored values, baked top-k
        keep = []
        for t in m.graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            ext = {e.key: e.value for e in t.external_data}
            if ext.get("location") != self._weights or t.data_type not in _ONNX_NP or self._mm is None:
                raise ManifestError(f"{path}: initializer {t.name} reads {ext.get('location')!r}, not the artifacts' "
                                    f"{self._weights}; re-export with --force")
            dt = np.dtype(_ONNX_NP[t.data_type])
            off, length = int(ext.get("offset", 0)), int(ext["length"])
            if off + length > len(self._mm) or length != dt.itemsize * int(np.prod(t.dims, dtype=np.int64)):
                raise ManifestError(f"{path}: initializer {t.name} lies outside {self._weights}; re-export with --force")
            arr = np.frombuffer(self._mm, dtype=dt, count=length // dt.itemsize, offset=off).reshape(tuple(t.dims))
            check_values(path, f"initializer {t.name}", arr)
            ov = self.ort.OrtValue.ortvalue_from_numpy(arr)
            so.add_initializer(t.name, ov)
            keep.append((arr, ov))
        return keep

    def _bind(self, binding, name: str, t: torch.Tensor, output: bool):
        t = t if t.is_contiguous() else t.contiguous()
        dev = "cuda" if t.is_cuda else "cpu"
        fn = binding.bind_output if output else binding.bind_input
        fn(name, dev, t.device.index or 0, _TORCH_NP[t.dtype], tuple(t.shape), t.data_ptr())
        return t

    def _run(self, name: str, feeds: Dict[str, torch.Tensor], outs: Dict[str, torch.Tensor]):
        sess = self.sessions[name]
        b = sess.io_binding()
        alive = []
        for spec in self.man.graph(name)["inputs"]:
            alive.append(self._bind(b, spec["name"], feeds[spec["name"]].to(self._in_dtypes[name][spec["name"]]), False))
        for n, t in outs.items():
            alive.append(self._bind(b, n, t, True))
        sess.run_with_iobinding(b)
        return outs

    def _alloc(self, name: str, k: int, device, kv_out: torch.Tensor = None) -> Dict[str, torch.Tensor]:
        return {n: (kv_out if n == "new_kv" else torch.empty(shape, dtype=dt, device=device))
                for n, (shape, dt) in self.man.output_specs(name, k).items()}

    def alloc_kv(self, shape, dtype) -> torch.Tensor:
        return fresh_kv(self.info, shape, dtype)

    def step(self, k: int, feeds: Dict[str, torch.Tensor], kv_out: torch.Tensor) -> Dict[str, torch.Tensor]:
        # new_kv is bound to the cache slice: written in place
        return self._run("step", dict(feeds, **self.consts[k]), self._alloc("step", k, kv_out.device, kv_out))

    def decode(self, f_hat: torch.Tensor) -> torch.Tensor:
        return self._run("decoder", {"f_hat": f_hat}, self._alloc("decoder", 0, f_hat.device))["image"]
