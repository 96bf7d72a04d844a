"""fp8 step graphs for TensorRT: the int8 recipe's layers in float8 e4m3fn QDQ form (DESIGN.md
"Low precision").

    fp32 step graph
      │ export.quantize.quantize_step(int8)   the same preparation, layer selection (each block's
      │                                       qkv/proj/fc1/fc2 MatMul; keep_fp32 as int8) and MinMax
      │                                       calibration on the model's own runs: every activation
      │                                       gets a symmetric int8 scale s8 = amax / 127
      │ to_fp8
      │   outputs       the Q/DQ pairs the int8 quantizer puts on the MatMuls' outputs (for ONNX
      │                 Runtime's QLinearMatMul) are dropped: TensorRT's fp8 GEMMs take fp8 inputs
      │                 and give a high-precision output, as ModelOpt places them
      │   activations   scale amax / 448 (= s8 * 127 / 448), zero point float8 0: QuantizeLinear
      │                 now writes float8 e4m3fn, per tensor
      │   weights       re-quantized from the fp32 parameter (one scale per tensor, max|B| / 448;
      ▼                 ONNX Runtime's QuantizeLinear kernel), the DequantizeLinear's axis dropped
    QDQ step graph: float8 e4m3fn (opset >= 19; TensorRT on compute capability >= 8.9 only)

Why not onnxruntime.quantization's own float8 mode: it calibrates float8 only with histograms,
which fail on the step graph's per-scale token counts. Why not NVIDIA ModelOpt's ONNX PTQ (which
does the same thing: ONNX Runtime int8 MinMax calibration, then int8 -> fp8): its `[onnx]` extra
pins onnx~=1.21 and onnxruntime-gpu~=1.24 and pulls in cupy; DESIGN.md "Low precision" has the
measurements.
"""
from __future__ import annotations

import os
from typing import Dict, Sequence

import numpy as np

from var_ssg.common.errors import ConfigError
from var_ssg.contract.quantization import FP8_MAX, QMAX

from .quantize import Quantized, quantize_step

PRECISION = "fp8"
MIN_OPSET = 19          # QuantizeLinear / DequantizeLinear take float8 from opset 19


def scheme() -> Dict:
    """What the manifest records of the fp8 recipe (the weights check re-derives from it)."""
    return dict(tool="onnxruntime.quantization", format="QDQ", weight_type="QFLOAT8E4M3FN",
                activation_type="QFLOAT8E4M3FN", weight_granularity="per-tensor", weight_axis=None,
                weight_symmetric=True, activation_granularity="per-tensor", activation_symmetric=True,
                calibration_method="MinMax (int8 ranges, scale = amax / 448)", op_types=["MatMul"])


def quantize_step_fp8(src: str, dst: str, params: Dict[str, np.ndarray], feeds: Sequence[Dict[str, np.ndarray]],
                      scratch: str, keep_fp32: Sequence[str] = ()) -> Quantized:
    """Quantize the fp32 step graph `src` (external data beside it, opset >= 19) into `dst`
    (external data `<dst>.data`) in fp8; arguments as export.quantize.quantize_step."""
    import onnx
    opset = max((o.version for o in onnx.load(src, load_external_data=False).opset_import if o.domain in ("", "ai.onnx")),
                default=0)
    if opset < MIN_OPSET:
        raise ConfigError(f"--precision fp8 needs --opset {MIN_OPSET} or later (QuantizeLinear takes float8 from "
                          f"opset {MIN_OPSET}); the step graph has opset {opset}")
    int8 = os.path.join(scratch, "int8.onnx")
    q = quantize_step(src, int8, "int8", params, feeds, scratch, keep_fp32)
    model = onnx.load(int8)                                 # external data read in
    to_fp8(model, {w: params[p] for w, p in q.weights.items()})
    onnx.save(model, dst, save_as_external_data=True, location=os.path.basename(dst) + ".data", size_threshold=1024)
    return q


def quantize_weight(b: np.ndarray):
    """A MatMul weight B (K, N), float32 -> (B in float8 e4m3fn, its scale): s = max|B| / 448 (1 for
    an all-zero B), the values by ONNX Runtime's QuantizeLinear kernel (opset 19, saturating), the
    tool's own rounding. contract.quantization.requantize derives the same independently (ml_dtypes),
    which is what the weights check compares."""
    import ml_dtypes
    import onnx
    import onnxruntime as ort
    from onnx import helper as oh, numpy_helper
    amax = np.float32(np.abs(b).max())
    s = np.float32(amax / np.float32(FP8_MAX)) if amax > 0 else np.float32(1.0)
    x = oh.make_tensor_value_info("b", onnx.TensorProto.FLOAT, list(b.shape))
    y = oh.make_tensor_value_info("q", onnx.TensorProto.FLOAT8E4M3FN, list(b.shape))
    node = oh.make_node("QuantizeLinear", ["b", "s", "z"], ["q"], saturate=1)
    inits = [numpy_helper.from_array(np.array(s, np.float32), "s"),
             numpy_helper.from_array(np.zeros((), ml_dtypes.float8_e4m3fn), "z")]
    m = oh.make_model(oh.make_graph([node], "q", [x], [y], inits), opset_imports=[oh.make_opsetid("", MIN_OPSET)],
                      ir_version=10)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    q = sess.run(None, {"b": b})[0]
    return np.asarray(q).view(ml_dtypes.float8_e4m3fn).reshape(b.shape), np.array(s, np.float32)


def to_fp8(model, weights: Dict[str, np.ndarray]) -> None:
    """The int8 QDQ graph `model` -> fp8, in place. `weights`: {stored int8 weight: its fp32
    parameter W (N, K)}; every other QuantizeLinear/DequantizeLinear pair is an activation's."""
    import ml_dtypes
    import onnx
    from onnx import numpy_helper
    g = model.graph
    inits = {t.name: t for t in g.initializer}

    def put(name: str, arr: np.ndarray) -> None:
        inits[name].CopyFrom(numpy_helper.from_array(np.array(arr, copy=True, order="C"), name))   # 0-d stays 0-d

    drop_output_qdq(g)
    zero = np.zeros((), ml_dtypes.float8_e4m3fn)
    done = set()
    for name, w_nk in weights.items():
        base = name[:-len("_quantized")]
        qw, s = quantize_weight(np.ascontiguousarray(np.asarray(w_nk, np.float32).T))
        put(name, qw)
        put(base + "_scale", s)
        put(base + "_zero_point", zero)
        done.update((name, base + "_scale", base + "_zero_point"))
        for n in g.node:
            if n.op_type == "DequantizeLinear" and n.input[0] == name:
                keep = [a for a in n.attribute if a.name != "axis"]       # one scale per tensor
                del n.attribute[:]
                n.attribute.extend(keep)
    for n in g.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        scale, zp = n.input[1], n.input[2] if len(n.input) > 2 else ""
        if not zp or scale not in inits or zp not in inits:
            raise ConfigError(f"{n.name}: the int8 quantizer wrote a {n.op_type} without a stored scale and zero "
                              f"point; it cannot be converted to fp8")
        if scale not in done:
            s8 = numpy_helper.to_array(inits[scale])
            if s8.ndim != 0:
                raise ConfigError(f"{n.name}: an activation scale of shape {list(s8.shape)}; fp8 activations "
                                  f"are per tensor")
            put(scale, np.float32(np.float64(s8) * QMAX / FP8_MAX))     # amax / 448
            done.add(scale)
        if zp not in done:
            if numpy_helper.to_array(inits[zp]).any():
                raise ConfigError(f"{n.name}: a zero point that is not 0; fp8 is symmetric")
            put(zp, zero)
            done.add(zp)
    del g.value_info[:]                 # the int8 element types it states are gone
    left = [t.name for t in g.initializer if t.data_type == onnx.TensorProto.INT8]
    if left:
        raise ConfigError(f"int8 tensors left in the fp8 graph: {', '.join(left[:5])}")


def drop_output_qdq(g) -> int:
    """Remove each QuantizeLinear -> DequantizeLinear pair on a MatMul's output that feeds no
    quantized input: the MatMul writes the pair's output name itself. Returns how many."""
    producer = {o: n for n in g.node for o in n.output}
    readers: Dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    drop = set()
    for q in g.node:
        mm = producer.get(q.input[0]) if q.op_type == "QuantizeLinear" else None
        if mm is None or mm.op_type != "MatMul" or q.input[0] in outputs:
            continue
        dqs = readers.get(q.output[0], [])
        if len(dqs) != 1 or dqs[0].op_type != "DequantizeLinear":
            continue
        dq = dqs[0]
        if any(r.op_type in ("MatMul", "QuantizeLinear") for r in readers.get(dq.output[0], [])):
            continue                                # a quantized input reads it: keep the pair
        old, new = q.input[0], dq.output[0]
        mm.output[list(mm.output).index(old)] = new
        for r in readers.get(old, []):
            if r is not q:
                for i, name in enumerate(r.input):
                    if name == old:
                        r.input[i] = new
        drop.update((id(q), id(dq)))
    keep = [n for n in g.node if id(n) not in drop]
    del g.node[:]
    g.node.extend(keep)
    used = {i for n in g.node for i in n.input}
    unused = [t for t in g.initializer if t.name not in used]
    for t in unused:
        g.initializer.remove(t)
    return len(drop) // 2
