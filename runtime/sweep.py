"""The noise sweep (DESIGN.md "Parity bounds"): the unmodified settings a correct backend must
pass, run teacher-forced, with the largest error of each measure (how the bounds were measured)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Tuple

from .parity import run_parity
from .pipeline import Row


MEASURES = ("logits_cfg_rel", "logits_rel", "prior_rel", "f_hat_rel", "f_hat_smooth_rel")


@dataclass
class SweepResult:
    settings: List[str] = field(default_factory=list)      # one line per setting: name, OK/FAIL
    noise: Dict[str, float] = field(default_factory=dict)  # measure -> max over every setting and scale
    flips: int = 0
    expected_flips: float = 0.0
    image_max_abs: float = 0.0
    failures: List[str] = field(default_factory=list)

    def to_json(self) -> Dict:
        return asdict(self)

    def summary(self, backend: str, precision: str) -> str:
        return "\n".join(self.settings) + f"\n{backend} ({precision}) largest errors: " + \
            ", ".join(f"{m} {v:.2e}" for m, v in self.noise.items()) + \
            f", image {self.image_max_abs:.2e}; {self.flips} flips (expected {self.expected_flips:.1f})"


def sweep_settings(num_classes: int, batch: int, k_max: int, V: int, seeds: int = 20) -> List[Tuple[str, Dict]]:
    """The unmodified settings a correct backend must pass: (name, Row fields)."""
    out: List[Tuple[str, Dict]] = [(f"seed {s}", dict(seed=s)) for s in range(seeds)]
    out += [("class -1", dict(classes=[-1] * batch))]
    out += [(f"cfg {g}", dict(guidance=g)) for g in (1.0, 1.5, 4.0, 10.0)]
    out += [(f"T {t}", dict(temperature=t)) for t in (0.25, 1.0, 3.0)]
    out += [(f"top-p {p}", dict(top_p=p)) for p in (0.5, 0.96, 1.0)]
    if k_max > 0:
        out += [(f"top-k {k}", dict(top_k=k)) for k in (1, 2, 900) if k <= k_max]
    if k_max == 0 or k_max >= V:
        out += [("top-k 0", dict(top_k=0))]
    out += [(f"beta {b}", dict(ssg_beta=str(b))) for b in (0, 1, 5)]
    out += [("more-smooth", dict(more_smooth=True))]
    return out


def sweep(ref_pipe, pipe, precision: str, seeds: int = 20) -> SweepResult:
    info = pipe.info
    B, C = info.batch or 1, info.cfg.num_classes
    res = SweepResult()
    for name, kw in sweep_settings(C, B, info.k_max, info.cfg.V, seeds):
        kw = dict(kw)
        classes = kw.pop("classes", [(-1 if i == 0 else (7 * i + 1) % C) for i in range(B)])
        seed = kw.pop("seed", 100)
        rows = [Row(c, seed + i, **kw) for i, c in enumerate(classes)]
        rep = run_parity(ref_pipe, pipe, rows, precision, probe=name == "seed 0")
        for r in rep.rows:
            for m in MEASURES:
                if m in r:
                    res.noise[m] = max(res.noise.get(m, 0.0), r[m])
            res.expected_flips += r["expected_flips"]
        res.flips += len(rep.flips)
        res.image_max_abs = max(res.image_max_abs, rep.image_max_abs)
        res.settings.append(f"{name}: {'OK' if rep.ok else 'FAIL'} ({len(rep.flips)} flips)")
        res.failures += [f"{name}: {f}" for f in rep.failures]
    return res
