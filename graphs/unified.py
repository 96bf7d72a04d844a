"""One step graph for all K scales (dynamic token axis), for TensorRT's one-engine layout.

The ten static graphs of graphs.step differ only in shapes and in a few per-scale constants.
Here those constants become inputs (`scale_*`, stored once in the artifacts' scale_consts.npz
and bound by the runtime), so one graph with three dynamic axes serves every scale:

    n   tokens of this scale (pn^2)         noise, scale_pos, scale_down, scale_up, logits, new_kv
    m   tokens of the previous scale        prev_logits, scale_dse       (k = 0: 1, a zero prior)
    Lp  past tokens (sum of earlier n)      past_kv                      (k = 0: 0, empty)

The maps are handled flattened so no shape needs sqrt(n): the resampling and DSE operators
are dense 2-D matrices (kron of the per-axis ones). Scale 0 runs the same graph: `scale_first`
selects the class-token path, its DSE matrix and beta are zero, and its past is empty.
TensorRT builds one optimization profile per scale with min = opt = max from these shapes.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np
import torch
import torch.nn as nn

from .config import VARConfig
from .dse import dse_matrix
from .resample import area_matrix, bicubic_matrix, kron2d
from .sampling import sample
from .step import OUTPUT_NAMES, StepSpec, blocks_with_cache, var_codebook
from .var import VAR
from .vqvae import VQVAE

SCALE_CONST_NAMES = ["scale_first", "scale_level", "scale_pos", "scale_down", "scale_up", "scale_dse",
                     "scale_phi", "scale_t"]
UNIFIED_INPUTS = ["label", "f_hat", "noise", "cfg", "temperature", "top_k", "top_p", "beta",
                  "past_kv", "prev_logits"] + SCALE_CONST_NAMES
UNIFIED_OUTPUTS = OUTPUT_NAMES


def _phis(vae: VQVAE) -> List[nn.Module]:
    return list(vae.quantize.quant_resi.qresi_ls)


def scale_constants(cfg: VARConfig, vae: VQVAE, transform: str, k: int) -> Dict[str, np.ndarray]:
    """The per-scale inputs of the unified graph (float32 / int64 numpy arrays)."""
    pn, P = cfg.patch_nums[k], cfg.patch_nums[-1]
    b, e = cfg.begin_ends[k]
    qr = vae.quantize.quant_resi
    phi = np.zeros(len(_phis(vae)), np.float32)
    phi[qr.index(k, cfg.num_scales)] = 1.0
    if k == 0:
        dse = np.zeros((pn * pn, 1))
    else:
        src = cfg.patch_nums[k - 1]
        dse = dse_matrix((src, src), (pn, pn), transform)
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


def prev_rows(cfg: VARConfig, k: int) -> int:
    """m: rows of prev_logits the unified graph takes at scale k (1 zero row at k = 0)."""
    return 1 if k == 0 else cfg.patch_nums[k - 1] ** 2


class UnifiedStep(nn.Module):
    """Same arithmetic as graphs.step.ScaleStep (resample='matrix', dse='folded'), any scale."""

    def __init__(self, var: VAR, vae: VQVAE, spec: StepSpec):
        super().__init__()
        self.var, self.vae, self.spec = var, vae, spec
        self.phis = nn.ModuleList(_phis(vae))
        self.P = var.cfg.patch_nums[-1]

    def forward(self, label, f_hat, noise, cfg, temperature, top_k, top_p, beta, past_kv, prev_logits,
                scale_first, scale_level, scale_pos, scale_down, scale_up, scale_dse, scale_phi, scale_t):
        var, dt = self.var, self.spec.dtype
        B = label.shape[0]
        cond = var.cond(label)                                                  # 2B D
        lvl_pos = (var.lvl_embed(scale_level) + var.pos_1LC[0][scale_pos]).unsqueeze(0)   # 1 n C
        f_flat = f_hat.flatten(2).transpose(1, 2)                               # B P² Cv
        x_word = var.word_embed((scale_down @ f_flat).to(var.word_embed.weight.dtype))
        x_word = torch.cat((x_word, x_word), dim=0)                             # 2B n C
        x_first = cond.unsqueeze(1) + var.pos_start[:, :1]                      # 2B 1 C (broadcast over n)
        x = torch.where(scale_first > 0.5, x_first, x_word) + lvl_pos
        h, new_kv = blocks_with_cache(var, x, cond, past_kv, dt)                # n depth 2 2B H hd
        lg = var.logits(h, cond.to(dt))
        t = cfg * scale_t
        logits_cfg = (1 + t) * lg[:B] - t * lg[B:]
        logits = logits_cfg + beta * (logits_cfg - scale_dse @ prev_logits)
        tokens = sample(logits, noise, temperature, top_k, top_p, self.spec.k_max)
        emb = var_codebook(self.vae)[tokens]                                    # B n Cv
        up = (scale_up @ emb).transpose(1, 2).reshape(B, -1, self.P, self.P)   # B Cv P P
        ph = torch.stack([m(up) for m in self.phis], dim=0)                     # nphi B Cv P P
        f_hat_out = f_hat + (scale_phi.view(-1, 1, 1, 1, 1) * ph).sum(dim=0)
        return tokens, logits, logits_cfg, f_hat_out, new_kv.to(dt)


def unified_feeds(cfg: VARConfig, vae: VQVAE, transform: str, k: int, batch: int,
                  kv_dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """Example inputs at scale k (used for export and tests)."""
    B = batch
    b, e = cfg.begin_ends[k]
    feeds = dict(label=torch.arange(B, dtype=torch.int64) % cfg.num_classes,
                 f_hat=torch.zeros(B, cfg.Cvae, cfg.patch_nums[-1], cfg.patch_nums[-1]),
                 noise=torch.rand(B, e - b), cfg=torch.tensor([1.5]), temperature=torch.tensor([1.0]),
                 top_k=torch.tensor([1], dtype=torch.int64), top_p=torch.tensor([0.96]),
                 beta=torch.tensor([0.0]),
                 past_kv=torch.zeros(b, cfg.depth, 2, 2 * B, cfg.num_heads, cfg.head_dim, dtype=kv_dtype),
                 prev_logits=torch.zeros(B, prev_rows(cfg, k), cfg.V))
    feeds.update({n: torch.from_numpy(v) for n, v in scale_constants(cfg, vae, transform, k).items()})
    return feeds


def dynamic_shapes(cfg: VARConfig):
    """torch.export dims: n (tokens), m (previous tokens), Lp (past)."""
    from torch.export import Dim
    P2 = cfg.patch_nums[-1] ** 2
    n = Dim("n", min=1, max=P2)
    m = Dim("m", min=1, max=P2)
    lp = Dim("Lp", min=0, max=cfg.L)
    shapes = {name: None for name in UNIFIED_INPUTS}
    shapes.update(noise={1: n}, past_kv={0: lp}, prev_logits={1: m}, scale_pos={0: n},
                  scale_down={0: n}, scale_up={1: n}, scale_dse={0: n, 1: m})
    return shapes
