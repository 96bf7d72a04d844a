"""Infinity's exported modules and their eager reference (DESIGN.md, "Infinity").

    InfinityText         per request: T5 states + mask (cond rows, and a negative prompt or the
                         learned empty prompt for the uncond rows) -> cond_BD (2B C), every
                         block's cross-attention keys/values (depth 2 2B H Lt hd), the 2B mask
    InfinityUnifiedStep  one graph for every scale of every aspect ratio:

        summed (B F d) ──scale_down (bilinear ↓, pixel_unshuffle)──word_embed──┐  (k = 0: cond + pos_start)
                                                                               ▼ + lvl_embed[k]
        past_kv, text K/V, mask ──► blocks (cosine SA with RoPE = scale_cos/sin, CA, FFN) ──► new_kv
                                                                               ▼
                                                               head → bit logits (2B n V)
        CFG  g = w·cond + (1 − w)·uncond                                       ──► logits_cfg
        SSG  l = g + beta·(g − scale_dse @ prev_logits)   (k ≥ 1)              ──► logits
        bits = per-bit sample(l / tau, top-k/top-p over the pair, noise)        ──► bits (own draw)
        used = force ? forced : bits;  codes = (2·used − 1)/sqrt(d)
        summed_out = summed + scale_up @ codes (pixel_shuffle, bilinear ↑; identity at the last)

    InfinityScaleStep    the eager reference of one scale of one schedule: the same feeds, the
                         reference arithmetic (torch.fft DSE, F.interpolate, rope_tables)
    InfinityDecoder      summed (B d H W) -> BSQ decoder -> image in [0, 1]

Every tunable is one value per row (B,): cfg, tau, top_k (over the pair: 2 = off, 1 = greedy),
top_p (2.0 = off), beta, force. KV layout as VAR's: past_kv (Lp, depth, 2, 2B, H, hd).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from .bitwise import bit_prior, grid_to_tokens, resize_codes
from .infinity import Infinity, rope_tables
from .infinity_config import ScaleSchedule
from .infinity_generate import vae_codes
from .infinity_vae import BSQVAE
from .sampling import sample_with_support


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, 1, 1)


def bit_tail(lg_2BnV, cfg, beta, prior_BnV: Optional[torch.Tensor], noise, tau, top_k, top_p, forced, force):
    """CFG -> SSG -> per-bit sample -> the bits that drive the codes. -> (bits B n d, logits,
    logits_cfg, used B n d). `prior_BnV` None: no SSG."""
    B, n, V = lg_2BnV.shape[0] // 2, lg_2BnV.shape[1], lg_2BnV.shape[2]
    w = _rows(cfg)
    logits_cfg = w * lg_2BnV[:B] + (1 - w) * lg_2BnV[B:]
    logits = logits_cfg if prior_BnV is None else logits_cfg + _rows(beta) * (logits_cfg - prior_BnV)
    pairs = logits.reshape(B, n * (V // 2), 2)
    bits, _ = sample_with_support(pairs, noise.reshape(B, -1), _rows(tau), _rows(top_k), _rows(top_p), 2)
    bits = bits.reshape(B, n, V // 2)
    used = torch.where(force.reshape(-1, 1, 1) > 0.5, forced, bits)
    return bits, logits, logits_cfg, used


def blocks_with_cache(model: Infinity, x, cond, text_kv, mask_BL, rope, past_kv: Optional[torch.Tensor],
                      heads_per_chunk: int = 0):
    """Every block over the cache layout: past_kv (Lp, depth, 2, 2B, H, hd) or None -> (hidden
    states, new_kv (n, depth, 2, 2B, H, hd)). text_kv (depth, 2, 2B, H, Lt, hd)."""
    gss = model.shared_ada_lin(cond).view(-1, 1, 6, model.cfg.width)
    news = []
    for i, blk in enumerate(model.blocks):
        past = None if past_kv is None else (past_kv[:, i, 0].permute(1, 2, 0, 3), past_kv[:, i, 1].permute(1, 2, 0, 3))
        x, (k, v) = blk(x, gss, (text_kv[i, 0], text_kv[i, 1]), mask_BL, rope, past, None, heads_per_chunk)
        # each block's K/V goes straight to the cache's layout (n 2 2B H hd), so the one Concat
        # below is the graph's last op and writes the bound cache slice: no whole-scale copy
        # before a transpose (4.3 GB at infinity-2b's last scale; DESIGN.md, "Infinity")
        news.append(torch.stack((k.permute(2, 0, 1, 3), v.permute(2, 0, 1, 3)), 1))
    return x, torch.stack(news, 1)                                            # n depth 2 2B H hd


class InfinityText(nn.Module):
    """The per-request text graph. use_neg (B,): 1 = the uncond row is the negative prompt, 0 =
    the learned empty prompt `cfg_uncond` with the prompt's own mask (the official)."""

    def __init__(self, model: Infinity):
        super().__init__()
        self.model = model

    def forward(self, text, text_mask, neg_text, neg_mask, use_neg):
        m = self.model
        B = text.shape[0]
        neg = (use_neg > 0.5).reshape(B, 1)
        un_text = torch.where(neg.unsqueeze(-1), neg_text, m.cfg_uncond.unsqueeze(0).expand_as(text))
        un_mask = torch.where(neg, neg_mask, text_mask)
        t2 = torch.cat((text, un_text), 0)
        m2 = torch.cat((text_mask, un_mask), 0)
        cond, _, ca_kv = m.encode_text(t2, m2 > 0.5)
        kvs = m.text_kvs(ca_kv)                                               # depth x (k, v): 2B H Lt hd
        text_kv = torch.stack([torch.stack(kv, 0) for kv in kvs], 0)
        return cond, text_kv, m2


class InfinityUnifiedStep(nn.Module):
    """The step graph (module docstring): matrices instead of FFT / interpolate / pixel shuffles."""

    def __init__(self, model: Infinity, heads_per_chunk: int = 0):
        super().__init__()
        self.model = model
        self.bits = model.cfg.vae.bits
        self.heads_per_chunk = heads_per_chunk      # 0: every head's scores at once

    def forward(self, cond, text_kv, text_mask2, summed, noise, cfg, tau, top_k, top_p, beta, past_kv, prev_logits,
                forced, force, scale_first, scale_level, scale_cos, scale_sin, scale_down, scale_up, scale_dse):
        m = self.model
        B, d = summed.shape[0], self.bits
        P2 = scale_down.shape[0]
        n = scale_down.shape[1]
        down = scale_down.unsqueeze(0) @ summed.unsqueeze(1)                     # B P2 n d
        tok = down.permute(0, 2, 3, 1).reshape(B, n, d * P2)                     # pixel_unshuffle order
        x_word = m.next_tokens(tok)
        x_word = torch.cat((x_word, x_word), 0)                                  # 2B n C
        x_first = m.first_tokens(cond)                                           # 2B 1 C
        x = torch.where(scale_first > 0.5, x_first, x_word) + m.lvl_embed(scale_level)
        h, new_kv = blocks_with_cache(m, x, cond, text_kv, text_mask2 > 0.5, (scale_cos, scale_sin), past_kv,
                                      self.heads_per_chunk)
        lg = m.logits(h, cond)
        beta = beta * (1 - scale_first)                                          # scale 0 has no prior
        bits, logits, logits_cfg, used = bit_tail(lg, cfg, beta, scale_dse @ prev_logits, noise, tau, top_k, top_p,
                                                  forced, force)
        codes = (used.to(summed.dtype) * 2 - 1) * (1.0 / d ** 0.5)                # B n d·P2
        codes = codes.reshape(B, n, d, P2).permute(0, 3, 1, 2)                   # B P2 n d
        summed_out = summed + (scale_up.unsqueeze(0) @ codes).sum(1)            # B F d
        return bits, logits, logits_cfg, summed_out, new_kv


class InfinityScaleStep(nn.Module):
    """The eager reference of scale k of `sched`: the step graph's feeds without `scale_*`."""

    def __init__(self, model: Infinity, sched: ScaleSchedule, k: int, transform: str):
        super().__init__()
        self.model, self.sched, self.k, self.transform = model, sched, k, transform
        cfg = model.cfg
        self.final = cfg.vae_hw(sched.hw[-1])
        self.rope = rope_tables(cfg, sched, k)

    def forward(self, cond, text_kv, text_mask2, summed, noise, cfg, tau, top_k, top_p, beta, past_kv, prev_logits,
                forced, force):
        m, k, sched = self.model, self.k, self.sched
        c = m.cfg
        B, d = summed.shape[0], c.vae.bits
        hw = sched.hw[k]
        grid = summed.transpose(1, 2).reshape(B, d, *self.final)                 # B d H W
        if k == 0:
            x, past_kv = m.first_tokens(cond), None
        else:
            nxt = resize_codes(grid, c.vae_hw(hw))
            x = m.next_tokens(grid_to_tokens(nxt, c.spatial_patchify)).repeat(2, 1, 1)
        x = x + m.lvl_embed.weight[k]
        h, new_kv = blocks_with_cache(m, x, cond, text_kv, text_mask2 > 0.5, self.rope, past_kv)
        lg = m.logits(h, cond)
        prior = bit_prior(prev_logits, sched.hw[k - 1], hw, self.transform) if k > 0 else None
        bits, logits, logits_cfg, used = bit_tail(lg, cfg, beta, prior, noise, tau, top_k, top_p, forced, force)
        codes = vae_codes(used, hw, d, c.spatial_patchify)
        grid = grid + (resize_codes(codes, self.final) if k < sched.num_scales - 1 else codes)
        return bits, logits, logits_cfg, grid.flatten(2).transpose(1, 2), new_kv


class InfinityDecoder(nn.Module):
    """Summed codes (B d H W) -> image in [0, 1] (the BSQ decoder's [-1, 1], mapped)."""

    def __init__(self, vae: BSQVAE):
        super().__init__()
        self.decoder = vae.decoder

    def forward(self, summed):
        return (self.decoder(summed).clamp(-1, 1) + 1) * 0.5


def build_scale_steps(model: Infinity, sched: ScaleSchedule, transform: str) -> List[InfinityScaleStep]:
    return [InfinityScaleStep(model, sched, k, transform) for k in range(sched.num_scales)]


def example_feeds(cfg, batch: int, sched: ScaleSchedule, k: int, transform: str = "dct") -> dict:
    """Step feeds of the right shapes and dtypes at scale k (export tracing, tests)."""
    from .infinity_io import InfinityStepIO, scale_constants
    shp = InfinityStepIO(cfg, batch).profile(sched, k)
    B = batch
    g = torch.Generator().manual_seed(k)
    f = {n: torch.zeros(s) for n, s in shp.items()}
    f.update(cond=torch.randn(shp["cond"], generator=g), text_kv=torch.randn(shp["text_kv"], generator=g),
             text_mask2=torch.ones(shp["text_mask2"]), summed=torch.randn(shp["summed"], generator=g) * 0.1,
             noise=torch.rand(shp["noise"], generator=g), cfg=torch.full((B,), 3.0), tau=torch.ones(B),
             top_k=torch.full((B,), 2, dtype=torch.int64), top_p=torch.full((B,), 0.97), beta=torch.zeros(B),
             past_kv=torch.randn(shp["past_kv"], generator=g), prev_logits=torch.randn(shp["prev_logits"], generator=g),
             forced=torch.zeros(shp["forced"], dtype=torch.int64), force=torch.zeros(B))
    f.update({n: torch.from_numpy(v) for n, v in scale_constants(cfg, sched, transform, k).items()})
    return f


def text_example_feeds(cfg, batch: int) -> dict:
    from .infinity_io import InfinityTextIO
    shp = InfinityTextIO(cfg, batch).shapes()
    mask = torch.zeros(shp["text_mask"])
    mask[:, :3] = 1
    return dict(text=torch.randn(shp["text"]), text_mask=mask, neg_text=torch.randn(shp["neg_text"]),
                neg_mask=mask.clone(), use_neg=torch.zeros(batch))


def split_text_kv(text_kv: torch.Tensor) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    return [(text_kv[i, 0], text_kv[i, 1]) for i in range(text_kv.shape[0])]
