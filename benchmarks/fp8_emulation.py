"""fp8 artifacts judged on a CPU (DESIGN.md "Low precision"): the step graph's float8 arithmetic
emulated in fp32 with ONNX Runtime, then the quality gate (runtime.quality) against eager bf16
autocast, as parity.py judges int8. An estimate of fp8's quantization error, not a TensorRT run.

    weight   DequantizeLinear(q8, s)        -> the constant q8 * s in fp32 (exact: 4 significant
                                               bits times a float32 scale)
    input    QuantizeLinear -> Dequantize   -> x / s -> Cast(float8 e4m3fn, saturate) -> Cast(float)
                                               -> * s: the same rounding and saturation
The MatMuls then multiply the same float8 values in fp32 (TensorRT's fp8 GEMMs accumulate in
fp32 too; their summation order differs). The emulated graph is built in a scratch directory;
the artifacts are not changed.
"""
from __future__ import annotations

import os
import tempfile
from typing import Dict

import numpy as np

from var_ssg.common.errors import ConfigError

FP8_PRECISION = "fp8"


def emulate_step_graph(model) -> int:
    """Rewrite an fp8 QDQ graph (onnx ModelProto, external data loaded) in place as fp32
    arithmetic; returns how many Q/DQ nodes were replaced."""
    import onnx
    from onnx import helper as oh, numpy_helper
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    nodes, consts, gone, n_done = [], [], set(), 0
    for n in g.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:          # a stored weight
            q = numpy_helper.to_array(inits[n.input[0]]).astype(np.float32)
            s = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
            consts.append(numpy_helper.from_array((q * s).astype(np.float32), n.output[0]))
            gone.add(n.input[0])
        elif n.op_type == "QuantizeLinear":
            if inits[n.input[2]].data_type != onnx.TensorProto.FLOAT8E4M3FN:
                raise ConfigError(f"{n.name}: not a float8 e4m3fn QuantizeLinear; only fp8 graphs are emulated")
            x, s, y = n.input[0], n.input[1], n.output[0]
            nodes += [oh.make_node("Div", [x, s], [y + "_emul_div"], name=n.name + "_emul_div"),
                      oh.make_node("Cast", [y + "_emul_div"], [y + "_emul_f8"], to=onnx.TensorProto.FLOAT8E4M3FN,
                                   saturate=1, name=n.name + "_emul_f8"),
                      oh.make_node("Cast", [y + "_emul_f8"], [y], to=onnx.TensorProto.FLOAT, name=n.name + "_emul_f32")]
        elif n.op_type == "DequantizeLinear":                                  # an activation's
            nodes.append(oh.make_node("Mul", [n.input[0], n.input[1]], [n.output[0]], name=n.name + "_emul_mul"))
        else:
            nodes.append(n)
            continue
        n_done += 1
    del g.node[:]
    g.node.extend(nodes)
    keep = [t for t in g.initializer if t.name not in gone]
    del g.initializer[:]
    g.initializer.extend(keep + consts)
    del g.value_info[:]
    return n_done


class _Sessions:
    """What runtime.backends.ort.OrtBackend takes from OrtSessions: the emulated step session and
    the artifacts' own decoder session."""

    def __init__(self, ort, man, sessions: Dict[str, object]):
        self.ort, self.man, self._sessions = ort, man, sessions
        self.options = ("cpu", 0, True, False, False)

    def result(self):
        return self._sessions


def emulated_backend(man, scratch: str):
    """An onnxruntime backend (CPU) over fp8 artifacts whose step graph is emulated in fp32."""
    import onnx
    from var_ssg.runtime.backends.ort import OrtBackend, import_ort
    if man.precision != FP8_PRECISION:
        raise ConfigError(f"fp8 emulation takes fp8 artifacts; these are {man.precision}")
    ort = import_ort()
    model = onnx.load(man.path(man.graph("step")["file"]))
    emulate_step_graph(model)
    path = os.path.join(scratch, "step_emulated.onnx")
    onnx.save(model, path, save_as_external_data=True, location="step_emulated.data", size_threshold=1024)
    del model
    cpu = ["CPUExecutionProvider"]
    sessions = {"step": ort.InferenceSession(path, providers=cpu),
                "decoder": ort.InferenceSession(man.path(man.graph("decoder")["file"]), providers=cpu)}
    backend = OrtBackend(man, sessions=_Sessions(ort, man, sessions))
    backend.info = type(backend.info)(**{**backend.info.__dict__, "name": "onnxruntime-fp8-emulated"})
    return backend


def judge(artifacts: str, class_id: int = 207, seed: int = 0, probe: bool = True):
    """The quality gate on fp8 artifacts, emulated: teacher-forced on the eager fp32 reference,
    against eager bf16 autocast (runtime.quality.run_quality). -> its QualityReport."""
    import torch
    from var_ssg.contract.manifest import load_manifest
    from var_ssg.runtime.backends import open_backend
    from var_ssg.runtime.backends.eager import EagerBackend
    from var_ssg.runtime.pipeline import Pipeline, Row
    from var_ssg.runtime.quality import run_quality
    man = load_manifest(artifacts)
    ref = Pipeline(open_backend("eager", man))
    base = Pipeline(EagerBackend(ref.backend.var, ref.backend.vae, transform=man.transform, k_max=man.k_max,
                                 autocast=torch.bfloat16))
    with tempfile.TemporaryDirectory(prefix="fp8-emulation-") as scratch:
        pipe = Pipeline(emulated_backend(man, scratch))
        return run_quality(ref, base, pipe, [Row(class_id, seed)], FP8_PRECISION, probe=probe)


def main(artifacts: str, class_id: int = 207, seed: int = 0) -> int:
    """Print the gate's table for fp8 artifacts, emulated; 0 if it passes, 1 if not."""
    rep = judge(artifacts, class_id, seed)
    print(rep.table())
    return 0 if rep.ok else 1
