"""Infinity samples from a prompt list (DESIGN.md, "Samples from a prompt list"): `scripts/sample.py
--prompts FILE` and `scripts/sweep.py --prompts FILE` on Infinity artifacts or presets write the
same .npz layout as VAR's samples (evaluation.samples), so CLIP score, ImageReward or GenEval can
be run on them with the user's own tools, beta = 0 against beta > 0.

    arr_0     uint8  N H W 3        image i: prompt i // per_prompt, seed S + i
    labels    int64  N              the prompt's line number among the non-blank lines (0-based)
    prompts   str    P              the prompts, in file order
    settings  str    [1]            JSON: every generation setting
    OUT.timing.json                 seconds and rows spent sampling (padding rows included)
    --png-dir DIR/000012.png        optional, one PNG per image with its prompt and seed in a note

One process; batches of the pipeline's batch, all of one aspect ratio (one scale schedule). Not
resumable batch by batch: OUT is written whole (temp name, then renamed), and a rerun with
--resume and the same settings finds it done.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from var_ssg.common.errors import ConfigError
from var_ssg.common.files import atomic_path, check_outputs, write_json
from var_ssg.runtime.images import png_bytes, to_uint8
from var_ssg.runtime.noise import VERSION as NOISE

from .samples import NpzBatch, diff_settings, settings_array, timing_path, write_npz_stream

PerScale = Union[float, Tuple[float, ...]]


def read_prompts(path: str) -> Tuple[str, ...]:
    """One prompt a line (UTF-8); blank lines and surrounding spaces are dropped."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"--prompts {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"--prompts {path} is a directory; give a text file with one prompt a line") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--prompts {path} is not UTF-8 text; save it as UTF-8, one prompt a line") from None
    prompts = tuple(s.strip() for s in text.splitlines() if s.strip())
    if not prompts:
        raise ConfigError(f"--prompts {path} has no prompts (empty or only blank lines): write one prompt a line")
    return prompts


@dataclass(frozen=True)
class PromptJob:
    """What to sample: `per_prompt` images of every prompt (prompt-major order)."""
    prompts: Tuple[str, ...]
    per_prompt: int = 1
    seed: int = 0
    aspect_ratio: str = "1:1"
    negative_prompt: Optional[str] = None
    cfg: PerScale = 3.0
    tau: PerScale = 1.0
    top_k: int = 0
    top_p: float = 0.97
    ssg_beta: str = "0"
    batch: Optional[int] = None              # None: the artifacts' batch, or 8 (eager)
    prompts_file: str = field(default="", compare=False)

    def __post_init__(self):
        if self.per_prompt < 1:
            raise ConfigError(f"--per-prompt must be >= 1, got {self.per_prompt}")
        if self.batch is not None and self.batch < 1:
            raise ConfigError(f"--batch must be >= 1, got {self.batch}")

    @property
    def num_images(self) -> int:
        return len(self.prompts) * self.per_prompt

    @property
    def labels(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.prompts), dtype=np.int64), self.per_prompt)

    def settings(self, pipe, source: str, batch: int) -> Dict:
        info = pipe.info
        sched = info.cfg.schedule(_ratio(self.aspect_ratio))
        h, w = info.cfg.image_size(sched)
        return {"format": "var-ssg samples v1", "model": info.cfg.name, "weights": source, "backend": info.name,
                "image_size": [h, w], "prompts_file": self.prompts_file, "prompts": list(self.prompts),
                "per_prompt": self.per_prompt, "seed": self.seed, "seed_rule": "image i uses seed S + i",
                "noise": NOISE, "batch": batch, "aspect_ratio": self.aspect_ratio, "template": sched.template,
                "negative_prompt": self.negative_prompt, "cfg": _jsonable(self.cfg), "tau": _jsonable(self.tau),
                "top_k": self.top_k, "top_p": self.top_p, "ssg_beta": self.ssg_beta, "dse": info.transform}


def _jsonable(v: PerScale):
    return list(v) if isinstance(v, tuple) else v


def _ratio(text: str) -> float:
    from var_ssg.graphs.infinity_config import parse_aspect_ratio
    return parse_aspect_ratio(text)


def _batch(pipe, requested: Optional[int]) -> int:
    fixed = pipe.info.batch
    if fixed is not None:
        if requested not in (None, fixed):
            raise ConfigError(f"--batch {requested} but the artifacts are exported for batch {fixed}")
        return fixed
    return requested or 8


def check_prompt_job(pipe, job: PromptJob) -> int:
    """Everything the pipeline would refuse, before a text encoder loads or a file is written;
    returns the batch."""
    from var_ssg.runtime.infinity import PromptRow
    K = pipe.info.cfg.schedule(_ratio(job.aspect_ratio)).num_scales
    pipe.check_row(PromptRow(None, None, seed=job.seed + job.num_images - 1, cfg=job.cfg, tau=job.tau,
                             top_k=job.top_k, top_p=job.top_p, ssg_beta=job.ssg_beta), K)
    return _batch(pipe, job.batch)


class TextEncoder:
    """The eager T5 of --text-encoder DIR, loaded once; prompts encoded once and kept."""

    def __init__(self, path: Optional[str], cfg):
        if not path:
            raise ConfigError(f"{cfg.name} needs its T5 text encoder to turn prompts into states: pass "
                              f"--text-encoder DIR, a local folder holding the tokenizer and encoder "
                              f"({cfg.t5 or 'width ' + str(cfg.text_dim)}); nothing is downloaded")
        from var_ssg.graphs.infinity_text import load_t5
        self.cfg = cfg
        self.tok, self.enc = load_t5(path)
        self.path = path
        self.cache: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}

    def __call__(self, texts: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
        from var_ssg.graphs.infinity_text import encode_prompts
        new = list(dict.fromkeys(t for t in texts if t not in self.cache))
        if new:
            e, m = encode_prompts(new, self.tok, self.enc, self.cfg.text_maxlen)
            if e.shape[-1] != self.cfg.text_dim:
                raise ConfigError(f"--text-encoder {self.path} gives states of width {e.shape[-1]}; {self.cfg.name} "
                                  f"takes {self.cfg.text_dim} (the encoder it was trained with: "
                                  f"{self.cfg.t5 or 'see its preset'})")
            for i, t in enumerate(new):
                self.cache[t] = (e[i].numpy(), m[i].numpy())
        return (np.stack([self.cache[t][0] for t in texts]), np.stack([self.cache[t][1] for t in texts]))


@dataclass
class PromptSampleResult:
    out: str
    num_images: int
    seconds: float
    rows: int                 # pipeline rows run, padding included
    reused: bool = False


def sample_prompts(pipe, source: str, encoder: TextEncoder, job: PromptJob, out: str, png_dir: Optional[str] = None,
                   resume: bool = False, progress: Optional[Callable[[int, int], None]] = None) -> PromptSampleResult:
    """Sample `job` on `pipe` (an InfinityPipeline) into `out` (and PNGs into `png_dir`)."""
    check_outputs(("--out", out, ".npz"))
    if png_dir is not None and not os.path.isdir(png_dir):
        raise ConfigError(f"--png-dir {png_dir}: no such directory (create it first)")
    B = check_prompt_job(pipe, job)
    settings = job.settings(pipe, source, B)
    if os.path.exists(out):
        if not resume:
            raise ConfigError(f"{out} exists: pass --resume to keep it, or delete it")
        old = NpzBatch(out).settings or {}
        diff = diff_settings(old, settings)
        if diff:
            raise ConfigError(f"{out} was made with other settings ({', '.join(diff)}): use another --out or delete it")
        t = _timing(out)
        return PromptSampleResult(out, job.num_images, t[0], int(t[1]), reused=True)
    ratio = _ratio(job.aspect_ratio)
    n, rows_run = job.num_images, 0
    neg = encoder([job.negative_prompt]) if job.negative_prompt is not None else None
    raw = out + ".raw"                # the images so far, streamed into OUT at the end (never all in memory)
    seconds, H, W = 0.0, 0, 0
    if progress:
        progress(0, n)
    try:
        with open(raw, "wb") as spool:
            for first in range(0, n, B):
                H, W, dt = _batch_into(spool, pipe, source, encoder, job, neg, ratio, first, min(first + B, n), png_dir)
                seconds += dt
                rows_run += B
                if progress:
                    progress(min(first + B, n), n)
        per = H * W * 3

        def chunks():
            with open(raw, "rb") as f:
                for i in range(0, n, 64):
                    k = min(64, n - i)
                    yield np.frombuffer(f.read(k * per), np.uint8).reshape(k, H, W, 3)
        write_json(timing_path(out), {"seconds": seconds, "rows": rows_run})
        write_npz_stream(out, (n, H, W, 3), chunks(),
                         {"labels": job.labels, "prompts": np.array(job.prompts), "settings": settings_array(settings)})
    finally:
        if os.path.exists(raw):
            os.unlink(raw)
    return PromptSampleResult(out, n, seconds, rows_run)


def _batch_into(spool, pipe, source, encoder, job, neg, ratio, first, end, png_dir):
    """Images first..end-1 appended to `spool` (and as PNGs) -> (H, W, pipeline seconds)."""
    from var_ssg.runtime.infinity import PromptRow
    idx = list(range(first, end))
    texts = [job.prompts[i // job.per_prompt] for i in idx]
    emb, mask = encoder(texts)
    rows = [PromptRow(emb[j], mask[j], seed=job.seed + i, cfg=job.cfg, tau=job.tau, top_k=job.top_k,
                      top_p=job.top_p, ssg_beta=job.ssg_beta,
                      neg_text=None if neg is None else neg[0][0], neg_mask=None if neg is None else neg[1][0])
            for j, i in enumerate(idx)]
    t0 = time.perf_counter()
    res = pipe.run(rows, ratio)
    dt = time.perf_counter() - t0
    imgs = to_uint8(res.images)
    spool.write(imgs.tobytes())
    if png_dir is not None:
        sched = res.schedule
        for j, i in enumerate(idx):
            note = (f"{pipe.info.cfg.name} backend={pipe.info.name} prompt={texts[j]!r} seed={job.seed + i} "
                    f"aspect={job.aspect_ratio} (template {sched.template}) cfg={job.cfg} tau={job.tau} "
                    f"top_k={job.top_k} top_p={job.top_p} ssg={job.ssg_beta} dse={pipe.info.transform}"
                    + (f" negative={job.negative_prompt!r}" if job.negative_prompt is not None else "")
                    + f"; {source}")
            with atomic_path(os.path.join(png_dir, f"{i:06d}.png")) as tmp, open(tmp, "wb") as f:
                f.write(png_bytes(res.images[j], note))
    return imgs.shape[1], imgs.shape[2], dt


def _timing(out: str) -> Tuple[float, float]:
    try:
        with open(timing_path(out)) as f:
            t = json.load(f)
        return float(t["seconds"]), float(t["rows"])
    except (OSError, ValueError, TypeError, KeyError):
        return float("nan"), 1.0


@dataclass
class PromptSweepResult:
    rows: List[Dict]
    json_path: str
    plot_path: str


def sweep_prompts(pipe, source: str, encoder: TextEncoder, job: PromptJob, betas: Sequence[str], out_dir: str,
                  json_path: Optional[str] = None, plot_path: Optional[str] = None,
                  progress: Optional[Callable[[int, int], None]] = None) -> PromptSweepResult:
    """Every beta schedule sampled into OUT_DIR/<dse>_<schedule>/samples.npz (reused when done
    with the same settings), then OUT_DIR/sweep.json and sweep.png: seconds per image per point.
    The metrics are the user's (CLIP score, ImageReward, GenEval on the samples)."""
    from .plots import plot_sweep
    from .sweep import _slug
    check_outputs(("--json", json_path, ".json"), ("--plot", plot_path, ".png"))
    if not os.path.isdir(out_dir):
        raise ConfigError(f"--out-dir {out_dir}: no such directory")
    jobs = [replace(job, ssg_beta=b) for b in betas]
    for j in jobs:                                  # every point's schedule before any work
        check_prompt_job(pipe, j)
    total, base = len(jobs) * job.num_images, 0
    rows = []
    for j in jobs:
        point = os.path.join(out_dir, f"{pipe.info.transform}_{_slug(j.ssg_beta)}")
        os.makedirs(point, exist_ok=True)
        res = sample_prompts(pipe, source, encoder, j, os.path.join(point, "samples.npz"), resume=True,
                             progress=(lambda d, n, b=base: progress(b + d, total)) if progress else None)
        base += job.num_images
        rows.append({"dse": pipe.info.transform, "beta": j.ssg_beta, "n_images": res.num_images,
                     "s_per_img": res.seconds / max(res.rows, 1), "samples": res.out})
    out_json = json_path or os.path.join(out_dir, "sweep.json")
    write_json(out_json, {"settings_of_first_point": NpzBatch(rows[0]["samples"]).settings, "reference": None,
                          "metrics": "yours: CLIP score, ImageReward, GenEval on each point's samples.npz",
                          "rows": rows}, indent=1)
    out_png = plot_path or os.path.join(out_dir, "sweep.png")
    info = pipe.info
    plot_sweep(out_png, rows, None, title=f"{info.cfg.name} [{info.name}], {job.num_images} images per point "
                                          f"({len(job.prompts)} prompts); {source}")
    return PromptSweepResult(rows, out_json, out_png)
