"""Low-precision graphs: the transformer's weight MatMuls and the decoder's convs in QDQ form
(DESIGN.md "Low precision"), through onnxruntime.quantization.

    fp32 step graph (scratch copy, own external data)
      │ prepare      value_info dropped (the quantizer's rewrites contradict it); every Gemm with a
      │              stored weight → MatMul (+ Add for the bias), so ONNX Runtime fuses it too
      │ select       MatMuls whose B is a stored weight equal to a VAR parameter transposed, bit for
      │              bit (the map initializer → parameter goes to the manifest); attention's
      │              activation MatMuls, DSE, CFG/SSG, sampling, the norms stay fp32
      │ calibrate    MinMax over the model's own runs: calibration rows (classes, seeds, guidance)
      │              through every scale, fed to the exported graph exactly as the runtime feeds it
      │ quantize     quantize_static, QDQ, weights per output channel (MatMul B axis 1), symmetric;
      ▼              activations per tensor, symmetric (zero point 0: what TensorRT takes)
    QDQ step graph: int8 (ONNX Runtime CPU: QLinearMatMul; TensorRT int8)

The precision's recipe (`SCHEMES`) and the calibration record are written into the manifest
(`quantization`), so the weights check can re-derive every stored weight and scale from the
reference's parameters (runtime.weights_check).

The decoder (`quantize_decoder`) takes the same recipe on its convolutions:

    fp32 decoder graph (f_hat -> image, weights inline)
      │ select       Convs whose weight is a VQVAE parameter, bit for bit, but the first (it reads
      │              the latent) and the last (it writes the image)
      │ probe        quantized once on one latent and optimised by ONNX Runtime's CPU: the convs
      │              it leaves as dequantize + fp32 Conv (not fused into QLinearConv) gain no
      │              speed and only add error, so they stay fp32 too (none, with the fan-outs)
      │ calibrate    MinMax over the calibration rows' final latents (what the decoder reads)
      │ quantize     QDQ, weights per output channel (Conv weight axis 0), symmetric; activations
      │              per tensor, symmetric; biases stay fp32 (ONNX Runtime fuses them as they are)
      │ fan out      a DequantizeLinear read by several nodes gets one reader, an identity
      ▼              Max(x); quantized convs among its readers get their own Q/DQ pair on it
    QDQ decoder: int8 convs; its image's PSNR against the fp32 decoder's on the calibration
    latents is measured and recorded (the quality gate bounds it on the rows it runs)
"""
from __future__ import annotations

import fnmatch
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from var_ssg.common.errors import ConfigError
from var_ssg.contract.quantization import IMAGE_PSNR_MIN, psnr, tensor_digest

from .clip import AbsHistogram, activation_histograms, clip_bound, saturated

log = logging.getLogger(__name__)


# precision -> (weight type, activation type) in onnxruntime.quantization's QuantType names
SCHEMES = {"int8": ("QInt8", "QInt8")}
QUANTIZED_GRAPHS = ("step", "decoder")      # what a quantized precision quantizes (part of the cache key)
DECODER_RECIPE = "fan-out"      # the int8 decoder's graph recipe (part of the cache key: int8 artifacts of before
                                # the fan-out have 7 convs unfused, 1.3-1.4x slower; they are re-exported)


@dataclass(frozen=True)
class CalibrationConfig:
    """The rows whose runs calibrate the activation ranges: row i is class `classes[i]`, seed
    `seed + i`, guidance `guidance[i % len(guidance)]`, the default SSG schedule; all scales.
    `keep_fp32`: VAR parameters whose MatMuls stay fp32 (fnmatch patterns on the names after
    `var.`): the head (it writes the logits the sampler reads), every AdaLN projection (its
    input is the request's class condition, shared by all blocks: ONNX Runtime's CPU does not
    fuse those QDQ MatMuls and would dequantize their weights at every scale) and word_embed
    (its input, the downsampled f_hat, has one static int8 range for every scale: quantized, it
    alone moved var-d2's sampling distributions 6x as far as bf16 does at scale 1; DESIGN.md
    "Low precision").
    `clip`: VAR parameters (patterns as keep_fp32) whose quantized MatMul's input gets its int8
    range by `clip_rule` instead of MinMax (export.clip): "mse" (the bound minimising int8's
    squared error over the calibration values), "pQ" (the Q-th percentile of |x|, e.g.
    "p99.99") or "minmax" (no clipping). The default clips the input of every quantized
    MatMul by "mse" (fc2's, GELU's long tail, most: DESIGN.md "Low precision" has the
    measurements); the MatMuls' outputs keep MinMax (clipped, scale 0 got worse).
    int8 only: fp8 keeps MinMax ranges."""
    classes: Tuple[int, ...] = (207, 1, 360, 980, 88, 417)
    seed: int = 0
    guidance: Tuple[float, ...] = (4.0, 1.5, 2.5, 1.0)
    keep_fp32: Tuple[str, ...] = ("head.*", "*ada_lin.*", "word_embed.*")
    clip: Tuple[str, ...] = ("blocks.*.attn.mat_qkv.weight", "blocks.*.attn.proj.weight", "blocks.*.ffn.fc1.weight",
                             "blocks.*.ffn.fc2.weight")
    clip_rule: str = "mse"

    def __post_init__(self):
        if not self.classes:
            raise ConfigError("calibration needs at least one class")
        if not self.guidance:
            raise ConfigError("calibration needs at least one guidance value")
        clip_bound(AbsHistogram(), self.clip_rule)          # a bad rule fails here, before any export work

    def rows(self, num_classes: int) -> List[Tuple[int, int, float]]:
        return [(int(c) % num_classes if c >= 0 else -1, self.seed + i, float(self.guidance[i % len(self.guidance)]))
                for i, c in enumerate(self.classes)]


def scheme(precision: str) -> Dict:
    """What the manifest records of the recipe (the weights check re-derives from it)."""
    w, a = SCHEMES[precision]
    return dict(tool="onnxruntime.quantization", format="QDQ", weight_type=w, activation_type=a,
                weight_granularity="per-channel", weight_axis=1, weight_symmetric=True,
                activation_granularity="per-tensor", activation_symmetric=True, calibration_method="MinMax",
                op_types=["MatMul"])


def decoder_scheme(q: "QuantizedDecoder") -> Dict:
    """The manifest's `quantization.decoder`: the same types and granularities as the step's,
    on Conv weights (per output channel: axis 0), and what the image error measured."""
    return dict(op_types=["Conv"], weight_axis=0, nodes=q.nodes, weights=q.weights, keep_fp32=q.keep_fp32,
                calibration=dict(latents=q.feeds), image_psnr_db=round(q.image_psnr_db, 2),
                image_psnr_latents=min(PSNR_LATENTS, q.feeds),
                image_psnr_bound=IMAGE_PSNR_MIN, fan_out=q.fan_out)


# ------------------------------------------------------------------ graph preparation
def gemm_to_matmul(model) -> int:
    """Gemm(A, W, bias) with a stored W (transB 0/1, alpha = beta = 1) → MatMul(A, W') + bias,
    W' stored as (K, N): ONNX Runtime's CPU fuses only MatMul with QDQ. Returns how many."""
    import onnx
    from onnx import numpy_helper
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    nodes, n_done = [], 0
    for n in g.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type != "Gemm" or n.input[1] not in inits or attrs.get("transA", 0) or \
                attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            nodes.append(n)
            continue
        w = numpy_helper.to_array(inits[n.input[1]])
        if attrs.get("transB", 0):
            w = np.ascontiguousarray(w.T)
        wname = n.input[1] + ".T" if attrs.get("transB", 0) else n.input[1]
        if wname not in inits:
            t = numpy_helper.from_array(w, wname)
            g.initializer.append(t)
            inits[wname] = t
        mm_out = n.output[0] + "_mm" if len(n.input) > 2 and n.input[2] else n.output[0]
        nodes.append(onnx.helper.make_node("MatMul", [n.input[0], wname], [mm_out], name=n.name + "_mm"))
        if mm_out != n.output[0]:
            nodes.append(onnx.helper.make_node("Add", [mm_out, n.input[2]], [n.output[0]], name=n.name + "_bias"))
        n_done += 1
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in g.node for i in n.input}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    return n_done


def weight_map(model, params: Dict[str, np.ndarray], op_type: str = "MatMul") -> Dict[str, str]:
    """Weights of `op_type` nodes that are a parameter, bit for bit: {initializer name: parameter
    name}. MatMul: B (K, N) is a 2-D parameter (N, K) transposed; Conv: W (O, I, kh, kw) is a 4-D
    parameter as it is. Only these are quantized."""
    from onnx import numpy_helper
    ndim, as_stored = {"MatMul": (2, lambda p: p.T), "Conv": (4, lambda p: p)}[op_type]
    by_digest: Dict[str, str] = {}
    dup = set()
    for name, p in params.items():
        if p.ndim == ndim:
            d = tensor_digest(as_stored(p))
            if d in by_digest:
                dup.add(d)                # two parameters with the same bytes: neither is named by them
            by_digest.setdefault(d, name)
    for d in dup:
        del by_digest[d]
    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type == op_type and n.input[1] in inits and n.input[1] not in out:
            w = numpy_helper.to_array(inits[n.input[1]])
            if w.ndim == ndim and w.dtype == np.float32:
                hit = by_digest.get(tensor_digest(w))
                if hit is not None:
                    out[n.input[1]] = hit
    return out


# ------------------------------------------------------------------ quantization
class _Feeds:
    """onnxruntime.quantization's CalibrationDataReader over recorded feed dicts (a list, or
    export.calibrate.FeedStore, which reads each from disk only when the quantizer asks for it)."""

    def __init__(self, feeds: Iterable[Dict[str, np.ndarray]]):
        self._it = iter(feeds)

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        return next(self._it, None)

    def rewind(self):            # the quantizer never rewinds MinMax calibration
        raise NotImplementedError


@dataclass
class Quantized:
    weights: Dict[str, str]      # quantized initializer (as the graph stores it) -> VAR parameter
    nodes: int                   # weights quantized (one MatMul each in VAR's graphs)
    feeds: int                   # calibration feeds (scales x runs)
    clipped: Dict[str, Dict] = field(default_factory=dict)   # activation -> its clipped range (clip_ranges)


QMAX_ACT = 127              # int8 activations, symmetric: scale = bound / 127


def _matches(param: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(param[len("var."):], x) for x in patterns)


def clip_ranges(prepared: str, inputs: Dict[str, str], feeds: Sequence[Dict[str, np.ndarray]],
                rule: str) -> Dict[str, Dict]:
    """{activation: {parameter, amax, range, saturated}} for the MatMul inputs `inputs` (activation
    -> the VAR parameter its MatMul multiplies), their symmetric bound by `rule`, from one pass of
    the prepared graph over the calibration feeds (export.clip)."""
    hists = activation_histograms(prepared, sorted(inputs), feeds)
    out = {}
    for t, h in hists.items():
        c = clip_bound(h, rule)
        if not c > 0:
            raise ConfigError(f"the input of {inputs[t]} is 0 on every calibration feed: no int8 range to clip")
        out[t] = dict(parameter=inputs[t], amax=h.amax, range=c, saturated=saturated(h, c))
    return out


def activation_scales(path: str) -> Dict[str, float]:
    """{activation: its QuantizeLinear's scale} of the QDQ graph at `path` (weights excluded: their
    QuantizeLinear is folded into stored int8 values)."""
    import onnx
    from onnx import numpy_helper
    g = onnx.load(path, load_external_data=False).graph
    inits = {t.name: t for t in g.initializer}
    base = os.path.dirname(os.path.abspath(path))
    return {n.input[0]: float(numpy_helper.to_array(inits[n.input[1]], base)) for n in g.node
            if n.op_type == "QuantizeLinear" and n.input[1] in inits}


def check_clipped(path: str, clipped: Dict[str, Dict]) -> None:
    """Every clipped activation of the QDQ graph at `path` is quantized with scale range / 127
    (float32, as the quantizer computes it): the override was applied, not the MinMax range."""
    scales = activation_scales(path)
    for t, r in clipped.items():
        want = np.float32(2.0 * np.float32(r["range"]) / (2 * QMAX_ACT))
        got = scales.get(t)
        if got is None or not abs(got - want) <= 1e-6 * want:
            raise ConfigError(f"the quantizer did not apply the clipped range of {r['parameter']}'s input {t}: scale "
                              f"{got} instead of {r['range']:.6g} / {QMAX_ACT} = {want:.6g}")


def quantize_step(src: str, dst: str, precision: str, params: Dict[str, np.ndarray],
                  feeds: Sequence[Dict[str, np.ndarray]], scratch: str, keep_fp32: Sequence[str] = (),
                  clip: Sequence[str] = (), clip_rule: str = "minmax") -> Quantized:
    """Quantize the fp32 step graph `src` (external data beside it) into `dst` (external data
    `<dst>.data`). `params`: the VAR parameters in float32 (the weights to match), `feeds`: the
    graph's inputs of every calibration scale. `clip`, `clip_rule`: the MatMuls (their VAR
    parameters, as keep_fp32) whose input gets a range by `clip_rule` instead of MinMax
    (CalibrationConfig; export.clip); the quantizer takes it as a tensor override."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    if precision not in SCHEMES:
        raise ConfigError(f"no quantization scheme for precision {precision!r} (one of {', '.join(SCHEMES)})")
    model = onnx.load(src)
    del model.graph.value_info[:]
    gemm_to_matmul(model)
    wmap = {w: p for w, p in weight_map(model, params).items() if not _matches(p, keep_fp32)}
    if not wmap:
        raise ConfigError("the step graph has no MatMul whose weight is a VAR parameter: nothing to quantize")
    nodes = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in wmap]
    to_clip = {n.input[0]: wmap[n.input[1]] for n in model.graph.node
               if n.op_type == "MatMul" and n.input[1] in wmap and _matches(wmap[n.input[1]], clip)}
    for x in clip:
        if not any(_matches(p, (x,)) for p in to_clip.values()):
            raise ConfigError(f"clip pattern {x!r} names no quantized MatMul's weight (VAR parameter names after "
                              f"'var.', e.g. blocks.0.ffn.fc2.weight; keep_fp32 ones are not quantized); "
                              f"leave it out of CalibrationConfig.clip")
    prepared = os.path.join(scratch, "prepared.onnx")
    onnx.save(model, prepared, save_as_external_data=True, location="prepared.data", size_threshold=1024)
    del model
    clipped = clip_ranges(prepared, to_clip, feeds, clip_rule) if to_clip and clip_rule != "minmax" else {}
    w_type, a_type = (getattr(QuantType, t) for t in SCHEMES[precision])
    quantize_static(prepared, dst, _Feeds(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=w_type, activation_type=a_type, op_types_to_quantize=["MatMul"],
                    nodes_to_quantize=nodes, use_external_data_format=True, calibrate_method=CalibrationMethod.MinMax,
                    extra_options=dict(ActivationSymmetric=True, WeightSymmetric=True, MatMulConstBOnly=True,
                                       QDQOpTypePerChannelSupportToAxis={"MatMul": 1},
                                       CalibTensorRangeSymmetric=False,
                                       TensorQuantOverrides={t: [dict(rmin=np.float32(-r["range"]),
                                                                        rmax=np.float32(r["range"]))]
                                                             for t, r in clipped.items()}))
    check_clipped(dst, clipped)
    q = onnx.load(dst, load_external_data=False)
    stored = {t.name for t in q.graph.initializer}
    weights = {}
    for w, p in wmap.items():
        if w + "_quantized" not in stored or w + "_scale" not in stored:
            raise ConfigError(f"the quantizer left the weight of {p} unquantized ({w}); it cannot be checked")
        weights[w + "_quantized"] = p
    return Quantized(weights=weights, nodes=len(weights), feeds=len(feeds), clipped=clipped)


# ------------------------------------------------------------------ the decoder
PSNR_LATENTS = 2      # the export measures the int8 decoder's image error on this many calibration latents
                      # (each costs two decodes; the quality gate measures it on the rows it runs)


@dataclass
class QuantizedDecoder:
    weights: Dict[str, str]      # quantized initializer -> VQVAE parameter (vae.*)
    nodes: int                   # convs quantized
    keep_fp32: Dict[str, str]    # the weight (vae.*) of each conv that stays fp32 -> why
    feeds: int                   # calibration latents
    image_psnr_db: float         # the int8 decoder's image vs the fp32 decoder's, worst of PSNR_LATENTS
    fan_out: List[str]           # the dequantized tensors given one reader (fan_out)


def _decoder_options(precision: str, convs: Sequence[str]) -> Dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    w_type, a_type = (getattr(QuantType, t) for t in SCHEMES[precision])
    return dict(quant_format=QuantFormat.QDQ, per_channel=True, weight_type=w_type, activation_type=a_type,
                op_types_to_quantize=["Conv"], nodes_to_quantize=list(convs), calibrate_method=CalibrationMethod.MinMax,
                extra_options=dict(ActivationSymmetric=True, WeightSymmetric=True, CalibTensorRangeSymmetric=False,
                                   QuantizeBias=False))


def _unfused(path: str, convs: Sequence[str], scratch: str) -> List[str]:
    """The convs of `convs` that ONNX Runtime's CPU leaves as Conv (dequantize + fp32) in the QDQ
    graph at `path`: the fusion into QLinearConv keeps the node name out of the optimised graph."""
    import onnx
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED   # the QDQ fusions
    so.optimized_model_filepath = os.path.join(scratch, "probe-optimized.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    left = {n.name for n in onnx.load(so.optimized_model_filepath, load_external_data=False).graph.node
            if n.op_type == "Conv"}
    return [c for c in convs if c in left]


def fan_out(model) -> List[str]:
    """Give every activation DequantizeLinear that several nodes read one reader, an identity
    Max(x) (one input) that they read instead; a QDQ conv among them (its weight dequantized)
    gets its own QuantizeLinear/DequantizeLinear pair on the Max, with the same scale and zero
    point (exact: the values are already on that grid). Why: ONNX Runtime's CPU gives such a DQ
    one copy per reader, its Q then has two readers, its int8 -> uint8 conversion skips that
    pair and the convs on either side keep mixed types, unfused (DESIGN.md "Low precision").
    In place; returns the tensors fanned out. The fp32 function is unchanged."""
    import copy
    import onnx
    g = model.graph
    made_by = {o: n for n in g.node for o in n.output}
    readers: Dict[str, List[Tuple[object, int]]] = {}
    for n in g.node:
        for k, i in enumerate(n.input):
            readers.setdefault(i, []).append((n, k))
    outputs = {o.name for o in g.output}
    after: Dict[int, list] = {}
    done = []
    for dq in g.node:
        t = dq.output[0] if dq.op_type == "DequantizeLinear" else None
        q = made_by.get(dq.input[0]) if t else None
        if q is None or q.op_type != "QuantizeLinear" or len(readers.get(t, ())) < 2 or t in outputs \
                or len(readers[q.output[0]]) != 1:
            continue
        fan = t + "_fan_out"
        extra = [onnx.helper.make_node("Max", [t], [fan], name=dq.name + "_fan_out")]
        for n, k in readers[t]:
            src = fan
            w = made_by.get(n.input[1]) if n.op_type == "Conv" and k == 0 and len(n.input) > 1 else None
            if w is not None and w.op_type == "DequantizeLinear":      # a QDQ conv: its own pair
                q2, dq2 = copy.deepcopy(q), copy.deepcopy(dq)
                q2.name, dq2.name = f"{n.name}_fan_out_q", f"{n.name}_fan_out_dq"
                q2.input[0], q2.output[0] = fan, f"{fan}_{n.name}_q"
                dq2.input[0], dq2.output[0] = q2.output[0], f"{fan}_{n.name}"
                extra += [q2, dq2]
                src = dq2.output[0]
            n.input[k] = src
        after[id(dq)] = extra
        done.append(t)
    nodes = []
    for n in g.node:
        nodes.append(n)
        nodes.extend(after.get(id(n), ()))
    del g.node[:]
    g.node.extend(nodes)
    return done


def _quantize_fanned(src: str, dst: str, feeds, options: Dict) -> List[str]:
    """quantize_static, then fan_out on the result (rewritten in place at `dst`)."""
    import onnx
    from onnxruntime.quantization import quantize_static
    quantize_static(src, dst, feeds, **options)
    model = onnx.load(dst)
    fanned = fan_out(model)
    onnx.save(model, dst)
    return fanned


def decoder_psnr(src: str, dst: str, f_hats: Sequence[np.ndarray]) -> float:
    """The worst PSNR (dB, images in [0, 1]) of the decoder `dst`'s image against `src`'s on the
    same latents, both run by ONNX Runtime's CPU."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    a, b = (ort.InferenceSession(p, so, providers=["CPUExecutionProvider"]) for p in (src, dst))
    name = a.get_inputs()[0].name
    return min(psnr(a.run(None, {name: f})[0], b.run(None, {name: f})[0]) for f in f_hats)


def quantize_decoder(src: str, dst: str, precision: str, params: Dict[str, np.ndarray],
                     f_hats: Sequence[np.ndarray], scratch: str) -> QuantizedDecoder:
    """Quantize the fp32 decoder graph `src` (weights inline) into `dst` (module docstring).
    `params`: the VQVAE's parameters in float32 (vae.*), `f_hats`: the calibration runs' final
    latents, each a batch as the graph takes it."""
    import onnx
    if precision not in SCHEMES:
        raise ConfigError(f"no quantization scheme for precision {precision!r} (one of {', '.join(SCHEMES)})")
    if not f_hats:
        raise ConfigError("the decoder's calibration needs at least one latent")
    model = onnx.load(src)
    wmap = weight_map(model, params, "Conv")
    convs = [n.name for n in model.graph.node if n.op_type == "Conv" and n.input[1] in wmap]
    if len(convs) < 3:
        raise ConfigError(f"the decoder graph has {len(convs)} convs whose weight is a VQVAE parameter: "
                          f"nothing to quantize between the first and the last")
    name = model.graph.input[0].name
    weight_of = {n.name: n.input[1] for n in model.graph.node if n.name in convs}
    del model
    keep = {convs[0]: "the first conv: it reads the latent", convs[-1]: "the last conv: it writes the image"}
    chosen = convs[1:-1]
    probe = os.path.join(scratch, "probe.onnx")
    _quantize_fanned(src, probe, _Feeds([{name: f_hats[0]}]), _decoder_options(precision, chosen))
    for c in _unfused(probe, chosen, scratch):
        keep[c] = "ONNX Runtime's CPU runs it as dequantize + fp32 Conv (not fused into QLinearConv)"
    chosen = [c for c in chosen if c not in keep]
    fanned = _quantize_fanned(src, dst, _Feeds([{name: f} for f in f_hats]), _decoder_options(precision, chosen))
    q = onnx.load(dst, load_external_data=False)
    stored = {t.name for t in q.graph.initializer}
    weights = {}
    for c in chosen:
        w = weight_of[c]
        if w + "_quantized" not in stored or w + "_scale" not in stored:
            raise ConfigError(f"the quantizer left the weight of {wmap[w]} unquantized ({w}); it cannot be checked")
        weights[w + "_quantized"] = wmap[w]
    db = decoder_psnr(src, dst, f_hats[:PSNR_LATENTS])
    if db < IMAGE_PSNR_MIN:
        log.warning("the int8 decoder's image is %.1f dB from the fp32 decoder's on the calibration latents, below "
                    "the quality gate's %.0f dB: parity.py will fail these artifacts", db, IMAGE_PSNR_MIN)
    return QuantizedDecoder(weights=weights, nodes=len(weights), feeds=len(f_hats), image_psnr_db=db,
                            keep_fp32={wmap[weight_of[c]]: why for c, why in keep.items()}, fan_out=fanned)
