"""Everything a backend checks when it opens artifacts, without building anything: what a driver
(scripts/serve.py) runs before it starts Ray, so bad artifacts are generate.py's one line at
once, not a replica that fails to start (DESIGN.md "What the hashes promise").

    check_artifacts(man)   for each graph: check_graph (io, external data, stored values, baked
                           top-k), every initializer's values in the weights file (in bounds, no
                           NaN); then the scale constants (Manifest.scale_consts)
"""
from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import helper

from .graphcheck import check_graph, check_values
from .manifest import Manifest, ManifestError

GRAPHS = ("step", "decoder")


def check_artifacts(man: Manifest) -> None:
    weights = man.data["external_data"]["file"]
    wpath = man.path(weights)
    mm = np.memmap(wpath, dtype=np.uint8, mode="r") if os.path.getsize(wpath) else None    # freed with its views
    for name in GRAPHS:
        path = man.path(man.graph(name)["file"])
        try:
            m = onnx.load(path, load_external_data=False)
        except Exception as e:  # noqa: BLE001 - protobuf/onnx decode errors
            raise ManifestError(f"{path}: not a readable ONNX graph ({type(e).__name__}); re-export with --force") from None
        check_graph(man, name, m, path)         # external data: only in `weights`
        for t in m.graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            ext = {e.key: e.value for e in t.external_data}
            dt = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
            off, length = int(ext.get("offset", 0)), int(ext.get("length", 0))
            if mm is None or off + length > len(mm) or length != dt.itemsize * int(np.prod(t.dims, dtype=np.int64)):
                raise ManifestError(f"{path}: initializer {t.name} lies outside {weights}; re-export with --force")
            check_values(path, f"initializer {t.name}", mm[off:off + length].view(dt))
    man.scale_consts()
