"""`scripts/parity.py`: Prove a backend matches eager PyTorch scale by scale; exit 1 past the parity bounds (DESIGN.md, "Parity bounds").

  python scripts/parity.py --artifacts build/var-d2 --backends eager,onnxruntime --class 1 2 --seeds 0-5
  python scripts/parity.py --artifacts build/var-d2 --free-running        (a report: images equal, PSNR)
  python scripts/parity.py --artifacts build/inf-tiny --prompt "a cat" --text-encoder t5/ --seeds 0-3

Teacher-forced by default: the backend follows the reference's tokens, so every scale compares
like with like; every token the backend draws must follow from its own logits, and the number
of tokens that differ from the reference's must fit the logit differences (runtime/parity.py).
Each run adds a probe row (T, top-k, top-p and beta off their defaults) unless --no-probe.
"""
from __future__ import annotations

import sys

from var_ssg.tools.cli import add_sampling_args, parser
from var_ssg.tools.infinity_cli import add_infinity_args
from var_ssg.common.files import check_outputs, write_json
from var_ssg.common.errors import ConfigError


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


def _failures(rep):
    """A parity or quality report's failures (a quality report's parity checks included)."""
    return list(rep.failures) + (list(rep.parity.failures) if getattr(rep, "parity", None) else [])


def main(argv=None) -> int:
    p = parser("Per-scale parity of backends against eager PyTorch.")
    p.add_argument("--artifacts", required=True)
    p.add_argument("--backends", default="eager,onnxruntime", help="comma list; eager is the reference")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seeds", help="several runs: 0-5 or 1,4,9 (each run: image i uses seed + i); overrides --seed")
    p.add_argument("--free-running", action="store_true",
                   help="no teacher forcing: rows are compared until their tokens first differ; a report (images "
                        "equal, PSNR) that fails on unexplained flips and on the logit, prior and f_hat bounds of "
                        "the scales compared")
    p.add_argument("--no-probe", action="store_true",
                   help="only the given rows (default: also a probe row with T, top-k, top-p and beta off their defaults)")
    p.add_argument("--sweep", action="store_true",
                   help="run the unmodified settings a correct backend must pass (20 seeds, cfg, T, top-k/p, "
                        "beta, more_smooth, class -1) and print the largest error of each measure")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--polygraphy", action="store_true",
                   help="also run the step graph through Polygraphy's ONNX Runtime runner with all graph "
                        "optimizations and with none, and compare them (a fusion that changes numerics); "
                        "a MISMATCH fails")
    add_sampling_args(p)
    add_infinity_args(p)
    p.set_defaults(classes=None)
    a = p.parse_args(argv)
    seeds = parse_seeds(a.seeds) if a.seeds else [a.seed]
    check_outputs(("--json", a.json, None), inputs=(a.artifacts,))
    from var_ssg.runtime.infinity import is_infinity
    if is_infinity(artifacts=a.artifacts):     # DESIGN.md "Infinity": its own teacher-forced check
        from var_ssg.tools.infinity_cli import parity as parity_infinity
        return parity_infinity(a, seeds)

    import torch
    from var_ssg.contract.manifest import load_manifest
    from var_ssg.contract.quantization import IMAGE_PSNR_MIN
    from var_ssg.graphs.config import parse_ssg_beta
    from var_ssg.runtime.backends import open_backend
    from var_ssg.runtime.backends.eager import EagerBackend
    from var_ssg.runtime.parity import BOUNDS
    from var_ssg.runtime.quality import run_quality
    from var_ssg.runtime.parity import run_parity
    from var_ssg.runtime.pipeline import Pipeline, Row
    from var_ssg.runtime.sweep import sweep
    from var_ssg.runtime.weights_check import weights_check

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
    wrep = weights_check(man, {"var": ref.backend.var, "vae": ref.backend.vae})
    print(wrep.summary())
    quantized = BOUNDS[man.precision] is None        # int8: the quality gate replaces the logit bounds
    if quantized and (a.sweep or a.free_running):
        raise ConfigError(f"{man.precision} artifacts are judged by the quality gate (teacher-forced): "
                          f"drop --sweep / --free-running")
    # an int8 decoder: the image on fixed tokens is judged by its PSNR (the bound is the code's, not the manifest's)
    psnr_min = IMAGE_PSNR_MIN if quantized and (man.data.get("quantization") or {}).get("decoder") else None
    base = Pipeline(EagerBackend(ref.backend.var, ref.backend.vae, transform=man.transform, k_max=man.k_max,
                                 device=a.device, autocast=torch.bfloat16)) if quantized else None
    reports, sweeps, fails = [], [], list(wrep.failures)
    for name in others:
        pipe = Pipeline(open_backend(name, man, device=a.device))
        if a.sweep:
            res = sweep(ref, pipe, man.precision)
            print(res.summary(name, man.precision))
            sweeps.append(dict(backend=name, **res.to_json()))
            fails += res.failures
            continue
        for seed in seeds:
            rows = [Row(c, seed + i, a.guidance, betas, top_k, a.top_p, a.temperature, a.more_smooth)
                    for i, c in enumerate(classes)]
            if quantized:
                rep = run_quality(ref, base, pipe, rows, man.precision, probe=not a.no_probe, image_psnr_min=psnr_min)
            else:
                rep = run_parity(ref, pipe, rows, man.precision, mode, probe=not a.no_probe)
            print(f"seed {seed} classes {classes}")
            print(rep.table())
            reports.append((seed, rep))
    if a.polygraphy:
        from var_ssg.runtime.poly import polygraphy_check
        lines = polygraphy_check(man)
        print("\n".join(lines))
        fails += [f"polygraphy: {line}" for line in lines if not line.endswith(": OK")]
    if a.json:
        write_json(a.json, dict(weights=dict(compared=wrep.compared, quantized=wrep.quantized, failures=wrep.failures),
                                sweeps=sweeps, runs=[dict(seed=s, **r.to_json()) for s, r in reports],
                                failures=fails + [f for _, r in reports for f in _failures(r)]), indent=2)
    if fails:
        print("parity FAILED:\n" + "\n".join(fails), file=sys.stderr)
        return 1
    if a.sweep:
        print("sweep OK")
        return 0
    bad = [(s, r) for s, r in reports if not r.ok]
    toks = [r.parity if quantized else r for _, r in reports]
    flips = sum(len(r.flips) for r in toks)
    expected = sum(row["expected_flips"] for r in toks for row in r.rows)
    print(f"{len(reports)} runs, {flips} token flips (expected {expected:.1f} from the logit differences), "
          f"{sum(f['explained'] for r in toks for f in r.flips)} drawn by the backend's own logits")
    if bad:
        print("parity FAILED: " + "; ".join(f"{r.backend} seed {s}: {_failures(r)[0]}" for s, r in bad),
              file=sys.stderr)
        return 1
    print("parity OK")
    return 0

