"""One module to ONNX: torch's dynamo export, then torch's ONNX optimisation without its one
costly rule (export.optimize), then the graph's input/output names. Used by the step export
(export.onnx_export) and by the decoder's child process (export.decoder_job)."""
from __future__ import annotations

import warnings
from typing import Dict

import torch


def export_one(module: torch.nn.Module, feeds: Dict[str, torch.Tensor], in_names, out_names, opset: int,
               dynamic_shapes=None):
    """The dynamo export, then torch's ONNX optimisation without its one costly rule that never
    fires here, then the input/output names, in torch's order (export.optimize; DESIGN.md,
    "Export cost"): the same graph in half the time."""
    from .optimize import name_io, optimize
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(module, (), kwargs=feeds, dynamo=True, opset_version=opset, optimize=False,
                                 verbose=False, dynamic_shapes=dynamic_shapes)
    return name_io(optimize(prog.model), in_names, out_names)
