"""The multi-scale VQVAE (state-dict compatible with `vae_ch160v4096z32.pth`).

Only the decoder and the quantizer's codebook/phi run at inference; the encoder exists so
official checkpoints load strictly (and for completeness).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import VQVAEConfig


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.C = c
        self.norm = _norm(c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).unbind(1)   # B C N
        w = (q.transpose(1, 2) @ k * (C ** -0.5)).softmax(dim=2)            # B N(q) N(k)
        h = (v @ w.transpose(1, 2)).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Upsample2x(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Downsample2x(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class _Level(nn.Module):
    """One resolution level (names `block`, `attn`, `upsample`/`downsample` as in the official)."""


class Encoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        ch, mult, nrb = cfg.ch, cfg.ch_mult, cfg.num_res_blocks
        self.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
        in_mult = (1,) + tuple(mult)
        self.down = nn.ModuleList()
        bin_ = ch
        for i, m in enumerate(mult):
            lvl = _Level()
            lvl.block, lvl.attn = nn.ModuleList(), nn.ModuleList()
            bin_, bout = ch * in_mult[i], ch * m
            for _ in range(nrb):
                lvl.block.append(ResnetBlock(bin_, bout))
                bin_ = bout
                if i == len(mult) - 1:
                    lvl.attn.append(AttnBlock(bin_))
            if i != len(mult) - 1:
                lvl.downsample = Downsample2x(bin_)
            self.down.append(lvl)
        self.mid = _Level()
        self.mid.block_1, self.mid.attn_1, self.mid.block_2 = ResnetBlock(bin_, bin_), AttnBlock(bin_), ResnetBlock(bin_, bin_)
        self.norm_out = _norm(bin_)
        self.conv_out = nn.Conv2d(bin_, cfg.z_channels, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for i, lvl in enumerate(self.down):
            for j, blk in enumerate(lvl.block):
                h = blk(h)
                if len(lvl.attn):
                    h = lvl.attn[j](h)
            if hasattr(lvl, "downsample"):
                h = lvl.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        ch, mult, nrb = cfg.ch, cfg.ch_mult, cfg.num_res_blocks
        nres = len(mult)
        bin_ = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, bin_, 3, 1, 1)
        self.mid = _Level()
        self.mid.block_1, self.mid.attn_1, self.mid.block_2 = ResnetBlock(bin_, bin_), AttnBlock(bin_), ResnetBlock(bin_, bin_)
        ups = []
        for i in reversed(range(nres)):
            lvl = _Level()
            lvl.block, lvl.attn = nn.ModuleList(), nn.ModuleList()
            bout = ch * mult[i]
            for _ in range(nrb + 1):
                lvl.block.append(ResnetBlock(bin_, bout))
                bin_ = bout
                if i == nres - 1:
                    lvl.attn.append(AttnBlock(bin_))
            if i != 0:
                lvl.upsample = Upsample2x(bin_)
            ups.insert(0, lvl)
        self.up = nn.ModuleList(ups)
        self.norm_out = _norm(bin_)
        self.conv_out = nn.Conv2d(bin_, 3, 3, 1, 1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for i in reversed(range(len(self.up))):
            lvl = self.up[i]
            for j, blk in enumerate(lvl.block):
                h = blk(h)
                if len(lvl.attn):
                    h = lvl.attn[j](h)
            if hasattr(lvl, "upsample"):
                h = lvl.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Phi(nn.Conv2d):
    """phi(h) = (1 - r) h + r conv3x3(h)."""

    def __init__(self, c: int, ratio: float):
        super().__init__(c, c, 3, 1, 1)
        self.ratio = abs(ratio)

    def forward(self, h):
        return h * (1 - self.ratio) + super().forward(h) * self.ratio


class PhiPartiallyShared(nn.Module):
    def __init__(self, n: int, c: int, ratio: float):
        super().__init__()
        self.qresi_ls = nn.ModuleList([Phi(c, ratio) for _ in range(n)])


class Quantizer(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.z_channels)
        self.quant_resi = PhiPartiallyShared(cfg.share_quant_resi, cfg.z_channels, cfg.quant_resi)
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(cfg.patch_nums), cfg.vocab_size))


class VQVAE(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = Quantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, 1, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, 1, 1)

    def phi(self, k: int) -> Phi:
        return self.quantize.quant_resi.qresi_ls[self.cfg.phi_index(k)]

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """f_hat (B Cvae P P) -> image in [0, 1] (B 3 16P 16P: 256px for P = 16, 512px for P = 32)."""
        return (self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1) + 1) * 0.5


class FhatDecoder(nn.Module):
    """The exported decoder graph: f_hat -> image in [0, 1]."""

    def __init__(self, vae: VQVAE):
        super().__init__()
        self.vae = vae

    def forward(self, f_hat):
        return self.vae.fhat_to_img(f_hat)
