"""Parity of a backend against the eager reference, scale by scale (DESIGN.md "Parity bounds").

Teacher-forced (the default): the reference runs freely; the backend under test runs the same
rows with its f_hat driven by the reference's tokens (`force_tokens`; more_smooth rows, whose
f_hat follows the logits through a sharp softmax, start each scale from the reference's f_hat),
so every scale compares like with like. Free-running (a report): both run freely; rows are
compared until their tokens first differ.

Per scale, four measures, each max|d| / max|ref| against a bound measured from the noise of a
correct backend (BOUNDS, DESIGN.md "Parity bounds"):
  CFG logits       backend vs reference
  post-SSG logits  backend vs reference
  DSE prior        the prior the backend used, (l_cfg - l) / beta + l_cfg, against the DSE of
                   its own previous CFG logits computed on the host in float64 (rows with beta != 0)
  f_hat            backend vs reference; more_smooth rows allow the Gumbel-softmax's gain
and three token checks:
  sampler          every token the backend drew must be what the float64 reference sampler
                   draws from the backend's own logits with the same u, top-k, top-p and
                   temperature; a difference is excused only by fp32 rounding (u, or the top-p
                   mass, within ROUND_EPS of a CDF edge), a fixed margin that no logit error widens
  flips            tokens that differ from the reference's are reported with their near-tie
                   evidence (u's distance to the reference bin's edge)
  flip rate        the expected number of flips, from each position's two float64 kept
                   distributions (the share of u in [0, 1) that lands in different tokens), against
                   the observed count: fail when P(Poisson(expected) >= observed) < P_FLIP
The sampler in every artifact set runs in fp32 on the logits it outputs (fp16/bf16 cast only
the transformer), so the sampler check is exact for every precision.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from var_ssg.common.errors import ConfigError
from var_ssg.graphs.config import DEFAULT_TOP_K, DEFAULT_TOP_P, parse_ssg_beta
from var_ssg.graphs.sampling import BISECT_STEPS
from var_ssg.graphs.step import smooth_tau

from .pipeline import RunResult, Row

# max|d| / max|ref| of the CFG and post-SSG logits, per precision of the backend under test
# (the reference is eager fp32). Measured noise x a stated margin: DESIGN.md "Parity bounds".
BOUNDS = {
    "fp32": 2e-5,
    "fp16": 4e-3,
    "bf16": 3e-2,
    "int8": None,     # quantized: no logit bound; judged by runtime.quality's gate (TV against bf16 autocast)
    "fp8": None,      # the same (TensorRT only: DESIGN.md "Low precision")
}
PRIOR_BOUND = 2e-5       # the DSE prior: fp32 in every artifact set, from the backend's own logits
FHAT_BOUND = 2e-5        # f_hat, teacher-forced: same tokens, fp32 update
SMOOTH_FHAT_GAIN = 1.0   # more_smooth rows: f_hat bound + this * expm1(2 * gain * d)
IMAGE_BOUND = 1e-4       # an fp32 decoder (int8 artifacts with int8 convs: a PSNR bound instead, runtime.quality)
ROUND_EPS = 2e-6         # fp32 rounding of a CDF edge or of the top-p mass (K <= 4096 terms)
P_FLIP = 1e-6            # flip-rate test: a count this unlikely under the expected rate fails


# ------------------------------------------------------------------ the float64 reference sampler
def _kept(l64: torch.Tensor, T, top_k, top_p, k_max: int, thr_scale: float = 1.0):
    """Kept, normalised probabilities in CDF order and their token ids: l64 (N V) float64,
    T/top_k/top_p (N 1). Sorted sampler: descending, ties by lower id (ONNX TopK's order)."""
    z = l64 / T
    if k_max > 0:
        K = min(k_max, z.shape[-1])
        cand = torch.topk(z, min(K + 1, z.shape[-1]), dim=-1).indices.sort(-1).values    # ids ascending
        order = cand.gather(-1, torch.sort(z.gather(-1, cand), dim=-1, descending=True, stable=True).indices)
        order = order[..., :K]                   # ties (rare: equal fp32 logits) go to the lower id
        vals = z.gather(-1, order)
        vals = torch.where(torch.arange(K) < top_k, vals, torch.full_like(vals, -torch.inf))
        p = vals.softmax(-1)
        p = torch.where((p.cumsum(-1) - p) < top_p, p, torch.zeros_like(p))
    else:
        p = z.softmax(-1)
        lo, hi = torch.zeros_like(p[..., :1]), p.amax(-1, keepdim=True)
        for _ in range(BISECT_STEPS):
            mid = (lo + hi) * 0.5
            ok = torch.where(p >= mid, p, torch.zeros_like(p)).sum(-1, keepdim=True) >= top_p
            lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
        p = torch.where(p >= lo * thr_scale, p, torch.zeros_like(p))
        order = torch.arange(p.shape[-1]).expand_as(p)
    return p / p.sum(-1, keepdim=True), order


def _draw(q, order, u):
    """Inverse CDF: token ids (N) and the CDF (N K)."""
    cdf = q.cumsum(-1)
    j = (cdf <= u.unsqueeze(-1)).sum(-1, keepdim=True)
    last = ((q > 0).to(torch.int64) * torch.arange(q.shape[-1])).amax(-1, keepdim=True)
    return order.gather(-1, torch.minimum(j, last)).squeeze(-1), cdf


def _intervals(q, order, cdf, V: int):
    """Each token's bin [lo, hi) of u over the vocabulary (N V); tokens not kept: empty."""
    hi = torch.zeros(q.shape[0], V, dtype=torch.float64).scatter_(-1, order, cdf)
    lo = torch.zeros_like(hi).scatter_(-1, order, cdf - q)
    return lo, hi


@dataclass
class Sampled:
    tokens: torch.Tensor     # N
    lo: torch.Tensor         # N V
    hi: torch.Tensor         # N V


def reference_sample(l64, u, T, top_k, top_p, k_max: int) -> Sampled:
    q, order = _kept(l64, T, top_k, top_p, k_max)
    tok, cdf = _draw(q, order, u)
    return Sampled(tok, *_intervals(q, order, cdf, l64.shape[-1]))


def _rounding_tie(l64, u, T, top_k, top_p, k_max: int, got: int) -> bool:
    """Does `got` follow from the backend's logits (1 V) within fp32 rounding: with the top-p
    mass (or the bisection threshold) moved by ROUND_EPS, u within ROUND_EPS of got's bin?"""
    scales = (1.0,) if k_max > 0 else (1 - ROUND_EPS, 1.0, 1 + ROUND_EPS)
    for tp in (top_p, top_p - ROUND_EPS, top_p + ROUND_EPS):
        for s in scales:
            q, order = _kept(l64, T, top_k, tp, k_max, s)
            _, cdf = _draw(q, order, u)
            lo, hi = _intervals(q, order, cdf, l64.shape[-1])
            a, b = float(lo[0, got]), float(hi[0, got])
            if b > a and a - ROUND_EPS <= float(u[0]) < b + ROUND_EPS:
                return True
    return False


def poisson_tail(n: int, lam: float) -> float:
    """P(X >= n) for X ~ Poisson(lam)."""
    if n <= 0 or n <= lam:
        return 1.0
    if lam <= 0:
        return 0.0
    total, i = 0.0, n
    while True:
        t = math.exp(-lam + i * math.log(lam) - math.lgamma(i + 1))
        total += t
        if t < total * 1e-17 or i > n + 10000:
            return min(1.0, total)
        i += 1


# ------------------------------------------------------------------ the report
@dataclass
class ParityReport:
    backend: str
    precision: str
    mode: str
    rows: List[Dict] = field(default_factory=list)       # per run ("rows" / "probe") and scale
    flips: List[Dict] = field(default_factory=list)      # every token that differs from the reference's
    mismatches: List[Dict] = field(default_factory=list)  # tokens the backend's own logits do not give
    image_max_abs: float = 0.0
    failures: List[str] = field(default_factory=list)
    images_equal: float = 1.0
    image_psnr: float = float("inf")

    @property
    def ok(self) -> bool:
        return not self.failures

    def table(self) -> str:
        lb = BOUNDS[self.precision]
        lines = [f"{self.backend} vs eager ({self.precision}, {self.mode}); bounds: logits "
                 f"{'none (quality gate)' if lb is None else format(lb, 'g')}, "
                 f"DSE prior {PRIOR_BOUND:g}, f_hat {FHAT_BOUND:g}, flip rate p < {P_FLIP:g}",
                 f"{'run':>5} {'scale':>5} {'tokens':>6} {'cfg logits rel':>14} {'ssg logits rel':>14} "
                 f"{'prior rel':>9} {'f_hat rel':>9} {'flips':>5} {'expected':>8} {'sampler ok':>10}"]
        for r in self.rows:
            lines.append(f"{r['run']:>5} {r['scale']:>5} {r['n']:>6} {r['logits_cfg_rel']:>14.2e} "
                         f"{r['logits_rel']:>14.2e} {r['prior_rel']:>9.2e} {r.get('f_hat_rel', float('nan')):>9.2e} "
                         f"{r['flips']:>5} {r['expected_flips']:>8.2f} {r['n'] * r['batch'] - r['mismatches']:>10}")
        for f in self.flips[:10]:
            lines.append(f"  flip {f['run']} scale {f['scale']} row {f['row']} pos {f['pos']}: token {f['ref']} vs "
                         f"{f['got']}, u {f['u_edge_dist']:.2e} from the reference bin's edge, logits differ by "
                         f"{f['logit_diff']:.2e} -> {f['why']}")
        tail = f"images equal {self.images_equal * 100:.0f}%  PSNR {self.image_psnr:.1f} dB  " \
            if self.mode == "free-running" else \
            f"image max|d| {self.image_max_abs:.2e}  PSNR {self.image_psnr:.1f} dB  "
        lines.append(tail + "-> " + ("OK" if self.ok else "FAIL: " + "; ".join(self.failures)))
        return "\n".join(lines)

    def to_json(self) -> Dict:
        return dict(backend=self.backend, precision=self.precision, mode=self.mode, ok=self.ok, rows=self.rows,
                    flips=self.flips, mismatches=self.mismatches, failures=self.failures,
                    images_equal=self.images_equal, image_psnr=self.image_psnr, image_max_abs=self.image_max_abs)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    a, b = a.double().cpu(), b.double().cpu()
    return float((b - a).abs().max() / a.abs().max().clamp_min(1e-30))


@dataclass(frozen=True)
class RunInfo:
    """Per row of one run: what the graph was fed (fp32 values, as the graph saw them)."""
    T: torch.Tensor          # B 1 float64
    top_k: torch.Tensor      # B 1 int64
    top_p: torch.Tensor      # B 1 float64
    betas: torch.Tensor      # B K float64 (scale 0: 0)
    smooth: torch.Tensor     # B bool


def run_info(ref: RunResult, num_scales: int) -> RunInfo:
    f32 = lambda xs: torch.tensor(xs, dtype=torch.float32).double().view(-1, 1)   # noqa: E731
    betas = []
    for r in ref.rows:
        b = parse_ssg_beta(r.ssg_beta, num_scales) if isinstance(r.ssg_beta, str) else tuple(r.ssg_beta)
        betas.append((0.0,) + tuple(b))
    return RunInfo(T=f32([r.temperature for r in ref.rows]), top_k=torch.tensor(ref.sampling["top_k"]).view(-1, 1),
                   top_p=f32(ref.sampling["top_p"]), betas=torch.tensor(betas, dtype=torch.float32).double(),
                   smooth=torch.tensor([bool(r.more_smooth) for r in ref.rows]))


@functools.lru_cache(maxsize=64)
def _dse64(pn_prev: int, pn: int, transform: str) -> torch.Tensor:
    from var_ssg.graphs.dse import dse_matrix
    return torch.from_numpy(dse_matrix((pn_prev, pn_prev), (pn, pn), transform))


def _prior_rel(got: RunResult, k: int, info: RunInfo, live, pn_prev: int, pn: int, transform: str) -> float:
    """The prior the backend applied, recovered from its outputs, vs the float64 DSE of its own
    previous CFG logits; rows with beta != 0 (elsewhere the prior does not reach the output)."""
    rows = [b for b in range(len(got.rows)) if live[b] and info.betas[b, k] != 0]
    if k == 0 or not rows:
        return 0.0
    prior = _dse64(pn_prev, pn, transform) @ got.logits_cfg[k - 1][rows].double().cpu()      # R n V
    lc, lg = got.logits_cfg[k][rows].double().cpu(), got.logits[k][rows].double().cpu()
    beta = info.betas[rows, k].view(-1, 1, 1)
    used = lc + (lc - lg) / beta
    return float((used - prior).abs().max() / prior.abs().max().clamp_min(1e-30))


def _tokens_at_scale(rep: ParityReport, run: str, k: int, ref: RunResult, got: RunResult, info: RunInfo,
                     live: torch.Tensor, k_max: int) -> Tuple[int, float, int]:
    """Sampler check, flips and the flip rate at scale k -> (flips, expected flips, mismatches)."""
    B, n = ref.tokens[k].shape
    rows = live.nonzero().flatten()
    if len(rows) == 0:
        return 0, 0.0, 0
    V = ref.logits[k].shape[-1]
    rep_n = lambda t: t[rows].repeat_interleave(n, 0)                  # noqa: E731 - per row -> per position
    T, tk, tp = rep_n(info.T), rep_n(info.top_k), rep_n(info.top_p)
    u = ref.noise[k][rows].double().cpu().reshape(-1)
    lr = ref.logits[k][rows].double().cpu().reshape(-1, V)
    lg = got.logits[k][rows].double().cpu().reshape(-1, V)
    sr, sg = reference_sample(lr, u, T, tk, tp, k_max), reference_sample(lg, u, T, tk, tp, k_max)
    tref = ref.tokens[k][rows].cpu().reshape(-1)
    tgot = got.tokens[k][rows].cpu().reshape(-1)
    overlap = (torch.minimum(sr.hi, sg.hi) - torch.maximum(sr.lo, sg.lo)).clamp_min(0).sum(-1)
    expected = float((1 - overlap).clamp_min(0).sum())
    n_mis, ties = 0, {}
    for j in (tgot != sg.tokens).nonzero().flatten().tolist():            # the sampler check
        b, i = int(rows[j // n]), j % n
        tie = _rounding_tie(lg[j:j + 1], u[j:j + 1], T[j:j + 1], tk[j:j + 1], float(tp[j]), k_max, int(tgot[j]))
        rep.mismatches.append(dict(run=run, scale=k, row=b, pos=i, got=int(tgot[j]), float64=int(sg.tokens[j]),
                                   rounding=tie))
        ties[j] = tie
        n_mis += not tie
    flips = (tref != tgot).nonzero().flatten().tolist()
    for j in flips:
        t = int(tref[j])
        lo, hi = float(sr.lo[j, t]), float(sr.hi[j, t])
        why = "UNEXPLAINED" if not ties.get(j, True) else "fp32 rounding tie" if j in ties else "its own logits give it"
        rep.flips.append(dict(run=run, scale=k, row=int(rows[j // n]), pos=j % n, ref=t, got=int(tgot[j]),
                              u_edge_dist=min(float(u[j]) - lo, hi - float(u[j])) if hi > lo else float("inf"),
                              logit_diff=float((lg[j] - lr[j]).abs().max()), explained=why != "UNEXPLAINED", why=why))
    if n_mis:
        m = next(m for m in rep.mismatches if (m["run"], m["scale"]) == (run, k) and not m["rounding"])
        rep.failures.append(f"{run} scale {k}: sampler: {n_mis} tokens that the float64 sampler on the backend's own "
                            f"logits does not give (first: row {m['row']} position {m['pos']}: drew {m['got']}, "
                            f"its logits give {m['float64']})")
    p = poisson_tail(len(flips), expected)
    if p < P_FLIP:
        rep.failures.append(f"{run} scale {k}: flip rate: {len(flips)} token flips where the logit differences "
                            f"predict {expected:.2f} (P = {p:.1e} < {P_FLIP:g})")
    return len(flips), expected, n_mis


def compare(ref: RunResult, got: RunResult, backend: str, precision: str, k_max: int, transform: str,
            patch_nums: Sequence[int], mode: str = "teacher-forced", run: str = "rows",
            rep: Optional[ParityReport] = None, image_psnr_min: Optional[float] = None) -> ParityReport:
    """Compare one run of the backend with the reference's (appending to `rep` if given).
    `image_psnr_min` (a quantized decoder): teacher-forced images must be within this PSNR (dB)
    of the reference's instead of IMAGE_BOUND."""
    bound = BOUNDS[precision]
    rep = rep or ParityReport(backend=backend, precision=precision, mode=mode)
    ref, got = ref.as_torch(), got.as_torch()
    K = len(ref.tokens)
    info = run_info(ref, K)
    B = ref.tokens[0].shape[0]
    live = torch.ones(B, dtype=torch.bool)        # free-running: rows whose inputs still agree
    for k in range(K):
        rel_cfg = _rel(ref.logits_cfg[k][live], got.logits_cfg[k][live])
        rel = _rel(ref.logits[k][live], got.logits[k][live])
        prior = _prior_rel(got, k, info, live, patch_nums[k - 1] if k else 0, patch_nums[k], transform)
        n_flips, expected, n_mis = _tokens_at_scale(rep, run, k, ref, got, info, live, k_max)
        row = dict(run=run, scale=k, n=ref.tokens[k].shape[-1], batch=int(live.sum()), logits_cfg_rel=rel_cfg,
                   logits_rel=rel, prior_rel=prior, flips=n_flips, expected_flips=expected, mismatches=n_mis,
                   token_agree=float((ref.tokens[k].cpu() == got.tokens[k].cpu()).float().mean()))
        checks = [] if bound is None else [("CFG logits", rel_cfg, bound, precision),
                                           ("post-SSG logits", rel, bound, precision)]
        checks.append(("DSE prior", prior, PRIOR_BOUND, "fp32"))
        if mode == "teacher-forced":
            plain, smooth = ~info.smooth, info.smooth
            row["f_hat_rel"] = _rel(ref.f_hats[k][plain], got.f_hats[k][plain])
            checks.append(("f_hat", row["f_hat_rel"], FHAT_BOUND, "fp32"))
            if smooth.any():
                # the Gumbel-softmax multiplies logits by (1 + r) / (T tau): its weights move by up
                # to expm1(2 gain d) for a logit difference d (DESIGN.md "Parity bounds")
                r = k / (K - 1)
                gain = (1 + r) / (smooth_tau(r) * float(info.T[smooth].min()))
                d = float((ref.logits[k][smooth].double() - got.logits[k][smooth].double()).abs().max())
                row["f_hat_smooth_rel"] = _rel(ref.f_hats[k][smooth], got.f_hats[k][smooth])
                row["f_hat_smooth_bound"] = FHAT_BOUND + SMOOTH_FHAT_GAIN * math.expm1(min(2 * gain * d, 50.0))
                checks.append(("f_hat (more_smooth rows)", row["f_hat_smooth_rel"], row["f_hat_smooth_bound"],
                               f"gain {gain:.0f}"))
        rep.rows.append(row)
        for what, v, b, why in checks:
            if not v <= b:
                rep.failures.append(f"{run} scale {k}: {what} max|d|/max|ref| {v:.2e} > {b:.2g} ({why} bound)")
        if mode == "free-running":                 # after a flip the rows see different inputs
            live &= (ref.tokens[k].cpu() == got.tokens[k].cpu()).all(dim=1)
    if not ref.images.numel() or not got.images.numel():
        return rep                                 # a run stopped at the latent (the probe): no image to compare
    if mode == "free-running":
        same = torch.stack([(a.cpu() == b.cpu()).all(dim=1) for a, b in zip(ref.tokens, got.tokens)]).all(dim=0)
        rep.images_equal = float(same.float().mean())
        d = got.images.float().cpu() - ref.images.float().cpu()
        mse = float(d.pow(2).mean())
        rep.image_psnr = float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)
    else:
        plain = ~info.smooth         # more_smooth images follow the last scale's soft weights (f_hat check)
        if plain.any():
            a, b = ref.images[plain].float().cpu(), got.images[plain].float().cpu()
            rep.image_max_abs = max(rep.image_max_abs, float((b - a).abs().max()))
            for i in range(a.shape[0]):          # the worst image's PSNR (images in [0, 1])
                mse = float((b[i].double() - a[i].double()).pow(2).mean())
                rep.image_psnr = min(rep.image_psnr, float("inf") if mse == 0 else 10 * math.log10(1.0 / mse))
        if image_psnr_min is not None:
            if not rep.image_psnr >= image_psnr_min:
                rep.failures.append(f"{run}: image PSNR {rep.image_psnr:.1f} dB < {image_psnr_min:g} dB (the int8 "
                                    f"decoder against the fp32 one, same tokens)")
        elif rep.image_max_abs > IMAGE_BOUND:
            rep.failures.append(f"{run}: image max|d| {rep.image_max_abs:.2e} > {IMAGE_BOUND:g} (the decoder)")
    return rep


def probe_rows(num_classes: int, k_max: int, seed: int) -> List[Row]:
    """The settings every default run adds beside the user's rows, so that a graph that
    ignores temperature, top-k, top-p or the DSE prior differs from the reference: T != 1,
    top-p != 0.96, top-k != 900 (where the artifacts have a top-k), beta != 0."""
    top_k = 0 if k_max == 0 else max(1, min(k_max - 1, DEFAULT_TOP_K // 9))
    assert top_k != DEFAULT_TOP_K and DEFAULT_TOP_P != 0.9
    return [Row(class_id=(7 * seed + 3) % num_classes, seed=seed, guidance=3.0, ssg_beta="linear:0.6,1.2",
                top_k=top_k, top_p=0.9, temperature=1.4)]


def run_parity(ref_pipe, pipe, rows: Sequence[Row], precision: str, mode: str = "teacher-forced",
               probe: bool = True, ref_cache: Optional[Dict] = None, images: bool = True) -> ParityReport:
    """Run the reference and the backend on the user's rows (and, with `probe`, on
    `probe_rows` in a second run) and compare them. The probe run stops at the final latent:
    the decoder does not see the sampling settings, so the rows' images check it (DESIGN.md
    "Parity bounds"). `images=False` checks the step graph only (no decode at all). `ref_cache`
    (a dict) keeps the reference's runs for reuse against other backends."""
    if mode not in ("teacher-forced", "free-running"):
        raise ConfigError(f"parity mode must be teacher-forced or free-running, got {mode!r}")
    info = pipe.info
    free = mode == "free-running"
    rep = ParityReport(backend=info.name, precision=precision, mode=mode)
    runs = [("rows", list(rows))]
    if probe:
        runs.append(("probe", probe_rows(info.cfg.num_classes, info.k_max, int(rows[0].seed) + 7919)))
    for name, rs in runs:
        decode = images and name == "rows" and (free or any(not r.more_smooth for r in rs))   # see compare
        key = (tuple(rs), free, decode)
        ref = ref_cache.get(key) if ref_cache is not None else None
        if ref is None:
            ref = ref_pipe.run_rows(rs, keep_logits=True, keep_fhat=not free, decode=decode)
            if ref_cache is not None:
                ref_cache[key] = ref
        got = pipe.run_rows(rs, keep_logits=True, keep_fhat=not free, force_tokens=None if free else ref.tokens,
                            force_fhat=None if free else ref.f_hats, decode=decode)
        compare(ref, got, info.name, precision, info.k_max, info.transform, info.cfg.patch_nums, mode, name, rep)
    return rep
