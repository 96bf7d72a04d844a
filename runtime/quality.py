"""The quality gate for low-precision artifacts (DESIGN.md "Low precision"): bit parity cannot
hold there, so the backend is judged by how far its sampling distributions move, against what
the official code itself accepts: the transformer under bf16 autocast, measured the same way.

Teacher-forced on the fp32 reference's tokens, per scale, over every position of every row:
  TV   mean total-variation distance between the reference's kept distribution (after
       temperature, top-k and top-p, the sampler's own rule) and the backend's: the probability
       that coupled sampling (the same u) picks a different token;
  KL   mean KL(reference || backend) of the tempered full softmax (finite where the kept sets
       differ);
for the backend under test and for the baseline (eager, fp32 weights, transformer under
torch.autocast bf16). The gate, per scale: TV(backend) <= GATE_FACTOR * TV(baseline) + TV_SLACK.
The token checks of runtime.parity still apply to the backend (every token follows from its
own logits; the observed flips agree with the count the logit differences predict, the
Poisson test), as do the fp32 checks of the DSE prior, f_hat and the image on fixed tokens.
Where the decoder's convs are int8 too (`image_psnr_min`: the manifest's quantization.decoder),
the image on fixed tokens (the reference's latent, within the f_hat bound) is judged by its
PSNR against the fp32 decoder's: >= contract.quantization.IMAGE_PSNR_MIN (its reason is there).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from .parity import ParityReport, _kept, compare, probe_rows, run_info
from .pipeline import RunResult, Row

GATE_FACTOR = 2.0      # the backend may move the sampling distributions twice as far as bf16 autocast does
TV_SLACK = 2e-3        # absolute: where bf16's TV is ~0 (greedy rows), a noise floor of the estimate


def kept_dense(l64: torch.Tensor, T, top_k, top_p, k_max: int) -> torch.Tensor:
    """The sampler's kept distribution over the vocabulary (N V), float64."""
    q, order = _kept(l64, T, top_k, top_p, k_max)
    return torch.zeros_like(l64).scatter_(-1, order, q)


def tv_kl(ref: RunResult, got: RunResult, k: int, k_max: int, info) -> Dict[str, float]:
    """Mean TV of the kept distributions and mean KL(ref || got) of the tempered softmax at scale k
    (`info`: runtime.parity.run_info of the reference's run)."""
    B, n, V = ref.logits[k].shape
    rep = lambda t: t.repeat_interleave(n, 0)          # noqa: E731 - per row -> per position
    T, tk, tp = rep(info.T), rep(info.top_k), rep(info.top_p)
    lr = ref.logits[k].double().cpu().reshape(-1, V)
    lg = got.logits[k].double().cpu().reshape(-1, V)
    pr, pg = kept_dense(lr, T, tk, tp, k_max), kept_dense(lg, T, tk, tp, k_max)
    tv = 0.5 * (pr - pg).abs().sum(-1)
    a, b = (lr / T).log_softmax(-1), (lg / T).log_softmax(-1)
    kl = (a.exp() * (a - b)).sum(-1).clamp_min(0)
    return dict(tv=float(tv.mean()), kl=float(kl.mean()))


@dataclass
class QualityReport:
    backend: str
    precision: str
    rows: List[Dict] = field(default_factory=list)      # per run and scale: tv, kl, tv_base, kl_base, bound
    parity: ParityReport = None                          # the token, prior, f_hat and image checks
    failures: List[str] = field(default_factory=list)
    image_psnr_min: Optional[float] = None              # the int8 decoder's image bound (dB); None: fp32 decoder

    @property
    def ok(self) -> bool:
        return not self.failures and self.parity is not None and self.parity.ok

    def table(self) -> str:
        lines = [f"{self.backend} ({self.precision}) vs eager fp32, teacher-forced; baseline: eager bf16 autocast; "
                 f"gate: TV <= {GATE_FACTOR:g} x baseline TV + {TV_SLACK:g} per scale",
                 f"{'run':>5} {'scale':>5} {'TV':>9} {'TV bf16':>9} {'bound':>9} {'KL':>9} {'KL bf16':>9} "
                 f"{'flips':>5} {'expected':>8}"]
        for r in self.rows:
            lines.append(f"{r['run']:>5} {r['scale']:>5} {r['tv']:>9.2e} {r['tv_base']:>9.2e} {r['bound']:>9.2e} "
                         f"{r['kl']:>9.2e} {r['kl_base']:>9.2e} {r['flips']:>5} {r['expected_flips']:>8.2f}")
        fails = self.failures + (self.parity.failures if self.parity else [])
        psnr = f", PSNR {self.parity.image_psnr:.1f} dB" + \
            (f" (bound {self.image_psnr_min:g} dB: int8 decoder)" if self.image_psnr_min is not None else "")
        lines.append(f"image on fixed tokens: max|d| {self.parity.image_max_abs:.2e}{psnr}  -> " +
                     ("OK" if self.ok else "FAIL: " + "; ".join(fails)))
        return "\n".join(lines)

    def to_json(self) -> Dict:
        return dict(backend=self.backend, precision=self.precision, ok=self.ok, gate_factor=GATE_FACTOR,
                    tv_slack=TV_SLACK, rows=self.rows, failures=self.failures, image_psnr_min=self.image_psnr_min,
                    parity=self.parity.to_json() if self.parity else None)


def run_quality(ref_pipe, base_pipe, pipe, rows: Sequence[Row], precision: str, probe: bool = True,
                images: bool = True, image_psnr_min: Optional[float] = None) -> QualityReport:
    """`ref_pipe` eager fp32 (the reference), `base_pipe` eager with bf16 autocast (the
    baseline), `pipe` the backend under test; the rows (and the probe row) teacher-forced.
    `image_psnr_min`: the artifacts' decoder is int8 (module docstring)."""
    info = pipe.info
    rep = QualityReport(backend=info.name, precision=precision, image_psnr_min=image_psnr_min)
    rep.parity = ParityReport(backend=info.name, precision=precision, mode="teacher-forced")
    runs = [("rows", list(rows))]
    if probe:
        runs.append(("probe", probe_rows(info.cfg.num_classes, info.k_max, int(rows[0].seed) + 7919)))
    for name, rs in runs:
        decode = images and name == "rows" and any(not r.more_smooth for r in rs)
        ref = ref_pipe.run_rows(rs, keep_logits=True, keep_fhat=True, decode=decode)
        forced = dict(keep_logits=True, keep_fhat=True, force_tokens=ref.tokens, force_fhat=ref.f_hats, decode=decode)
        got, base = pipe.run_rows(rs, **forced), base_pipe.run_rows(rs, **forced)
        compare(ref, got, info.name, precision, info.k_max, info.transform, info.cfg.patch_nums, "teacher-forced",
                name, rep.parity, image_psnr_min=image_psnr_min)
        r_ref, r_got, r_base = ref.as_torch(), got.as_torch(), base.as_torch()
        prow = [r for r in rep.parity.rows if r["run"] == name]
        info_ref = run_info(r_ref, len(ref.tokens))
        for k in range(len(ref.tokens)):
            m, mb = tv_kl(r_ref, r_got, k, info.k_max, info_ref), tv_kl(r_ref, r_base, k, info.k_max, info_ref)
            bound = GATE_FACTOR * mb["tv"] + TV_SLACK
            rep.rows.append(dict(run=name, scale=k, tv=m["tv"], kl=m["kl"], tv_base=mb["tv"], kl_base=mb["kl"],
                                 bound=bound, flips=prow[k]["flips"], expected_flips=prow[k]["expected_flips"]))
            if not m["tv"] <= bound:
                rep.failures.append(f"{name} scale {k}: TV {m['tv']:.2e} > {bound:.2e} ({GATE_FACTOR:g} x bf16 "
                                    f"autocast's {mb['tv']:.2e} + {TV_SLACK:g})")
    return rep
