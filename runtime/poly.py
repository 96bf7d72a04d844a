"""Graph-level comparison with Polygraphy (works without a GPU): the step graph at a few scales,
run by Polygraphy's ONNX Runtime runner with all graph optimizations against the same graph
with none, so a fusion that changes numerics shows up per output tensor."""
from __future__ import annotations

from typing import List

import numpy as np

from var_ssg.contract.manifest import Manifest
from var_ssg.common.errors import ConfigError


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
    consts = man.scale_consts()
    dtypes = man.input_dtypes("step")
    path = man.path(man.graph("step")["file"])
    out = []
    for k in (s for s in scales if s < man.cfg.num_scales):
        feed = dict(consts[k])
        for name, shape in man.profile(k).items():
            if name in feed:
                continue
            if dtypes[name] == "bfloat16":
                raise ConfigError("--polygraphy: numpy has no bfloat16; check fp32/fp16 artifacts")
            dt = np.dtype(dtypes[name])
            if name == "label":
                feed[name] = np.arange(shape[0], dtype=dt) % man.cfg.num_classes
            elif name == "top_k":
                feed[name] = np.full(shape, max(man.k_max, 1), dtype=dt)
            elif name in ("temperature", "guidance"):
                feed[name] = np.full(shape, 1.0, dtype=dt)
            elif name == "top_p":
                feed[name] = np.full(shape, 0.9, dtype=dt)
            elif name in ("forced", "force", "smooth", "gumbel", "beta"):
                feed[name] = np.zeros(shape, dtype=dt)
            else:
                feed[name] = (rng.random(shape) * (0.1 if name == "past_kv" else 1.0)).astype(dt)
        r1 = OnnxrtRunner(session(path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL), name="ort-optimized")
        r2 = OnnxrtRunner(session(path, ort.GraphOptimizationLevel.ORT_DISABLE_ALL), name="ort-plain")
        res = Comparator.run([r1, r2], data_loader=[feed])
        tol = 1e-4 if man.precision == "fp32" else 1e-2
        ok = bool(Comparator.compare_accuracy(res, compare_func=CompareFunc.simple(atol=tol, rtol=tol)))
        out.append(f"polygraphy step scale {k}: {'OK' if ok else 'MISMATCH'}")
    return out
