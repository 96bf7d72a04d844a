"""One VAR scale as a module: the unit that is exported (one graph per scale) and that the
eager backend runs.

    f_hat ──area↓──word_embed──┐            (k = 0: class emb + pos_start instead)
                               ▼
    past_kv ──► blocks (AdaLN, attention over past + this scale) ──► new_kv
                               ▼
                          head → logits (2B rows)
                               ▼
    CFG: l = (1+t) l_cond − t l_uncond, t = cfg·k/(K−1)        ──► logits_cfg
                               ▼
    SSG: l + beta·(l − DSE(prev_logits))   (k ≥ 1)              ──► logits
                               ▼
    sample(noise) ──► tokens ──► codebook ──bicubic↑──phi──► f_hat + h ──► f_hat_out

KV layout (shared with the runtime): past_kv is (L_past, depth, 2, 2B, H, hd) so that the
prefix of the preallocated cache is one contiguous view, and new_kv (n_k, depth, 2, 2B, H, hd)
is the next contiguous slice.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import VARConfig
from .dse import dse_chain_matrices, dse_fft, dse_matrix
from .resample import area_matrix, bicubic_matrix
from .sampling import sample
from .var import VAR
from .vqvae import VQVAE

DSE_MODES = ("fft", "folded", "chain")
RESAMPLE_MODES = ("interp", "matrix")


@dataclass(frozen=True)
class StepSpec:
    """How a scale step is built. Eager reference: dse='fft', resample='interp'.
    Exported: dse='folded' (or 'chain'), resample='matrix'."""
    transform: str = "dct"
    dse: str = "fft"
    resample: str = "interp"
    k_max: int = 900                 # TopK K baked in (0 = bisection sampler)
    dtype: torch.dtype = torch.float32   # transformer + KV precision; CFG/SSG/DSE stay fp32

    def __post_init__(self):
        if self.dse not in DSE_MODES:
            raise ValueError(f"dse must be one of {DSE_MODES}")
        if self.resample not in RESAMPLE_MODES:
            raise ValueError(f"resample must be one of {RESAMPLE_MODES}")


def input_names(k: int) -> List[str]:
    names = ["label", "f_hat", "noise", "cfg", "temperature", "top_k", "top_p"]
    if k > 0:
        names += ["past_kv", "prev_logits", "beta"]
    return names


OUTPUT_NAMES = ["tokens", "logits", "logits_cfg", "f_hat_out", "new_kv"]


class ScaleStep(nn.Module):
    def __init__(self, var: VAR, vae: VQVAE, k: int, spec: StepSpec):
        super().__init__()
        cfg: VARConfig = var.cfg
        self.var, self.vae, self.k, self.spec = var, vae, k, spec
        self.K, self.pn = cfg.num_scales, cfg.patch_nums[k]
        self.n = self.pn ** 2
        P = cfg.patch_nums[-1]
        self.P = P
        self.phi = vae.phi(k)
        self.t_ratio = k / (self.K - 1)
        f32 = dict(dtype=torch.float32)
        if spec.resample == "matrix":
            if k > 0:
                self.register_buffer("down", torch.tensor(area_matrix(P, self.pn), **f32), persistent=False)
            self.register_buffer("up", torch.tensor(bicubic_matrix(self.pn, P), **f32), persistent=False)
        if k > 0:
            src = cfg.patch_nums[k - 1]
            if spec.dse == "folded":
                M = dse_matrix((src, src), (self.pn, self.pn), spec.transform)
                self.register_buffer("dse_M", torch.tensor(M, **f32), persistent=False)
            elif spec.dse == "chain":
                for name, m in dse_chain_matrices((src, src), (self.pn, self.pn), spec.transform).items():
                    self.register_buffer(f"dse_{name}", torch.tensor(m, **f32), persistent=False)

    # ------------------------------------------------------------------ pieces
    def _down(self, f_hat):                       # B Cv P P -> B n Cv
        if self.spec.resample == "matrix":
            x = self.down @ f_hat @ self.down.T
        else:
            x = F.interpolate(f_hat, size=(self.pn, self.pn), mode="area")
        return x.flatten(2).transpose(1, 2)

    def _up(self, h):                             # B Cv pn pn -> B Cv P P
        if self.k == self.K - 1:
            return h
        if self.spec.resample == "matrix":
            return self.up @ h @ self.up.T
        return F.interpolate(h, size=(self.P, self.P), mode="bicubic")

    def prior(self, prev_logits: torch.Tensor) -> torch.Tensor:
        """DSE of the previous scale's CFG logits: B n_{k-1} V -> B n_k V."""
        if self.spec.dse == "folded":
            return self.dse_M @ prev_logits                               # (n, n') @ B n' V
        if self.spec.dse == "chain":
            I = self.dse_interp @ prev_logits
            Sr, Si = self.dse_fwd_re @ I, self.dse_fwd_im @ I
            keep = self.dse_keep.unsqueeze(-1)
            Sr = Sr * keep + self.dse_coarse_re @ prev_logits
            Si = Si * keep + self.dse_coarse_im @ prev_logits
            return self.dse_inv_re @ Sr - self.dse_inv_im @ Si
        B, n_prev, V = prev_logits.shape
        src = int(round(n_prev ** 0.5))
        m = prev_logits.transpose(1, 2).reshape(B, V, src, src)
        out = dse_fft(m, (self.pn, self.pn), self.spec.transform)
        return out.reshape(B, V, self.n).transpose(1, 2)

    # ------------------------------------------------------------------ forward
    def forward(self, label, f_hat, noise, cfg, temperature, top_k, top_p,
                past_kv: Optional[torch.Tensor] = None, prev_logits: Optional[torch.Tensor] = None,
                beta: Optional[torch.Tensor] = None):
        var = self.var
        B = label.shape[0]
        cond = var.cond(label)                                           # 2B D
        if self.k == 0:
            x = var.first_tokens(cond)
        else:
            x = var.next_tokens(self.k, self._down(f_hat).to(var.word_embed.weight.dtype))
        h, new_kv = blocks_with_cache(var, x, cond, past_kv, self.spec.dtype)
        lg = var.logits(h, cond.to(self.spec.dtype))                    # 2B n V, fp32
        t = cfg * self.t_ratio
        logits_cfg = (1 + t) * lg[:B] - t * lg[B:]
        logits = logits_cfg
        if self.k > 0:
            logits = logits_cfg + beta * (logits_cfg - self.prior(prev_logits))
        tokens = sample(logits, noise, temperature, top_k, top_p, self.spec.k_max)   # B n
        emb = var_codebook(self.vae)[tokens]                                   # B n Cv
        h_BChw = emb.transpose(1, 2).reshape(B, -1, self.pn, self.pn)
        f_hat_out = f_hat + self.phi(self._up(h_BChw))
        return tokens, logits, logits_cfg, f_hat_out, new_kv.to(self.spec.dtype)


def blocks_with_cache(var: VAR, x, cond, past_kv: Optional[torch.Tensor], dt: torch.dtype):
    """The transformer blocks over the cache layout: past_kv (Lp, depth, 2, 2B, H, hd) or None
    -> (hidden states, new_kv (n, depth, 2, 2B, H, hd))."""
    past = None
    if past_kv is not None:
        past = [(past_kv[:, i, 0].permute(1, 2, 0, 3), past_kv[:, i, 1].permute(1, 2, 0, 3))
                for i in range(var.cfg.depth)]                      # each 2B H Lp hd
    x, ks, vs = var.blocks_forward(x.to(dt), cond.to(dt), past)
    new_kv = torch.stack([torch.stack((k, v), dim=0) for k, v in zip(ks, vs)], dim=0)   # depth 2 2B H n hd
    return x, new_kv.permute(4, 0, 1, 2, 3, 5).contiguous()       # n depth 2 2B H hd


def var_codebook(vae: VQVAE) -> torch.Tensor:
    return vae.quantize.embedding.weight


def build_steps(var: VAR, vae: VQVAE, spec: StepSpec) -> List[ScaleStep]:
    return [ScaleStep(var, vae, k, spec) for k in range(var.cfg.num_scales)]
