"""What a graph file must agree with in its manifest, checked on the graph itself before a session
is made (hashes prove the files are the ones listed, not that they belong together: DESIGN.md
"What the hashes promise").

    check_graph(man, name, model, path)
        inputs and outputs: names, element types and fixed dimensions as the manifest declares
            them (a batch-2 graph in batch-1 artifacts, the decoder entry naming the step graph)
        external data: initializers only, in the manifest's weights file; a Constant node, a sparse
            or attribute tensor reading another file is refused (the runtime reads listed files only)
        values stored in the graph: no NaN; +-inf only in one-element fill values (masks)
        step graph: TopK's K is the manifest's k_max (sampler.k_max)
    check_values(what, array)   the same value rule for initializers read from the weights file
"""
from __future__ import annotations

from typing import Iterator, List, Optional, Tuple

import numpy as np
import onnx
from onnx import numpy_helper

from .dtypes import FLOAT_NAMES, name_of_onnx, onnx_type
from .manifest import Manifest, ManifestError


def _fail(path: str, what: str) -> ManifestError:
    return ManifestError(f"{path}: {what}; re-export with --force")


def check_values(path: str, what: str, a: np.ndarray) -> None:
    """NaN never; +-inf only in a one-element fill value (the exported -inf of a mask)."""
    if a.dtype.name not in FLOAT_NAMES:        # bfloat16 and float8 arrays are ml_dtypes'
        return
    bad = np.isnan(a).any() if a.size == 1 else not np.isfinite(a).all()
    if bad:
        raise _fail(path, f"{what} holds NaN or infinite values (damaged weights)")


def _tensors(graph: onnx.GraphProto, where: str = "") -> Iterator[Tuple[str, onnx.TensorProto, bool]]:
    """(label, tensor, is a top-level initializer) for every tensor stored in the graph, subgraphs included."""
    for t in graph.initializer:
        yield f"initializer {t.name}", t, not where
    for s in graph.sparse_initializer:
        yield f"sparse initializer {s.values.name}", s.values, False
    for n in graph.node:
        for a in n.attribute:
            label = f"{where}{n.op_type} node {n.name or '?'} attribute {a.name}"
            if a.type == onnx.AttributeProto.TENSOR:
                yield label, a.t, False
            elif a.type == onnx.AttributeProto.TENSORS:
                for t in a.tensors:
                    yield label, t, False
            elif a.type == onnx.AttributeProto.SPARSE_TENSOR:
                yield label, a.sparse_tensor.values, False
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                yield from _tensors(g, f"{label}: ")


def _io(path: str, kind: str, values, declared: List[dict]) -> None:
    got = [v.name for v in values]
    want = [d["name"] for d in declared]
    if got != want:
        raise _fail(path, f"{kind} {got} are not the manifest's {want} (the wrong graph for this entry)")
    for v, d in zip(values, declared):
        t = v.type.tensor_type
        if t.elem_type != onnx_type(d["dtype"]):
            raise _fail(path, f"{kind[:-1]} {v.name} has element type "
                              f"{onnx.TensorProto.DataType.Name(t.elem_type)}, the manifest says {d['dtype']}")
        dims = [x.dim_value if x.HasField("dim_value") else None for x in t.shape.dim]
        if len(dims) != len(d["shape"]) or any(isinstance(w, int) and g != w for g, w in zip(dims, d["shape"])):
            shape = [g if g is not None else "?" for g in dims]
            raise _fail(path, f"{kind[:-1]} {v.name} has shape {shape}, the manifest says {d['shape']} "
                              f"(graphs exported for another batch or preset)")


def _const_value(graph: onnx.GraphProto, name: str) -> Optional[np.ndarray]:
    for t in graph.initializer:
        if t.name == name and t.data_location != onnx.TensorProto.EXTERNAL:
            return numpy_helper.to_array(t)
    for n in graph.node:
        if n.op_type == "Constant" and name in n.output:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    return numpy_helper.to_array(a.t)
    return None


def check_graph(man: Manifest, name: str, model: onnx.ModelProto, path: str) -> None:
    g = man.graph(name)
    weights = man.data["external_data"]["file"]
    _io(path, "inputs", model.graph.input, g["inputs"])
    _io(path, "outputs", model.graph.output, g["outputs"])
    for label, t, top in _tensors(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = {e.key: e.value for e in t.external_data}.get("location")
            if not top or loc != weights:
                raise _fail(path, f"{label} reads {loc!r}, not the artifacts' {weights} (only initializers "
                                  f"in the listed weights file are read)")
        elif name_of_onnx(t.data_type) in FLOAT_NAMES:
            check_values(path, label, numpy_helper.to_array(t))
    if name == "step":
        ks = []
        for n in model.graph.node:
            if n.op_type == "TopK":
                k = _const_value(model.graph, n.input[1]) if len(n.input) > 1 else None
                ks.append(None if k is None or k.size != 1 else int(k.reshape(-1)[0]))
        want = [man.k_max] if man.k_max else []
        if ks != want:
            raise _fail(path, f"the graph's sampler keeps top-k {ks or 'none'} (TopK K), the manifest's "
                              f"sampler.k_max is {man.k_max}")
