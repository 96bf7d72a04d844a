"""Bitwise tokens (DESIGN.md, "Infinity"): CFG, SSG with a DSE prior, per-bit
sampling from supplied uniforms, bits -> VAE codes.

The head gives V = 2·d logits per position: channel 2j + v is value v of bit j. Each of these
V channels is a spatial map, so SSG and DSE apply to them exactly as to VAR's V logit maps:

    g_k      = w_k·l_cond + (1 − w_k)·l_uncond            (official CFG on logits)
    prior_k  = DSE(g_{k−1})  per channel, (h_{k−1}, w_{k−1}) -> (h_k, w_k)
    l_k      = g_k + beta_k·(g_k − prior_k)               (k ≥ 1; scale 0 unchanged)
    bit      ~ softmax(l_k[2j : 2j+2] / tau_k), top-k / top-p over the two values, one u per bit

SSG on the pair equals SSG on the logit difference δ = l[2j+1] − l[2j] (the only thing the
pair's softmax sees), because DSE is linear: δ' = δ + beta·(δ − DSE(δ_prev)).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .dse import dse_fft
from .sampling import sample_with_support


def cfg_combine(lg_2BnV: torch.Tensor, w: float) -> torch.Tensor:
    """The official logit CFG: w·cond + (1 − w)·uncond (rows [:B] cond, [B:] uncond)."""
    B = lg_2BnV.shape[0] // 2
    return w * lg_2BnV[:B] + (1 - w) * lg_2BnV[B:]


def bit_prior(prev_BnV: torch.Tensor, src: Tuple[int, int], dst: Tuple[int, int], transform: str = "dct") -> torch.Tensor:
    """DSE of the previous scale's CFG logits, every one of the V channels alike: B n_src V -> B n_dst V."""
    B, n, V = prev_BnV.shape
    if n != src[0] * src[1]:
        raise ValueError(f"{n} positions do not form the {src} grid")
    m = prev_BnV.transpose(1, 2).reshape(B, V, *src)
    return dse_fft(m, dst, transform).reshape(B, V, -1).transpose(1, 2)


def ssg(g_BnV: torch.Tensor, prior_BnV: Optional[torch.Tensor], beta: float) -> torch.Tensor:
    return g_BnV if prior_BnV is None else g_BnV + beta * (g_BnV - prior_BnV)


def sample_bits(logits_BnV: torch.Tensor, u_Bnd: torch.Tensor, tau: float, top_k: int, top_p: float) -> torch.Tensor:
    """One draw per bit from the pair (channels 2j, 2j+1): temperature, top-k over the two
    values (2 = off, 1 = greedy), top-p (2.0 = off), inverse CDF over the values sorted by
    probability. u: B n d in [0, 1). -> bits B n d (int64, 0/1)."""
    B, n, V = logits_BnV.shape
    pairs = logits_BnV.reshape(B, n * (V // 2), 2)
    t = torch.as_tensor(tau, dtype=pairs.dtype)
    bits, _ = sample_with_support(pairs, u_Bnd.reshape(B, -1), t, torch.as_tensor(top_k), torch.as_tensor(top_p), 2)
    return bits.reshape(B, n, V // 2)


def bits_to_grid(bits_Bnd: torch.Tensor, hw: Tuple[int, int], patchify: bool) -> torch.Tensor:
    """Token bits -> VAE-position bits B d H W. With spatial patchify a token's 4d channels are
    a 2x2 block of d-channel positions (official pixel_shuffle order)."""
    B, n, d = bits_Bnd.shape
    x = bits_Bnd.transpose(1, 2).reshape(B, d, *hw)
    return F.pixel_shuffle(x, 2) if patchify else x


def grid_to_tokens(codes_BdHW: torch.Tensor, patchify: bool) -> torch.Tensor:
    """VAE-position codes B d H W -> token inputs B n d_vae (pixel_unshuffle with patchify)."""
    x = F.pixel_unshuffle(codes_BdHW, 2) if patchify else codes_BdHW
    return x.flatten(2).transpose(1, 2)


def resize_codes(codes_BdHW: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """The official `trilinear` over (1, H, W), which with a time axis of 1 is bilinear
    (half-pixel centres, no antialiasing), up and down alike."""
    if tuple(codes_BdHW.shape[-2:]) == tuple(size):
        return codes_BdHW
    return F.interpolate(codes_BdHW, size=size, mode="bilinear", align_corners=False)
