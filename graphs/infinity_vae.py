"""The multi-scale BSQ VAE of Infinity, with the official state-dict names (DESIGN.md,
"Infinity").

Generation needs only the decoder: bits -> codes (2·bit − 1)/sqrt(d) per channel, the codes of
every scale upsampled (bilinear = the official trilinear over a time axis of 1) and summed at
the final grid, then `decoder` and a clamp to [-1, 1]. The encoder is built too, so that an
official file loads with no unexpected key; it is not used here.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .infinity_config import BSQVAEConfig


class Conv(nn.Module):
    """The official `Conv` wrapper (2-D): names `*.conv.weight`."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding)

    def forward(self, x):
        return self.conv(x)


class Normalize(nn.Module):
    """GroupNorm with 32 groups (24 where 32 does not divide), eps 1e-6: names `*.norm.*`."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = nn.GroupNorm(32 if c % 32 == 0 else 24, c, eps=1e-6, affine=True)

    def forward(self, x):
        return self.norm(x)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = Normalize(cin), Conv(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = Normalize(cout), Conv(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = Conv(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = Conv(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = Conv(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.block_1, self.block_2 = ResnetBlock(c, c), ResnetBlock(c, c)

    def forward(self, x):
        return self.block_2(self.block_1(x))


class _Level(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList()          # empty in the official image VAE (no attention)


class Encoder(nn.Module):
    def __init__(self, cfg: BSQVAEConfig):
        super().__init__()
        ch, mult = cfg.ch, cfg.ch_mult
        self.conv_in = Conv(3, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for i, m in enumerate(mult):
            block_in = ch * ((1,) + tuple(mult))[i]
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, ch * m))
                block_in = ch * m
            level = _Level(blocks)
            if i < len(mult) - 1:
                level.downsample = Downsample(block_in)
            self.down.append(level)
        self.mid = _Mid(block_in)
        self.norm_out = Normalize(block_in)
        self.conv_out = Conv(block_in, cfg.bits, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for b in level.block:
                h = b(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: BSQVAEConfig):
        super().__init__()
        ch, mult = cfg.ch, cfg.ch_mult
        block_in = ch * mult[-1]
        self.conv_in = Conv(cfg.bits, block_in, 3, padding=1)
        self.mid = _Mid(block_in)
        levels = []
        for i in reversed(range(len(mult))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, ch * mult[i]))
                block_in = ch * mult[i]
            level = _Level(blocks)
            if i >= 1:
                level.upsample = Upsample(block_in)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(block_in)
        self.conv_out = Conv(block_in, 3, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for b in level.block:
                h = b(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class BSQ(nn.Module):
    """Holds the official `mask` buffer (2^(d-1) .. 2^0: bit j of an integer label)."""

    def __init__(self, bits: int):
        super().__init__()
        self.register_buffer("mask", 2 ** torch.arange(bits - 1, -1, -1))


class MultiScaleBSQ(nn.Module):
    def __init__(self, bits: int):
        super().__init__()
        self.lfq = BSQ(bits)


class BSQVAE(nn.Module):
    def __init__(self, cfg: BSQVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantizer = MultiScaleBSQ(cfg.bits)
        self.quantize = self.quantizer      # the official alias: both names are in the state dict

    def decode(self, summed_BdHW: torch.Tensor) -> torch.Tensor:
        """Summed codes at the final grid -> image in [-1, 1] (B 3 H W)."""
        return self.decoder(summed_BdHW).clamp(-1, 1)
