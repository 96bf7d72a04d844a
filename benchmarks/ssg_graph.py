"""SSG's cost on the exported path, in isolation: the folded DSE prior and the fusion of one
scale, `out = l + beta * (l - M @ prev)`, as a four-node ONNX graph run by ONNX Runtime with IO
binding (the arithmetic the step graph does for SSG, nothing else; DESIGN.md "Decisions": DSE
folded offline). Written with onnx.helper: exporting a torch module per scale would cost the
benchmark seconds of tracing for four nodes.

  prev (B, m, V) ─► MatMul(M (n, m)) ─► prior ─► Sub(l − prior) ─► Mul(beta ·) ─► Add(l +) ─► out (B, n, V)
"""
from __future__ import annotations

import numpy as np

OPSET = 18


def ssg_fusion_model(M: np.ndarray, batch: int, V: int):
    """The ONNX model of one scale's prior + fusion: inputs l (B, n, V), prev (B, m, V), beta (1,);
    M (n, m) float32 is an initializer."""
    import onnx.helper as oh
    from onnx import TensorProto, numpy_helper
    n, m = M.shape
    F = TensorProto.FLOAT
    nodes = [oh.make_node("MatMul", ["M", "prev"], ["prior"]), oh.make_node("Sub", ["l", "prior"], ["d"]),
             oh.make_node("Mul", ["beta", "d"], ["e"]), oh.make_node("Add", ["l", "e"], ["out"])]
    g = oh.make_graph(nodes, "ssg",
                      [oh.make_tensor_value_info("l", F, [batch, n, V]),
                       oh.make_tensor_value_info("prev", F, [batch, m, V]),
                       oh.make_tensor_value_info("beta", F, [1])],
                      [oh.make_tensor_value_info("out", F, [batch, n, V])],
                      initializer=[numpy_helper.from_array(np.ascontiguousarray(M, dtype=np.float32), "M")])
    return oh.make_model(g, opset_imports=[oh.make_opsetid("", OPSET)], ir_version=9)


class SsgSession:
    """One scale's SSG graph in an ONNX Runtime CPU session, its inputs and output bound once
    (torch tensors, by pointer), so `run()` times the arithmetic alone."""

    def __init__(self, M: np.ndarray, l, prev, beta):
        import onnxruntime as ort
        import torch
        model = ssg_fusion_model(M, l.shape[0], l.shape[-1])
        self.sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        self.inputs = dict(l=l.contiguous(), prev=prev.contiguous(), beta=beta.contiguous())
        self.out = torch.empty(l.shape, dtype=torch.float32)
        self.bind = self.sess.io_binding()
        for name, t in self.inputs.items():
            self.bind.bind_input(name, "cpu", 0, np.float32, tuple(t.shape), t.data_ptr())
        self.bind.bind_output("out", "cpu", 0, np.float32, tuple(self.out.shape), self.out.data_ptr())

    def run(self):
        self.sess.run_with_iobinding(self.bind)
        return self.out
