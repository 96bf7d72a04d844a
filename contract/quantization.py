"""The `quantization` section of a quantized manifest (int8, fp8), and the one re-derivation
of a quantized weight from its fp32 parameter (DESIGN.md "Low precision").

    quantization = {tool, tool_version, format: "QDQ", weight_type, activation_type,
                    weight_granularity: "per-channel" (int8) | "per-tensor" (fp8),
                    weight_axis: 1 (int8) | null (fp8), weight_symmetric: true,
                    activation_granularity: "per-tensor", activation_symmetric: true,
                    calibration_method, op_types, nodes,
                    calibration: {method, rows, ssg_beta, batch, scales, feeds, keep_fp32,
                                  clip, clip_rule, clipped: {activation: {parameter, amax,
                                                                          range, saturated}}},
                    weights: {stored int8 initializer: VAR parameter},
                    decoder: {op_types: ["Conv"], weight_axis: 0, nodes, weights: {...: vae.*},
                              keep_fp32: {vae.* conv weight: why}, calibration: {latents},
                              image_psnr_db, image_psnr_latents, image_psnr_bound,
                              fan_out: [dequantized tensors given one identity Max reader]}}
                                                       (absent: the decoder is fp32)

`requantize(w, precision, op)` is what the weights check compares the stored weights against,
bit for bit, one scale per output channel, s = max |W| over the channel / QMAX (QMAX = 127),
q = round-half-even(W / s) clipped to [-127, 127], the zero point 0:
  MatMul   the stored B = W^T (K, N) of a parameter W (N, K); its channels are B's axis 1;
  Conv     the stored W (O, I, kh, kw) is the parameter as it is; its channels are axis 0.
This is the recipe onnxruntime.quantization applies with WeightSymmetric per channel; a
quantizer bug (a scale off, the wrong axis, a zero point that is not 0) makes some stored value
differ.
fp8 (float8 e4m3fn, TensorRT only; MatMul weights): one scale for the whole weight,
s = max |B| / 448 (E4M3's largest finite value), q = B / s rounded to the nearest
float8_e4m3fn (ties to even, ml_dtypes' cast: what ONNX's QuantizeLinear to float8 does with
saturate=1), the zero point 0 in float8.
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
              "nodes", "calibration", "weights", "decoder")
CALIBRATION_KEYS = ("method", "rows", "ssg_beta", "batch", "scales", "feeds", "keep_fp32", "clip", "clip_rule",
                    "clipped")
CLIPPED_KEYS = ("parameter", "amax", "range", "saturated")
DECODER_KEYS = ("op_types", "weight_axis", "nodes", "weights", "keep_fp32", "calibration", "image_psnr_db",
                "image_psnr_latents", "image_psnr_bound", "fan_out")
# the op a quantized weight feeds -> the stored weight's output-channel axis (DequantizeLinear's axis)
WEIGHT_AXIS = {"MatMul": 1, "Conv": 0}
# The image error an int8 decoder may add, teacher-forced (the same latent into both decoders):
# PSNR >= 30 dB against the fp32 decoder's image. Why 30: it is the low end of what lossy 8-bit
# image and video codecs are run at (30-50 dB), i.e. an error of the size people accept from a
# JPEG; int8 measured 33.1-34.4 dB on var-d2's (random) VQVAE, bf16 autocast 47 dB (DESIGN.md
# "Low precision"). It catches a broken decoder (an activation scale 2x off: far below), not the
# 1 % weight errors that only the bit-for-bit weights check sees.
IMAGE_PSNR_MIN = 30.0


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
    _validate_weights(c, q, "quantization", "MatMuls", "var.", "a VAR parameter")
    cal = c.get(q, "calibration", dict, "quantization.calibration")
    c.only(cal, CALIBRATION_KEYS, "quantization.calibration")
    rows = c.get(cal, "rows", list, "quantization.calibration.rows")
    if not rows:
        c.fail("quantization.calibration.rows", "is empty")
    if c.get(cal, "scales", list, "quantization.calibration.scales") != list(range(num_scales)):
        c.fail("quantization.calibration.scales", f"must be every scale 0..{num_scales - 1}")
    c.int_in(cal, "feeds", 1, 1 << 20, "quantization.calibration.feeds")
    _validate_clipped(c, cal)
    if "decoder" in q:
        _validate_decoder(c, c.get(q, "decoder", dict, "quantization.decoder"))


def _validate_weights(c, sec: Dict[str, Any], where: str, ops: str, prefix: str, what: str) -> None:
    """sec.nodes and sec.weights {stored int8 tensor: parameter}: one weight per quantized op,
    each naming a parameter under `prefix`."""
    nodes = c.int_in(sec, "nodes", 1, 1 << 20, f"{where}.nodes")
    w = c.get(sec, "weights", dict, f"{where}.weights")
    if len(w) != nodes:
        c.fail(f"{where}.weights", f"lists {len(w)} weights for {nodes} quantized {ops}")
    for name, param in w.items():
        if not isinstance(param, str) or not param.startswith(prefix):
            c.fail(f"{where}.weights.{name:.60}", f"must name {what} ({prefix}*)")


def _validate_clipped(c, cal: Dict[str, Any]) -> None:
    """calibration.clipped: {activation: {parameter: var.*, amax, range, saturated}}, each range in
    (0, amax]: the int8 range the quantizer was handed for that MatMul input (scale = range / 127)
    instead of MinMax's max|x| = amax, by calibration.clip_rule (absent: artifacts from before)."""
    if "clipped" not in cal:
        return
    c.get(cal, "clip_rule", str, "quantization.calibration.clip_rule")
    for t, r in c.get(cal, "clipped", dict, "quantization.calibration.clipped").items():
        where = f"quantization.calibration.clipped.{t:.60}"
        c.only(c.get(cal["clipped"], t, dict, where), CLIPPED_KEYS, where)
        if not str(r.get("parameter", "")).startswith("var."):
            c.fail(where + ".parameter", "must name a VAR parameter (var.*)")
        nums = [r.get(k) for k in ("amax", "range", "saturated")]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in nums):
            c.fail(where, "amax, range and saturated must be numbers")
        elif not 0 < r["range"] <= r["amax"] or not 0 <= r["saturated"] <= 1:
            c.fail(where, f"range {r['range']} must be in (0, amax = {r['amax']}] and saturated in [0, 1]")


def _validate_decoder(c, d: Dict[str, Any]) -> None:
    c.only(d, DECODER_KEYS, "quantization.decoder")
    if c.get(d, "op_types", list, "quantization.decoder.op_types") != ["Conv"]:
        c.fail("quantization.decoder.op_types", "must be [\"Conv\"]")
    c.int_in(d, "weight_axis", 0, 0, "quantization.decoder.weight_axis")
    _validate_weights(c, d, "quantization.decoder", "convs", "vae.", "a VQVAE parameter")
    c.get(d, "keep_fp32", dict, "quantization.decoder.keep_fp32")
    c.int_in(c.get(d, "calibration", dict, "quantization.decoder.calibration"), "latents", 1, 1 << 20,
             "quantization.decoder.calibration.latents")
    for key in ("image_psnr_db", "image_psnr_bound"):
        if not isinstance(d.get(key), (int, float)) or isinstance(d.get(key), bool):
            c.fail(f"quantization.decoder.{key}", "must be a number (dB)")
    if "fan_out" in d and not all(isinstance(t, str) for t in c.get(d, "fan_out", list, "quantization.decoder.fan_out")):
        c.fail("quantization.decoder.fan_out", "must list tensor names")


def tensor_digest(a: np.ndarray) -> str:
    """sha256 of an array's bytes in C order (how a stored tensor is matched to a parameter)."""
    return hashlib.sha256(np.ascontiguousarray(a).view(np.uint8).reshape(-1)).hexdigest()


def requantize(w: np.ndarray, precision: str, op: str = "MatMul") -> Tuple[np.ndarray, np.ndarray]:
    """A float32 parameter -> (the stored weight in the precision's type, its scale, float32),
    the manifest's scheme for a weight of `op` (module docstring): MatMul W (N, K) -> B = W^T
    (K, N), int8 scale (N,); Conv W (O, I, kh, kw) -> as it is, int8 scale (O,); fp8 (MatMul
    only): one scale for the whole weight, a float32 scalar (shape ())."""
    if op not in WEIGHT_AXIS:
        raise ValueError(f"no quantization layout for {op} weights (one of {', '.join(WEIGHT_AXIS)})")
    if precision not in QUANT_PRECISIONS:
        raise ValueError(f"no quantization scheme for precision {precision!r} (one of {', '.join(QUANT_PRECISIONS)})")
    b = np.asarray(w, np.float32)
    b = np.ascontiguousarray(b.T if op == "MatMul" else b)
    if precision == "fp8":
        if op != "MatMul":
            raise ValueError(f"fp8 quantizes MatMul weights only, not {op}")
        import ml_dtypes
        s = np.float32(np.abs(b).max()) / np.float32(FP8_MAX)
        s = np.float32(1.0) if s == 0 else np.float32(s)
        q = np.clip(b / s, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
        return q, np.asarray(s, np.float32)
    axis = WEIGHT_AXIS[op]
    qmax = QMAX
    absmax = np.abs(b).max(axis=tuple(i for i in range(b.ndim) if i != axis))
    scale = (absmax / np.float32(qmax)).astype(np.float32)
    scale = np.where(scale == 0, np.float32(1.0), scale).astype(np.float32)
    shape = [1] * b.ndim
    shape[axis] = -1
    q = np.clip(np.rint(b / scale.reshape(shape)), -qmax, qmax).astype(np.int8)
    return q, scale


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two images in [0, 1] (inf when equal)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * float(np.log10(1.0 / mse))
