"""`scripts/sweep.py`: A grid of SSG beta schedules (x DSE transforms): sample + evaluate each point, then one table
and one plot (metric per schedule, with each point's latency). Resumable: rerun the same command
and finished samples and metrics are reused, an interrupted point continues where it stopped.

  python scripts/sweep.py --artifacts build/var-d16 --betas "0;linear:0.1,0.3;0.5" \\
      --classes 0-999 --per-class 50 --ref VIRTUAL_imagenet256_labeled.npz --out-dir sweep/
  python scripts/sweep.py --model var-d16 --ckpt var_d16.pth --vae-ckpt vae_ch160v4096z32.pth \\
      --dse dct,dft --betas "0;0.2" ...                 # eager: any transform without re-exporting
  python scripts/sweep.py --artifacts build/d16-dct,build/d16-dft ...   # one export per transform
  python scripts/sweep.py ... --device cuda --address local             # every point over all GPUs

Per point: OUT_DIR/<dse>_<schedule>/samples.npz (+ .partial/ while running), metrics.json;
OUT_DIR/sweep.json and sweep.png. Without --ref only the latency is measured.
--extractor pixels replaces Inception by 8x8 block means: for plumbing tests, NOT FID.
"""
from __future__ import annotations

import sys

from var_ssg.graphs.config import DEFAULT_GUIDANCE, DEFAULT_TOP_P
from var_ssg.tools.cli import add_model_args, add_sampling_args, note_random_weights, parser
from var_ssg.tools.infinity_cli import add_prompts_args, check_prompts_args
from var_ssg.tools.evalargs import (add_cluster_args, add_job_args, add_source_args, pool_from_args, print_workers,
                            request_from_args, source_from_args)


def main(argv=None) -> int:
    p = parser("Sweep SSG beta schedules (and DSE transforms): samples, metrics, latency, one plot.")
    add_model_args(p)
    add_sampling_args(p, dse_list=True)
    add_source_args(p)
    add_job_args(p, per_class=50)
    add_cluster_args(p)
    p.add_argument("--betas", required=True, help="';'-separated beta schedules, e.g. \"0;linear:0.1,0.3;0.5\"")
    p.add_argument("--out-dir", required=True, help="where every grid point's samples and metrics go")
    p.add_argument("--ref", metavar="REF.npz", help="reference batch; without it only latency is measured")
    p.add_argument("--extractor", choices=("inception", "pixels"), default="inception")
    p.add_argument("--inception-weights", metavar="FILE")
    p.add_argument("--metric", help="the metric plotted (default fid; fd_pixels with --extractor pixels)")
    p.add_argument("--json", metavar="FILE", help="table as JSON (default OUT_DIR/sweep.json)")
    p.add_argument("--plot", metavar="FILE", help="PNG (default OUT_DIR/sweep.png)")
    add_prompts_args(p)
    p.set_defaults(guidance=None, top_p=None, per_class=None)   # each family's own default (VAR's or Infinity's)
    a = p.parse_args(argv)
    from var_ssg.runtime.infinity import is_infinity
    infinity = is_infinity(a.model, a.artifacts)
    check_prompts_args(a, infinity)
    if infinity:                        # prompts: DESIGN.md "Samples from a prompt list"
        from var_ssg.tools import infinity_cli
        from var_ssg.evaluation.sweep import parse_betas
        return infinity_cli.sweep(a, parse_betas(a.betas))
    a.guidance = DEFAULT_GUIDANCE if a.guidance is None else a.guidance
    a.top_p = DEFAULT_TOP_P if a.top_p is None else a.top_p
    a.per_class = 50 if a.per_class is None else a.per_class

    from var_ssg.evaluation.sweep import SweepConfig, parse_betas, run_sweep, sweep_sources
    transforms = tuple(t.strip() for t in a.dse.split(",")) if a.dse else ()
    cfg = SweepConfig(betas=parse_betas(a.betas), out_dir=a.out_dir, transforms=transforms, ref=a.ref,
                      extractor=a.extractor, inception_weights=a.inception_weights, device=a.device,
                      metric=a.metric, json_path=a.json, plot_path=a.plot)
    sources = sweep_sources(source_from_args(a), transforms)
    request, pool = request_from_args(a), pool_from_args(a)

    from tqdm import tqdm
    with tqdm(desc="sweep", unit="img", file=sys.stderr, smoothing=0.1) as bar:
        def progress(done, total):
            bar.total = total
            bar.update(done - bar.n)
        res = run_sweep(sources, request, cfg, pool=pool, progress=progress)

    print_workers(res.workers)
    _print_table(res.rows)
    print(f"wrote {res.json_path} and {res.plot_path}")
    note_random_weights(res.source)
    return 0


def _print_table(rows):
    keys = ["dse", "beta"] + [k for k in rows[0] if k not in ("dse", "beta", "n_images", "s_per_img")] + ["s_per_img"]
    cells = [[_fmt(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))


def _fmt(v):
    if v is None:
        return "n/a"
    return f"{v:.4g}" if isinstance(v, float) else str(v)
