"""Graph-level comparison with Polygraphy (works without a GPU): each step graph run by
Polygraphy's ONNX Runtime runner with all graph optimizations against the same graph with none,
so a fusion that changes numerics shows up per output tensor."""
from __future__ import annotations

from typing import List

import numpy as np

from .manifest import Manifest

_NP = {"float": np.float32, "float16": np.float16, "int64": np.int64}


def polygraphy_check(man: Manifest, scales=(0, 1, 5)) -> List[str]:
    import onnxruntime as ort
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import Comparator, CompareFunc
    from polygraphy.logger import G_LOGGER
    G_LOGGER.module_severity = G_LOGGER.ERROR

    def session(path, level):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        return ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    out = []
    for k in scales:
        g = man.graph(f"step_{k}")
        feed = {}
        for spec in g["inputs"]:
            dt = _NP.get(spec["dtype"], np.float32)
            if spec["name"] == "label":
                feed["label"] = np.arange(spec["shape"][0], dtype=np.int64)
            elif spec["name"] == "top_k":
                feed["top_k"] = np.array([max(man.k_max, 1)], dtype=np.int64)
            elif spec["name"] in ("temperature", "cfg"):
                feed[spec["name"]] = np.array([1.0], dtype=dt)
            elif spec["name"] == "top_p":
                feed["top_p"] = np.array([0.9], dtype=dt)
            else:
                feed[spec["name"]] = rng.random(spec["shape"]).astype(dt) * (0.1 if spec["name"] == "past_kv" else 1.0)
        path = man.path(g["file"])
        r1 = OnnxrtRunner(session(path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL), name="ort-optimized")
        r2 = OnnxrtRunner(session(path, ort.GraphOptimizationLevel.ORT_DISABLE_ALL), name="ort-plain")
        res = Comparator.run([r1, r2], data_loader=[feed])
        tol = 1e-4 if man.precision == "fp32" else 1e-2
        ok = bool(Comparator.compare_accuracy(res, compare_func=CompareFunc.simple(atol=tol, rtol=tol)))
        out.append(f"polygraphy step_{k}: {'OK' if ok else 'MISMATCH'}")
    return out
