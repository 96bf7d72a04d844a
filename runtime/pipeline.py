"""The K-scale loop over any backend, with one preallocated KV cache per run.

    rows   = one Row per image: class, seed, guidance, SSG schedule, top-k/top-p/temperature,
             more_smooth; partial batches are padded to the backend's batch and trimmed after
    noise  = per row, from that row's own seed: u_k (n_k) drawn in scale order, and for
             more_smooth rows Gumbel noise (n_k x V) from a second stream of the same seed, so
             an image depends only on its own row (any slot, any batch, any backend)
    cache  = empty(L, depth, 2, 2B, H, hd)            allocated once per run (or owned by the
                                                       backend: TensorRT keeps its addresses fixed)
    for k: feeds = the step graph's (graphs.io.STEP_FEEDS): past_kv = cache[:L_k] (a
                   contiguous prefix view); k = 0: empty past, one zero prior row, beta 0;
                   forced/force: the tokens that drive f_hat (teacher-forced parity) or off
           outs  = backend.step(k, feeds, kv_out=cache[L_k:L_k+n_k])  (written in place / one copy)
    image  = backend.decode(f_hat)

The host side is numpy (no torch: the ONNX Runtime CPU path runs without it). Feeds the
pipeline makes are numpy arrays; what a step returns stays the backend's own (a device tensor
on a GPU) and goes back into the next step as it is; what the result keeps is copied to the
host by `backend.host`, so a RunResult holds numpy arrays whatever the backend.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from var_ssg.graphs.config import (DEFAULT_GUIDANCE, DEFAULT_SSG_BETA, DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P,
                           SEED_MAX, SamplerConfig, SSGConfig,
                           check_guidance, check_seed, parse_ssg_beta)
from var_ssg.common.errors import ConfigError
from var_ssg.graphs.io import prev_rows

from .backends.base import Backend, BackendInfo
from .noise import draw_row_noise

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Row:
    """One image request. `ssg_beta`: the CLI grammar ('0', a float, 'linear:A,B', K-1 values)
    or the K-1 values themselves."""
    class_id: int                    # 0..num_classes-1, or -1: unconditional (the official label)
    seed: int                        # 0..2**63-1: this row's noise comes only from it
    guidance: float = DEFAULT_GUIDANCE  # classifier-free guidance weight (`--cfg`)
    ssg_beta: Union[str, Tuple[float, ...]] = DEFAULT_SSG_BETA
    top_k: Optional[int] = None      # None: 900 or the artifacts' baked K if smaller; 0 = no top-k
    top_p: float = DEFAULT_TOP_P     # 0 = off
    temperature: float = DEFAULT_TEMPERATURE
    more_smooth: bool = False        # the official Gumbel-softmax f_hat update


@dataclass
class RunResult:
    """What a run gives back, on the host (numpy), whatever the backend."""
    images: np.ndarray                      # B 3 H W float32 in [0, 1]
    tokens: List[np.ndarray]                # K x (B, n_k) int64: each step's own draw
    logits: List[np.ndarray] = field(default_factory=list)        # after CFG + SSG (on request)
    logits_cfg: List[np.ndarray] = field(default_factory=list)    # after CFG only (on request)
    f_hats: List[np.ndarray] = field(default_factory=list)        # f_hat after each scale (on request)
    noise: List[np.ndarray] = field(default_factory=list)         # K x (B, n_k): the uniforms used
    rows: List[Row] = field(default_factory=list)
    f_hat: Optional[np.ndarray] = None      # the final latent (B Cv P P), what the decoder reads
    sampling: Dict[str, list] = field(default_factory=dict)       # per row: the top_k / top_p fed

    def as_torch(self) -> "RunResult":
        """The same run with CPU tensors that share the arrays' memory (for torch math: parity)."""
        import torch
        t = torch.from_numpy
        return replace(self, images=t(self.images), tokens=[t(x) for x in self.tokens],
                       logits=[t(x) for x in self.logits], logits_cfg=[t(x) for x in self.logits_cfg],
                       f_hats=[t(x) for x in self.f_hats], noise=[t(x) for x in self.noise],
                       f_hat=None if self.f_hat is None else t(self.f_hat))


class Pipeline:
    def __init__(self, backend: Backend):
        self.backend = backend
        self.info: BackendInfo = backend.info

    # ------------------------------------------------------------------ validation
    def check_row(self, row: Row) -> Tuple[Tuple[float, ...], int, float]:
        """Validate one request (the CLI's and the server's one validation); returns its beta
        schedule, the top-k fed to the graph and the top-p threshold."""
        info, mc = self.info, self.info.cfg
        if isinstance(row.class_id, bool) or not isinstance(row.class_id, (int, np.integer)) or \
                not -1 <= int(row.class_id) < mc.num_classes:
            raise ConfigError(f"class id {row.class_id!r} is outside 0..{mc.num_classes - 1} (or -1 for unconditional)")
        check_seed(int(row.seed) if isinstance(row.seed, np.integer) else row.seed, "seed")
        check_guidance(row.guidance)
        if isinstance(row.ssg_beta, str):
            betas = parse_ssg_beta(row.ssg_beta, mc.num_scales)
        else:
            betas = tuple(float(b) for b in row.ssg_beta)
            if len(betas) != mc.num_scales - 1:
                raise ConfigError(f"SSG schedule has {len(betas)} values, expected {mc.num_scales - 1}")
        SSGConfig(betas=betas, transform=info.transform)          # finite and within range
        top_k = row.top_k
        if top_k is None:                     # the default: VAR's 900, or what the artifacts bake
            top_k = 0 if info.k_max == 0 else min(DEFAULT_TOP_K, info.k_max)
        s = SamplerConfig(top_k=top_k, top_p=row.top_p, temperature=row.temperature)
        V = mc.V
        if s.top_k == 0 or s.top_k >= V:
            if 0 < info.k_max < V:
                raise ConfigError(f"--top-k {s.top_k} (no top-k) but the artifacts bake top-k {info.k_max}: "
                                  f"use --top-k <= {info.k_max} or re-export with --top-k 0")
            top_k = max(info.k_max, 1)
        elif info.k_max == 0:
            raise ConfigError(f"these artifacts sample without top-k (bisection sampler); --top-k {s.top_k} "
                              f"needs artifacts exported with --top-k {s.top_k} or more")
        elif s.top_k > info.k_max:
            raise ConfigError(f"--top-k {s.top_k} exceeds the top-k of {info.k_max} baked into the artifacts: "
                              f"use --top-k <= {info.k_max} or re-export with a larger --top-k")
        else:
            top_k = s.top_k
        return betas, top_k, s.top_p_threshold

    # ------------------------------------------------------------------ runs
    def run(self, classes: Sequence[int], seed: int, guidance: float = DEFAULT_GUIDANCE,
            sampler: SamplerConfig = SamplerConfig(), ssg: Optional[SSGConfig] = None,
            keep_logits: bool = False, progress: Optional[Callable[[int], None]] = None,
            more_smooth: bool = False, **kw) -> RunResult:
        """One image per class; image i uses seed `seed + i`."""
        mc = self.info.cfg
        if not classes:
            raise ConfigError("give at least one class id")
        if ssg is not None and ssg.transform != self.info.transform:
            raise ConfigError(f"--dse {ssg.transform} but the artifacts bake DSE transform {self.info.transform}: "
                              f"use --dse {self.info.transform} or re-export with --dse {ssg.transform}")
        betas = ssg.betas if ssg is not None else (0.0,) * (mc.num_scales - 1)
        if not isinstance(seed, (int, np.integer)) or not 0 <= seed <= SEED_MAX - (len(classes) - 1):
            raise ConfigError(f"seed {seed!r} is outside 0..{SEED_MAX - (len(classes) - 1)} (image i uses seed + i)")
        rows = [Row(c, int(seed) + i, guidance, betas, sampler.top_k, sampler.top_p, sampler.temperature, more_smooth)
                for i, c in enumerate(classes)]
        return self.run_rows(rows, keep_logits=keep_logits, progress=progress, **kw)

    def run_rows(self, rows: Sequence[Row], keep_logits: bool = False, keep_fhat: bool = False,
                 force_tokens: Optional[Sequence] = None, force_fhat: Optional[Sequence] = None,
                 decode: bool = True, progress: Optional[Callable[[int], None]] = None) -> RunResult:
        """Generate one image per row. `force_tokens` (K x (len(rows), n_k)): drive f_hat with
        these tokens instead of the sampled ones (teacher forcing; the outputs' tokens stay
        the backend's own draws). `force_fhat` (K x (len(rows), Cv, P, P), a reference's
        `f_hats`): more_smooth rows start scale k from it, since their f_hat follows the
        logits through a sharp softmax, not the tokens. Both take arrays (numpy, or CPU tensors).
        `decode=False` stops at the final latent (res.f_hat)."""
        info, mc, be = self.info, self.info.cfg, self.backend
        rows = list(rows)
        if not rows:
            raise ConfigError("give at least one request")
        checked = [self.check_row(r) for r in rows]
        n_real = len(rows)
        B = info.batch or n_real
        if n_real > B:
            raise ConfigError(f"{n_real} images but the artifacts were exported for batch {B}: give at most {B} "
                              f"class ids per run, or re-export with --batch {n_real}")
        rows, checked = rows + [rows[0]] * (B - n_real), checked + [checked[0]] * (B - n_real)   # pad
        V, f32, i64 = mc.V, np.float32, np.int64
        drawn = [draw_row_noise(r.seed, mc.patch_nums, V, r.more_smooth) for r in rows[:n_real]]
        drawn += [drawn[0]] * (B - n_real)                          # pads repeat row 0: same noise
        noise = [np.stack([d[0][k] for d in drawn]) for k in range(mc.num_scales)]
        per_row = dict(label=np.array([int(r.class_id) for r in rows], i64),
                       guidance=np.array([float(r.guidance) for r in rows], f32),
                       temperature=np.array([float(r.temperature) for r in rows], f32),
                       top_k=np.array([c[1] for c in checked], i64),
                       top_p=np.array([c[2] for c in checked], f32),
                       smooth=np.array([1.0 if r.more_smooth else 0.0 for r in rows], f32))
        betas = np.array([[0.0] + list(c[0]) for c in checked], f32)                  # B K
        force = np.full((B,), 1.0 if force_tokens is not None else 0.0, f32)
        shape = (mc.L, mc.depth, 2, 2 * B, mc.num_heads, mc.head_dim)
        kv = be.alloc_kv(shape, info.kv_dtype)                 # TensorRT owns it (fixed addresses)
        f_hat = np.zeros((B, mc.Cvae, mc.patch_nums[-1], mc.patch_nums[-1]), f32)
        res = RunResult(images=np.empty(0, f32), tokens=[], rows=rows[:n_real],
                        sampling=dict(top_k=[c[1] for c in checked[:n_real]], top_p=[c[2] for c in checked[:n_real]]))
        prev = np.zeros((B, prev_rows(mc, 0), V), f32)             # scale 0: one zero prior row
        smooth_rows = [i for i, r in enumerate(rows[:n_real]) if r.more_smooth]
        kept: Dict[str, list] = dict(tokens=[], logits=[], logits_cfg=[], f_hats=[])   # the backend's arrays:
        for k, (b, e) in enumerate(mc.begin_ends):                                       # to the host after the loop
            n = e - b
            if force_fhat is not None and k > 0 and smooth_rows:
                f_hat = be.host(f_hat).copy()
                f_hat[smooth_rows] = np.asarray(force_fhat[k - 1])[smooth_rows]
            forced = np.zeros((B, n), i64)
            if force_tokens is not None:
                forced[:n_real] = np.asarray(force_tokens[k])
            if smooth_rows:
                gumbel = np.zeros((B, n, V), f32)                    # rows without more_smooth: unused
                for i, d in enumerate(drawn):
                    if d[1] is not None:
                        gumbel[i] = d[1][k]
            else:
                gumbel = be.zeros((B, n, V))                         # where the backend computes
            feeds = dict(per_row, f_hat=f_hat, noise=noise[k], beta=np.ascontiguousarray(betas[:, k]),
                         past_kv=kv[:b], prev_logits=prev, forced=forced, force=force, gumbel=gumbel)
            out = be.step(k, feeds, kv[b:e])
            f_hat, prev = out["f_hat_out"], out["logits_cfg"]      # fresh arrays every step
            kept["tokens"].append(out["tokens"])
            res.noise.append(noise[k][:n_real])
            if keep_logits:
                kept["logits"].append(out["logits"])
                kept["logits_cfg"].append(out["logits_cfg"])
            if keep_fhat:
                kept["f_hats"].append(f_hat)
            if progress:
                progress(k)
        for name, arrays in kept.items():
            setattr(res, name, [be.host(a)[:n_real].copy() for a in arrays])
        res.f_hat = be.host(f_hat)[:n_real].copy()
        if decode:
            res.images = be.host(be.decode(f_hat))[:n_real]
        return res
