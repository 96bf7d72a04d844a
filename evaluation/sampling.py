"""Resumable sampling into an ADM-format .npz.

    OUT.partial/settings.json      the run's settings (written first; --resume must match them)
    OUT.partial/batch_000012.npz   one finished batch: images (real rows only), seconds
    OUT                            written from the batch files (temp name, then renamed);
                                   the .partial folder is removed only after that
Every file appears under its final name only when complete (write, then rename), so an
interrupted run loses at most the batch in flight and a resumed run redoes nothing finished.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Callable, Dict, Optional

import numpy as np

from graphs.config import ConfigError

from .run import Job, check_job, run_batches
from common.files import atomic_path

from .samples import NpzBatch, diff_settings, settings_array, write_npz_stream

log = logging.getLogger(__name__)


def partial_dir(out: str) -> str:
    return out + ".partial"


def _batch_file(out: str, b: int) -> str:
    return os.path.join(partial_dir(out), f"batch_{b:06d}.npz")


def check_output(out: str, settings: Optional[Dict], resume: bool) -> str:
    """'done' (OUT exists with these settings), 'resume' or 'fresh'. Raises on any conflict.
    settings None: check the paths only (cheap, before a model is loaded)."""
    if not out.endswith(".npz"):
        raise ConfigError(f"--out must be a .npz file, got {out!r}")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise ConfigError(f"cannot write {out}: directory {folder} does not exist or is not writable")
    part = partial_dir(out)
    if os.path.exists(out):
        if not resume:
            raise ConfigError(f"{out} exists: pass --resume to keep it, or delete it")
        old = NpzBatch(out).settings or {}
        if settings is not None and diff_settings(old, settings):
            raise ConfigError(f"{out} was made with other settings ({', '.join(diff_settings(old, settings))} "
                              f"differ): use another --out")
        return "done"
    if os.path.isdir(part) and not os.listdir(part):
        return "fresh"                          # stopped before its settings were written
    if os.path.isdir(part):
        if not resume:
            raise ConfigError(f"{part}/ holds an unfinished run: pass --resume to continue it, or delete it")
        with open(os.path.join(part, "settings.json")) as f:
            old = json.load(f)
        if settings is not None and diff_settings(old, settings):
            raise ConfigError(f"--resume: the unfinished run in {part}/ used other settings "
                              f"({', '.join(diff_settings(old, settings))} differ)")
        return "resume"
    return "fresh"


def sample_to_npz(pipe, job: Job, source: str, out: str, resume: bool = False, png_dir: Optional[str] = None,
                  max_batches: Optional[int] = None,
                  progress: Optional[Callable[[int, int], None]] = None) -> bool:
    """Sample `job` into `out`. Returns True when `out` is complete, False when stopped early
    by `max_batches` (new batches this call; the partial state stays for --resume).
    `progress(done_images, total_images)` is called after each batch."""
    check_job(pipe, job)
    settings = job.settings(pipe, source)
    state = check_output(out, settings, resume)
    if png_dir and not os.path.isdir(png_dir):
        raise ConfigError(f"--png-dir {png_dir}: no such directory")
    if state == "done":
        log.info("%s is complete already", out)
        return True
    part = partial_dir(out)
    if state == "fresh":
        os.makedirs(part, exist_ok=True)
        with atomic_path(os.path.join(part, "settings.json")) as tmp, open(tmp, "w") as f:
            json.dump(settings, f, sort_keys=True, indent=1)
    labels = job.labels
    done = {b for b in range(job.num_batches) if os.path.exists(_batch_file(out, b))}
    todo = [b for b in range(job.num_batches) if b not in done]
    if done:
        log.info("resuming: %d of %d batches done", len(done), job.num_batches)
    n_done = sum(min(job.batch, len(labels) - b * job.batch) for b in done)
    if progress:
        progress(n_done, len(labels))
    if max_batches is not None:
        todo = todo[:max_batches]
    for b, images, _, seconds in run_batches(pipe, job, todo):
        if png_dir:                         # before the batch file: a done batch has its PNGs
            _write_pngs(png_dir, b * job.batch, images, labels)
        with atomic_path(_batch_file(out, b)) as tmp, open(tmp, "wb") as f:
            np.savez(f, images=images, seconds=np.float64(seconds))
        n_done += len(images)
        if progress:
            progress(n_done, len(labels))
    if any(not os.path.exists(_batch_file(out, b)) for b in range(job.num_batches)):
        return False
    _assemble(out, job, settings)
    shutil.rmtree(part)
    return True


def _write_pngs(folder: str, first: int, images: np.ndarray, labels: np.ndarray) -> None:
    from PIL import Image
    for i, img in enumerate(images):
        path = os.path.join(folder, f"{first + i:06d}_c{int(labels[first + i])}.png")
        with atomic_path(path) as tmp:
            Image.fromarray(img).save(tmp, format="PNG")


def _assemble(out: str, job: Job, settings: Dict) -> None:
    files = [_batch_file(out, b) for b in range(job.num_batches)]
    seconds = 0.0
    for path in files:                      # np.load reads only the members asked for
        with np.load(path) as z:
            seconds += float(z["seconds"])
    with np.load(files[0]) as z:
        hw = z["images"].shape[1:]

    def chunks():
        for path in files:
            with np.load(path) as z:
                yield z["images"]

    write_npz_stream(out, (len(job.labels), *hw), chunks(),
                     {"labels": job.labels, "settings": settings_array(settings),
                      "timing": np.array([seconds, job.num_batches * job.batch], dtype=np.float64)})
