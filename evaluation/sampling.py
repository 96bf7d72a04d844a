"""Resumable sampling into an ADM-format .npz, in one process or over a pool of workers.

    OUT.partial/settings.json      the run's settings (written first; --resume must match them)
    OUT.partial/batch_000012.npz   one finished batch: images (real rows only), seconds, and the
                                   sha256 of both written with them (batch_digest)
    OUT.partial/.lock              held (flock) by the one sampler writing this run
    OUT.timing.json, OUT           written from the batch files (temp names, then renamed);
                                   the .partial folder is removed only after that
Every file appears under its final name only when complete (write, then rename), so an
interrupted run loses at most the batches in flight and a resumed run redoes nothing finished.
On resume a damaged batch file (truncated, wrong shape, content that does not match its sha256,
or no sha256) is redone, not trusted; a damaged
settings file with no batch beside it is rewritten. Only the driver writes (workers return
images), and the lock keeps a second sampler out of the same run: two writers never own a batch.

The batch files hold nothing of how they were made (which worker, how many), so OUT has the
same bytes whatever ran them (DESIGN.md "Evaluation at scale").
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from var_ssg.common.files import atomic_path, check_outputs, write_json
from var_ssg.common.errors import ConfigError
from var_ssg.runtime.opener import PipelineSource, open_sources

from .run import Executor, Job, JobRequest, PipelineView, Work, check_job, run_batches
from .samples import NpzBatch, diff_settings, settings_array, timing_path, write_npz_stream

log = logging.getLogger(__name__)

SETTINGS, LOCK = "settings.json", ".lock"


def partial_dir(out: str) -> str:
    return out + ".partial"


def _batch_file(out: str, b: int) -> str:
    return os.path.join(partial_dir(out), f"batch_{b:06d}.npz")


def _batch_files(part: str) -> List[str]:
    return [n for n in os.listdir(part) if n.startswith("batch_") and n.endswith(".npz")]


def _read_settings(part: str) -> Optional[Dict]:
    """The partial run's settings, or None if missing or damaged (unreadable, not a JSON object)."""
    try:
        with open(os.path.join(part, SETTINGS), "rb") as f:
            s = json.loads(f.read(1 << 20).decode("utf-8"))
    except (OSError, ValueError):
        return None
    return s if isinstance(s, dict) else None


def check_output(out: str, settings: Optional[Dict], resume: bool) -> str:
    """'done' (OUT exists with these settings), 'resume' or 'fresh'. Raises on any conflict.
    settings None: check the paths only (cheap, before a model is loaded)."""
    check_outputs(("--out", out, ".npz"))           # a folder, a FIFO, an unwritable place: now
    part = partial_dir(out)
    if os.path.exists(out):
        if not resume:
            raise ConfigError(f"{out} exists: pass --resume to keep it, or delete it")
        try:
            old = NpzBatch(out).settings or {}
        except ValueError:
            raise ConfigError(f"{out} exists but its settings are unreadable: use another --out") from None
        if settings is not None and diff_settings(old, settings):
            raise ConfigError(f"{out} was made with other settings ({', '.join(diff_settings(old, settings))} "
                              f"differ): use another --out")
        return "done"
    if os.path.lexists(part) and not os.path.isdir(part):
        raise ConfigError(f"{part} exists and is not a folder: move it away")
    if not os.path.isdir(part) or not _batch_files(part):
        return "fresh"                              # nothing sampled yet (settings alone are rewritten)
    if not resume:
        raise ConfigError(f"{part}/ holds an unfinished run: pass --resume to continue it, or delete it")
    old = _read_settings(part)
    if old is None:
        raise ConfigError(f"{part}/{SETTINGS} is missing or damaged, so its batches cannot be checked against "
                          f"these settings: delete {part}/ to start over")
    if settings is not None and diff_settings(old, settings):
        raise ConfigError(f"--resume: the unfinished run in {part}/ used other settings "
                          f"({', '.join(diff_settings(old, settings))} differ)")
    return "resume"


def check_png_dir(png_dir: Optional[str]) -> None:
    """--png-dir must be a folder we can create files in: tried now, not after the first batch."""
    if not png_dir:
        return
    if not os.path.isdir(png_dir):
        raise ConfigError(f"--png-dir {png_dir}: no such directory")
    probe = os.path.join(png_dir, f".var-ssg-probe-{os.getpid()}.png")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"--png-dir {png_dir}: cannot write there ({e.strerror})") from None


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n < 1e12 else f"{n / 1e12:,.1f} TB"


def check_space(out: str, job: Job, image_size: int, todo_images: int) -> None:
    """The batch files still to write and OUT itself must fit on the disk: refused before work."""
    per = image_size * image_size * 3
    need = (todo_images + job.num_images) * per
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(out))).free
    if need > free:
        raise ConfigError(f"{job.num_images:,} images of {image_size}x{image_size} need about {_gb(need)} on the disk "
                          f"of {out} (batch files, then the .npz), which has {_gb(free)} free: sample fewer images "
                          f"(--classes, --per-class) or choose another --out")


class PartialRun:
    """One output being sampled: its checks, its lock, its batch files and the final merge."""

    def __init__(self, out: str, job: Job, settings: Dict, png_dir: Optional[str] = None):
        self.out, self.job, self.settings, self.png_dir = out, job, settings, png_dir
        self.part = partial_dir(out)
        self.todo: List[int] = []
        self.state = ""
        self._lock = None

    def open(self, resume: bool) -> "PartialRun":
        self.state = check_output(self.out, self.settings, resume)
        if self.state == "done":
            return self
        check_png_dir(self.png_dir)
        size = self.settings["image_size"]
        found = self._found()
        check_space(self.out, self.job, size, self.job.num_images - sum(self.job.batch_len(b) for b in found))
        self._take_lock()
        self.state = check_output(self.out, self.settings, resume)     # again, now that we own it
        self._clean_temps()
        if self.state == "fresh" or _read_settings(self.part) is None:
            with atomic_path(os.path.join(self.part, SETTINGS)) as tmp, open(tmp, "w") as f:
                json.dump(self.settings, f, sort_keys=True, indent=1)
        done = set()
        for b in sorted(self._found()):
            path = _batch_file(self.out, b)
            if _batch_ok(path, self.job.batch_len(b), (size, size)):
                done.add(b)
            else:
                log.warning("%s is damaged: redoing that batch", path)
                os.unlink(path)
        self.todo = [b for b in range(self.job.num_batches) if b not in done]
        if done:
            log.info("resuming: %d of %d batches done", len(done), self.job.num_batches)
        return self

    def _found(self) -> List[int]:
        """Indices of the batch files present (of this job's range)."""
        if not os.path.isdir(self.part):
            return []
        idx = [int(n[6:-4]) for n in _batch_files(self.part) if n[6:-4].isdigit()]
        return [b for b in idx if b < self.job.num_batches]

    def _take_lock(self) -> None:
        import fcntl
        os.makedirs(self.part, exist_ok=True)
        fd = os.open(os.path.join(self.part, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise ConfigError(f"{self.part}/ is being written by another sampler right now: "
                                  f"wait for it to finish, or stop it") from None
            raise
        self._lock = fd

    def _clean_temps(self) -> None:
        """Temporary files of a killed writer (we hold the lock: nobody else writes here)."""
        for n in os.listdir(self.part):
            if n.startswith(".") and ".tmp" in n:
                os.unlink(os.path.join(self.part, n))

    def close(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    @property
    def images_done(self) -> int:
        return self.job.num_images - sum(self.job.batch_len(b) for b in self.todo)

    def store(self, b: int, images: np.ndarray, seconds: float) -> None:
        if self.png_dir:                         # before the batch file: a done batch has its PNGs
            _write_pngs(self.png_dir, b * self.job.batch, images, self.job)
        with atomic_path(_batch_file(self.out, b)) as tmp, open(tmp, "wb") as f:
            np.savez(f, images=images, seconds=np.float64(seconds), sha256=np.array(batch_digest(images, seconds)))

    def complete(self) -> bool:
        return self.state == "done" or all(os.path.exists(_batch_file(self.out, b))
                                           for b in range(self.job.num_batches))

    def finish(self) -> None:
        """Merge the batch files in image order into OUT (and its timing), then drop the folder."""
        if self.state == "done":
            return
        files = [_batch_file(self.out, b) for b in range(self.job.num_batches)]
        seconds = 0.0
        for path in files:                      # np.load reads only the members asked for
            with np.load(path) as z:
                seconds += float(z["seconds"])

        def chunks():
            for path in files:
                with np.load(path) as z:
                    yield z["images"]

        size = self.settings["image_size"]
        write_json(timing_path(self.out), {"seconds": seconds, "rows": self.job.num_batches * self.job.batch})
        write_npz_stream(self.out, (self.job.num_images, size, size, 3), chunks(),
                         {"labels": self.job.labels, "settings": settings_array(self.settings)})
        shutil.rmtree(self.part)
        self.state = "done"


def batch_digest(images: np.ndarray, seconds: float) -> str:
    """sha256 of a batch's images (shape and bytes) and its seconds, written with them."""
    h = hashlib.sha256(repr(tuple(images.shape)).encode())
    h.update(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
    h.update(np.float64(seconds).tobytes())
    return h.hexdigest()


def _batch_ok(path: str, n: int, hw: Tuple[int, int]) -> bool:
    """A batch file whose structure is whole (both members, `images` uint8 n H W 3 and all its
    bytes) and whose content matches the sha256 written with it."""
    return _batch_whole(path, n, hw) and _batch_sums(path)


def _batch_sums(path: str) -> bool:
    try:
        with np.load(path) as z:
            stored = z["sha256"]
            if stored.dtype.kind != "U" or stored.shape != ():
                return False
            return str(stored) == batch_digest(z["images"], float(z["seconds"]))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        return False


def _batch_whole(path: str, n: int, hw: Tuple[int, int]) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo("images.npy")
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
                header = f.tell()
            zf.getinfo("seconds.npy")
        return dtype == np.uint8 and tuple(shape) == (n, *hw, 3) and info.file_size == header + n * hw[0] * hw[1] * 3
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        return False


def _write_pngs(folder: str, first: int, images: np.ndarray, job: Job) -> None:
    from PIL import Image
    for i, img in enumerate(images):
        c = job.classes[(first + i) // job.per_class]
        path = os.path.join(folder, f"{first + i:06d}_c{int(c)}.png")
        with atomic_path(path) as tmp:
            Image.fromarray(img).save(tmp, format="PNG")


# ---------------------------------------------------------------- who runs the batches

class LocalExecutor:
    """This process, one pipeline per DSE transform (what sample.py always did)."""

    def __init__(self, pipes):
        self.pipes = {p.info.transform: p for p in pipes}

    def run(self, work):
        for w in work:
            for b, images, _, seconds in run_batches(self.pipes[w.job.ssg.transform], w.job, w.batches):
                yield w.key, b, images, seconds


def sample_runs(executor: Executor, runs: Sequence[PartialRun], max_batches: Optional[int] = None,
                progress: Optional[Callable[[int, int], None]] = None) -> bool:
    """Sample every opened run's missing batches through `executor` and merge each finished
    run. True when all are complete; False when `max_batches` (new batches) stopped them early.
    `progress(done_images, total_images)` over all runs."""
    total = sum(r.job.num_images for r in runs)
    done = sum(r.images_done for r in runs)
    if progress:
        progress(done, total)
    work, left = [], max_batches
    for key, r in enumerate(runs):
        todo = r.todo if left is None else r.todo[:left]
        if left is not None:
            left -= len(todo)
        if todo:
            work.append(Work(key, r.job, tuple(todo)))
    remaining = {key: set(w.batches) for key, w in ((w.key, w) for w in work)}
    for key, b, images, seconds in executor.run(work):
        runs[key].store(b, images, seconds)
        done += len(images)
        remaining[key].discard(b)
        if not remaining[key] and runs[key].complete():
            runs[key].finish()                  # merged as soon as its last batch lands
        if progress:
            progress(done, total)
    for r in runs:
        if r.complete():
            r.finish()
    return all(r.state == "done" for r in runs)


@contextmanager
def executor_for(sources: Sequence[PipelineSource], pool=None):
    """(executor, pipelines, weights note): this process's pipelines (pool None: what the
    commands always did), or a Ray pool's workers (evaluation.distributed.PoolConfig) and
    views of their pipelines."""
    if pool is None:
        pipes, note = open_sources(sources)
        yield LocalExecutor(pipes), pipes, note
        return
    from .distributed import pool_session
    with pool_session(pool, sources) as p:
        yield p, [PipelineView(info) for info in p.infos], p.note


@dataclass
class SampleResult:
    complete: bool
    job: Job
    source: str                                 # the weights note
    workers: list = field(default_factory=list)  # evaluation.distributed.WorkerStats (pooled runs)


def sample(source: PipelineSource, request: JobRequest, out: str, resume: bool = False,
           png_dir: Optional[str] = None, max_batches: Optional[int] = None, pool=None,
           progress: Optional[Callable[[int, int], None]] = None) -> SampleResult:
    """What sample.py does: the paths checked before any model loads, the pipeline opened here
    or on every worker of `pool`, then `sample_runs`."""
    request.check()
    check_output(out, None, resume)
    check_png_dir(png_dir)
    with executor_for([source], pool) as (ex, (pipe,), note):
        job = request.job(pipe)
        complete = _sample_one(ex, pipe, job, note, out, resume, png_dir, max_batches, progress)
        return SampleResult(complete, job, note, list(getattr(ex, "stats", [])))


def _sample_one(ex, pipe, job: Job, source: str, out: str, resume: bool, png_dir: Optional[str],
                max_batches: Optional[int], progress) -> bool:
    """One job into `out` on executor `ex`: True when `out` is complete."""
    check_job(pipe, job)
    run = PartialRun(out, job, job.settings(pipe, source), png_dir)
    try:
        run.open(resume)
        if run.state == "done":
            log.info("%s is complete already", out)
            return True
        return sample_runs(ex, [run], max_batches, progress)
    finally:
        run.close()
