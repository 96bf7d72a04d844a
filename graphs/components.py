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
from .step import StepSpec
from .unified import UnifiedStep, prev_rows, scale_constants
from .vqvae import FhatDecoder

# Fed by the runtime at every scale (one tensor each), in graph order. Tunables are per row (B,).
STEP_FEEDS = ["label", "f_hat", "noise", "guidance", "temperature", "top_k", "top_p", "beta", "past_kv",
              "prev_logits", "forced", "force", "smooth", "gumbel"]
# Per-scale constants: stored in scale_consts.npz, bound by the runtime's backends.
SCALE_CONSTS = ["scale_first", "scale_level", "scale_pos", "scale_down", "scale_up", "scale_dse",
                "scale_phi", "scale_t"]
STEP_OUTPUTS = ["tokens", "logits", "logits_cfg", "f_hat_out", "new_kv"]
# The step graph's dynamic axes (input -> axis -> dim): n = this scale's tokens, m = the
# previous scale's, Lp = the past tokens; every other input axis is static.
DYNAMIC_AXES = dict(noise={1: "n"}, past_kv={0: "Lp"}, prev_logits={1: "m"}, forced={1: "n"}, gumbel={1: "n"},
                    scale_pos={0: "n"}, scale_down={0: "n"}, scale_up={1: "n"}, scale_dse={0: "n", 1: "m"})


@dataclass(frozen=True)
class StepComponent:
    cfg: VARConfig
    batch: int
    spec: StepSpec
    name: str = "step"
    file: str = "step_all.onnx"
    consts_file: str = "scale_consts.npz"

    @property
    def inputs(self) -> List[str]:
        return STEP_FEEDS + SCALE_CONSTS

    @property
    def outputs(self) -> List[str]:
        return STEP_OUTPUTS

    def module(self, var, vae) -> torch.nn.Module:
        return UnifiedStep(var, vae, self.spec)

    def example_scale(self) -> int:
        """The scale traced at export: n, m and Lp all > 1, so no axis is specialised to 1."""
        return min(3, self.cfg.num_scales - 1)

    def scale_consts(self, k: int):
        return scale_constants(self.cfg, self.spec.transform, k)

    def profile(self, k: int) -> Dict[str, List[int]]:
        """Every input's shape at scale k (TensorRT: min = opt = max)."""
        c, B = self.cfg, self.batch
        b, e = c.begin_ends[k]
        P = c.patch_nums[-1]
        n, m = e - b, prev_rows(c, k)
        return dict(label=[B], f_hat=[B, c.Cvae, P, P], noise=[B, n], guidance=[B], temperature=[B], top_k=[B],
                    top_p=[B], beta=[B], past_kv=[b, c.depth, 2, 2 * B, c.num_heads, c.head_dim],
                    prev_logits=[B, m, c.V], forced=[B, n], force=[B], smooth=[B], gumbel=[B, n, c.V],
                    # the scale constants (graphs.unified.scale_constants)
                    scale_first=[1], scale_level=[1], scale_pos=[n], scale_down=[n, P * P], scale_up=[P * P, n],
                    scale_dse=[n, m], scale_phi=[c.vae.share_quant_resi], scale_t=[1])

    def output_shapes(self, k: int) -> Dict[str, List[int]]:
        c, B = self.cfg, self.batch
        n, P = c.patch_nums[k] ** 2, c.patch_nums[-1]
        return dict(tokens=[B, n], logits=[B, n, c.V], logits_cfg=[B, n, c.V], f_hat_out=[B, c.Cvae, P, P],
                    new_kv=[n, c.depth, 2, 2 * B, c.num_heads, c.head_dim])

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
        return sorted(DYNAMIC_AXES)


@dataclass(frozen=True)
class DecoderComponent:
    cfg: VARConfig
    batch: int
    name: str = "decoder"
    file: str = "decoder.onnx"
    inputs = ("f_hat",)
    outputs = ("image",)

    def module(self, var, vae) -> torch.nn.Module:
        return FhatDecoder(vae)

    def example_feeds(self) -> Dict[str, torch.Tensor]:
        P = self.cfg.patch_nums[-1]
        return dict(f_hat=torch.zeros(self.batch, self.cfg.Cvae, P, P))
