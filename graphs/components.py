"""What is exported, one class per component (as TensorRT's demo/Diffusion does): names of the
inputs and outputs, example feeds, dynamic axes, per-scale shapes (TensorRT's optimization
profiles) and the module to export. export/ turns these into files; the manifest records them;
the runtime only reads the manifest.

    StepComponent     step_all.onnx   one graph for every scale (graphs.unified.UnifiedStep)
    DecoderComponent  decoder.onnx    f_hat -> image in [0, 1]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch

from .config import DEFAULT_GUIDANCE, VARConfig
from .io import DYNAMIC_AXES, DecoderIO, StepIO, scale_constants
from .step import StepSpec
from .unified import UnifiedStep
from .vqvae import FhatDecoder


@dataclass(frozen=True)
class StepComponent:
    cfg: VARConfig
    batch: int
    spec: StepSpec
    name: str = "step"
    file: str = "step_all.onnx"
    consts_file: str = "scale_consts.npz"

    @property
    def io(self) -> StepIO:
        """The graph's inputs and outputs as plain data (what the manifest records)."""
        return StepIO(self.cfg, self.batch, str(self.spec.dtype).replace("torch.", ""))

    @property
    def inputs(self) -> List[str]:
        return self.io.inputs

    @property
    def outputs(self) -> List[str]:
        return self.io.outputs

    def module(self, var, vae) -> torch.nn.Module:
        return UnifiedStep(var, vae, self.spec)

    def example_scale(self) -> int:
        """The scale traced at export: n, m and Lp all > 1, so no axis is specialised to 1."""
        return min(3, self.cfg.num_scales - 1)

    def scale_consts(self, k: int):
        return scale_constants(self.cfg, self.spec.transform, k)

    def profile(self, k: int) -> Dict[str, List[int]]:
        """Every input's shape at scale k (TensorRT: min = opt = max)."""
        return self.io.profile(k)

    def output_shapes(self, k: int) -> Dict[str, List[int]]:
        return self.io.output_shapes(k)

    def example_feeds(self, k: int) -> Dict[str, torch.Tensor]:
        """Inputs of the right shapes and dtypes at scale k (export tracing, tests)."""
        c = self.cfg
        shp = self.profile(k)
        B = self.batch
        feeds = dict(label=torch.arange(B, dtype=torch.int64) % c.num_classes,
                     f_hat=torch.zeros(shp["f_hat"]), noise=torch.rand(shp["noise"]),
                     guidance=torch.full((B,), DEFAULT_GUIDANCE), temperature=torch.ones(B),
                     top_k=torch.ones(B, dtype=torch.int64), top_p=torch.full((B,), 0.96), beta=torch.zeros(B),
                     past_kv=torch.zeros(shp["past_kv"], dtype=self.spec.dtype), prev_logits=torch.zeros(shp["prev_logits"]),
                     forced=torch.zeros(shp["forced"], dtype=torch.int64), force=torch.zeros(B), smooth=torch.zeros(B),
                     gumbel=torch.zeros(shp["gumbel"]))
        feeds.update({n: torch.from_numpy(v) for n, v in self.scale_consts(k).items()})
        return feeds

    def dynamic_shapes(self) -> Dict[str, object]:
        """torch.export dims shared by name: n (tokens), m (previous tokens), Lp (past)."""
        from torch.export import Dim         # imports sympy (~0.7 s): only the export needs it
        P2 = self.cfg.patch_nums[-1] ** 2
        dims = dict(n=Dim("n", min=1, max=P2), m=Dim("m", min=1, max=P2), Lp=Dim("Lp", min=0, max=self.cfg.L))
        shapes: Dict[str, object] = {name: None for name in self.inputs}
        shapes.update({name: {axis: dims[d] for axis, d in axes.items()} for name, axes in DYNAMIC_AXES.items()})
        return shapes

    @property
    def dynamic_inputs(self) -> List[str]:
        return self.io.dynamic_inputs


@dataclass(frozen=True)
class DecoderComponent:
    cfg: VARConfig
    batch: int
    name: str = "decoder"
    file: str = "decoder.onnx"
    inputs = DecoderIO.inputs
    outputs = DecoderIO.outputs

    def module(self, var, vae) -> torch.nn.Module:
        return FhatDecoder(vae)

    def example_feeds(self) -> Dict[str, torch.Tensor]:
        return dict(f_hat=torch.zeros(DecoderIO(self.cfg, self.batch).f_hat_shape()))
