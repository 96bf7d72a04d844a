"""TensorRT-compatibility lint for ONNX graphs (runs without TensorRT).

Rules (DESIGN.md "Decisions": one step graph, TensorRT): every op is one the TensorRT ONNX parser supports at the chosen opset;
no DFT/STFT/complex/sequence/control-flow ops; static shapes on every graph input and output
(one static graph per scale; step_all.onnx may name dynamic inputs, pinned by profiles); int64 only in ops that TensorRT 10 accepts it for; TopK's K a
constant within TensorRT's limit; opset no newer than the target parser documents.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import AbstractSet, List, Sequence

import onnx
from onnx import numpy_helper

from var_ssg.contract.manifest import MAX_OPSET       # TensorRT 10.x's parser documents opsets 9..20
from var_ssg.graphs.config import TRT_TOPK_LIMIT

# Ops the TensorRT 10 ONNX parser supports (from onnx-tensorrt's operator matrix), minus the
# ones this project forbids outright (control flow, DFT, random).
TRT_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast
CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum
DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor
Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater
GreaterOrEqual GridSample GroupNormalization HardSigmoid HardSwish Identity InstanceNormalization
IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax LpNormalization LpPool
LRN MatMul Max MaxPool Mean Min Mish Mod Mul Neg Not OneHot Or Pad Pow PRelu QuantizeLinear
Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin
ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize Round ScatterElements ScatterND Selu
Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt
Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Where Xor
""".split())

FORBIDDEN = {
    "DFT": "FFT ops: write transforms as dense matrix products",
    "STFT": "FFT ops: write transforms as dense matrix products",
    "Loop": "control flow: unroll it", "Scan": "control flow: unroll it", "If": "control flow: make it static",
    "SequenceAt": "sequence ops", "SequenceConstruct": "sequence ops", "SequenceEmpty": "sequence ops",
    "SequenceErase": "sequence ops", "SequenceInsert": "sequence ops", "SequenceLength": "sequence ops",
    "SplitToSequence": "sequence ops", "ConcatFromSequence": "sequence ops",
    "Multinomial": "random ops: sample from supplied noise", "RandomUniform": "random ops: sample from supplied noise",
    "RandomNormal": "random ops", "RandomUniformLike": "random ops", "RandomNormalLike": "random ops",
}
COMPLEX = {onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128}
# Float-math ops: TensorRT has no int64 kernels for them.
FLOAT_ONLY = frozenset("MatMul Gemm Conv Softmax LayerNormalization GroupNormalization Exp Log Sqrt Pow Tanh "
                       "Sigmoid Erf ReduceL2 ReduceMean Resize CumSum TopK".split())


@dataclass
class LintIssue:
    graph: str
    node: str
    message: str

    def __str__(self):
        return f"{self.graph}: {self.node}: {self.message}"


def _static(vi) -> bool:
    t = vi.type.tensor_type
    return t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim)


def lint_model(model: onnx.ModelProto, name: str = "graph", topk_limit: int = TRT_TOPK_LIMIT,
               max_opset: int = MAX_OPSET, dynamic: AbstractSet[str] = frozenset()) -> List[LintIssue]:
    """`dynamic`: inputs allowed symbolic dims (step_all.onnx, whose shapes come from one
    TensorRT optimization profile per scale); every other input and output must be static
    or, for outputs, derived from those inputs."""
    out: List[LintIssue] = []
    g = model.graph
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and imp.version > max_opset:
            out.append(LintIssue(name, "opset", f"opset {imp.version} > {max_opset}, the newest TensorRT 10's parser documents; export with --opset {max_opset}"))
        elif imp.domain not in ("", "ai.onnx"):
            if any(n.domain == imp.domain for n in g.node):
                out.append(LintIssue(name, "opset", f"custom domain {imp.domain!r} (needs a TensorRT plugin)"))
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - lint still checks the rest
        inferred = model
    types = {}
    for vi in list(inferred.graph.value_info) + list(g.input) + list(g.output):
        types[vi.name] = vi.type.tensor_type.elem_type
    consts = {}
    for init in g.initializer:
        types[init.name] = init.data_type
        consts[init.name] = init
    for vi in list(g.input) + ([] if dynamic else list(g.output)):
        if not _static(vi) and vi.name not in dynamic:
            out.append(LintIssue(name, vi.name, "dynamic shape on a graph input/output; export one static graph per scale"))
    for vi in list(inferred.graph.value_info) + list(g.input) + list(g.output):
        if vi.type.tensor_type.elem_type in COMPLEX:
            out.append(LintIssue(name, vi.name, "complex tensor (TensorRT has none): use real cos/sin matrices"))
    for init in g.initializer:
        if init.data_type in COMPLEX:
            out.append(LintIssue(name, init.name, "complex initializer"))
    for node in g.node:
        label = node.name or node.op_type
        if node.domain not in ("", "ai.onnx"):
            out.append(LintIssue(name, label, f"op {node.domain}::{node.op_type} is not in the ONNX domain"))
            continue
        if node.op_type in FORBIDDEN:
            out.append(LintIssue(name, label, f"{node.op_type} is not allowed ({FORBIDDEN[node.op_type]})"))
            continue
        if node.op_type not in TRT_OPS:
            out.append(LintIssue(name, label, f"{node.op_type} is not supported by TensorRT's ONNX parser"))
            continue
        for a in node.attribute:
            if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                out.append(LintIssue(name, label, "subgraph attribute (control flow)"))
        if node.op_type in FLOAT_ONLY:
            for i in node.input[:1]:
                if types.get(i) == onnx.TensorProto.INT64:
                    out.append(LintIssue(name, label, f"int64 input to {node.op_type}; TensorRT computes it in float only"))
        if node.op_type == "TopK":
            kname = node.input[1] if len(node.input) > 1 else ""
            kval = None
            if kname in consts:
                kval = int(numpy_helper.to_array(consts[kname]).reshape(-1)[0])
            else:
                for c in g.node:
                    if c.op_type == "Constant" and kname in c.output:
                        kval = int(numpy_helper.to_array(c.attribute[0].t).reshape(-1)[0])
            if kval is None:
                out.append(LintIssue(name, label, "TopK's K is not a constant (TensorRT needs an initializer)"))
            elif kval > topk_limit:
                out.append(LintIssue(name, label, f"TopK K={kval} exceeds TensorRT's limit {topk_limit}; "
                                                 f"use top-k <= {topk_limit} or the bisection sampler (no top-k)"))
    return out


def lint_files(paths: Sequence[str], **kw) -> List[LintIssue]:
    issues: List[LintIssue] = []
    for p in paths:
        m = onnx.load(str(p), load_external_data=False)
        issues += lint_model(m, name=str(p).rsplit("/", 1)[-1], **kw)
    return issues
