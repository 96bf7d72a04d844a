"""The exported step: one graph for all K scales (step_all.onnx), dynamic token axes.

The scales differ only in shapes and a few constants. Those constants are inputs (`scale_*`,
stored once in the artifacts' scale_consts.npz and bound by the runtime), so one graph with
three dynamic axes serves every scale:

    n   tokens of this scale (pn^2)         noise, scale_pos, scale_down, scale_up, logits, new_kv
    m   tokens of the previous scale        prev_logits, scale_dse       (k = 0: 1, a zero prior)
    Lp  past tokens (sum of earlier n)      past_kv                      (k = 0: 0, empty)

Maps stay flattened so no shape needs sqrt(n): resampling and DSE are dense 2-D matrices (kron
of the exact per-axis ones; DSE folded into one matrix). Scale 0 runs the same graph:
`scale_first` selects the class-token path, its DSE row is zero and beta 0, its past empty.
The tail (CFG -> SSG -> sample -> codebook) is graphs.step.step_tail, shared with the reference.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .step import StepSpec, blocks_with_cache, codebook, step_tail
from .var import VAR
from .vqvae import VQVAE


class UnifiedStep(nn.Module):
    """Same arithmetic as graphs.step.ScaleStep with matrices instead of FFT/interpolate."""

    def __init__(self, var: VAR, vae: VQVAE, spec: StepSpec):
        super().__init__()
        self.var, self.vae, self.spec = var, vae, spec
        self.phis = nn.ModuleList(vae.quantize.quant_resi.qresi_ls)
        self.P = var.cfg.patch_nums[-1]

    def forward(self, label, f_hat, noise, guidance, temperature, top_k, top_p, beta, past_kv, prev_logits,
                forced, force, smooth, gumbel, scale_first, scale_level, scale_pos, scale_down, scale_up, scale_dse, scale_phi, scale_t):
        var = self.var
        B = label.shape[0]
        cond = var.cond(label)                                                  # 2B D
        lvl_pos = (var.lvl_embed(scale_level) + var.pos_1LC[0][scale_pos]).unsqueeze(0)   # 1 n C
        f_flat = f_hat.flatten(2).transpose(1, 2)                               # B P² Cv
        x_word = var.word_embed((scale_down @ f_flat).to(var.word_embed.weight.dtype))
        x_word = torch.cat((x_word, x_word), dim=0)                             # 2B n C
        x_first = cond.unsqueeze(1) + var.pos_start[:, :1]                      # 2B 1 C (broadcast over n)
        x = torch.where(scale_first > 0.5, x_first, x_word) + lvl_pos
        h, new_kv = blocks_with_cache(var, x, cond, past_kv, self.spec.dtype)   # n depth 2 2B H hd
        lg = var.logits(h, cond.to(self.spec.dtype))
        beta = beta * (1 - scale_first)                                        # scale 0 has no prior
        tokens, logits, logits_cfg, h_BnC = step_tail(lg, scale_t, guidance, beta, scale_dse @ prev_logits, noise,
                                                      temperature, top_k, top_p, self.spec.k_max, codebook(self.vae),
                                                      forced, force, smooth, gumbel)
        up = (scale_up @ h_BnC).transpose(1, 2).reshape(B, -1, self.P, self.P)  # B Cv P P
        ph = torch.stack([m(up) for m in self.phis], dim=0)                     # nphi B Cv P P
        f_hat_out = f_hat + (scale_phi.view(-1, 1, 1, 1, 1) * ph).sum(dim=0)
        return tokens, logits, logits_cfg, f_hat_out, new_kv
