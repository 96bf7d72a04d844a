"""`scripts/parity.py`: Prove a backend matches eager PyTorch scale by scale; exit 1 past the parity bounds (DESIGN.md, "Parity bounds").

  python scripts/parity.py --artifacts build/var-d2 --backends eager,onnxruntime --class 1 2 --seeds 0-5
  python scripts/parity.py --artifacts build/var-d2 --free-running        (a report: images equal, PSNR)

Teacher-forced by default: the backend follows the reference's tokens, so every scale compares
like with like; every token the backend draws must follow from its own logits, and the number
of tokens that differ from the reference's must fit the logit differences (runtime/parity.py).
Each run adds a probe row (T, top-k, top-p and beta off their defaults) unless --no-probe.
"""
from __future__ import annotations

import sys

from tools.cli import add_sampling_args, parser
from common.files import check_outputs, write_json
from graphs.config import ConfigError


def parse_seeds(spec: str):
    """'5' or '0-5' (inclusive) or '1,4,9'."""
    try:
        out = []
        for part in spec.split(","):
            a, _, b = part.partition("-")
            lo, hi = int(a), int(b) if b else int(a)
            if hi - lo >= 1000 or len(out) > 1000:
                raise ConfigError("--seeds gives more than 1000 seeds; give 1..1000 seeds >= 0")
            out += list(range(lo, hi + 1))
    except ValueError:
        raise ConfigError(f"--seeds must look like 5, 0-5 or 1,4,9; got {spec!r}") from None
    if not out or len(out) > 1000 or min(out) < 0:
        raise ConfigError(f"--seeds gives {len(out)} seeds; give 1..1000 seeds >= 0")
    return out


def main(argv=None) -> int:
    p = parser("Per-scale parity of backends against eager PyTorch.")
    p.add_argument("--artifacts", required=True)
    p.add_argument("--backends", default="eager,onnxruntime", help="comma list; eager is the reference")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seeds", help="several runs: 0-5 or 1,4,9 (each run: image i uses seed + i); overrides --seed")
    p.add_argument("--free-running", action="store_true",
                   help="no teacher forcing: a report (images equal, PSNR) that fails only on unexplained flips")
    p.add_argument("--no-probe", action="store_true",
                   help="only the given rows (default: also a probe row with T, top-k, top-p and beta off their defaults)")
    p.add_argument("--sweep", action="store_true",
                   help="run the unmodified settings a correct backend must pass (20 seeds, cfg, T, top-k/p, "
                        "beta, more_smooth, class -1) and print the largest error of each measure")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--polygraphy", action="store_true",
                   help="also compare the step graph in ONNX Runtime against Polygraphy's run (graph level)")
    add_sampling_args(p)
    p.set_defaults(classes=None)
    a = p.parse_args(argv)
    seeds = parse_seeds(a.seeds) if a.seeds else [a.seed]
    check_outputs(("--json", a.json, None), inputs=(a.artifacts,))

    from contract.manifest import load_manifest
    from graphs.config import parse_ssg_beta
    from runtime.backends import open_backend
    from runtime.parity import run_parity, sweep, weights_check
    from runtime.pipeline import Pipeline, Row

    names = [b.strip() for b in a.backends.split(",") if b.strip()]
    others = [b for b in names if b != "eager"]
    if not others:
        raise ConfigError("--backends needs at least one backend besides eager (e.g. eager,onnxruntime)")
    man = load_manifest(a.artifacts)          # validated and hashed once for every backend
    cfg = man.cfg
    ref = Pipeline(open_backend("eager", man, device=a.device))
    classes = a.classes or [(7 * i + 1) % cfg.num_classes for i in range(man.batch)]
    if len(classes) > man.batch:
        raise ConfigError(f"{len(classes)} classes but the artifacts were exported for batch {man.batch}")
    top_k = a.top_k                           # None: the pipeline's default (900 or the baked K)
    betas = parse_ssg_beta(a.ssg_beta, cfg.num_scales)
    mode = "free-running" if a.free_running else "teacher-forced"
    n_w, wbad = weights_check(man, {"var": ref.backend.var, "vae": ref.backend.vae})
    print("\n".join(wbad) or f"weights: {n_w} exported tensors equal the reference's, bit for bit")
    reports = []
    for name in others:
        pipe = Pipeline(open_backend(name, man, device=a.device))
        if a.sweep:
            res = sweep(ref, pipe, man.precision)
            print(res.summary(name, man.precision))
            reports += [(0, f) for f in res.failures]
            continue
        for seed in seeds:
            rows = [Row(c, seed + i, a.guidance, betas, top_k, a.top_p, a.temperature, a.more_smooth)
                    for i, c in enumerate(classes)]
            rep = run_parity(ref, pipe, rows, man.precision, mode, probe=not a.no_probe)
            print(f"seed {seed} classes {classes}")
            print(rep.table())
            reports.append((seed, rep))
    if a.polygraphy:
        from runtime.poly import polygraphy_check
        for line in polygraphy_check(man):
            print(line)
    if a.json:
        write_json(a.json, [dict(seed=s, **r.to_json()) for s, r in reports], indent=2)
    fails = wbad + ([f for _, f in reports] if a.sweep else [])
    if fails:
        print("parity FAILED:\n" + "\n".join(fails), file=sys.stderr)
        return 1
    if a.sweep:
        print("sweep OK")
        return 0
    bad = [(s, r) for s, r in reports if not r.ok]
    flips = sum(len(r.flips) for _, r in reports)
    expected = sum(row["expected_flips"] for _, r in reports for row in r.rows)
    print(f"{len(reports)} runs, {flips} token flips (expected {expected:.1f} from the logit differences), "
          f"{sum(f['explained'] for _, r in reports for f in r.flips)} drawn by the backend's own logits")
    if bad:
        print("parity FAILED: " + "; ".join(f"{r.backend} seed {s}: {r.failures[0]}" for s, r in bad), file=sys.stderr)
        return 1
    print("parity OK")
    return 0

