"""ONNX Runtime backend: one session over the step graph (step_all.onnx, fed each scale's
constants) and one over the decoder.

* Weights: external initializers are OrtValues over one read-only memory map of the
  manifest's weights file (`SessionOptions.add_initializer`); the step session pre-packs them
  once (MLAS), which speeds up the small scales.
* Start-up: `OrtSessions` checks both graphs, then builds the sessions in a background thread
  (ONNX Runtime releases the GIL while it optimises and pre-packs), started through
  `load_manifest(on_files=...)` before the schema check; the caller builds what the thread has
  not started (DESIGN.md, "Start-up"). On the CPU this backend never imports torch: feeds,
  outputs and the KV cache are numpy arrays.
* IO binding: inputs and outputs are bound by address (the KV cache prefix view as `past_kv`,
  this scale's cache slice as `new_kv`), so no per-scale copies are made.
* CUDA: `device="cuda"` requires the CUDA provider on every session; a silent fall back to
  the CPU is an error. Its buffers are torch CUDA tensors (torch is imported then).
"""
from __future__ import annotations

import logging
import mmap
import os
import threading
from typing import Dict, Optional

import numpy as np
import onnx

from var_ssg.contract.graphcheck import check_graph, check_values
from var_ssg.contract.dtypes import dtype_name_of, name_of_onnx, numpy_dtype, torch_dtype
from var_ssg.contract.manifest import Manifest, ManifestError
from var_ssg.common.errors import ConfigError

from .base import BackendInfo, to_torch, torch_host

log = logging.getLogger(__name__)
GRAPHS = ("step", "decoder")
GRAPHS_OF = {"var": GRAPHS, "infinity": ("text", "step", "decoder")}     # by the manifest's family


def import_ort():
    """onnxruntime, or a one-line ConfigError naming the package to install."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError("the onnxruntime backend needs the onnxruntime package: pip install onnxruntime-gpu "
                          "(or onnxruntime for CPU only)") from None
    return ort


class OrtSessions:
    """The step and decoder sessions of one artifacts directory, checked here and built on one
    background thread; `result()` waits for them and raises what a build raised."""

    def __init__(self, man: Manifest, device: str = "cpu", threads: int = 0, prepack: bool = True,
                 trt_provider: bool = False, session_cache: bool = False, arena: bool = True):
        ort = import_ort()
        self._arena = arena
        self.ort, self.man, self.device = ort, man, device
        self.graphs = GRAPHS_OF[man.family]
        self.options = (device, threads, prepack, trt_provider, session_cache)
        if device not in ("cpu", "cuda"):
            raise ConfigError(f"--device must be cpu or cuda, got {device!r}")
        if man.precision == "fp8":
            raise ConfigError("fp8 artifacts are TensorRT-only (ONNX Runtime's CPU provider rejects their float8 "
                              "QDQ MatMuls; no other provider is a tested path): run them with --backend tensorrt "
                              "on a GPU of compute capability >= 8.9, or export --precision int8 or fp32 for "
                              "onnxruntime")
        self.providers = ["CPUExecutionProvider"]
        if device == "cuda":
            import torch
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ConfigError("--device cuda: this onnxruntime has no CUDAExecutionProvider; "
                                  "pip install onnxruntime-gpu (and a CUDA 12 runtime)")
            if not torch.cuda.is_available():
                raise ConfigError("--device cuda: PyTorch sees no CUDA device (it holds the I/O buffers)")
            self.providers = (["TensorrtExecutionProvider"] if trt_provider else []) + ["CUDAExecutionProvider",
                                                                                        "CPUExecutionProvider"]
        if man.data["kv"]["dtype"] == "bfloat16":
            raise ConfigError("the onnxruntime backend does not bind bf16 tensors here: use fp32/fp16 artifacts "
                              "with onnxruntime, or --backend tensorrt / eager for bf16")
        self._weights = man.data["external_data"]["file"]
        self._mm = None
        wpath = man.path(self._weights)
        if os.path.getsize(wpath) > 0:
            with open(wpath, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._threads = threads
        self._cache = None
        if session_cache:                           # on the CPU only (runtime.opener checks the options)
            from .ort_cache import SessionCache
            try:
                self._cache = SessionCache(man, ort, prepack=prepack, threads=threads)
            except OSError as e:
                log.warning("ONNX Runtime session cache off (%s)", e)
        self._done: Dict[str, object] = {}
        self._lock = threading.Lock()
        # the graph checks run here; ONNX Runtime's builds run one after the other in one thread
        # (the step first: the longest). A graph the thread has not started when the caller asks
        # for the sessions (the decoder, in practice) is built by the caller (`_claim`), beside
        # the step's build. Not a daemon: a process that
        # fails (a schema error after an early start) waits for the build at exit instead of
        # killing it inside ONNX Runtime (which aborts the process).
        values: list = []
        self._todo = {name: self._options(name, prepack=(name == "step" and prepack), values=values)
                      for name in self.graphs}
        self._job = threading.Thread(target=self._build, name="ort-sessions")
        self._job.start()
        # the stored values (the weights: ~0.3 s per GB) are checked while the sessions build;
        # a damaged value is raised by result(), before any session is used
        self._values_error: Optional[BaseException] = None
        try:
            for path, label, arr in values:
                check_values(path, label, arr)
        except ManifestError as e:
            self._values_error = e

    def _options(self, name: str, prepack: bool, values: list):
        ort = self.ort
        path = self.man.path(self.man.graph(name)["file"])
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self._threads:
            so.intra_op_num_threads = self._threads
        if not prepack:
            so.add_session_config_entry("session.disable_prepacking", "1")
        so.enable_cpu_mem_arena = self._arena       # off: freed activations go back to the system
        return so, path, self._share(so, path, name, values)

    def _claim(self, name: str) -> bool:
        """True for the one thread that builds `name` (the build thread or the caller)."""
        with self._lock:
            if name in self._done:
                return False
            self._done[name] = None      # claimed
            return True

    def _build_one(self, name: str) -> None:
        so, path, keep = self._todo[name]
        try:
            self._done[name] = self._session(name, so, path, keep)
        except BaseException as e:  # noqa: BLE001 - handed to result(), raised in the caller's thread
            self._done[name] = e

    def _build(self) -> None:
        for name in self.graphs:
            if not self._claim(name):
                return
            self._build_one(name)
            if isinstance(self._done[name], BaseException):
                return

    def _session(self, name: str, so, path: str, keep: list):
        try:
            if name == "step" and self._cache is not None:      # opt-in: DESIGN.md "Start-up: the session cache"
                sess = self._cache.load(self.providers) or self._cache.save(so, path, self.providers)
            else:
                sess = self.ort.InferenceSession(path, sess_options=so, providers=self.providers)
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            raise ManifestError(f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0][:200]}); "
                                f"re-export with --force") from None
        if self.device == "cuda" and "CUDAExecutionProvider" not in sess.get_providers():
            raise ConfigError(f"{self.man.graph(name)['file']}: onnxruntime fell back to the CPU (providers "
                              f"{sess.get_providers()}); check the CUDA/cuDNN libraries that onnxruntime-gpu needs")
        sess._var_ssg_keep = keep     # the OrtValues must outlive the session
        return sess

    def result(self) -> Dict[str, object]:
        if self._values_error is None and not any(isinstance(v, BaseException) for v in self._done.values()):
            for name in self.graphs:     # what the build thread has not started yet: built here
                if self._claim(name):
                    self._build_one(name)
        self._job.join()
        if self._values_error is not None:
            raise self._values_error
        for name in self.graphs:
            got = self._done.get(name)
            if isinstance(got, BaseException):
                raise got
        return {name: self._done[name] for name in self.graphs}

    def _share(self, so, path: str, name: str, values: list) -> list:
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
            dtype = name_of_onnx(t.data_type)
            if ext.get("location") != self._weights or dtype is None or self._mm is None:
                raise ManifestError(f"{path}: initializer {t.name} reads {ext.get('location')!r}, not the artifacts' "
                                    f"{self._weights}; re-export with --force")
            dt = numpy_dtype(dtype)
            off, length = int(ext.get("offset", 0)), int(ext["length"])
            if off + length > len(self._mm) or length != dt.itemsize * int(np.prod(t.dims, dtype=np.int64)):
                raise ManifestError(f"{path}: initializer {t.name} lies outside {self._weights}; re-export with --force")
            arr = np.frombuffer(self._mm, dtype=dt, count=length // dt.itemsize, offset=off).reshape(tuple(t.dims))
            values.append((path, f"initializer {t.name}", arr))        # checked while the sessions build
            ov = self.ort.OrtValue.ortvalue_from_numpy(arr)
            so.add_initializer(t.name, ov)
            keep.append((arr, ov))
        return keep


def early_sessions(holder: dict, **options):
    """A `load_manifest(on_files=...)` hook: start the sessions as soon as the files are verified
    (into holder["sessions"]). Best effort: a problem here is left for the full open to report,
    after the schema check, with its own message."""
    def start(man: Manifest) -> None:
        try:
            holder["sessions"] = OrtSessions(man, **options)
        except Exception:  # noqa: BLE001 - reported by the full open, after the schema check
            log.debug("early ONNX Runtime start skipped", exc_info=True)
    return start


class OrtBackend:
    def __init__(self, man: Manifest, device: str = "cpu", threads: int = 0, prepack: bool = True,
                 trt_provider: bool = False, session_cache: bool = False, sessions: Optional[OrtSessions] = None):
        options = (device, threads, prepack, trt_provider, session_cache)
        if sessions is None or sessions.options != options or sessions.man.data is not man.data:
            sessions = OrtSessions(man, device=device, threads=threads, prepack=prepack, trt_provider=trt_provider,
                                   session_cache=session_cache)
        self.ort, self.man, self.device = sessions.ort, man, device
        self._in_dtypes = {n: {i: np.dtype(dt) for i, dt in man.input_dtypes(n).items()} for n in GRAPHS}
        consts = man.scale_consts()                      # on the host, while the sessions build
        self.sessions = sessions.result()                # a build's error first (before any CUDA copy)
        self.consts = consts if device == "cpu" else [{n: to_torch(a, device) for n, a in c.items()} for c in consts]
        self.info = BackendInfo(name="onnxruntime", cfg=man.cfg, k_max=man.k_max, transform=man.transform,
                                kv_dtype=man.kv_dtype, batch=man.batch, device=device)
        self.source_note = man.source_note

    def _bind(self, binding, name: str, x, dtype: np.dtype, output: bool):
        """Bind an array by address: numpy on the CPU, torch tensors on CUDA; returns what must
        stay alive until the run ends."""
        fn = binding.bind_output if output else binding.bind_input
        if self.device == "cpu":
            a = np.asarray(x)
            if output:      # written in place: a copy would lose what the session writes
                if not a.flags.c_contiguous or a.dtype != dtype:
                    raise RuntimeError(f"output {name}: needs a C-contiguous {dtype} array, got "
                                       f"{'a C-contiguous' if a.flags.c_contiguous else 'a strided'} {a.dtype} one")
            else:
                a = np.ascontiguousarray(a, dtype=dtype)
            fn(name, "cpu", 0, dtype.type, a.shape, a.ctypes.data)
            return a
        t = to_torch(x, self.device).to(torch_dtype(dtype.name)).contiguous()
        fn(name, "cuda", t.device.index or 0, dtype.type, tuple(t.shape), t.data_ptr())
        return t

    def _run(self, name: str, feeds: Dict[str, object], outs: Dict[str, object]):
        sess = self.sessions[name]
        b = sess.io_binding()
        dtypes = self._in_dtypes[name]
        alive = [self._bind(b, spec["name"], feeds[spec["name"]], dtypes[spec["name"]], False)
                 for spec in self.man.graph(name)["inputs"]]
        for n, t in outs.items():
            alive.append(self._bind(b, n, t, np.dtype(dtype_name_of(t.dtype)), True))
        sess.run_with_iobinding(b)
        return outs

    def _array(self, shape, dtype: str, zero: bool = False):
        """A new array where this backend computes: numpy on the CPU, a torch tensor on CUDA."""
        if self.device == "cpu":
            return (np.zeros if zero else np.empty)(tuple(shape), dtype=np.dtype(dtype))
        import torch
        return (torch.zeros if zero else torch.empty)(tuple(shape), dtype=torch_dtype(dtype), device=self.device)

    def _alloc(self, name: str, k: int, kv_out=None) -> Dict[str, object]:
        return {n: (kv_out if n == "new_kv" else self._array(shape, dt))
                for n, (shape, dt) in self.man.output_specs(name, k).items()}

    def alloc_kv(self, shape, dtype: str):
        return self._array(shape, dtype)

    def step(self, k: int, feeds: Dict[str, object], kv_out) -> Dict[str, object]:
        # new_kv is bound to the cache slice: written in place
        return self._run("step", dict(feeds, **self.consts[k]), self._alloc("step", k, kv_out))

    def decode(self, f_hat):
        return self._run("decoder", {"f_hat": f_hat}, self._alloc("decoder", 0))["image"]

    def host(self, x) -> np.ndarray:
        return torch_host(x)

    def zeros(self, shape):
        return self._array(shape, "float32", zero=True)
