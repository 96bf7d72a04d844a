"""The K-scale loop over any backend, with one preallocated KV cache per run.

    rows   = one Row per image: class, seed, guidance, SSG schedule, top-k/top-p/temperature,
             more_smooth; partial batches are padded to the backend's batch and trimmed after
    noise  = per row, from that row's own seed: u_k (n_k) drawn in scale order, and for
             more_smooth rows Gumbel noise (n_k x V) from a second stream of the same seed, so
             an image depends only on its own row (any slot, any batch, any backend)
    cache  = empty(L, depth, 2, 2B, H, hd)            allocated once per run (or owned by the
                                                       backend: TensorRT keeps its addresses fixed)
    for k: feeds = the step graph's (graphs.components.STEP_FEEDS): past_kv = cache[:L_k] (a
                   contiguous prefix view); k = 0: empty past, one zero prior row, beta 0;
                   forced/force: the tokens that drive f_hat (teacher-forced parity) or off
           outs  = backend.step(k, feeds, kv_out=cache[L_k:L_k+n_k])  (written in place / one copy)
    image  = backend.decode(f_hat)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from graphs.config import (DEFAULT_GUIDANCE, DEFAULT_SSG_BETA, DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P,
                           SEED_MAX, ConfigError, SamplerConfig, SSGConfig, VARConfig,
                           check_guidance, check_seed, parse_ssg_beta)
from graphs.unified import prev_rows

from .backends.base import Backend, BackendInfo
from .images import to_uint8  # noqa: F401  (the images' home is runtime/images.py)

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
    images: torch.Tensor                    # B 3 H W in [0, 1]
    tokens: List[torch.Tensor]              # K x (B, n_k) int64: each step's own draw
    logits: List[torch.Tensor] = field(default_factory=list)      # after CFG + SSG (on request)
    logits_cfg: List[torch.Tensor] = field(default_factory=list)  # after CFG only (on request)
    f_hats: List[torch.Tensor] = field(default_factory=list)      # f_hat after each scale (on request)
    noise: List[torch.Tensor] = field(default_factory=list)       # K x (B, n_k): the uniforms used
    rows: List[Row] = field(default_factory=list)
    f_hat: Optional[torch.Tensor] = None    # the final latent (B Cv P P), what the decoder reads
    sampling: Dict[str, list] = field(default_factory=dict)       # per row: the top_k / top_p fed


def draw_row_noise(seed: int, patch_nums: Sequence[int], V: int, smooth: bool):
    """One row's noise: uniforms per scale from `seed`; Gumbel noise (n_k x V) per scale from
    a second stream (seed + 2**63), only for more_smooth rows (else None)."""
    g = torch.Generator().manual_seed(int(seed))
    u = [torch.rand(p * p, generator=g) for p in patch_nums]
    gum = None
    if smooth:
        g2 = torch.Generator().manual_seed(int(seed) + 2 ** 63)
        # -log(-log(u)), u in (0, 1): the standard Gumbel, as F.gumbel_softmax draws it
        gum = [-(-torch.rand(p * p, V, generator=g2).clamp_(1e-20, 1.0).log()).log() for p in patch_nums]
    return u, gum


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
                 force_tokens: Optional[Sequence[torch.Tensor]] = None,
                 force_fhat: Optional[Sequence[torch.Tensor]] = None, decode: bool = True,
                 progress: Optional[Callable[[int], None]] = None) -> RunResult:
        """Generate one image per row. `force_tokens` (K x (len(rows), n_k)): drive f_hat with
        these tokens instead of the sampled ones (teacher forcing; the outputs' tokens stay
        the backend's own draws). `force_fhat` (K x (len(rows), Cv, P, P), a reference's
        `f_hats`): more_smooth rows start scale k from it, since their f_hat follows the
        logits through a sharp softmax, not the tokens. `decode=False` stops at the final
        latent (res.f_hat)."""
        info, mc = self.info, self.info.cfg
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
        dev, V = info.device, mc.V
        f32 = dict(dtype=torch.float32, device=dev)
        drawn = [draw_row_noise(r.seed, mc.patch_nums, V, r.more_smooth) for r in rows[:n_real]]
        drawn += [drawn[0]] * (B - n_real)                          # pads repeat row 0: same noise
        noise = [torch.stack([d[0][k] for d in drawn]).to(dev) for k in range(mc.num_scales)]
        per_row = dict(label=torch.tensor([int(r.class_id) for r in rows], dtype=torch.int64, device=dev),
                       guidance=torch.tensor([float(r.guidance) for r in rows], **f32),
                       temperature=torch.tensor([float(r.temperature) for r in rows], **f32),
                       top_k=torch.tensor([c[1] for c in checked], dtype=torch.int64, device=dev),
                       top_p=torch.tensor([c[2] for c in checked], **f32),
                       smooth=torch.tensor([1.0 if r.more_smooth else 0.0 for r in rows], **f32))
        betas = torch.tensor([[0.0] + list(c[0]) for c in checked], **f32)                 # B K
        force = torch.full((B,), 1.0 if force_tokens is not None else 0.0, **f32)
        shape = (mc.L, mc.depth, 2, 2 * B, mc.num_heads, mc.head_dim)
        kv = self.backend.alloc_kv(shape, info.kv_dtype)       # TensorRT owns it (fixed addresses)
        f_hat = torch.zeros(B, mc.Cvae, mc.patch_nums[-1], mc.patch_nums[-1], device=dev)
        res = RunResult(images=torch.empty(0), tokens=[], rows=rows[:n_real],
                        sampling=dict(top_k=[c[1] for c in checked[:n_real]], top_p=[c[2] for c in checked[:n_real]]))
        prev = torch.zeros(B, prev_rows(mc, 0), V, device=dev)      # scale 0: one zero prior row
        smooth_rows = [i for i, r in enumerate(rows[:n_real]) if r.more_smooth]
        for k, (b, e) in enumerate(mc.begin_ends):
            n = e - b
            if force_fhat is not None and k > 0 and smooth_rows:
                f_hat = f_hat.clone()
                f_hat[smooth_rows] = force_fhat[k - 1][smooth_rows].to(dev, f_hat.dtype)
            forced = torch.zeros(B, n, dtype=torch.int64, device=dev)
            if force_tokens is not None:
                forced[:n_real] = force_tokens[k].to(dev)
            gumbel = torch.zeros(B, n, V, device=dev)                 # rows without more_smooth: unused
            for i, d in enumerate(drawn):
                if d[1] is not None:
                    gumbel[i] = d[1][k]
            feeds: Dict[str, torch.Tensor] = dict(per_row, f_hat=f_hat, noise=noise[k], beta=betas[:, k].contiguous(),
                                                  past_kv=kv[:b], prev_logits=prev, forced=forced, force=force,
                                                  gumbel=gumbel)
            out = self.backend.step(k, feeds, kv[b:e])
            f_hat, prev = out["f_hat_out"], out["logits_cfg"]
            res.tokens.append(out["tokens"][:n_real])
            res.noise.append(noise[k][:n_real])
            if keep_logits:
                res.logits.append(out["logits"][:n_real])
                res.logits_cfg.append(out["logits_cfg"][:n_real])
            if keep_fhat:
                res.f_hats.append(f_hat[:n_real].clone())
            if progress:
                progress(k)
        res.f_hat = f_hat[:n_real].clone()
        if decode:
            res.images = self.backend.decode(f_hat)[:n_real]
        return res
