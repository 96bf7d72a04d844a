"""One external-data file shared by every graph: initializers are deduplicated by content, so
the ten scale graphs (which all read the same transformer weights) store them once.

Writing costs one pass over the weights (DESIGN.md, "Export cost"): each tensor is written
from its own memory (no bytes copy), hashed once for deduplication, and the file's own sha256
(the manifest's) is computed on a second thread while it is written, so the file is never read
back to be hashed.
"""
from __future__ import annotations

import hashlib
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Optional, Tuple

import numpy as np
import onnx_ir as ir

INLINE_BYTES = 1024     # smaller tensors stay inside the .onnx file
ALIGN = 64


def tensor_bytes(t) -> memoryview:
    """The tensor's raw little-endian bytes, without a copy where its memory already holds them."""
    if sys.byteorder == "little":
        arr = _contiguous(t.numpy())
        if arr.nbytes == t.nbytes:
            return memoryview(arr.reshape(-1).view(np.uint8))
    return memoryview(t.tobytes())          # packed sub-byte types, big-endian hosts


def _contiguous(arr: np.ndarray) -> np.ndarray:
    """`arr` in C order. The optimiser's folded constants (e.g. a transposed weight) are strided
    numpy views; torch copies those about 6x faster than numpy (blocked, all cores)."""
    if arr.flags.c_contiguous:
        return arr
    try:
        import torch
        with warnings.catch_warnings():     # a read-only view: torch warns, but only reads it (a copy)
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(arr).contiguous().numpy()
    except (TypeError, ValueError):         # a dtype or stride layout torch does not take
        return np.ascontiguousarray(arr)


class SharedWeights:
    def __init__(self, directory: str, filename: str = "weights.bin"):
        self.dir, self.filename = directory, filename
        self.path = os.path.join(directory, filename)
        self._f = open(self.path, "wb")
        self._index: Dict[Tuple[str, int], Tuple[int, int]] = {}
        self._file_hash = hashlib.sha256()
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="weights-sha256")   # in order: one worker
        self._pending = []
        self.sha256: Optional[str] = None       # of the whole file, set by close()
        self.bytes_written = 0
        self.bytes_referenced = 0

    def _write(self, data) -> None:
        self._f.write(data)
        self.bytes_written += len(data)
        self._pending.append(self._hasher.submit(self._file_hash.update, data))     # hashlib drops the GIL
        if len(self._pending) > 64:
            self._pending = [f for f in self._pending if not f.done()]

    def _put(self, data) -> Tuple[int, int]:
        key = (hashlib.sha256(data).hexdigest(), len(data))
        if key not in self._index:
            pad = (-self.bytes_written) % ALIGN
            if pad:
                self._write(b"\0" * pad)
            self._index[key] = (self.bytes_written, len(data))
            self._write(data)
        self.bytes_referenced += len(data)
        return self._index[key]

    def externalize(self, model: ir.Model) -> None:
        """Move every large initializer of `model` into the shared file (in place)."""
        for v in model.graph.initializers.values():
            t = v.const_value
            if t is None or t.nbytes < INLINE_BYTES:
                continue
            off, n = self._put(tensor_bytes(t))
            v.const_value = ir.ExternalTensor(self.filename, off, n, t.dtype, shape=t.shape,
                                              name=v.name, base_dir=self.dir)

    def close(self) -> None:
        try:
            self._hasher.shutdown(wait=True)
            for f in self._pending:
                f.result()
            self._f.flush()
            os.fsync(self._f.fileno())
        finally:
            self._f.close()
        self.sha256 = self._file_hash.hexdigest()
