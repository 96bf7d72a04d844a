"""`scripts/sweep.py`: A grid of SSG beta schedules (x DSE transforms): sample + evaluate each point, then one table
and one plot (metric per schedule, with each point's latency). Resumable: rerun the same command
and finished samples and metrics are reused, an interrupted point continues where it stopped.

  python scripts/sweep.py --artifacts build/var-d16 --betas "0;linear:0.1,0.3;0.5" \
      --classes 0-999 --per-class 50 --ref VIRTUAL_imagenet256_labeled.npz --out-dir sweep/
  python scripts/sweep.py --model var-d16 --ckpt var_d16.pth --vae-ckpt vae_ch160v4096z32.pth \
      --dse dct,dft --betas "0;0.2" ...                 # eager: any transform without re-exporting
  python scripts/sweep.py --artifacts build/d16-dct,build/d16-dft ...   # one export per transform

Per point: OUT_DIR/<dse>_<schedule>/samples.npz (+ .partial/ while running), metrics.json;
OUT_DIR/sweep.json and sweep.png. Without --ref only the latency is measured.
--extractor pixels replaces Inception by 8x8 block means: for plumbing tests, NOT FID.
"""
from __future__ import annotations

import json
import os
import re
import sys

from tools.cli import add_model_args, add_sampling_args, parser


def main(argv=None) -> int:
    p = parser("Sweep SSG beta schedules (and DSE transforms): samples, metrics, latency, one plot.")
    add_model_args(p)
    add_sampling_args(p)
    from evaluation.cliargs import add_job_args, add_source_args, job_from_args, precheck
    add_source_args(p)
    add_job_args(p, per_class=50)
    for act in p._actions:      # the shared --dse takes one transform, here a list: widen it (no public API)
        if "--dse" in act.option_strings:
            act.choices, act.default = None, None
            act.help = "comma list of DSE transforms, e.g. dct,dft (default: dct, or what the --artifacts bake)"
    p.add_argument("--betas", required=True, help="';'-separated beta schedules, e.g. \"0;linear:0.1,0.3;0.5\"")
    p.add_argument("--out-dir", required=True, help="where every grid point's samples and metrics go")
    p.add_argument("--ref", metavar="REF.npz", help="reference batch; without it only latency is measured")
    p.add_argument("--extractor", choices=("inception", "pixels"), default="inception")
    p.add_argument("--inception-weights", metavar="FILE")
    p.add_argument("--metric", help="the metric plotted (default fid; fd_pixels with --extractor pixels)")
    p.add_argument("--json", metavar="FILE", help="table as JSON (default OUT_DIR/sweep.json)")
    p.add_argument("--plot", metavar="FILE", help="PNG (default OUT_DIR/sweep.png)")
    a = p.parse_args(argv)
    from common.files import check_outputs       # output paths checked before any work
    check_outputs(("--json", a.json, ".json"), ("--plot", a.plot, ".png"))

    from graphs.config import ConfigError
    betas = [s.strip() for s in a.betas.split(";") if s.strip()]
    if not betas:
        raise ConfigError("--betas is empty; give ';'-separated schedules like \"0;linear:0.1,0.3\"")
    transforms = [t.strip() for t in a.dse.split(",")] if a.dse else None
    if transforms and any(t not in ("dct", "dft") for t in transforms):
        raise ConfigError(f"--dse {a.dse}: each transform must be dct or dft")
    precheck(a, betas=betas)
    if not os.path.isdir(a.out_dir):
        raise ConfigError(f"--out-dir {a.out_dir}: no such directory")
    extractor = None
    if a.ref:
        from evaluation.samples import NpzBatch
        from evaluation.score import make_extractor
        NpzBatch(a.ref)                                      # readable, before any sampling
        extractor = make_extractor(a.extractor, a.inception_weights, a.device)
    metric = a.metric or ("fd_pixels" if a.extractor == "pixels" else "fid")

    pipes, source = _open(a, transforms)
    grid = [(pipe, b) for pipe in pipes for b in betas]
    jobs = [(pipe, job_from_args(a, pipe, b)) for pipe, b in grid]

    from tqdm import tqdm
    from evaluation.run import check_job
    from evaluation.sampling import check_output, sample_to_npz
    from evaluation.samples import NpzBatch
    from common.files import atomic_path
    points = [os.path.join(a.out_dir, f"{job.ssg.transform}_{_slug(job.ssg.spec)}") for _, job in jobs]
    for (pipe, job), point in zip(jobs, points):        # every point's conflicts before any work
        check_job(pipe, job)
        if os.path.isdir(point):
            check_output(os.path.join(point, "samples.npz"), job.settings(pipe, source), resume=True)
    rows = []
    total = sum(len(j.labels) for _, j in jobs)
    with tqdm(total=total, desc="sweep", unit="img", file=sys.stderr) as bar:
        base = 0
        for (pipe, job), point in zip(jobs, points):
            os.makedirs(point, exist_ok=True)
            samples = os.path.join(point, "samples.npz")

            def progress(done, _total, base=base):
                bar.n = base + done
                bar.refresh()

            sample_to_npz(pipe, job, source, samples, resume=True, progress=progress)
            base += len(job.labels)
            seconds, rows_run = NpzBatch(samples).get("timing")
            row = {"dse": job.ssg.transform, "beta": job.ssg.spec, "n_images": len(job.labels),
                   "s_per_img": seconds / rows_run}
            if extractor is not None:
                row.update(_metrics(point, samples, a.ref, extractor, a.out_dir))
            rows.append(row)
    _print_table(rows)
    out_json = a.json or os.path.join(a.out_dir, "sweep.json")
    with atomic_path(out_json) as tmp, open(tmp, "w") as f:
        json.dump({"settings_of_first_point": jobs[0][1].settings(jobs[0][0], source), "reference": a.ref,
                   "extractor": a.extractor if a.ref else None, "rows": rows}, f, indent=1)
    from evaluation.plots import plot_sweep
    out_png = a.plot or os.path.join(a.out_dir, "sweep.png")
    cfg = pipes[0].info.cfg
    plot_sweep(out_png, rows, metric if a.ref else None,
               title=f"{cfg.name} [{pipes[0].info.name}], {len(jobs[0][1].labels)} images per point; {source}")
    print(f"wrote {out_json} and {out_png}")
    if "RANDOM" in source:
        print("note: made with RANDOM weights, not a trained model", file=sys.stderr)
    return 0


def _open(a, transforms):
    from graphs.config import ConfigError
    from evaluation.cliargs import open_from_args
    from evaluation.run import open_pipeline
    if not a.artifacts:
        return open_from_args(a, transforms or ["dct"])
    pipes, source = [], ""
    for d in a.artifacts.split(","):
        (pipe,), source = open_pipeline(a.backend or "onnxruntime", d, a.model, device=a.device, transforms=())
        pipes.append(pipe)
    have = [p.info.transform for p in pipes]
    if len(set(have)) != len(have):
        raise ConfigError(f"--artifacts {a.artifacts}: two directories bake the same DSE transform ({have})")
    if transforms:
        missing = [t for t in transforms if t not in have]
        if missing:
            raise ConfigError(f"--dse {missing[0]}: none of --artifacts {a.artifacts} bakes it (they bake {have})")
        pipes = [p for p in pipes if p.info.transform in transforms]
    return pipes, source


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", spec).strip("_") or "x"


def _metrics(point, samples, ref, extractor, cache_dir):
    """metrics.json of a point, recomputed only when the samples, reference or extractor changed."""
    from common.files import atomic_path
    from evaluation.score import evaluate_files
    st, rst = os.stat(samples), os.stat(ref)
    key = [st.st_size, st.st_mtime_ns, os.path.abspath(ref), rst.st_size, rst.st_mtime_ns, extractor.key]
    path = os.path.join(point, "metrics.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old.get("key") == key:
            return old["metrics"]
    m = evaluate_files(samples, ref, extractor, cache_dir=cache_dir)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump({"key": key, "metrics": m}, f, indent=1)
    return m


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

