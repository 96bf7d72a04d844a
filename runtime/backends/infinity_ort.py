"""ONNX Runtime backend for Infinity artifacts: sessions over text.onnx, step_all.onnx and
decoder.onnx, built and checked as VAR's are (runtime.backends.ort.OrtSessions: weights shared
from one memory map, every graph checked against the manifest before a session is made). The
per-scale constants come in the feeds (runtime.infinity computes them from the schedule); on
the CPU, inputs and outputs are bound by address and the KV cache slice is written in place."""
from __future__ import annotations

import logging
import os
from typing import Dict, Optional

import numpy as np

from var_ssg.common.proc import physical_memory
from var_ssg.contract.manifest import Manifest

from .base import InfinityInfo
from .ort import OrtSessions

log = logging.getLogger(__name__)


# ONNX Runtime's CPU pre-packs every MatMul weight into a second, private copy at session
# start (the original stays memory-mapped from weights.bin) and keeps freed activations in its
# arena. Above this share of the machine's memory both are off (DESIGN.md, "Infinity"):
# infinity-2b's 8.7 GB of fp32 weights beside its 11 GB KV cache at 1024 px would not fit 24 GB
# twice.
PREPACK_MAX_SHARE = 0.25


def prepack_fits(weights_bytes: int, memory: int) -> bool:
    return weights_bytes <= PREPACK_MAX_SHARE * memory


class InfinityOrtBackend:
    def __init__(self, man: Manifest, threads: int = 0, prepack: Optional[bool] = None):
        self.man = man
        if prepack is None:
            wbytes = os.path.getsize(man.path(man.data["external_data"]["file"]))
            prepack = prepack_fits(wbytes, physical_memory())
            if not prepack:
                log.info("weights %.1f GB > %d%% of memory: ONNX Runtime's weight pre-packing and memory "
                         "arena are off", wbytes / 1e9, round(100 * PREPACK_MAX_SHARE))
        self.prepack = prepack
        self.sessions = OrtSessions(man, device="cpu", threads=threads, prepack=prepack, arena=prepack).result()
        self._in = {n: [i["name"] for i in man.graph(n)["inputs"]] for n in ("text", "step", "decoder")}
        self._dtypes = {n: {i["name"]: np.dtype(i["dtype"]) for i in man.graph(n)["inputs"]} for n in self._in}
        self.info = InfinityInfo(name="onnxruntime", cfg=man.cfg, transform=man.transform, batch=man.batch)
        self.source_note = man.source_note

    def _feeds(self, name: str, feeds: Dict[str, object]) -> Dict[str, np.ndarray]:
        return {n: np.ascontiguousarray(feeds[n], dtype=self._dtypes[name][n]) for n in self._in[name]}

    def encode(self, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        outs = self.sessions["text"].run(None, self._feeds("text", feeds))
        return dict(zip(("cond", "text_kv", "text_mask2"), outs))

    def step(self, sched, k: int, feeds: Dict[str, object], kv_out: np.ndarray) -> Dict[str, np.ndarray]:
        sess = self.sessions["step"]
        b = sess.io_binding()
        alive = []
        for n, a in self._feeds("step", feeds).items():
            b.bind_input(n, "cpu", 0, a.dtype.type, a.shape, a.ctypes.data)
            alive.append(a)
        if not kv_out.flags.c_contiguous:
            raise RuntimeError("the KV cache slice must be C-contiguous")
        names = [o.name for o in sess.get_outputs()]
        for n in names:
            if n == "new_kv":       # written in place into the cache slice
                b.bind_output(n, "cpu", 0, kv_out.dtype.type, kv_out.shape, kv_out.ctypes.data)
            else:
                b.bind_output(n, "cpu")
        sess.run_with_iobinding(b)
        outs = b.copy_outputs_to_cpu()           # in binding order
        return {n: o for n, o in zip(names, outs) if n != "new_kv"}

    def decode(self, summed: np.ndarray) -> np.ndarray:
        return self.sessions["decoder"].run(None, self._feeds("decoder", dict(summed=summed)))[0]

    def alloc_kv(self, shape) -> np.ndarray:
        return np.empty(tuple(shape), np.float32)

    def host(self, x) -> np.ndarray:
        return np.asarray(x)
