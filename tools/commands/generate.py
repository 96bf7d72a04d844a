"""`scripts/generate.py`: Generate class-conditional images with VAR + SSG on any backend.

  python scripts/generate.py --model var-d16 --random-init 0 --class 207 88 --out grid.png
  python scripts/generate.py --backend onnxruntime --artifacts build/var-d16 --class 207 --out a.png
  python scripts/generate.py --artifacts build/inf-tiny --prompt "a cat" --text-encoder t5/ --out cat.png
"""
from __future__ import annotations

import sys
import time

from var_ssg.common.proc import process_age_s
from var_ssg.tools.cli import add_model_args, add_precision_arg, add_sampling_args, add_session_cache_arg, note_random_weights, parser
from var_ssg.common.files import check_outputs, json_writer, write_outputs
from var_ssg.contract.stamp import VERIFY_MODES
from var_ssg.common.errors import ConfigError
from var_ssg.graphs.config import BACKENDS, DEFAULT_GUIDANCE, DEFAULT_TOP_P, SamplerConfig, make_ssg
from var_ssg.tools.infinity_cli import add_infinity_args


def main(argv=None) -> int:
    p = parser("Generate images with VAR + SSG.")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="default: onnxruntime with --artifacts, eager with --model (as sample, serve and the opener)")
    p.add_argument("--artifacts", help="artifacts directory (scripts/export.py); required for onnxruntime/tensorrt")
    p.add_argument("--device", default="cpu", help="eager/onnxruntime device: cpu or cuda")
    add_precision_arg(p)
    p.add_argument("--out", default="out.png", help="PNG file (a grid for several classes)")
    p.add_argument("--save-tokens", metavar="FILE.json", help="also write the per-scale token ids")
    p.add_argument("--verify", choices=VERIFY_MODES, default="stamp",
                   help="artifacts check at start: stamp (default) re-hashes only files changed since they were "
                        'last verified; full re-hashes every file (DESIGN.md "Start-up")')
    add_session_cache_arg(p)
    add_infinity_args(p)
    p.set_defaults(guidance=None, top_p=None)      # each family's own default (VAR's or Infinity's)
    a = p.parse_args(argv)
    from var_ssg.runtime.infinity import is_infinity
    if is_infinity(a.model, a.artifacts):       # text-to-image: DESIGN.md "Infinity"
        if a.session_cache:
            raise ConfigError("--session-cache is for VAR artifacts on onnxruntime; Infinity does not keep one")
        if a.precision:
            raise ConfigError("--precision is for VAR's eager backend; Infinity runs in fp32")
        from var_ssg.tools.infinity_cli import generate as generate_infinity
        return generate_infinity(a, a.backend)
    if a.prompt or a.negative_prompt or a.text_encoder or a.cfg_list:
        raise ConfigError("--prompt, --negative-prompt, --text-encoder and --cfg-list are for Infinity "
                          "(--model infinity-* or Infinity artifacts); VAR takes --class")
    a.guidance = DEFAULT_GUIDANCE if a.guidance is None else a.guidance
    a.top_p = DEFAULT_TOP_P if a.top_p is None else a.top_p

    from tqdm import tqdm

    check_outputs(("--out", a.out, ".png"), ("--save-tokens", a.save_tokens, None),
                  inputs=(a.artifacts, a.ckpt, a.vae_ckpt))       # before the run, not after it
    sampler = SamplerConfig(top_k=a.top_k, top_p=a.top_p, temperature=a.temperature)

    from var_ssg.runtime.opener import PipelineSource, open_pipelines
    src = PipelineSource(
        artifacts=a.artifacts, backend=a.backend, model=a.model, ckpt=a.ckpt, vae_ckpt=a.vae_ckpt,
        random_init=a.random_init, transforms=(a.dse,) if a.dse else (), top_k=a.top_k, device=a.device,
        verify=a.verify, session_cache=a.session_cache, precision=a.precision)
    # the opener's default, named in the progress bar and the note (with the eager precision asked for)
    backend = src.backend_name + (f"-{a.precision}" if a.precision else "")
    (pipe,), source = open_pipelines(src)
    from var_ssg.runtime.images import png_note, save_grid
    cfg = pipe.info.cfg
    ssg = make_ssg(a.ssg_beta, a.dse or pipe.info.transform, cfg.num_scales)

    started = process_age_s()
    t0 = time.perf_counter()
    with tqdm(total=cfg.num_scales, desc=f"{cfg.name} [{backend}]", unit="scale", file=sys.stderr) as bar:
        res = pipe.run(a.classes, a.seed, a.guidance, sampler, ssg, progress=lambda k: bar.update(1),
                       more_smooth=a.more_smooth)
    run_s = time.perf_counter() - t0
    note = png_note(cfg.name, backend, a.classes, a.seed, guidance=a.guidance, ssg=ssg.spec, top_k=a.top_k,
                    top_p=a.top_p, temperature=a.temperature, transform=ssg.transform, more_smooth=a.more_smooth,
                    source=source)
    write_outputs([(a.out, lambda path: save_grid(res.images, path, note)),      # both or neither
                   (a.save_tokens, json_writer({"note": note, "tokens": [t.tolist() for t in res.tokens]}))])
    print(f"wrote {a.out} ({note})")
    print(f"start-up {'?' if started is None else f'{started:.2f}'} s (process start to the first scale), "
          f"pipeline {run_s:.2f} s", file=sys.stderr)
    note_random_weights(source)
    return 0

