"""`scripts/spectrum.py` (its docstring shows the usage): the SSG paper's spectral diagnostics
as one PNG (two panels; evaluation/spectrum.py computes them).
"""
from __future__ import annotations

import sys

from var_ssg.tools.cli import add_model_args, add_sampling_args, note_random_weights, parser
from var_ssg.tools.evalargs import add_job_args, add_source_args, request_from_args, source_from_args


def main(argv=None) -> int:
    p = parser("Radial image spectrum ratio and per-scale latent spectrum change, with and without SSG.")
    add_model_args(p)
    add_sampling_args(p)
    add_source_args(p)
    add_job_args(p, per_class=4)
    p.add_argument("--compare-beta", default="0", help="the schedule to compare against (default 0: SSG off)")
    p.add_argument("--ref", metavar="REF.npz", help="reference images (ADM batch layout, arr_0)")
    p.add_argument("--ref-limit", type=int, help="use only the first N reference images")
    p.add_argument("--out", required=True, help="PNG")
    p.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    a = p.parse_args(argv)
    from var_ssg.common.files import check_outputs       # output paths checked before any work
    check_outputs(("--out", a.out, ".png"), ("--json", a.json, ".json"))
    request = request_from_args(a)
    request.check(betas=(a.compare_beta,))

    from var_ssg.common.errors import ConfigError
    ref = None
    if a.ref:
        from var_ssg.evaluation.samples import NpzBatch
        ref = NpzBatch(a.ref)
        if ref.shape is None:
            raise ConfigError(f"{a.ref} has no images (arr_0)")

    from tqdm import tqdm
    from var_ssg.evaluation import spectrum as sp
    from var_ssg.evaluation.plots import plot_spectrum
    from var_ssg.evaluation.run import check_job, run_batches

    from var_ssg.runtime.opener import open_pipelines
    (pipe,), source = open_pipelines(source_from_args(a, (a.dse,) if a.dse else ()))
    cfg = pipe.info.cfg
    jobs = {a.ssg_beta: request.job(pipe), a.compare_beta: request.job(pipe, a.compare_beta)}
    if len(jobs) == 1:
        raise ConfigError(f"--compare-beta {a.compare_beta} is the same schedule as --ssg-beta")
    for job in jobs.values():
        check_job(pipe, job)
    img, lat = {}, {}
    total = sum(j.num_images for j in jobs.values())
    with tqdm(total=total, desc=f"{cfg.name} [{pipe.info.name}]", unit="img", file=sys.stderr) as bar:
        for spec, job in jobs.items():
            acc, lat_sum = sp.ImageSpectrum(), 0
            for _, images, f_hats, _ in run_batches(pipe, job, range(job.num_batches), keep_fhat=True):
                acc.add(images)
                lat_sum = lat_sum + sp.latent_profiles(f_hats) * len(images)
                bar.update(len(images))
            img[spec], lat[spec] = acc.profile, lat_sum / job.num_images
    name_a, name_b = f"beta {a.ssg_beta}", f"beta {a.compare_beta}"
    if ref is not None:
        if ref.shape[1:3] != (cfg.vae.image_size,) * 2:
            raise ConfigError(f"{a.ref} holds {ref.shape[1]}x{ref.shape[2]} images, the model makes "
                              f"{cfg.vae.image_size}x{cfg.vae.image_size}: the spectra are not comparable")
        ref_prof = sp.image_spectrum(ref.iter_images(limit=a.ref_limit))
        ratios = {f"{name_a} / reference": img[a.ssg_beta] / ref_prof,
                  f"{name_b} / reference": img[a.compare_beta] / ref_prof}
    else:
        ratios = {f"{name_a} / {name_b}": img[a.ssg_beta] / img[a.compare_beta]}
    deltas = {name_a: sp.latent_delta(lat[a.ssg_beta]), name_b: sp.latent_delta(lat[a.compare_beta])}
    nyq = sp.nyquist_bins(cfg.patch_nums)
    n = jobs[a.ssg_beta].num_images
    plot_spectrum(a.out, ratios, deltas, nyq,
                  title=f"{cfg.name} [{pipe.info.name}], {n} images per schedule, dse={pipe.info.transform}; {source}")
    if a.json:
        from var_ssg.common.files import write_json
        out = {"settings": jobs[a.ssg_beta].settings(pipe, source), "compare_beta": a.compare_beta,
               "reference": a.ref, "image_bins": list(range(len(next(iter(ratios.values()))))),
               "image_ratio": {k: v.tolist() for k, v in ratios.items()},
               "image_amplitude": {k: v.tolist() for k, v in img.items()},
               "latent_amplitude": {k: v.tolist() for k, v in lat.items()},
               "latent_delta_logmag": {k: v.tolist() for k, v in deltas.items()}, "nyquist": nyq}
        write_json(a.json, out, indent=1)
    print(f"wrote {a.out}" + (f" and {a.json}" if a.json else ""))
    note_random_weights(source)
    return 0

