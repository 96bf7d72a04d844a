"""The exported graphs' inputs and outputs as plain data (no torch): names, dtypes by name,
per-scale shapes, dynamic axes and the per-scale constants. The export's components
(graphs.components) and the manifest's schema (contract.manifest) both read them here, so a
runtime can check artifacts and run them without importing torch (DESIGN.md, "Start-up").

    StepIO      step_all.onnx: the feeds of every scale, the `scale_*` constants, the outputs
    DecoderIO   decoder.onnx: f_hat -> image
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import numpy as np

from .config import VARConfig
from .dse import dse_matrix
from .resample import area_matrix, bicubic_matrix, kron2d

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
# Element types by name (the manifest's names; numpy's too). Integer inputs are int64; past_kv
# and new_kv have the KV cache's dtype; everything else is float32.
INT64 = ("label", "top_k", "forced", "tokens", "scale_level", "scale_pos")
KV = ("past_kv", "new_kv")


def prev_rows(cfg: VARConfig, k: int) -> int:
    """m: rows of prev_logits at scale k (one zero row at k = 0)."""
    return 1 if k == 0 else cfg.patch_nums[k - 1] ** 2


def scale_constants(cfg: VARConfig, transform: str, k: int) -> Dict[str, np.ndarray]:
    """The per-scale `scale_*` inputs (float32 / int64 numpy arrays)."""
    pn, P = cfg.patch_nums[k], cfg.patch_nums[-1]
    b, e = cfg.begin_ends[k]
    phi = np.zeros(cfg.vae.share_quant_resi, np.float32)
    phi[cfg.vae.phi_index(k)] = 1.0
    dse = np.zeros((pn * pn, 1)) if k == 0 else dse_matrix((cfg.patch_nums[k - 1],) * 2, (pn, pn), transform)
    up = np.eye(P * P) if k == cfg.num_scales - 1 else kron2d(bicubic_matrix(pn, P), bicubic_matrix(pn, P))
    f32 = np.float32
    return dict(scale_first=np.array([1.0 if k == 0 else 0.0], f32),
                scale_level=np.array([k], np.int64),
                scale_pos=np.arange(b, e, dtype=np.int64),
                scale_down=kron2d(area_matrix(P, pn), area_matrix(P, pn)).astype(f32),
                scale_up=up.astype(f32),
                scale_dse=dse.astype(f32),
                scale_phi=phi,
                scale_t=np.array([k / (cfg.num_scales - 1)], f32))


@dataclass(frozen=True)
class StepIO:
    """The step graph's contract at batch `batch` with a KV cache of dtype `kv` (a name)."""
    cfg: VARConfig
    batch: int
    kv: str = "float32"

    @property
    def inputs(self) -> List[str]:
        return STEP_FEEDS + SCALE_CONSTS

    @property
    def outputs(self) -> List[str]:
        return STEP_OUTPUTS

    def dtype(self, name: str) -> str:
        """The element type of an input or output, by name."""
        return "int64" if name in INT64 else self.kv if name in KV else "float32"

    def profile(self, k: int) -> Dict[str, List[int]]:
        """Every input's shape at scale k (TensorRT: min = opt = max)."""
        c, B = self.cfg, self.batch
        b, e = c.begin_ends[k]
        P = c.patch_nums[-1]
        n, m = e - b, prev_rows(c, k)
        return dict(label=[B], f_hat=[B, c.Cvae, P, P], noise=[B, n], guidance=[B], temperature=[B], top_k=[B],
                    top_p=[B], beta=[B], past_kv=[b, c.depth, 2, 2 * B, c.num_heads, c.head_dim],
                    prev_logits=[B, m, c.V], forced=[B, n], force=[B], smooth=[B], gumbel=[B, n, c.V],
                    # the scale constants (scale_constants above)
                    scale_first=[1], scale_level=[1], scale_pos=[n], scale_down=[n, P * P], scale_up=[P * P, n],
                    scale_dse=[n, m], scale_phi=[c.vae.share_quant_resi], scale_t=[1])

    def output_shapes(self, k: int) -> Dict[str, List[int]]:
        c, B = self.cfg, self.batch
        n, P = c.patch_nums[k] ** 2, c.patch_nums[-1]
        return dict(tokens=[B, n], logits=[B, n, c.V], logits_cfg=[B, n, c.V], f_hat_out=[B, c.Cvae, P, P],
                    new_kv=[n, c.depth, 2, 2 * B, c.num_heads, c.head_dim])

    @property
    def dynamic_inputs(self) -> List[str]:
        return sorted(DYNAMIC_AXES)


@dataclass(frozen=True)
class DecoderIO:
    cfg: VARConfig
    batch: int
    inputs = ("f_hat",)
    outputs = ("image",)

    def dtype(self, name: str) -> str:
        return "float32"

    def f_hat_shape(self) -> List[int]:
        P = self.cfg.patch_nums[-1]
        return [self.batch, self.cfg.Cvae, P, P]

    def image_shape(self) -> List[int]:
        """The decoded image: the VQVAE upsamples by 2 per level after the first."""
        side = self.cfg.patch_nums[-1] * 2 ** (len(self.cfg.vae.ch_mult) - 1)
        return [self.batch, 3, side, side]
