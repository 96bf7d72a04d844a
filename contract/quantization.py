"""The `quantization` section of a quantized manifest (int8, fp8), and the one re-derivation
of a quantized weight from its fp32 parameter (DESIGN.md "Low precision").

    quantization = {tool, tool_version, format: "QDQ", weight_type, activation_type,
                    weight_granularity: "per-channel" (int8) | "per-tensor" (fp8),
                    weight_axis: 1 (int8) | null (fp8), weight_symmetric: true,
                    activation_granularity: "per-tensor", activation_symmetric: true,
                    calibration_method, op_types, nodes, calibration: {...},
                    weights: {stored int8 initializer: VAR parameter}}

`requantize(w)` is what the weights check compares the stored weights against, bit for bit:
a MatMul weight B = W^T (K, N), one scale per output channel n: s_n = max_k |B[k, n]| / QMAX
(QMAX = 127), q = round-half-even(B / s) clipped to [-127, 127], the zero point 0. This is the recipe onnxruntime.quantization applies with
WeightSymmetric per channel; a quantizer bug (a scale off, the wrong axis, a zero point that is
not 0) makes some stored value differ.
fp8 (float8 e4m3fn, TensorRT only): one scale for the whole weight, s = max |B| / 448 (E4M3's
largest finite value), q = B / s rounded to the nearest float8_e4m3fn (ties to even, ml_dtypes'
cast: what ONNX's QuantizeLinear to float8 does with saturate=1), the zero point 0 in float8.
"""
from __future__ import annotations

import hashlib
from typing import Any, Dict, Tuple

import numpy as np

QUANT_PRECISIONS = ("int8", "fp8")
QMAX = 127.0                    # int8's symmetric range [-127, 127]
FP8_MAX = 448.0                 # float8 e4m3fn's largest finite value
# precision -> (weight/activation type in onnxruntime.quantization's QuantType names, weight granularity, axis)
LAYOUT = {"int8": ("QInt8", "per-channel", 1), "fp8": ("QFLOAT8E4M3FN", "per-tensor", None)}
QUANT_KEYS = ("tool", "tool_version", "format", "weight_type", "activation_type", "weight_granularity", "weight_axis",
              "weight_symmetric", "activation_granularity", "activation_symmetric", "calibration_method", "op_types",
              "nodes", "calibration", "weights")
CALIBRATION_KEYS = ("method", "rows", "ssg_beta", "batch", "scales", "feeds", "keep_fp32")


def validate(c, data: Dict[str, Any], precision: str, num_scales: int) -> None:
    """The section's schema (c: contract.manifest's field checker): present exactly for int8 and fp8."""
    q = data.get("quantization")
    if precision not in QUANT_PRECISIONS:
        if q is not None:
            c.fail("quantization", f"is given for precision {precision}, which is not quantized")
        return
    q = c.get(data, "quantization", dict)
    c.only(q, QUANT_KEYS, "quantization")
    want, granularity, axis = LAYOUT[precision]
    c.choice(q, "format", ("QDQ",), "quantization.format")
    c.choice(q, "weight_granularity", (granularity,), "quantization.weight_granularity")
    c.choice(q, "activation_granularity", ("per-tensor",), "quantization.activation_granularity")
    if axis is None:
        if q.get("weight_axis") is not None:
            c.fail("quantization.weight_axis", f"must be null ({precision} weights have one scale per tensor)")
    else:
        c.int_in(q, "weight_axis", axis, axis, "quantization.weight_axis")
    for key in ("weight_symmetric", "activation_symmetric"):
        if c.get(q, key, bool, f"quantization.{key}") is not True:
            c.fail(f"quantization.{key}", "must be true (zero point 0: what TensorRT takes)")
    for key in ("weight_type", "activation_type"):
        c.choice(q, key, (want,), f"quantization.{key}")
    c.get(q, "tool", str, "quantization.tool")
    c.get(q, "tool_version", str, "quantization.tool_version")
    c.get(q, "calibration_method", str, "quantization.calibration_method")
    c.get(q, "op_types", list, "quantization.op_types")
    nodes = c.int_in(q, "nodes", 1, 1 << 20, "quantization.nodes")
    w = c.get(q, "weights", dict, "quantization.weights")
    if len(w) != nodes:
        c.fail("quantization.weights", f"lists {len(w)} weights for {nodes} quantized MatMuls")
    for name, param in w.items():
        if not isinstance(param, str) or not param.startswith("var."):
            c.fail(f"quantization.weights.{name:.60}", "must name a VAR parameter (var.*)")
    cal = c.get(q, "calibration", dict, "quantization.calibration")
    c.only(cal, CALIBRATION_KEYS, "quantization.calibration")
    rows = c.get(cal, "rows", list, "quantization.calibration.rows")
    if not rows:
        c.fail("quantization.calibration.rows", "is empty")
    if c.get(cal, "scales", list, "quantization.calibration.scales") != list(range(num_scales)):
        c.fail("quantization.calibration.scales", f"must be every scale 0..{num_scales - 1}")
    c.int_in(cal, "feeds", 1, 1 << 20, "quantization.calibration.feeds")


def tensor_digest(a: np.ndarray) -> str:
    """sha256 of an array's bytes in C order (how a stored tensor is matched to a parameter)."""
    return hashlib.sha256(np.ascontiguousarray(a).view(np.uint8).reshape(-1)).hexdigest()


def requantize(w_nk: np.ndarray, precision: str) -> Tuple[np.ndarray, np.ndarray]:
    """A parameter W (N, K), float32 -> (stored weight B (K, N) in the precision's type, scale:
    (N,) float32 for int8, a float32 scalar (shape ()) for fp8), the manifest's scheme (module
    docstring)."""
    b = np.ascontiguousarray(np.asarray(w_nk, np.float32).T)
    if precision == "fp8":
        import ml_dtypes
        s = np.float32(np.abs(b).max()) / np.float32(FP8_MAX)
        s = np.float32(1.0) if s == 0 else np.float32(s)
        q = np.clip(b / s, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
        return q, np.asarray(s, np.float32)
    if precision != "int8":
        raise ValueError(f"no quantization scheme for precision {precision!r} (one of {', '.join(QUANT_PRECISIONS)})")
    qmax = QMAX
    absmax = np.abs(b).max(axis=0)
    scale = (absmax / np.float32(qmax)).astype(np.float32)
    scale = np.where(scale == 0, np.float32(1.0), scale).astype(np.float32)
    q = np.clip(np.rint(b / scale), -qmax, qmax).astype(np.int8)
    return q, scale
