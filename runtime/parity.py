"""Parity of a backend against the eager reference, scale by scale (SPEC section 6).

Teacher-forced (the default): the reference runs freely; the backend under test runs the same
rows with its f_hat driven by the reference's tokens (`force_tokens`; more_smooth rows, whose
f_hat follows the logits through a sharp softmax, start each scale from the reference's f_hat),
so every scale compares like with like. Per scale: CFG logits and post-SSG logits (max |d| / max |ref|), the backend's
own sampled tokens against the reference's, and for every differing token the evidence that it
is a near-tie (`flip_margin`). Pass = logits within bounds and zero unexplained flips.

Free-running (a report): both run freely; share of images with every token equal, image PSNR;
it fails only on unexplained flips at the first scale where an image's tokens differ (later
scales see different inputs and are not comparable).

The near-tie rule. Inverse-CDF sampling picks token j when u lies in [c_{j-1}, c_j) of the
kept, normalised CDF. If the two backends' logits at that position differ by at most d (max
over the vocabulary), every kept probability changes by a factor within exp(±2d/T), so every
CDF edge moves by at most exp(2d/T) - 1 (and top-k/top-p set boundaries within that much of
their threshold can move). A flip is explained when the reference's u lies within
    margin = FLIP_SAFETY * (exp(2d/T) - 1) + CDF_EPS
of the edge of its token's bin, or a kept-set boundary at that position is within the same
margin of top-p / within 2d of the top-k cut. The sorted sampler has one more kind of tie:
candidates whose logits are within 2d of each other can swap places in the TopK order, so the
same u picks the other one; that flip is explained when the two tokens' reference logits are
within 2d (a near-flat distribution, as with random weights, shows these most). FLIP_SAFETY = 4 covers the float32 rounding of
the CDF sums themselves; CDF_EPS = 1e-6 is that rounding for a few thousand terms.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch

from graphs.sampling import bisect_candidates, sorted_candidates

from .pipeline import RunResult

# max |d| / max |ref| of the logits, per precision of the backend under test:
BOUNDS = {
    "fp32": 1e-4,   # same fp32 math, other summation orders: measured 3e-7..2e-6 (d2-tiny), ~1e-5 at V=4096
    "fp16": 1e-2,   # transformer + KV in fp16 (10-bit mantissa, ~5e-4 per op, accumulated over depth)
    "bf16": 3e-2,   # 7-bit mantissa: ~8x fp16's rounding
}
# the image: the decoder is fp32 in every artifact set and its input follows the same tokens, so
# only f_hat's own rounding reaches the pixels (measured ~5e-6 on var-d2-tiny)
IMAGE_BOUND = 1e-3
FLIP_SAFETY = 4.0
CDF_EPS = 1e-6


def flip_margin(d: float, temperature: float) -> float:
    return FLIP_SAFETY * math.expm1(2.0 * d / temperature) + CDF_EPS


def _near_tie(ref_l: torch.Tensor, d: float, u: float, tok: int, got: int, T: float, top_k: int, top_p: float,
              k_max: int) -> Tuple[bool, float, float]:
    """(explained, distance of u to its bin's edge, margin) for one position (ref_l: V)."""
    m = flip_margin(d, T)
    if k_max > 0 and abs(float(ref_l[tok]) - float(ref_l[got])) <= 2 * d * (1 + 1e-3):
        return True, 0.0, m                     # an order tie in the TopK candidates
    one = lambda x: torch.tensor([x])          # noqa: E731
    l = ref_l.double().view(1, 1, -1)
    if k_max > 0:
        p, idx = sorted_candidates(l, one(T), one(top_k), one(top_p), k_max)
        p, idx = p[0, 0], idx[0, 0]
        hit = (idx == tok).nonzero()
        j = int(hit[0, 0]) if len(hit) else -1
        vals = torch.topk(l[0, 0] / T, min(k_max, l.shape[-1])).values          # the candidates, descending
        if 0 < top_k < len(vals) and vals[top_k - 1] - vals[top_k] <= 2 * d / T:
            return True, 0.0, m                   # the top-k cut is a near-tie
        vals = vals[:top_k] if top_k > 0 else vals
    else:
        p = bisect_candidates(l, one(T), one(top_p))[0, 0]
        j = tok
        vals = torch.sort(l[0, 0] / T, descending=True).values
    # the nucleus cut: a candidate whose mass before/after it is within the margin of top-p
    q = vals.softmax(0)
    incl = q.cumsum(0)
    if top_p <= 1.0 and bool((((incl - q) - top_p).abs() <= m).any() or ((incl - top_p).abs() <= m).any()):
        return True, 0.0, m
    total = float(p.sum())
    cdf = p.cumsum(0) / total
    excl = cdf - p / total
    if j < 0 or p[j] <= 0:
        return False, float("inf"), m          # the reference's token is not even kept
    lo, hi = float(excl[j]), float(cdf[j])
    dist = min(u - lo, hi - u)
    return dist <= m, dist, m


@dataclass
class ParityReport:
    backend: str
    precision: str
    mode: str
    rows: List[Dict] = field(default_factory=list)
    flips: List[Dict] = field(default_factory=list)          # every differing token, with its evidence
    image_max_abs: float = 0.0
    failures: List[str] = field(default_factory=list)
    images_equal: float = 1.0
    image_psnr: float = float("inf")

    @property
    def ok(self) -> bool:
        return not self.failures

    def table(self) -> str:
        lines = [f"{self.backend} vs eager ({self.precision}, {self.mode})",
                 f"{'scale':>5} {'tokens':>7} {'cfg logits rel':>15} {'ssg logits rel':>15} {'f_hat rel':>10} "
                 f"{'token agree':>12} {'flips':>6} {'explained':>9}"]
        for r in self.rows:
            lines.append(f"{r['scale']:>5} {r['n']:>7} {r['logits_cfg_rel']:>15.3e} {r['logits_rel']:>15.3e} "
                         f"{r.get('f_hat_rel', float('nan')):>10.2e} {r['token_agree']:>12.5f} {r['flips']:>6} "
                         f"{r['explained']:>9}")
        for f in self.flips[:10]:
            lines.append(f"  flip scale {f['scale']} row {f['row']} pos {f['pos']}: token {f['ref']} vs {f['got']}, "
                         f"u {f['u_edge_dist']:.2e} from the CDF edge, logits differ by {f['logit_diff']:.2e}, "
                         f"margin {f['margin']:.2e} -> {'near-tie' if f['explained'] else 'UNEXPLAINED'}")
        tail = f"images equal {self.images_equal * 100:.0f}%  PSNR {self.image_psnr:.1f} dB  " if self.mode == "free-running" \
            else f"image max|d| {self.image_max_abs:.2e}  "
        lines.append(tail + "-> " + ("OK" if self.ok else "FAIL: " + "; ".join(self.failures)))
        return "\n".join(lines)

    def to_json(self) -> Dict:
        return dict(backend=self.backend, precision=self.precision, mode=self.mode, ok=self.ok, rows=self.rows,
                    flips=self.flips, failures=self.failures, images_equal=self.images_equal,
                    image_psnr=self.image_psnr, image_max_abs=self.image_max_abs)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return float((b - a).abs().max() / a.abs().max().clamp_min(1e-30))


def _check_flips(rep: ParityReport, k: int, ref: RunResult, got: RunResult, rows_mask, sampler: Dict, k_max: int):
    """Record every token where got differs from ref at scale k (for rows in rows_mask)."""
    tr, tg = ref.tokens[k].cpu(), got.tokens[k].cpu()
    diff = (tr != tg) & rows_mask.view(-1, 1)
    n_expl = 0
    for b, i in diff.nonzero().tolist():
        row = ref.rows[b]
        lr, lg = ref.logits[k][b, i].float().cpu(), got.logits[k][b, i].float().cpu()
        d = float((lg - lr).abs().max())
        top_k = sampler["top_k"][b]
        ok, dist, m = _near_tie(lr, d, float(ref.noise[k][b, i]), int(tr[b, i]), int(tg[b, i]), float(row.temperature),
                                top_k, sampler["top_p"][b], k_max)
        n_expl += ok
        rep.flips.append(dict(scale=k, row=b, pos=i, ref=int(tr[b, i]), got=int(tg[b, i]), u_edge_dist=dist,
                              logit_diff=d, margin=m, explained=ok))
    n = int(diff.sum())
    if n > n_expl:
        first = next(f for f in rep.flips if f["scale"] == k and not f["explained"])
        rep.failures.append(f"scale {k}: {n - n_expl} unexplained token flips (tokens; first at row {first['row']} "
                            f"position {first['pos']}: u is {first['u_edge_dist']:.2e} from the CDF edge, the logits "
                            f"differ by {first['logit_diff']:.2e}, margin {first['margin']:.2e})")
    return n, n_expl


def compare(ref: RunResult, got: RunResult, backend: str, precision: str, sampler: Dict[str, list], k_max: int,
            mode: str = "teacher-forced") -> ParityReport:
    """`sampler`: per row, the top_k and top_p threshold each row was sampled with. Teacher-forced
    runs also compare each scale's f_hat (the update, more_smooth's included) and the image."""
    bound = BOUNDS[precision]
    rep = ParityReport(backend=backend, precision=precision, mode=mode)
    B = ref.tokens[0].shape[0]
    live = torch.ones(B, dtype=torch.bool)        # free-running: rows whose inputs still agree
    for k in range(len(ref.tokens)):
        rel_cfg = _rel(ref.logits_cfg[k][live], got.logits_cfg[k][live]) if live.any() else 0.0
        rel = _rel(ref.logits[k][live], got.logits[k][live]) if live.any() else 0.0
        agree = float((ref.tokens[k].cpu() == got.tokens[k].cpu()).float().mean())
        n, n_expl = _check_flips(rep, k, ref, got, live, sampler, k_max)
        row = dict(scale=k, n=ref.tokens[k].shape[-1], logits_cfg_rel=rel_cfg, logits_rel=rel,
                   token_agree=agree, flips=n, explained=n_expl)
        checks = [("CFG logits", rel_cfg), ("post-SSG logits", rel)]
        if mode == "teacher-forced":
            row["f_hat_rel"] = _rel(ref.f_hats[k], got.f_hats[k])
            checks.append(("f_hat", row["f_hat_rel"]))
        rep.rows.append(row)
        for what, v in checks:
            if v > bound:
                rep.failures.append(f"scale {k}: {what} max|d|/max|ref| {v:.2e} > {bound:g} ({precision} bound)")
        if mode == "free-running":                 # after a flip the rows see different inputs
            live &= (ref.tokens[k].cpu() == got.tokens[k].cpu()).all(dim=1)
    if mode == "free-running":
        same = torch.stack([(a.cpu() == b.cpu()).all(dim=1) for a, b in zip(ref.tokens, got.tokens)]).all(dim=0)
        rep.images_equal = float(same.float().mean())
        d = got.images.float().cpu() - ref.images.float().cpu()
        mse = float(d.pow(2).mean())
        rep.image_psnr = float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)
        rep.failures = [f for f in rep.failures if "unexplained" in f]      # a report: flips are expected
    else:
        rep.image_max_abs = float((got.images.float().cpu() - ref.images.float().cpu()).abs().max())
        if rep.image_max_abs > IMAGE_BOUND:
            rep.failures.append(f"image max|d| {rep.image_max_abs:.2e} > {IMAGE_BOUND:g} (the decoder)")
    return rep


def run_parity(ref_pipe, pipe, rows, precision: str, mode: str = "teacher-forced") -> ParityReport:
    """Run the reference and the backend on the same rows and compare them."""
    if mode not in ("teacher-forced", "free-running"):
        raise ValueError(mode)
    free = mode == "free-running"
    ref = ref_pipe.run_rows(rows, keep_logits=True, keep_fhat=not free)
    got = pipe.run_rows(rows, keep_logits=True, keep_fhat=not free, force_tokens=None if free else ref.tokens,
                        force_fhat=None if free else ref.f_hats)
    return compare(ref, got, pipe.info.name, precision, ref.sampling, pipe.info.k_max, mode)
