"""Infinity (text-to-image, bitwise tokens): config dataclasses, presets and scale schedules
(DESIGN.md, "Infinity").

One dataclass per thing: `BSQVAEConfig` (the multi-scale BSQ tokenizer), `InfinityConfig` (the
transformer), `InfinityRunConfig` (per-scale guidance and temperature, bit sampling). Presets
are looked up by exact name; scale schedules come from the official dynamic-resolution
templates (aspect ratio h/w -> one (h, w) token grid per scale).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Tuple

from var_ssg.common.errors import ConfigError

from .config import GUIDANCE_MAX, TEMPERATURE_RANGE

# ---------------------------------------------------------------- scale schedules
# The official templates: for each aspect ratio h/w, the (h, w) token grid of each of the 13
# scales of the 1M-pixel class (64x64 tokens at 1:1, 16 px per token = 1024 px). The smaller
# pixel classes are prefixes of these (their first 7, 10, 12 scales).
_RATIO_HWS = {
    1.000: ((1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32), (40, 40), (48, 48), (64, 64)),
    1.250: ((1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24), (35, 28), (45, 36), (55, 44), (70, 56)),
    1.333: ((1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21), (36, 27), (48, 36), (60, 45), (72, 54)),
    1.500: ((1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22), (39, 26), (48, 32), (63, 42), (78, 52)),
    1.750: ((1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20), (42, 24), (56, 32), (70, 40), (84, 48)),
    2.000: ((1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19), (46, 23), (60, 30), (74, 37), (90, 45)),
    2.500: ((1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16), (50, 20), (65, 26), (80, 32), (100, 40)),
    3.000: ((1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15), (54, 18), (72, 24), (90, 30), (111, 37)),
}
PIXEL_CLASSES = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}     # scales per pixel class


def _templates() -> Dict[float, Tuple[Tuple[int, int], ...]]:
    """h/w template -> 1M schedule, in the official order (a ratio, then its inverse, whose key
    is 1/ratio truncated to 3 decimals); the order decides exact ties of `nearest_template`."""
    out = {}
    for r, hws in _RATIO_HWS.items():
        out[r] = hws
        if r != 1.0:
            out[int(1 / r * 1000) / 1000] = tuple((w, h) for h, w in hws)
    return out


ASPECT_TEMPLATES = _templates()


def nearest_template(h_div_w: float) -> float:
    """The template nearest to h/w (the first one on an exact tie, as np.argmin)."""
    if not (isinstance(h_div_w, (int, float)) and math.isfinite(h_div_w) and h_div_w > 0):
        raise ConfigError(f"aspect ratio (height/width) must be a positive number, got {h_div_w!r}")
    keys = list(ASPECT_TEMPLATES)
    return min(keys, key=lambda t: (abs(float(h_div_w) - t), keys.index(t)))


def parse_aspect_ratio(text: str) -> float:
    """An aspect ratio as 'H:W' (height:width, e.g. '1:1', '3:4') or h/w as a number ('0.75')."""
    s = str(text).strip()
    try:
        if ":" in s:
            h, w = s.split(":")
            val = float(h) / float(w)
        else:
            val = float(s)
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"malformed aspect ratio {text!r}: give height:width like '1:1' or '3:4', "
                          f"or h/w as a number like 0.75") from None
    nearest_template(val)       # validates
    return val


@dataclass(frozen=True)
class ScaleSchedule:
    """The token grids of one generation: `hw[k]` = (h, w) at scale k; `full` = the last grid of
    the template's 1M schedule (RoPE positions are spread over it, DESIGN.md)."""
    template: float
    hw: Tuple[Tuple[int, int], ...]
    full: Tuple[int, int]

    @property
    def num_scales(self) -> int:
        return len(self.hw)

    @property
    def L(self) -> int:
        return sum(h * w for h, w in self.hw)


# ---------------------------------------------------------------- configs
@dataclass(frozen=True)
class BSQVAEConfig:
    """The multi-scale BSQ VAE (official `vae_model`: 2-D convs, GroupNorm, no attention).
    `bits` is the code dimension d (codebook 2^d); the decoder upsamples by 2^(levels-1)."""
    bits: int = 32
    ch: int = 128
    ch_mult: Tuple[int, ...] = (1, 2, 4, 4, 4)
    num_res_blocks: int = 2

    def __post_init__(self):
        if self.bits < 1:
            raise ConfigError(f"BSQ VAE bits must be >= 1, got {self.bits}")
        for m in self.ch_mult:
            c = self.ch * m
            if c % 32 and c % 24:
                raise ConfigError(f"BSQ VAE channel count {c} must be a multiple of 32 or 24 (GroupNorm groups)")

    @property
    def patch_size(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class InfinityConfig:
    """The Infinity transformer as the official inference builds it: shared AdaLN, cosine
    self-attention with RoPE-2D (positions spread over the 1M grid), cross-attention to the
    projected T5 states in every block, level embedding once before the first block, a bit-label
    head of 2 logits per bit; blocks grouped in `block_chunks` (state-dict names)."""
    name: str
    depth: int
    width: int                       # C (= D, the condition width)
    num_heads: int
    text_dim: int                    # Ct5: the T5 encoder's d_model
    vae: BSQVAEConfig = field(default_factory=BSQVAEConfig)
    spatial_patchify: bool = False   # 2x2 VAE positions per token (Infinity-8B)
    block_chunks: int = 8
    pixels: str = "1M"               # default pixel class of the schedules
    text_maxlen: int = 512
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    num_levels: int = 15             # rows of lvl_embed
    rope_grid: int = 128             # RoPE position table edge (2048 px / 16)
    t5: str = ""                     # the text encoder the weights were trained with
    # derived
    head_dim: int = field(init=False)
    d_vae: int = field(init=False)   # channels per token: bits, x4 with spatial patchify
    V: int = field(init=False)       # head outputs: 2 per token channel
    ffn_hidden: int = field(init=False)
    pool_heads: int = field(init=False)

    def __post_init__(self):
        if self.depth < 1 or self.width < 1 or self.num_heads < 1:
            raise ConfigError(f"{self.name}: depth, width and heads must be >= 1")
        if self.width % self.num_heads:
            raise ConfigError(f"{self.name}: width {self.width} is not a multiple of heads {self.num_heads}")
        hd = self.width // self.num_heads
        if hd % 4:
            raise ConfigError(f"{self.name}: head dim {hd} must be a multiple of 4 (RoPE-2D: pairs split by axis)")
        if self.block_chunks < 2 or self.depth % self.block_chunks:
            raise ConfigError(f"{self.name}: block_chunks must be >= 2 and divide depth {self.depth}, got {self.block_chunks}")
        if self.pixels not in PIXEL_CLASSES:
            raise ConfigError(f"{self.name}: pixel class {self.pixels!r} is not one of {', '.join(PIXEL_CLASSES)}")
        pool_hd = 64 if self.width > 4096 else 128          # official TextAttentivePool rule
        pool_heads = self.text_dim // pool_hd
        if pool_heads < 1 or self.width % pool_heads:
            raise ConfigError(f"{self.name}: text dim {self.text_dim} gives {pool_heads} pooling heads "
                              f"(text_dim // {pool_hd}); it must be >= 1 and divide width {self.width}")
        d_vae = self.vae.bits * (4 if self.spatial_patchify else 1)
        object.__setattr__(self, "head_dim", hd)
        object.__setattr__(self, "d_vae", d_vae)
        object.__setattr__(self, "V", 2 * d_vae)
        object.__setattr__(self, "ffn_hidden", round(self.width * self.mlp_ratio / 256) * 256)
        object.__setattr__(self, "pool_heads", pool_heads)

    def schedule(self, h_div_w: float = 1.0, pixels: str = "") -> ScaleSchedule:
        """The token grids for an aspect ratio (nearest official template) and pixel class."""
        pixels = pixels or self.pixels
        if pixels not in PIXEL_CLASSES:
            raise ConfigError(f"unknown pixel class {pixels!r}; valid: {', '.join(PIXEL_CLASSES)}")
        t = nearest_template(h_div_w)
        full = ASPECT_TEMPLATES[t]
        return ScaleSchedule(template=t, hw=full[:PIXEL_CLASSES[pixels]], full=full[-1])

    def vae_hw(self, hw: Tuple[int, int]) -> Tuple[int, int]:
        """A token grid in VAE latent positions (x2 per axis with spatial patchify)."""
        f = 2 if self.spatial_patchify else 1
        return hw[0] * f, hw[1] * f

    def image_size(self, sched: ScaleSchedule) -> Tuple[int, int]:
        h, w = self.vae_hw(sched.hw[-1])
        return h * self.vae.patch_size, w * self.vae.patch_size


# ---------------------------------------------------------------- presets
OFFICIAL_INFINITY_CKPTS = {"infinity-2b": ("infinity_2b_reg.pth", "infinity_vae_d32_reg.pth"),
                           "infinity-8b": ("infinity_8b_weights", "infinity_vae_d56_f8_14_patchify.pth")}
T5_XL = "google/flan-t5-xl"

_PRESETS = {
    # the official run_infinity tool (`infinity_2b`) and infer script: vae_type 32, no patchify, Flan-T5-XL
    "infinity-2b": lambda: InfinityConfig(name="infinity-2b", depth=32, width=2048, num_heads=16, text_dim=2048,
                                          vae=BSQVAEConfig(bits=32), t5=T5_XL),
    # `infinity_8b` + its notebook: vae_type 14 with spatial patchify (patch 8, ch_mult 1,2,4,4)
    "infinity-8b": lambda: InfinityConfig(name="infinity-8b", depth=40, width=3584, num_heads=28, text_dim=2048,
                                          vae=BSQVAEConfig(bits=14, ch_mult=(1, 2, 4, 4)), spatial_patchify=True,
                                          t5=T5_XL),
    # the same structure at test size: 8 bits, a 4x VAE, the 0.06M schedules (7 scales, 16x16 at 1:1)
    "infinity-tiny": lambda: InfinityConfig(name="infinity-tiny", depth=2, width=64, num_heads=2, text_dim=256,
                                            vae=BSQVAEConfig(bits=8, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1),
                                            block_chunks=2, pixels="0.06M", text_maxlen=32),
    # tiny with spatial patchify, so the 8B layout is tested too
    "infinity-tiny-patchify": lambda: InfinityConfig(name="infinity-tiny-patchify", depth=2, width=64, num_heads=2,
                                                     text_dim=256, vae=BSQVAEConfig(bits=4, ch=32, ch_mult=(1, 2),
                                                                                    num_res_blocks=1),
                                                     spatial_patchify=True, block_chunks=2, pixels="0.06M",
                                                     text_maxlen=32),
}
INFINITY_PRESETS = tuple(_PRESETS)


def get_infinity_preset(name: str) -> InfinityConfig:
    """Exact-name lookup; the error lists every valid name."""
    make = _PRESETS.get(name) if isinstance(name, str) else None
    if make is None:
        raise ConfigError(f"unknown Infinity preset {name!r}; valid presets: {', '.join(INFINITY_PRESETS)}")
    return make()


@dataclass(frozen=True)
class InfinityRunConfig:
    """Per-scale settings of one generation (the official `cfg_list`, `tau_list`) and the bit
    sampler: top-k over the two values of a bit (0 = off, 1 = greedy) and top-p (0 = off).
    The official defaults: cfg 3 (scripts: 3 or 4), tau 1 (scripts: 0.5 or 1), top-k 900 (no
    effect on two values), top-p 0.97."""
    cfg: Tuple[float, ...]
    tau: Tuple[float, ...]
    top_k: int = 0
    top_p: float = 0.97

    def __post_init__(self):
        if len(self.cfg) != len(self.tau):
            raise ConfigError(f"cfg and tau need one value per scale: got {len(self.cfg)} and {len(self.tau)}")
        for w in self.cfg:
            if not (math.isfinite(w) and abs(w) <= GUIDANCE_MAX):
                raise ConfigError(f"--cfg values must be finite and within -{GUIDANCE_MAX:g}..{GUIDANCE_MAX:g}, got {w}")
        lo, hi = TEMPERATURE_RANGE
        for t in self.tau:
            if not lo <= t <= hi:
                raise ConfigError(f"--tau values must be in {lo:g}..{hi:g}, got {t}")
        if self.top_k < 0:
            raise ConfigError(f"--top-k must be >= 0 (0 = off, 1 = greedy), got {self.top_k}")
        if not (math.isfinite(self.top_p) and 0.0 <= self.top_p <= 1.0):
            raise ConfigError(f"--top-p must be in [0, 1] (0 = off), got {self.top_p}")

    @classmethod
    def constant(cls, num_scales: int, cfg: float = 3.0, tau: float = 1.0, **kw) -> "InfinityRunConfig":
        return cls(cfg=(float(cfg),) * num_scales, tau=(float(tau),) * num_scales, **kw)

    @property
    def top_k_pair(self) -> int:
        """top-k as the sampler takes it over a pair: 0 (off) keeps both values."""
        return 2 if self.top_k <= 0 else min(self.top_k, 2)

    @property
    def top_p_threshold(self) -> float:
        return 2.0 if self.top_p <= 0 or self.top_p >= 1 else self.top_p
