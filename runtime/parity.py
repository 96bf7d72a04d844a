"""Parity of a backend against the eager reference, scale by scale (SPEC section 6)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List

from .pipeline import RunResult

BOUNDS = {
    "fp32": dict(logits_rel=1e-4, token_agree=1.0, image_abs=1e-4),
    "fp16": dict(logits_rel=1e-2, token_agree=0.99, image_abs=None),
    "bf16": dict(logits_rel=3e-2, token_agree=0.98, image_abs=None),
}


@dataclass
class ParityReport:
    backend: str
    precision: str
    rows: List[Dict] = field(default_factory=list)
    image_max_abs: float = 0.0
    image_psnr: float = 0.0
    failures: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def table(self) -> str:
        lines = [f"{self.backend} vs eager ({self.precision})",
                 f"{'scale':>5} {'tokens':>7} {'logits max|d|/max|ref|':>24} {'token agree':>12}"]
        for r in self.rows:
            lines.append(f"{r['scale']:>5} {r['n']:>7} {r['logits_rel']:>24.3e} {r['token_agree']:>12.4f}")
        lines.append(f"image max|d| {self.image_max_abs:.3e}  PSNR {self.image_psnr:.1f} dB  -> "
                     + ("OK" if self.ok else "FAIL: " + "; ".join(self.failures)))
        return "\n".join(lines)


def compare(ref: RunResult, got: RunResult, backend: str, precision: str) -> ParityReport:
    b = BOUNDS[precision]
    rep = ParityReport(backend=backend, precision=precision)
    for k, (lr, lg, tr, tg) in enumerate(zip(ref.logits, got.logits, ref.tokens, got.tokens)):
        rel = ((lg.float().cpu() - lr.float().cpu()).abs().max() / lr.abs().max().clamp_min(1e-30)).item()
        agree = (tg.cpu() == tr.cpu()).float().mean().item()
        rep.rows.append(dict(scale=k, n=tr.shape[-1], logits_rel=rel, token_agree=agree))
        if rel > b["logits_rel"]:
            rep.failures.append(f"scale {k} logits rel {rel:.2e} > {b['logits_rel']:g}")
        if agree < b["token_agree"]:
            rep.failures.append(f"scale {k} token agreement {agree:.4f} < {b['token_agree']}")
    d = (got.images.float().cpu() - ref.images.float().cpu())
    rep.image_max_abs = d.abs().max().item()
    mse = d.pow(2).mean().item()
    rep.image_psnr = float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)
    if b["image_abs"] is not None and rep.image_max_abs > b["image_abs"]:
        rep.failures.append(f"image max|d| {rep.image_max_abs:.2e} > {b['image_abs']:g}")
    return rep
