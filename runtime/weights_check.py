"""The exported weights against the reference's, bit for bit (DESIGN.md "Parity bounds",
"Low precision"): a precision's noise can hide a small weight error from the logits, not here.

Every stored tensor of the step and decoder graphs is read (any element type the manifest
allows), and every parameter the graphs use must be accounted for:
  copied      an initializer named after the parameter, or holding its bytes (reshaped, or a
              2-D weight transposed, as the exporter folds them), in the graph's dtype: the
              reference parameter cast to that dtype must give the same bytes;
  quantized   (int8, fp8 artifacts) the stored weight, its scale (per channel for int8, one per
              tensor for fp8) and zero point must equal contract.quantization.requantize of the
              reference parameter, bit for bit: the step's MatMul weights (channels on axis 1)
              and, for int8, the decoder's Conv weights (channels on axis 0);
  derived     the few small tensors the exporter folds into other constants (DERIVED below:
              q/v biases concatenated, the attention scale through exp/clamp); they reach the
              logits, which the parity bounds compare.
A parameter neither copied nor quantized (nor derived) is a failure, as is a named initializer
whose shape or bytes differ: the check cannot pass without comparing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

# parameters that reach the graphs only through a folded constant (suffixes of state-dict keys)
DERIVED = (".attn.q_bias", ".attn.v_bias", ".attn.scale_mul_1H11")
# modules of the VQVAE that no exported graph runs (the decoder starts at post_quant_conv)
UNUSED = ("vae.encoder.", "vae.quant_conv.")


@dataclass
class WeightsReport:
    compared: int = 0                       # stored tensors compared bit for bit
    quantized: int = 0                      # of them: quantized weights re-derived
    failures: List[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.failures:
            return "\n".join(self.failures)
        q = f" ({self.quantized} quantized weights re-derived from the reference's)" if self.quantized else ""
        return f"weights: {self.compared} exported tensors equal the reference's, bit for bit{q}; every parameter compared"


def _ref_key(name: str):
    """Initializer name -> state-dict key with its model prefix: var.K, vae.K, phis.N.K (the quant_resi convs)."""
    if name.startswith(("var.", "vae.")):
        return name
    if name.startswith("phis."):
        return "vae.quantize.quant_resi.qresi_ls." + name[len("phis."):]
    return None


def _np_dtype(data_type: int):
    """The numpy dtype of an ONNX element type, through the one dtype table (bf16: ml_dtypes)."""
    from var_ssg.contract.dtypes import name_of_onnx, numpy_dtype
    name = name_of_onnx(data_type)
    if name is None:
        raise ValueError(f"ONNX element type {data_type} is not in contract.dtypes")
    return numpy_dtype(name)


def _cast(t, dtype: np.dtype) -> np.ndarray:
    """A reference tensor (torch) cast to a stored dtype the way the export casts it (torch's rounding)."""
    import torch
    name = dtype.name
    if name == "bfloat16":
        return t.to(torch.bfloat16).view(torch.uint16).numpy().view(dtype)
    return t.to(getattr(torch, name)).numpy() if hasattr(torch, name) else t.float().numpy().astype(dtype)


class _Reader:
    def __init__(self, man):
        wfile = man.path(man.data["external_data"]["file"])
        self.blob = np.memmap(wfile, dtype=np.uint8, mode="r") if Path(wfile).stat().st_size else None

    def read(self, t) -> np.ndarray:
        import onnx
        from onnx import numpy_helper
        if t.data_location == onnx.TensorProto.EXTERNAL:
            ext = {e.key: e.value for e in t.external_data}
            off, ln = int(ext.get("offset", 0)), int(ext["length"])
            return np.frombuffer(self.blob[off:off + ln].tobytes(), dtype=_np_dtype(t.data_type)).reshape(tuple(t.dims))
        return numpy_helper.to_array(t)


def weights_check(man, models: Dict[str, object]) -> WeightsReport:
    """`models`: {"var": VAR, "vae": VQVAE}, the eager reference's (fp32)."""
    import onnx
    from var_ssg.contract.quantization import requantize, tensor_digest
    params = {f"{m}.{k}": v.detach().cpu() for m, mod in models.items() for k, v in mod.state_dict().items()}
    required = {k for m, mod in models.items() for k, _ in mod.named_parameters(prefix=m)
                if not k.startswith(UNUSED) and not k.endswith(DERIVED)}
    qsec = man.data.get("quantization") or {}
    quant = {w: (p, "MatMul") for w, p in qsec.get("weights", {}).items()}          # stored -> (parameter, op)
    quant.update({w: (p, "Conv") for w, p in (qsec.get("decoder") or {}).get("weights", {}).items()})
    companions = {q[:-len("_quantized")] + s for q in quant for s in ("_scale", "_zero_point")}
    rep, seen = WeightsReport(), set()
    reader = _Reader(man)
    by_digest: Dict[Tuple[str, str], List[str]] = {}      # (dtype, digest) -> parameters with those bytes

    def digests(dtype: np.dtype):
        key = dtype.name
        if not any(k[0] == key for k in by_digest):
            for name in sorted(required):
                a = _cast(params[name], dtype)
                by_digest.setdefault((key, tensor_digest(a)), []).append(name)
                if a.ndim == 2:
                    by_digest.setdefault((key, tensor_digest(a.T)), []).append(name)
        return key

    for gname in ("step", "decoder"):
        g = onnx.load(man.path(man.graph(gname)["file"]), load_external_data=False)
        inits = {t.name: t for t in g.graph.initializer}
        for t in g.graph.initializer:
            if t.name in quant:
                param, op = quant[t.name]
                rep.compared += _check_quantized(rep, gname, t, inits, param, op, params, reader, man.precision,
                                                 requantize)
                _check_dequantize(rep, gname, g.graph, t.name, param, op, man.precision)
                seen.add(param)
                continue
            if t.name in companions:
                continue                    # compared with their weight
            arr = reader.read(t)
            key = _ref_key(t.name)
            if key is not None and key in params:
                want = _cast(params[key], arr.dtype)
                rep.compared += 1
                seen.add(key)
                if tuple(arr.shape) != tuple(want.shape):
                    rep.failures.append(f"weights: {gname} graph's {t.name} has shape {list(arr.shape)}, the "
                                        f"reference's {key} {list(want.shape)}")
                elif not np.array_equal(arr.view(np.uint8), np.ascontiguousarray(want).view(np.uint8)):
                    d = float(np.abs(arr.astype(np.float64) - want.astype(np.float64)).max())
                    rep.failures.append(f"weights: {gname} graph's {t.name} differs from the reference's {key} "
                                        f"(max|d| {d:.2e}; it must be the same {arr.dtype.name} values)")
                continue
            if arr.size >= 16 and (arr.dtype.kind == "f" or arr.dtype.name == "bfloat16"):
                hits = by_digest.get((digests(arr.dtype), tensor_digest(arr)), [])
                if hits:
                    rep.compared += 1
                    seen.update(hits)
    for name in sorted(required - seen):
        rep.failures.append(f"weights: the reference's {name} is in no exported graph as it should be (copied, "
                            f"transposed or re-quantized): a changed or missing weight")
    return rep


def _check_dequantize(rep: WeightsReport, gname: str, graph, name: str, param: str, op: str,
                      precision: str) -> None:
    """The stored values are used as the scheme says: one DequantizeLinear reads the weight with its
    own scale and zero point along the output channels' axis (MatMul: 1, Conv: 0; fp8's one scale
    per tensor has no axis: its shape is compared with the scheme's), and feeds the weight input
    of a node of that op."""
    import onnx
    from var_ssg.contract.quantization import LAYOUT, WEIGHT_AXIS
    want_axis = WEIGHT_AXIS[op] if LAYOUT[precision][2] is not None else None
    base = name[:-len("_quantized")]
    dqs = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input and n.input[0] == name]
    why = None
    if len(dqs) != 1:
        why = f"{len(dqs)} DequantizeLinear nodes read it (one should)"
    else:
        dq = dqs[0]
        axis = next((onnx.helper.get_attribute_value(a) for a in dq.attribute if a.name == "axis"), 1)
        if list(dq.input[1:3]) != [base + "_scale", base + "_zero_point"]:
            why = f"its DequantizeLinear reads {list(dq.input[1:3])}, not its own scale and zero point"
        elif want_axis is not None and axis != want_axis:
            why = f"its DequantizeLinear runs along axis {axis}, the scheme's output channels are axis {want_axis}"
        elif not any(n.op_type == op and len(n.input) > 1 and n.input[1] == dq.output[0] for n in graph.node):
            why = f"its DequantizeLinear does not feed a {op}'s weight input"
    if why:
        rep.failures.append(f"weights: {gname} graph's {name} ({param}): {why}")


def _check_quantized(rep: WeightsReport, gname: str, t, inits, param: str, op: str, params, reader, precision: str,
                     requantize) -> int:
    base = t.name[:-len("_quantized")]
    if param not in params:
        rep.failures.append(f"weights: {gname} graph's {t.name} names {param}, which the reference does not have")
        return 0
    missing = [n for n in (base + "_scale", base + "_zero_point") if n not in inits]
    if missing:
        rep.failures.append(f"weights: {gname} graph's {t.name} has no {missing[0]}")
        return 0
    q, s, z = reader.read(t), reader.read(inits[base + "_scale"]), reader.read(inits[base + "_zero_point"])
    want_q, want_s = requantize(params[param].float().numpy(), precision, op)
    what = None
    if q.shape != want_q.shape or s.shape != want_s.shape:
        what = f"shape {list(q.shape)} / scale {list(s.shape)}, the scheme gives {list(want_q.shape)} / {list(want_s.shape)}"
    elif not np.array_equal(s.astype(np.float32).view(np.uint32), want_s.view(np.uint32)):
        what = f"scales (max rel. d {float(np.abs(s / want_s - 1).max()):.2e})"
    elif z.astype(np.float32).any():
        what = "a zero point that is not 0 (the scheme is symmetric)"
    elif not np.array_equal(q.view(np.uint8), want_q.view(np.uint8)):
        what = f"{int((q.view(np.uint8) != want_q.view(np.uint8)).sum())} stored values"
    if what:
        rep.failures.append(f"weights: {gname} graph's {t.name} differs from {param} re-quantized by the manifest's "
                            f"scheme: {what}")
    rep.quantized += 1
    return 1
