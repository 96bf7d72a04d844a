"""Infinity's exported graphs as plain data (no torch): names, dtypes, per-scale shapes and the
per-scale constants, which the runtime computes from the schedule (DESIGN.md, "Infinity
(text-to-image)"). The export's modules (graphs.infinity_step) and the manifest's schema
(contract.infinity_schema) read them here, as VAR's read graphs.io.

    InfinityTextIO   text.onnx     T5 states + mask (cond and negative) -> cond_BD, text K/V
    InfinityStepIO   step_all.onnx every scale of every aspect ratio: dynamic n, m, Lp, F
    InfinityDecoderIO decoder.onnx summed codes (B d H W, H/W dynamic) -> image in [0, 1]

Token maps stay flattened: a scale's resampling and DSE are dense matrices (kron of the exact
per-axis ones; DSE folded into one matrix), so no shape needs a square root and one graph
serves every aspect ratio. With spatial patchify a token is a 2x2 block of VAE positions: the
matrices come in P2 = 4 slices, one per position of the block (pixel (un)shuffle folded in).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np

from .dse import dse_matrix
from .infinity_config import ASPECT_TEMPLATES, InfinityConfig, ScaleSchedule
from .resample import bilinear_matrix, kron2d

TEXT_FEEDS = ["text", "text_mask", "neg_text", "neg_mask", "use_neg"]
TEXT_OUTPUTS = ["cond", "text_kv", "text_mask2"]
STEP_FEEDS = ["cond", "text_kv", "text_mask2", "summed", "noise", "cfg", "tau", "top_k", "top_p", "beta",
              "past_kv", "prev_logits", "forced", "force"]
SCALE_CONSTS = ["scale_first", "scale_level", "scale_cos", "scale_sin", "scale_down", "scale_up", "scale_dse"]
STEP_OUTPUTS = ["bits", "logits", "logits_cfg", "summed_out", "new_kv"]
# n: this scale's tokens, m: the previous scale's, Lp: the past, F: VAE positions of the final grid
DYNAMIC_AXES = dict(summed={1: "F"}, noise={1: "n"}, past_kv={0: "Lp"}, prev_logits={1: "m"}, forced={1: "n"},
                    scale_cos={0: "n"}, scale_sin={0: "n"}, scale_down={1: "n", 2: "F"},
                    scale_up={1: "F", 2: "n"}, scale_dse={0: "n", 1: "m"})
INT64 = ("top_k", "forced", "bits", "scale_level")
KV_LAYOUT = "(L, depth, 2, 2B, heads, head_dim)"
TEXT_KV_LAYOUT = "(depth, 2, 2B, heads, Lt, head_dim)"


def template_schedules(cfg: InfinityConfig) -> List[ScaleSchedule]:
    """The schedule of every aspect-ratio template (the preset's pixel class): the shapes one
    exported graph, and one TensorRT profile per scale, must take."""
    return [cfg.schedule(t) for t in ASPECT_TEMPLATES]


Span = Dict[str, Tuple[List[int], List[int], List[int]]]


def span(shapes: List[Dict[str, List[int]]], opt: Dict[str, List[int]]) -> Span:
    """name -> (min, opt, max) over `shapes`, axis by axis."""
    return {n: ([min(s[n][a] for s in shapes) for a in range(len(v))], list(v),
                [max(s[n][a] for s in shapes) for a in range(len(v))]) for n, v in opt.items()}


def heads_per_chunk(cfg: InfinityConfig, batch: int, budget: int) -> int:
    """How many heads' self-attention an exported step computes at once so that one fp32 score
    table (2B x heads x n x L at the largest scale of any template) stays within `budget` bytes;
    0 = every head at once (it fits), else at least 1 (DESIGN.md, "Infinity")."""
    fit = budget // table_bytes(cfg, batch, 1)
    return 0 if fit >= cfg.num_heads else max(1, int(fit))


def table_bytes(cfg: InfinityConfig, batch: int, heads: int) -> int:
    """Bytes of one fp32 self-attention score table over `heads` heads at the largest scale."""
    return max(2 * batch * heads * h * w * s.L * 4 for s in template_schedules(cfg) for h, w in s.hw[-1:])


def patch_slices(cfg: InfinityConfig) -> int:
    return 4 if cfg.spatial_patchify else 1


def prev_rows(sched: ScaleSchedule, k: int) -> int:
    """m: rows of prev_logits at scale k (one zero row at k = 0)."""
    return 1 if k == 0 else sched.hw[k - 1][0] * sched.hw[k - 1][1]


def _scatter(hw, f: int) -> List[np.ndarray]:
    """Per block position q = (di, dj): (h·f·w·f x h·w) 0/1 matrices placing token (i, j) at VAE
    position (f·i + di, f·j + dj): pixel_shuffle (f = 2) or the identity (f = 1)."""
    h, w = hw
    out = []
    for di in range(f):
        for dj in range(f):
            S = np.zeros((h * f * w * f, h * w))
            for i in range(h):
                for j in range(w):
                    S[(f * i + di) * (w * f) + f * j + dj, i * w + j] = 1.0
            out.append(S)
    return out


def rope_cos_sin(cfg: InfinityConfig, sched: ScaleSchedule, k: int):
    """cos, sin (n_k, head_dim/2) float32: graphs.infinity.rope_tables in numpy (the same float32
    arithmetic: positions round(i·H/h) half to even, inverse frequencies in float32)."""
    h, w = sched.hw[k]
    H, W = sched.full
    half = cfg.head_dim // 2
    inv = (np.float32(1.0) / (np.float32(10000.0) ** (np.arange(0, half, 2).astype(np.float32) / np.float32(half))))
    rows = np.round(np.arange(h, dtype=np.float32) * np.float32(H / h)).astype(np.float32)
    cols = np.round(np.arange(w, dtype=np.float32) * np.float32(W / w)).astype(np.float32)
    ang_r, ang_c = np.outer(rows, inv), np.outer(cols, inv)
    ang = np.concatenate((np.broadcast_to(ang_r[:, None, :], (h, w, half // 2)),
                          np.broadcast_to(ang_c[None, :, :], (h, w, half // 2))), -1).reshape(h * w, half)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def scale_constants(cfg: InfinityConfig, sched: ScaleSchedule, transform: str, k: int) -> Dict[str, np.ndarray]:
    """The per-scale `scale_*` inputs of the step graph (float32 / int64 numpy arrays).
    down: the sum of codes at the final grid, resized (bilinear) to this scale's VAE grid and
    split into the P2 block positions (pixel_unshuffle); up: this scale's codes placed on its
    VAE grid (pixel_shuffle) and resized to the final grid (the identity at the last scale)."""
    f = 2 if cfg.spatial_patchify else 1
    K = sched.num_scales
    fin = cfg.vae_hw(sched.hw[-1])
    cur = cfg.vae_hw(sched.hw[k])
    S = _scatter(sched.hw[k], f)                                        # P2 x (Fk x n)
    R_down = kron2d(bilinear_matrix(fin[0], cur[0]), bilinear_matrix(fin[1], cur[1]))   # Fk x F
    R_up = np.eye(fin[0] * fin[1]) if k == K - 1 else kron2d(bilinear_matrix(cur[0], fin[0]),
                                                              bilinear_matrix(cur[1], fin[1]))   # F x Fk
    dse = np.zeros((sched.hw[k][0] * sched.hw[k][1], 1)) if k == 0 else dse_matrix(sched.hw[k - 1], sched.hw[k], transform)
    cos, sin = rope_cos_sin(cfg, sched, k)
    f32 = np.float32
    return dict(scale_first=np.array([1.0 if k == 0 else 0.0], f32),
                scale_level=np.array([k], np.int64),
                scale_cos=cos, scale_sin=sin,
                scale_down=np.stack([s.T @ R_down for s in S]).astype(f32),
                scale_up=np.stack([R_up @ s for s in S]).astype(f32),
                scale_dse=dse.astype(f32))


@dataclass(frozen=True)
class InfinityTextIO:
    cfg: InfinityConfig
    batch: int
    inputs = tuple(TEXT_FEEDS)
    outputs = tuple(TEXT_OUTPUTS)

    def dtype(self, name: str) -> str:
        return "float32"

    def shapes(self) -> Dict[str, List[int]]:
        c, B = self.cfg, self.batch
        Lt = c.text_maxlen
        return dict(text=[B, Lt, c.text_dim], text_mask=[B, Lt], neg_text=[B, Lt, c.text_dim], neg_mask=[B, Lt],
                    use_neg=[B], cond=[2 * B, c.width],
                    text_kv=[c.depth, 2, 2 * B, c.num_heads, Lt, c.head_dim], text_mask2=[2 * B, Lt])


@dataclass(frozen=True)
class InfinityStepIO:
    cfg: InfinityConfig
    batch: int
    kv: str = "float32"

    @property
    def inputs(self) -> List[str]:
        return STEP_FEEDS + SCALE_CONSTS

    @property
    def outputs(self) -> List[str]:
        return STEP_OUTPUTS

    def dtype(self, name: str) -> str:
        return "int64" if name in INT64 else self.kv if name in ("past_kv", "new_kv") else "float32"

    def profile(self, sched: ScaleSchedule, k: int) -> Dict[str, List[int]]:
        """Every input's shape at scale k of a schedule."""
        c, B = self.cfg, self.batch
        h, w = sched.hw[k]
        n, m = h * w, prev_rows(sched, k)
        Lp = sum(a * b for a, b in sched.hw[:k])
        fh, fw = c.vae_hw(sched.hw[-1])
        F, P2 = fh * fw, patch_slices(c)
        t = InfinityTextIO(c, B).shapes()
        return dict(cond=t["cond"], text_kv=t["text_kv"], text_mask2=t["text_mask2"], summed=[B, F, c.vae.bits],
                    noise=[B, n, c.d_vae], cfg=[B], tau=[B], top_k=[B], top_p=[B], beta=[B],
                    past_kv=[Lp, c.depth, 2, 2 * B, c.num_heads, c.head_dim], prev_logits=[B, m, c.V],
                    forced=[B, n, c.d_vae], force=[B], scale_first=[1], scale_level=[1],
                    scale_cos=[n, c.head_dim // 2], scale_sin=[n, c.head_dim // 2], scale_down=[P2, n, F],
                    scale_up=[P2, F, n], scale_dse=[n, m])

    def output_shapes(self, sched: ScaleSchedule, k: int) -> Dict[str, List[int]]:
        c, B = self.cfg, self.batch
        h, w = sched.hw[k]
        n = h * w
        fh, fw = c.vae_hw(sched.hw[-1])
        return dict(bits=[B, n, c.d_vae], logits=[B, n, c.V], logits_cfg=[B, n, c.V], summed_out=[B, fh * fw, c.vae.bits],
                    new_kv=[n, c.depth, 2, 2 * B, c.num_heads, c.head_dim])

    @property
    def dynamic_inputs(self) -> List[str]:
        return sorted(DYNAMIC_AXES)

    def profile_span(self, k: int) -> Span:
        """Scale k's dynamic inputs over every template: (min, opt = the 1:1 schedule's, max);
        the text inputs are not among them (padded to the preset's text length, static)."""
        scheds = template_schedules(self.cfg)
        if len({s.num_scales for s in scheds}) != 1:
            raise ValueError(f"{self.cfg.name}: the templates' schedules differ in scale count")
        dyn = set(self.dynamic_inputs)
        pick = lambda prof: {n: v for n, v in prof.items() if n in dyn}      # noqa: E731
        return span([pick(self.profile(s, k)) for s in scheds], pick(self.profile(self.cfg.schedule(1.0), k)))


@dataclass(frozen=True)
class InfinityDecoderIO:
    cfg: InfinityConfig
    batch: int
    inputs = ("summed",)
    outputs = ("image",)
    dynamic = {"summed": {2: "H", 3: "W"}}

    def dtype(self, name: str) -> str:
        return "float32"

    def summed_shape(self, sched: ScaleSchedule) -> List[int]:
        return [self.batch, self.cfg.vae.bits, *self.cfg.vae_hw(sched.hw[-1])]

    def image_shape(self, sched: ScaleSchedule) -> List[int]:
        return [self.batch, 3, *self.cfg.image_size(sched)]

    def summed_span(self) -> Span:
        """`summed` over every template's final grid: (min, opt = 1:1, max)."""
        return span([dict(summed=self.summed_shape(s)) for s in template_schedules(self.cfg)],
                    dict(summed=self.summed_shape(self.cfg.schedule(1.0))))
