"""One VAR scale, written once: the eager reference module (`ScaleStep`, one per scale) and
the pieces it shares with the exported step (graphs.unified.UnifiedStep).

    f_hat ──area↓──word_embed──┐            (k = 0: class emb + pos_start instead)
                               ▼
    past_kv ──► blocks (AdaLN, attention over past + this scale) ──► new_kv
                               ▼
                          head → logits (2B rows)
                               ▼          ┌─────────────── step_tail (shared) ───────────────┐
    CFG: l = (1+t) l_cond − t l_uncond, t = guidance·k/(K−1)        ──► logits_cfg
    SSG: l + beta·(l − prior),  prior = DSE(prev_logits)  (k ≥ 1)   ──► logits
    sample(noise) ──► tokens                                         ──► tokens (own draw)
    used = force ? forced : tokens          (teacher forcing, per row, for parity)
    h = smooth ? gumbel_softmax(kept logits·(1+r), tau_r) @ codebook   (official more_smooth)
               : codebook[used]                                      ──► h (B n Cv)
                               ▼          └──────────────────────────────────────────────────┘
    f_hat_out = f_hat + phi_k(bicubic↑(h))           (no upsampling at the last scale)

Every tunable is one value per row (B,): guidance, beta, temperature, top_k, top_p, force,
smooth; noise (B n) and gumbel (B n V) are drawn per row on the host.

The reference computes DSE with torch.fft and resamples with F.interpolate; the exported step
uses the folded DSE matrix and exact resampling matrices. Same tail, same semantics.

KV layout (shared with the runtime): past_kv is (L_past, depth, 2, 2B, H, hd) so that the
prefix of the preallocated cache is one contiguous view, and new_kv (n_k, depth, 2, 2B, H, hd)
is the next contiguous slice.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import DEFAULT_TOP_K, VARConfig
from .dse import TRANSFORMS, dse_fft
from .sampling import sample_with_support
from .var import VAR
from .vqvae import VQVAE


@dataclass(frozen=True)
class StepSpec:
    """What a step bakes in: the DSE transform, TopK's K (0 = bisection sampler) and the
    transformer + KV precision (CFG/SSG/DSE/sampling stay fp32)."""
    transform: str = "dct"
    k_max: int = DEFAULT_TOP_K
    dtype: torch.dtype = torch.float32
    autocast: Optional[torch.dtype] = None     # eager only: the transformer under torch.autocast (fp32 weights)

    def __post_init__(self):
        if self.transform not in TRANSFORMS:
            raise ValueError(f"transform must be one of {TRANSFORMS}")
        if self.autocast is not None and (self.dtype != torch.float32 or
                                          self.autocast not in (torch.bfloat16, torch.float16)):
            raise ValueError("autocast runs fp32 weights in bfloat16 or float16")

    def transformer(self, device: torch.device):
        """The context the transformer runs in: torch.autocast in `autocast` (as the official code
        is run in bf16: matmuls in bf16, norms and softmax in fp32), else nothing."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast)


def blocks_with_cache(var: VAR, x, cond, past_kv: Optional[torch.Tensor], dt: torch.dtype):
    """The transformer blocks over the cache layout: past_kv (Lp, depth, 2, 2B, H, hd) or None
    -> (hidden states, new_kv (n, depth, 2, 2B, H, hd))."""
    past = None
    if past_kv is not None:
        past = [(past_kv[:, i, 0].permute(1, 2, 0, 3), past_kv[:, i, 1].permute(1, 2, 0, 3))
                for i in range(var.cfg.depth)]                      # each 2B H Lp hd
    x, ks, vs = var.blocks_forward(x.to(dt), cond.to(dt), past)
    new_kv = torch.stack([torch.stack((k, v), dim=0) for k, v in zip(ks, vs)], dim=0)   # depth 2 2B H n hd
    return x, new_kv.permute(4, 0, 1, 2, 3, 5).contiguous().to(dt)  # n depth 2 2B H hd


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, 1, 1)                      # per-row values (B,) -> B 1 1


def smooth_tau(ratio):
    """The official more_smooth Gumbel-softmax temperature at scale ratio r = k/(K-1):
    max(0.27 (1 - 0.95 r), 0.005), sharper at finer scales. A tensor ratio gives a tensor (as the
    exported graph computes it, fp32), a number a float (the parity bound's arithmetic)."""
    if isinstance(ratio, torch.Tensor):
        return torch.clamp(0.27 * (1 - 0.95 * ratio), min=0.005)
    return max(0.27 * (1 - 0.95 * ratio), 0.005)


def step_tail(lg_2BnV: torch.Tensor, ratio, guidance, beta, prior_BnV: Optional[torch.Tensor],
              noise, temperature, top_k, top_p, k_max: int, codebook_VC: torch.Tensor,
              forced, force, smooth, gumbel) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """CFG -> SSG -> sample -> f_hat input. `ratio` = k/(K-1); `prior_BnV` None: no SSG (scale 0
    of the reference). Returns tokens (B n, this step's own draw), logits (after SSG),
    logits_cfg (B n V, fp32) and h (B n Cv: the codebook vectors that update f_hat)."""
    B = lg_2BnV.shape[0] // 2
    t = _rows(guidance) * ratio
    logits_cfg = (1 + t) * lg_2BnV[:B] - t * lg_2BnV[B:]
    logits = logits_cfg if prior_BnV is None else logits_cfg + _rows(beta) * (logits_cfg - prior_BnV)
    T = _rows(temperature)
    tokens, keep = sample_with_support(logits, noise, T, _rows(top_k), _rows(top_p), k_max)
    used = torch.where(force.reshape(-1, 1) > 0.5, forced, tokens)
    # official more_smooth: Gumbel-softmax over the kept logits, sharper at finer scales
    tau = smooth_tau(torch.as_tensor(ratio, dtype=torch.float32))
    soft = ((torch.where(keep, logits / T, -torch.inf) * (1 + ratio) + gumbel) / tau).softmax(dim=-1)
    h = torch.where(_rows(smooth) > 0.5, soft @ codebook_VC, codebook_VC[used])
    return tokens, logits, logits_cfg, h


def codebook(vae: VQVAE) -> torch.Tensor:
    return vae.quantize.embedding.weight


class ScaleStep(nn.Module):
    """The eager reference at scale k (torch.fft DSE, F.interpolate resampling). It takes the
    step graph's feeds; at k = 0 it ignores past_kv, prev_logits and beta (scale 0 has no prior)."""

    def __init__(self, var: VAR, vae: VQVAE, k: int, spec: StepSpec):
        super().__init__()
        cfg: VARConfig = var.cfg
        self.var, self.vae, self.k, self.spec = var, vae, k, spec
        self.K, self.pn, self.P = cfg.num_scales, cfg.patch_nums[k], cfg.patch_nums[-1]
        self.phi = vae.phi(k)
        self.t_ratio = k / (self.K - 1)

    def prior(self, prev_logits: torch.Tensor) -> torch.Tensor:
        """DSE of the previous scale's CFG logits: B n_{k-1} V -> B n_k V."""
        B, n_prev, V = prev_logits.shape
        src = int(round(n_prev ** 0.5))
        m = prev_logits.transpose(1, 2).reshape(B, V, src, src)
        return dse_fft(m, (self.pn, self.pn), self.spec.transform).reshape(B, V, -1).transpose(1, 2)

    def forward(self, label, f_hat, noise, guidance, temperature, top_k, top_p, beta, past_kv, prev_logits,
                forced, force, smooth, gumbel):
        var, k = self.var, self.k
        B = label.shape[0]
        with self.spec.transformer(label.device):
            cond = var.cond(label)                                        # 2B D
            if k == 0:
                x, past_kv = var.first_tokens(cond), None
            else:
                down = F.interpolate(f_hat, size=(self.pn, self.pn), mode="area").flatten(2).transpose(1, 2)
                x = var.next_tokens(k, down.to(var.word_embed.weight.dtype))
            h, new_kv = blocks_with_cache(var, x, cond, past_kv, self.spec.dtype)
            lg = var.logits(h, cond.to(self.spec.dtype))                 # 2B n V
        lg, new_kv = lg.float(), new_kv.to(self.spec.dtype)              # fp32 logits; the cache's dtype
        prior = self.prior(prev_logits) if k > 0 else None
        tokens, logits, logits_cfg, h_BnC = step_tail(lg, self.t_ratio, guidance, beta, prior, noise, temperature,
                                                      top_k, top_p, self.spec.k_max, codebook(self.vae),
                                                      forced, force, smooth, gumbel)
        h_BChw = h_BnC.transpose(1, 2).reshape(B, -1, self.pn, self.pn)
        if k < self.K - 1:
            h_BChw = F.interpolate(h_BChw, size=(self.P, self.P), mode="bicubic")
        return tokens, logits, logits_cfg, f_hat + self.phi(h_BChw), new_kv


def build_steps(var: VAR, vae: VQVAE, spec: StepSpec) -> List[ScaleStep]:
    return [ScaleStep(var, vae, k, spec) for k in range(var.cfg.num_scales)]
