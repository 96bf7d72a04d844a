"""The ONNX graph optimisation that `torch.onnx.export(dynamo=True, optimize=True)` runs
(onnxscript's `optimize_ir` + `onnx_fusions.fuse`), minus the one rewrite rule that costs
most of the export and never fires on these graphs (DESIGN.md, "Export cost").

`SlicesSplit` (two Slices of one tensor -> one Split) is a two-output pattern: onnxscript
matches it by pairing Slice nodes, which on the var-d24 step graph took 54 of the optimiser's
67 s and matched nothing (the graphs never halve a last axis with two Slices). Every other pass
and rule runs as torch runs them, in the same order, so the graph is the same file byte for
byte (tests/test_startup.py compares it with torch's own path).
"""
from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript import rewriter
from onnxscript.optimizer import _constant_folding
from onnxscript.rewriter import onnx_fusions

SKIPPED_RULES = ("SlicesSplit",)


def rewrite_rules() -> list:
    return [r for r in rewriter._DEFAULT_REWRITE_RULES if getattr(r, "name", None) not in SKIPPED_RULES]


def optimize(model: ir.Model, num_iterations: int = 2) -> ir.Model:
    """In place, as onnxscript 0.7's `optimize_ir` with torch's defaults, then the opset fusions."""
    loop = ir.passes.PassManager(
        [_constant_folding.FoldConstantsPass(shape_inference=True,
                                             input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                                             output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
                                             should_fold=lambda node: None),
         rewriter.RewritePass(rewrite_rules()),
         common_passes.RemoveUnusedNodesPass(),
         common_passes.RemoveUnusedFunctionsPass(),
         common_passes.RemoveUnusedOpsetsPass()],
        steps=num_iterations, early_stop=True)
    passes = ir.passes.Sequential(
        common_passes.InlinePass(),
        loop,
        common_passes.RemoveUnusedNodesPass(),
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common_passes.LiftSubgraphInitializersToMainGraphPass(),
        common_passes.DeduplicateInitializersPass(),
        common_passes.CommonSubexpressionEliminationPass(),
        common_passes.OutputFixPass(),
        common_passes.NameFixPass(),
    )
    passes(model)
    onnx_fusions.fuse(model)
    return model


def name_io(model: ir.Model, in_names, out_names) -> ir.Model:
    """Name the graph's inputs and outputs after optimising, as torch does (keeping the traced
    name in the same metadata entry), so the file equals torch's own export."""
    for values, names in ((model.graph.inputs, in_names), (model.graph.outputs, out_names)):
        if len(set(names)) != len(names) or len(names) > len(values):
            raise ValueError(f"bad graph names {list(names)} for {len(values)} values")
        for v, name in zip(values, names):
            v.metadata_props["pkg.torch.onnx.original_node_name"] = str(v.name)
            v.name = name
    return model
