"""`scripts/generate.py`: Generate class-conditional images with VAR + SSG on any backend.

  python scripts/generate.py --model var-d16 --random-init 0 --class 207 88 --out grid.png
  python scripts/generate.py --backend onnxruntime --artifacts build/var-d16 --class 207 --out a.png
"""
from __future__ import annotations

import sys

from tools.cli import add_model_args, add_sampling_args, parser
from common.files import check_outputs, json_writer, write_outputs
from contract.stamp import VERIFY_MODES
from graphs.config import BACKENDS, ConfigError, SamplerConfig, get_preset, make_ssg, topk_bake


def main(argv=None) -> int:
    p = parser("Generate images with VAR + SSG.")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--backend", choices=BACKENDS, default="eager")
    p.add_argument("--artifacts", help="artifacts directory (scripts/export.py); required for onnxruntime/tensorrt")
    p.add_argument("--device", default="cpu", help="eager/onnxruntime device: cpu or cuda")
    p.add_argument("--out", default="out.png", help="PNG file (a grid for several classes)")
    p.add_argument("--save-tokens", metavar="FILE.json", help="also write the per-scale token ids")
    p.add_argument("--verify", choices=VERIFY_MODES, default="stamp",
                   help="artifacts check at start: stamp (default) re-hashes only files changed since they were "
                        "last verified; full re-hashes every file (DESIGN.md, start-up)")
    a = p.parse_args(argv)

    from tqdm import tqdm
    from runtime.pipeline import Pipeline, save_grid

    check_outputs(("--out", a.out, ".png"), ("--save-tokens", a.save_tokens, None),
                  inputs=(a.artifacts, a.ckpt, a.vae_ckpt))       # before the run, not after it
    sampler = SamplerConfig(top_k=a.top_k, top_p=a.top_p, temperature=a.temperature)

    if a.artifacts:
        from contract.manifest import load_manifest
        from runtime.backends import open_backend
        backend = open_backend(a.backend, load_manifest(a.artifacts, verify=a.verify), device=a.device)
        cfg = backend.info.cfg
        if a.model and a.model != cfg.name:
            raise ConfigError(f"--model {a.model} but the artifacts in {a.artifacts} are {cfg.name}")
        source = backend.source_note
    else:
        if a.backend != "eager":
            raise ConfigError(f"--backend {a.backend} needs --artifacts DIR (run scripts/export.py first)")
        if not a.model:
            raise ConfigError("give --model (e.g. var-d16) or --artifacts DIR")
        cfg = get_preset(a.model)
        from graphs.weights import load_models
        from runtime.backends.eager import EagerBackend
        var, vae, src = load_models(cfg, a.ckpt, a.vae_ckpt, a.random_init)
        backend = EagerBackend(var, vae, transform=a.dse or "dct", k_max=topk_bake(a.top_k, cfg.V), device=a.device)
        source = src.describe()
    ssg = make_ssg(a.ssg_beta, a.dse or backend.info.transform, cfg.num_scales)

    pipe = Pipeline(backend)
    with tqdm(total=cfg.num_scales, desc=f"{cfg.name} [{a.backend}]", unit="scale", file=sys.stderr) as bar:
        res = pipe.run(a.classes, a.seed, a.guidance, sampler, ssg, progress=lambda k: bar.update(1),
                       more_smooth=a.more_smooth)
    note = (f"{cfg.name} backend={a.backend} classes={a.classes} seeds={a.seed}..{a.seed + len(a.classes) - 1} "
            f"cfg={a.guidance} more_smooth={a.more_smooth} "
            f"top_k={a.top_k} top_p={a.top_p} T={a.temperature} ssg={ssg.spec} dse={ssg.transform}; {source}")
    write_outputs([(a.out, lambda path: save_grid(res.images, path, note)),      # both or neither
                   (a.save_tokens, json_writer({"note": note, "tokens": [t.tolist() for t in res.tokens]}))])
    print(f"wrote {a.out} ({note})")
    if "RANDOM" in source:
        print("note: made with RANDOM weights, not a trained model", file=sys.stderr)
    return 0

