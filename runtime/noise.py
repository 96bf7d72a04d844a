"""A row's noise, from its own seed, without torch (DESIGN.md, "Sampling").

Each stream is Mersenne Twister MT19937 with one 32-bit draw per float and
u = (draw & (2**24 - 1)) * 2**-24 (float32, in [0, 1)), as torch's CPU generator makes
`torch.rand`. The seeding is MT19937's reference seeding: a seed below 2**32 by `init_genrand`
(what `torch.Generator().manual_seed(seed)` does: those uniforms are torch's bit for bit, so a
row with such a seed and without more_smooth gets the image version 0.3 made); a larger one by
`init_by_array` of its two 32-bit words, so every 64-bit seed has its own stream. (torch keeps
only the low 32 bits: seeds 2**32 apart shared one, and a more_smooth row's Gumbel stream,
seed + 2**63, was its token stream.) numpy's legacy seeding implements both, frozen by its
compatibility policy.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np

_MASK24 = np.uint64((1 << 24) - 1)
GUMBEL_STREAM = 2 ** 63         # a row's Gumbel noise: the stream of seed + 2**63
# What samples record (evaluation's settings), so a resumed run never mixes two noise definitions.
VERSION = "mt19937: init_genrand below 2**32, init_by_array above; Gumbel: seed + 2**63, float64 log"


def _mt19937(seed: int) -> np.random.MT19937:
    seed = int(seed)
    if not 0 <= seed < 2 ** 64:
        raise ValueError(f"a noise seed is 0..2**64-1, got {seed}")
    legacy = np.random.RandomState(seed if seed < 2 ** 32 else [seed & 0xFFFFFFFF, seed >> 32])
    _, key, pos = legacy.get_state()[:3]
    bg = np.random.MT19937()
    bg.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": pos}}
    return bg


def uniforms(seed: int, counts: Sequence[int]) -> List[np.ndarray]:
    """float32 uniforms in [0, 1): one array per count, drawn in order from `seed`'s stream."""
    raw = _mt19937(seed).random_raw(int(sum(counts)))
    u = (raw & _MASK24).astype(np.float32) * np.float32(2.0 ** -24)
    return np.split(u, np.cumsum(counts)[:-1]) if len(counts) else []


def draw_row_noise(seed: int, patch_nums: Sequence[int], V: int,
                   smooth: bool) -> Tuple[List[np.ndarray], Optional[List[np.ndarray]]]:
    """One row's noise: uniforms per scale (n_k) from `seed`; Gumbel noise (n_k x V) per scale
    from the stream of seed + 2**63, only for more_smooth rows (else None)."""
    u = uniforms(seed, [p * p for p in patch_nums])
    gum = None
    if smooth:
        g = uniforms(int(seed) + GUMBEL_STREAM, [p * p * V for p in patch_nums])
        # -log(-log(u)), u clamped to [1e-20, 1]: the standard Gumbel, as F.gumbel_softmax draws it;
        # in float64 (then rounded once to float32), so no CPU's float32 log can change a value
        gum = [(-np.log(-np.log(np.clip(x.astype(np.float64), 1e-20, 1.0)))).astype(np.float32).reshape(p * p, V)
               for x, p in zip(g, patch_nums)]
    return u, gum
