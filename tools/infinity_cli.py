"""The Infinity side of `scripts/export.py` and `scripts/generate.py` (DESIGN.md, "Infinity
(text-to-image)"): the commands send `--model infinity-*` and Infinity artifacts here.

Prompts become T5 states on the host, eagerly (`--text-encoder DIR`: a local folder with the
tokenizer and the T5 encoder the weights expect; graphs.infinity_text), then the pipeline
(runtime.infinity) runs the text, step and decoder graphs on the chosen backend.
"""
from __future__ import annotations

import sys
import time
from typing import List, Optional, Sequence, Tuple

from var_ssg.common.errors import ConfigError

DEFAULT_CFG = 3.0
DEFAULT_TOP_P = 0.97


def add_infinity_args(p) -> None:
    g = p.add_argument_group("Infinity (text-to-image: --model infinity-* or Infinity artifacts)")
    g.add_argument("--prompt", nargs="+", metavar="TEXT", help="one image per prompt (several make a grid)")
    g.add_argument("--negative-prompt", nargs="+", metavar="TEXT",
                   help="one for every prompt, or one per prompt (default: the model's learned empty prompt)")
    g.add_argument("--aspect-ratio", default="1:1", help="height:width (e.g. 1:1, 3:4) or h/w; the nearest template")
    g.add_argument("--text-encoder", metavar="DIR",
                   help="local folder with the T5 tokenizer and encoder the weights expect (infinity-2b/8b: "
                        "google/flan-t5-xl saved with save_pretrained)")
    g.add_argument("--cfg-list", metavar="W1,W2,...", help="classifier-free guidance per scale (overrides --cfg)")
    g.add_argument("--tau", default="1.0", metavar="T or T1,T2,...",
                   help="Infinity's temperature: one value or one per scale (default 1.0)")


def _floats(text: str, flag: str) -> Tuple[float, ...]:
    try:
        vals = tuple(float(x) for x in str(text).split(","))
    except ValueError:
        raise ConfigError(f"{flag} takes a number or comma-separated numbers, got {text!r:.60}") from None
    return vals


def _per_scale(vals: Tuple[float, ...]):
    return vals[0] if len(vals) == 1 else vals


def encode(prompts: Sequence[str], negative: Optional[Sequence[str]], text_encoder: Optional[str], cfg):
    """Prompts -> (states, masks, neg states or None, neg masks or None) as numpy, padded to the
    preset's text length."""
    if not text_encoder:
        raise ConfigError(f"{cfg.name} needs its T5 text encoder to turn prompts into states: pass --text-encoder DIR, "
                          f"a local folder holding the tokenizer and encoder ({cfg.t5 or 'a T5 encoder of width ' + str(cfg.text_dim)}"
                          f", e.g. saved with save_pretrained); nothing is downloaded")
    from var_ssg.graphs.infinity_text import load_t5, text_condition
    if negative is not None:
        if len(negative) == 1:
            negative = list(negative) * len(prompts)
        elif len(negative) != len(prompts):
            raise ConfigError(f"{len(negative)} negative prompts for {len(prompts)} prompts: give one, or one per prompt")
    tok, enc = load_t5(text_encoder)
    tc = text_condition(list(prompts), tok, enc, cfg.text_maxlen, negative=negative)
    if tc.embeds.shape[-1] != cfg.text_dim:
        raise ConfigError(f"--text-encoder {text_encoder} gives states of width {tc.embeds.shape[-1]}; {cfg.name} takes "
                          f"{cfg.text_dim} (the encoder it was trained with: {cfg.t5 or 'see its preset'})")
    neg = (None, None) if tc.neg_embeds is None else (tc.neg_embeds.numpy(), tc.neg_mask.numpy())
    return tc.embeds.numpy(), tc.mask.numpy(), neg[0], neg[1]


def generate(a, backend: Optional[str]) -> int:
    """`scripts/generate.py` for Infinity (the argparse Namespace comes from tools.commands.generate)."""
    from var_ssg.graphs.infinity_config import parse_aspect_ratio
    from var_ssg.runtime.infinity import PromptRow, open_infinity
    from var_ssg.runtime.images import save_grid
    from var_ssg.common.files import check_outputs, json_writer, write_outputs
    if not a.prompt:
        raise ConfigError("Infinity generates from text: give --prompt TEXT (and --text-encoder DIR)")
    if a.more_smooth:
        raise ConfigError("--more-smooth is VAR's (a codebook update); Infinity has no such option")
    ratio = parse_aspect_ratio(a.aspect_ratio)
    check_outputs(("--out", a.out, ".png"), ("--save-tokens", a.save_tokens, None),
                  inputs=(a.artifacts, a.ckpt, a.vae_ckpt, a.text_encoder))
    pipe, source = open_infinity(artifacts=a.artifacts, backend=a.backend, model=a.model, ckpt=a.ckpt,
                                 vae_ckpt=a.vae_ckpt, random_init=a.random_init, transform=a.dse or "dct",
                                 device=a.device, verify=a.verify)
    cfg = pipe.info.cfg
    if a.dse and a.dse != pipe.info.transform:
        raise ConfigError(f"--dse {a.dse} but the artifacts bake DSE transform {pipe.info.transform}: "
                          f"use --dse {pipe.info.transform} or re-export with --dse {a.dse}")
    emb, mask, nemb, nmask = encode(a.prompt, a.negative_prompt, a.text_encoder, cfg)
    guidance = _per_scale(_floats(a.cfg_list, "--cfg-list")) if a.cfg_list else (
        DEFAULT_CFG if a.guidance is None else a.guidance)
    tau = _per_scale(_floats(a.tau, "--tau"))
    top_k = 0 if a.top_k is None else a.top_k
    top_p = DEFAULT_TOP_P if a.top_p is None else a.top_p
    rows: List[PromptRow] = [PromptRow(emb[i], mask[i], seed=a.seed + i, cfg=guidance, tau=tau, top_k=top_k,
                                       top_p=top_p, ssg_beta=a.ssg_beta,
                                       neg_text=None if nemb is None else nemb[i],
                                       neg_mask=None if nmask is None else nmask[i])
                             for i in range(len(a.prompt))]
    from tqdm import tqdm
    name = pipe.info.name
    t0 = time.perf_counter()
    sched = cfg.schedule(ratio)
    import numpy as np
    B = pipe.info.batch or len(rows)          # artifacts run their exported batch at a time
    images, bits = [], []
    with tqdm(total=sched.num_scales * -(-len(rows) // B), desc=f"{cfg.name} [{name}]", unit="scale",
              file=sys.stderr) as bar:
        for i in range(0, len(rows), B):
            res = pipe.run(rows[i:i + B], ratio, progress=lambda k: bar.update(1))
            images.append(res.images)
            bits.append(res.bits)
    images = np.concatenate(images)
    bits = [np.concatenate([b[k] for b in bits]) for k in range(sched.num_scales)]
    note = (f"{cfg.name} backend={name} prompts={list(a.prompt)!r} seeds={a.seed}.. aspect={a.aspect_ratio} "
            f"(template {sched.template}) cfg={guidance} tau={tau} top_k={top_k} top_p={top_p} ssg={a.ssg_beta} "
            f"dse={pipe.info.transform}" + (f" negative={list(a.negative_prompt)!r}" if a.negative_prompt else "")
            + f"; {source}")
    write_outputs([(a.out, lambda path: save_grid(images, path, note)),
                   (a.save_tokens, json_writer({"note": note, "bits": [b.tolist() for b in bits]}))])
    print(f"wrote {a.out} ({note})")
    print(f"pipeline {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    from var_ssg.tools.cli import note_random_weights
    note_random_weights(source)
    return 0


# an Infinity export holds the fp32 weights in memory and peaks at about this multiple of their
# size (infinity-2b: 10.05 GiB for 8.7 GB of weights)
EXPORT_PEAK_PER_WEIGHT_BYTE = 1.25


def check_export_memory(cfg, memory: int) -> None:
    """Refuse, before anything is loaded, an export that cannot fit this machine (infinity-8b's
    33.5 GB of fp32 weights on a 24 GB machine) instead of being killed for memory midway."""
    from var_ssg.graphs.infinity_weights import meta_models
    model, vae = meta_models(cfg)
    weights = 4 * (sum(p.numel() for p in model.parameters()) +
                   sum(p.numel() for n, p in vae.named_parameters() if n.startswith("decoder.")))
    need = EXPORT_PEAK_PER_WEIGHT_BYTE * weights
    if need > memory:
        raise ConfigError(f"exporting {cfg.name} holds its {weights / 1e9:.1f} GB of fp32 weights in memory, about "
                          f"{need / 1e9:.0f} GB at peak; this machine has {memory / 1e9:.0f} GB: export on a machine "
                          f"with more memory (the artifacts then run anywhere they fit)")


def export(a) -> int:
    """`scripts/export.py --model infinity-*`."""
    import resource
    from var_ssg.export.infinity_export import InfinityExportConfig, export_infinity
    from var_ssg.common.proc import physical_memory
    from var_ssg.export.publish import check_out
    from var_ssg.graphs.infinity_config import get_infinity_preset
    from var_ssg.graphs.infinity_weights import load_infinity
    from var_ssg.tools.progress import StageDisplay
    t0 = time.time()
    cfg = get_infinity_preset(a.model)
    opset = {} if a.opset is None else dict(opset=a.opset)          # None: the config's own default
    ec = InfinityExportConfig(precision=a.precision, batch=a.batch, transform=a.dse, target=a.target, **opset,
                              trt_hardware_compatible=a.trt_hardware_compatible,
                              trt_version_compatible=a.trt_version_compatible, trt_tf32=a.trt_tf32)
    check_out(a.out)
    check_export_memory(cfg, physical_memory())
    with StageDisplay(f"export {cfg.name}") as stages:
        stages("weights")
        model, vae, src = load_infinity(cfg, a.ckpt, a.vae_ckpt, a.random_init)
        stages("reuse check")
        res = export_infinity(model, vae, src, a.out, ec, force=a.force, progress=stages)
    print(stages.summary())
    if res.reused:
        print(f"{a.out} is up to date (same model, weights and options; files verified): nothing exported")
        return 0
    ext = res.manifest["external_data"]
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    engines = f", engines {', '.join(e['file'] for e in res.manifest['engines'].values())}" \
        if res.manifest.get("engines") else ""
    print(f"wrote {a.out}: {len(res.manifest['graphs'])} graphs (text, step, decoder){engines}, {ext['file']} "
          f"{ext['bytes'] / 2**20:.1f} MiB, {time.time() - t0:.0f} s, peak RSS {peak_gb:.2f} GiB; weights: {src.describe()}")
    return 0


def parity(a, seeds: Sequence[int]) -> int:
    """`scripts/parity.py` on Infinity artifacts: teacher-forced, scale by scale
    (runtime.infinity_parity); exit 1 on a broken bound or an unexplained flip."""
    from var_ssg.graphs.infinity_config import parse_aspect_ratio
    from var_ssg.runtime.infinity import PromptRow, open_infinity
    from var_ssg.runtime.infinity_parity import run_infinity_parity
    from var_ssg.common.files import write_json
    if a.free_running or a.sweep or a.polygraphy:
        raise ConfigError("Infinity parity is teacher-forced only here: drop --free-running, --sweep and --polygraphy")
    names = [b.strip() for b in a.backends.split(",") if b.strip()]
    others = [b for b in names if b != "eager"]
    if not others:
        raise ConfigError("--backends needs at least one backend besides eager (e.g. eager,onnxruntime)")
    if not a.prompt:
        raise ConfigError("Infinity parity needs --prompt TEXT (and --text-encoder DIR)")
    ratio = parse_aspect_ratio(a.aspect_ratio)
    ref, _ = open_infinity(artifacts=a.artifacts, backend="eager", device=a.device)
    cfg = ref.info.cfg
    emb, mask, nemb, nmask = encode(a.prompt, a.negative_prompt, a.text_encoder, cfg)
    guidance = _per_scale(_floats(a.cfg_list, "--cfg-list")) if a.cfg_list else (
        DEFAULT_CFG if a.guidance is None else a.guidance)
    tau = _per_scale(_floats(a.tau, "--tau"))
    top_p = DEFAULT_TOP_P if a.top_p is None else a.top_p
    runs, fails = [], []
    for name in others:
        # --device is the reference's (and onnxruntime's); TensorRT's engines run on the GPU
        pipe, _ = open_infinity(artifacts=a.artifacts, backend=name, device="cuda" if name == "tensorrt" else a.device)
        B = pipe.info.batch or len(a.prompt)
        for seed in seeds:
            for i in range(0, len(a.prompt), B):
                rows = [PromptRow(emb[j], mask[j], seed=seed + j, cfg=guidance, tau=tau, top_k=a.top_k or 0,
                                  top_p=top_p, ssg_beta=a.ssg_beta, neg_text=None if nemb is None else nemb[j],
                                  neg_mask=None if nmask is None else nmask[j])
                        for j in range(i, min(i + B, len(a.prompt)))]
                rep = run_infinity_parity(ref, pipe, rows, ratio)
                print(f"seed {seed} prompts {list(a.prompt[i:i + B])!r}")
                print(rep.table())
                runs.append(dict(backend=name, seed=seed, scales=[s.__dict__ for s in rep.scales], failures=rep.failures))
                fails += [f"{name} seed {seed}: {f}" for f in rep.failures]
    if a.json:
        write_json(a.json, dict(runs=runs, failures=fails), indent=2)
    if fails:
        print("parity FAILED:\n" + "\n".join(fails), file=sys.stderr)
        return 1
    print(f"{len(runs)} runs: parity OK")
    return 0


# ---------------------------------------------------------------- sample.py / sweep.py --prompts FILE
def add_prompts_args(p) -> None:
    """scripts/sample.py and sweep.py: prompts from a file, for Infinity artifacts or presets."""
    g = p.add_argument_group("Infinity (text-to-image: --model infinity-* or Infinity artifacts)")
    g.add_argument("--prompts", metavar="FILE", help="one prompt a line (e.g. GenEval's or COCO's prompt list); blank "
                                                     "lines are skipped")
    g.add_argument("--per-prompt", type=int, default=None, metavar="N", help="images per prompt (default 1)")
    g.add_argument("--negative-prompt", metavar="TEXT", help="one negative prompt for every image (default: the "
                                                             "model's learned empty prompt)")
    g.add_argument("--aspect-ratio", default="1:1", help="height:width (e.g. 1:1, 3:4) or h/w; the nearest template")
    g.add_argument("--text-encoder", metavar="DIR", help="local folder with the T5 tokenizer and encoder the weights "
                                                         "expect")
    g.add_argument("--cfg-list", metavar="W1,W2,...", help="classifier-free guidance per scale (overrides --cfg)")
    g.add_argument("--tau", default="1.0", metavar="T or T1,T2,...",
                   help="Infinity's temperature: one value or one per scale (default 1.0)")


VAR_ONLY = (("class_spec", "--classes"), ("per_class", "--per-class"), ("more_smooth", "--more-smooth"),
            ("address", "--address"), ("workers", "--workers"), ("chunk", "--chunk"), ("precision", "--precision"),
            ("ref", "--ref"), ("max_batches", "--max-batches"))


def check_prompts_args(a, infinity: bool) -> None:
    """Infinity takes --prompts and refuses VAR's class and cluster flags; VAR refuses the prompt flags."""
    if not infinity:
        given = [f for f, v in (("--prompts", a.prompts), ("--per-prompt", a.per_prompt),
                                ("--negative-prompt", a.negative_prompt), ("--text-encoder", a.text_encoder),
                                ("--cfg-list", a.cfg_list)) if v is not None]
        if given:
            raise ConfigError(f"{given[0]} is for Infinity (--model infinity-* or Infinity artifacts); VAR samples "
                              f"classes (--classes, --per-class)")
        return
    if not a.prompts:
        raise ConfigError("Infinity samples from text: give --prompts FILE (one prompt a line) and --text-encoder DIR")
    for attr, flag in VAR_ONLY:
        v = getattr(a, attr, None)
        if v not in (None, False):
            extra = (" FID needs a class-conditional reference: score the samples with CLIP score, ImageReward or "
                     "GenEval" if flag == "--ref" else (" use --per-prompt" if flag == "--per-class" else ""))
            raise ConfigError(f"{flag} is VAR's; Infinity runs from --prompts FILE in this process.{extra}".rstrip())


def _prompt_job(a, betas=None):
    from var_ssg.evaluation.prompt_samples import PromptJob, read_prompts
    from var_ssg.graphs.infinity_config import parse_aspect_ratio
    parse_aspect_ratio(a.aspect_ratio)
    guidance = _per_scale(_floats(a.cfg_list, "--cfg-list")) if a.cfg_list else (
        DEFAULT_CFG if a.guidance is None else a.guidance)
    return PromptJob(prompts=read_prompts(a.prompts), per_prompt=a.per_prompt or 1, seed=a.seed,
                     aspect_ratio=a.aspect_ratio, negative_prompt=a.negative_prompt, cfg=guidance,
                     tau=_per_scale(_floats(a.tau, "--tau")), top_k=0 if a.top_k is None else a.top_k,
                     top_p=DEFAULT_TOP_P if a.top_p is None else a.top_p, ssg_beta=a.ssg_beta, batch=a.batch,
                     prompts_file=a.prompts)


def _open(a, transform: Optional[str]):
    from var_ssg.runtime.infinity import open_infinity
    pipe, source = open_infinity(artifacts=a.artifacts, backend=a.backend, model=a.model, ckpt=a.ckpt,
                                 vae_ckpt=a.vae_ckpt, random_init=a.random_init, transform=transform or "dct",
                                 device=a.device)
    if transform and transform != pipe.info.transform:
        raise ConfigError(f"--dse {transform} but the artifacts bake DSE transform {pipe.info.transform}: "
                          f"use --dse {pipe.info.transform} or re-export with --dse {transform}")
    return pipe, source


def _bar(desc: str):
    from tqdm import tqdm
    bar = tqdm(desc=desc, unit="img", file=sys.stderr, smoothing=0.1)

    def progress(done, total):
        bar.total = total
        bar.update(done - bar.n)
    return bar, progress


def sample(a) -> int:
    """`scripts/sample.py --prompts FILE` on Infinity: the ADM-format .npz (and PNGs)."""
    from var_ssg.evaluation.prompt_samples import TextEncoder, check_prompt_job, sample_prompts
    job = _prompt_job(a)
    pipe, source = _open(a, a.dse)
    check_prompt_job(pipe, job)                      # before the text encoder loads
    enc = TextEncoder(a.text_encoder, pipe.info.cfg)
    bar, progress = _bar("sample")
    with bar:
        res = sample_prompts(pipe, source, enc, job, a.out, png_dir=a.png_dir, resume=a.resume, progress=progress)
    what = "already complete (same settings)" if res.reused else f"{res.num_images} images"
    print(f"wrote {a.out}: {what}, {len(job.prompts)} prompts x {job.per_prompt}, aspect {job.aspect_ratio}, "
          f"ssg={job.ssg_beta} dse={pipe.info.transform}; {source}")
    from var_ssg.tools.cli import note_random_weights
    note_random_weights(source)
    return 0


def sweep(a, betas: Sequence[str]) -> int:
    """`scripts/sweep.py --prompts FILE` on Infinity: samples per beta schedule and the latency;
    the metrics are the user's."""
    from var_ssg.evaluation.prompt_samples import TextEncoder, check_prompt_job, sweep_prompts
    transforms = [t.strip() for t in a.dse.split(",")] if a.dse else []
    if len(transforms) > 1:
        raise ConfigError("--dse: one transform per Infinity sweep here (artifacts bake one); run the sweep once "
                          "per transform")
    if a.artifacts and "," in a.artifacts:
        raise ConfigError("--artifacts: one Infinity artifacts directory per sweep")
    job = _prompt_job(a)
    pipe, source = _open(a, transforms[0] if transforms else None)
    check_prompt_job(pipe, job)
    enc = TextEncoder(a.text_encoder, pipe.info.cfg)
    bar, progress = _bar("sweep")
    with bar:
        res = sweep_prompts(pipe, source, enc, job, betas, a.out_dir, json_path=a.json, plot_path=a.plot,
                            progress=progress)
    for r in res.rows:
        print(f"dse={r['dse']} beta={r['beta']}: {r['n_images']} images, {r['s_per_img']:.4g} s/img -> {r['samples']}")
    print(f"wrote {res.json_path} and {res.plot_path}; score each samples.npz with CLIP score, ImageReward or GenEval "
          f"(FID needs a class-conditional reference: not for Infinity)")
    from var_ssg.tools.cli import note_random_weights
    note_random_weights(source)
    return 0
