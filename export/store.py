"""One external-data file shared by every graph: initializers are deduplicated by content, so
the ten scale graphs (which all read the same transformer weights) store them once."""
from __future__ import annotations

import hashlib
import os
from typing import Dict, Tuple

import onnx_ir as ir

INLINE_BYTES = 1024     # smaller tensors stay inside the .onnx file
ALIGN = 64


class SharedWeights:
    def __init__(self, directory: str, filename: str = "weights.bin"):
        self.dir, self.filename = directory, filename
        self.path = os.path.join(directory, filename)
        self._f = open(self.path, "wb")
        self._index: Dict[Tuple[str, int], Tuple[int, int]] = {}
        self.bytes_written = 0
        self.bytes_referenced = 0

    def _put(self, data: bytes) -> Tuple[int, int]:
        key = (hashlib.sha256(data).hexdigest(), len(data))
        if key not in self._index:
            pad = (-self.bytes_written) % ALIGN
            if pad:
                self._f.write(b"\0" * pad)
                self.bytes_written += pad
            self._index[key] = (self.bytes_written, len(data))
            self._f.write(data)
            self.bytes_written += len(data)
        self.bytes_referenced += len(data)
        return self._index[key]

    def externalize(self, model: ir.Model) -> None:
        """Move every large initializer of `model` into the shared file (in place)."""
        for v in model.graph.initializers.values():
            t = v.const_value
            if t is None or t.nbytes < INLINE_BYTES:
                continue
            off, n = self._put(t.tobytes())
            v.const_value = ir.ExternalTensor(self.filename, off, n, t.dtype, shape=t.shape,
                                              name=v.name, base_dir=self.dir)

    def close(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
