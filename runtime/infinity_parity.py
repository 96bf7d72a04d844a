"""Teacher-forced parity for Infinity (DESIGN.md, "Infinity" and "Parity bounds"):
the eager reference runs free with the rows' own noise; the backend under test is driven along
the reference's bits (forced), with the same noise, so every scale compares like with like:

    per scale   CFG bit logits and post-SSG bit logits: max |Δ| / max |ref| <= the fp32 bound
                the backend's own bits vs the reference's: every differing bit must be a near-tie
    near-tie    a bit's draw over its pair depends on δ = l[2j+1] − l[2j] (at temperature tau):
                its larger value is kept with probability p = sigmoid(|δ|/tau), the smaller one is
                dropped when 1 − p <= 1 − top_p, and u < p picks the larger. A flip is explained
                when the measured logit difference can move one of those edges past the draw:
                the order (|δ_ref| <= 2·|δ_ref − δ_test|), the u edge (|u − p_ref| <= 2·|p_ref −
                p_test| + 1e-6) or the top-p edge (|(1 − p_ref) − (1 − top_p)| <= 2·|p_ref − p_test|
                + 1e-6). Anything else is an unexplained flip: a failure.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Sequence

import numpy as np

from .infinity import InfinityPipeline, PromptRow

FP32_BOUND = 1e-4           # as VAR's fp32 logits (DESIGN.md "Parity bounds")


@dataclass
class ScaleParity:
    k: int
    logits_cfg_rel: float
    logits_rel: float
    flips: int
    unexplained: int
    bits: int


@dataclass
class InfinityParity:
    backend: str
    scales: List[ScaleParity] = field(default_factory=list)
    failures: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def table(self) -> str:
        lines = [f"{self.backend} vs eager (teacher-forced)",
                 "  k  logits_cfg rel   logits rel   flips  unexplained   bits"]
        for s in self.scales:
            lines.append(f"{s.k:3d}  {s.logits_cfg_rel:14.3e} {s.logits_rel:12.3e} {s.flips:7d} {s.unexplained:12d} {s.bits:6d}")
        return "\n".join(lines)


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - ref).max() / max(float(np.abs(ref).max()), 1e-30))


def unexplained_flips(ref_logits, test_logits, ref_bits, test_bits, u, tau, top_p) -> int:
    """Bits drawn differently that the logit differences cannot explain (module docstring).
    logits B n V, bits/u B n d, tau/top_p (B,) (top_p >= 1: off)."""
    d_ref = (ref_logits[..., 1::2] - ref_logits[..., 0::2]).astype(np.float64)
    d_tst = (test_logits[..., 1::2] - test_logits[..., 0::2]).astype(np.float64)
    t = np.asarray(tau, np.float64).reshape(-1, 1, 1)
    p_ref, p_tst = 1 / (1 + np.exp(-np.abs(d_ref) / t)), 1 / (1 + np.exp(-np.abs(d_tst) / t))
    dp = 2 * np.abs(p_ref - p_tst) + 1e-6
    tp = np.asarray(top_p, np.float64).reshape(-1, 1, 1)
    flip = ref_bits != test_bits
    order = np.abs(d_ref) <= 2 * np.abs(d_ref - d_tst)
    u_edge = np.abs(u - p_ref) <= dp
    p_edge = (tp < 1) & (np.abs((1 - p_ref) - (1 - tp)) <= dp)
    return int((flip & ~(order | u_edge | p_edge)).sum())


def run_infinity_parity(ref: InfinityPipeline, test: InfinityPipeline, rows: Sequence[PromptRow],
                        aspect_ratio: float = 1.0, bound: float = FP32_BOUND) -> InfinityParity:
    r = ref.run(rows, aspect_ratio, keep_logits=True, decode=False)
    t = test.run(rows, aspect_ratio, keep_logits=True, force_bits=r.bits, decode=False)
    rep = InfinityParity(backend=test.info.name)
    taus = [np.array([ref.check_row(row, len(r.bits))[0].tau[k] for row in rows]) for k in range(len(r.bits))]
    top_p = np.array([ref.check_row(row, len(r.bits))[0].top_p_threshold for row in rows])
    for k in range(len(r.bits)):
        flips = int((r.bits[k] != t.bits[k]).sum())
        bad = unexplained_flips(r.logits[k], t.logits[k], r.bits[k], t.bits[k], r.noise[k], taus[k], top_p)
        s = ScaleParity(k, _rel(t.logits_cfg[k], r.logits_cfg[k]), _rel(t.logits[k], r.logits[k]), flips, bad,
                        int(r.bits[k].size))
        rep.scales.append(s)
        for what, v in (("CFG bit logits", s.logits_cfg_rel), ("bit logits after SSG", s.logits_rel)):
            if not v <= bound:
                rep.failures.append(f"scale {k}: {what} differ by {v:.3e} relative (bound {bound:g})")
        if bad:
            rep.failures.append(f"scale {k}: {bad} of {flips} differing bits are not near-ties (unexplained flips)")
    return rep
