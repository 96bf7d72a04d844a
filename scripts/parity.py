#!/usr/bin/env python
"""Prove a backend matches eager PyTorch scale by scale; exit 1 past SPEC section 6 bounds.

  python scripts/parity.py --artifacts build/var-d2 --backends eager,onnxruntime --class 1 2 --seed 0
"""
from __future__ import annotations

import sys

from tools.cli import add_sampling_args, parser, run_main  # first: keeps scripts/ from shadowing the packages
from tools.outputs import check_outputs, write_json
from graphs.config import ConfigError, SamplerConfig, make_ssg


def main() -> int:
    p = parser("Per-scale parity of backends against eager PyTorch.")
    p.add_argument("--artifacts", required=True)
    p.add_argument("--backends", default="eager,onnxruntime", help="comma list; eager is the reference")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--polygraphy", action="store_true",
                   help="also compare each step graph in ONNX Runtime against Polygraphy's run (graph level)")
    add_sampling_args(p)
    p.set_defaults(classes=None)
    a = p.parse_args()
    check_outputs(("--json", a.json, None), inputs=(a.artifacts,))

    from runtime.backends import open_backend
    from runtime.parity import compare
    from runtime.pipeline import Pipeline

    names = [b.strip() for b in a.backends.split(",") if b.strip()]
    if "eager" not in names:
        names = ["eager"] + names
    others = [b for b in names if b != "eager"]
    if not others:
        raise ConfigError("--backends needs at least one backend besides eager (e.g. eager,onnxruntime)")
    from contract.manifest import load_manifest
    man = load_manifest(a.artifacts)          # validated and hashed once for every backend
    cfg = man.cfg
    ref_be = open_backend("eager", man, device=a.device)
    classes = a.classes or [(7 * i + 1) % cfg.num_classes for i in range(man.batch)]
    # the default --top-k (900) is clipped to what the artifacts bake in
    sampler = SamplerConfig(top_k=min(a.top_k, man.k_max) if man.k_max else a.top_k,
                            top_p=a.top_p, temperature=a.temperature)
    ssg = make_ssg(a.ssg_beta, man.transform, cfg.num_scales)
    ref = Pipeline(ref_be).run(classes, a.seed, a.guidance, sampler, ssg, keep_logits=True)
    reports = []
    for name in others:
        be = open_backend(name, man, device=a.device)
        got = Pipeline(be).run(classes, a.seed, a.guidance, sampler, ssg, keep_logits=True)
        rep = compare(ref, got, name, man.precision)
        print(rep.table())
        reports.append(rep)
    if a.polygraphy:
        from runtime.poly import polygraphy_check
        for line in polygraphy_check(man):
            print(line)
    if a.json:
        write_json(a.json, [dict(backend=r.backend, precision=r.precision, ok=r.ok, rows=r.rows,
                                 image_max_abs=r.image_max_abs, image_psnr=r.image_psnr, failures=r.failures)
                            for r in reports], indent=2)
    bad = [r for r in reports if not r.ok]
    if bad:
        print(f"parity FAILED for {', '.join(r.backend for r in bad)}", file=sys.stderr)
        return 1
    print("parity OK")
    return 0


if __name__ == "__main__":
    run_main(main)
