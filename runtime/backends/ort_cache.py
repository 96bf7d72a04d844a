"""The ONNX Runtime session cache (opt-in: `--session-cache`): the step graph as ONNX Runtime
optimised it, with its pre-packed weights, kept in the user's cache so a later start loads it
instead of optimising and pre-packing again (DESIGN.md, "Start-up: the session cache").

    <cache>/ort/<dev>-<ino>/   one entry per artifacts directory (the manifest's device and inode)
        step.onnx  step.data   what ONNX Runtime wrote (the weights as given and pre-packed)
        entry.json             the key it was made for, both files' identity when written, and
                               the artifacts directory (an entry whose manifest is gone is removed)
    <cache>/ort/<dev>-<ino>.lock   held by the one process writing that entry

The key covers what the saved session depends on: the step graph's and the weights' sha256
(from the verified manifest), the onnxruntime version, the CPU (model and feature flags: the
saved graph may hold CPU-specific layouts) and whether it pre-packs. An entry is used only if
its key matches and both files still have the identity (device, inode, size, mtime_ns,
ctime_ns) they had when written, the verified stamp's rule; anything else is a miss, and a miss
with the cache on writes a new entry (a first start then builds the session once while saving
it). Any problem with the cache (unwritable, too little space, another process writing it) is
logged and the session is built as without it. Links are never followed: a cache root or ort/
that is a symbolic link is refused (one line; the cache is off), the lock and entry files are
opened with O_NOFOLLOW, and entries and leftovers are lstat'ed before they are read or removed.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import platform
import shutil
import stat
import tempfile
from typing import Any, Optional

from var_ssg.common.files import open_regular
from var_ssg.contract import stamp
from var_ssg.contract.manifest import Manifest

log = logging.getLogger(__name__)

FORMAT = 1
GRAPH, DATA, ENTRY = "step.onnx", "step.data", "entry.json"
SPACE_FACTOR = 2.2          # the data file holds the weights twice (as given and pre-packed)


def _cpu() -> str:
    """The CPU's model and feature flags (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read(1 << 20).splitlines()
        keep = [ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")]
        return "\n".join(dict.fromkeys(keep))
    except OSError:
        return platform.processor()


def session_key(man: Manifest, ort_version: str, options: Any) -> str:
    """What a saved session depends on (`options`: the session options that shape the saved
    graph; the thread count does not, it is set at load)."""
    files = man.data["files"]
    parts = dict(format=FORMAT, ort=ort_version, machine=platform.machine(), cpu=_cpu(), options=repr(options),
                 graph=files[man.graph("step")["file"]]["sha256"],
                 weights=files[man.data["external_data"]["file"]]["sha256"])
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _no_link(path: str) -> None:
    """Refuse `path` if it is a symbolic link (the cache would write and delete where it points)."""
    if os.path.islink(path):
        raise OSError(errno.ELOOP, f"{path!r} is a symbolic link (to {os.readlink(path)!r:.200}); the session cache "
                                   f"uses only a real folder there: replace the link with a folder or set VAR_SSG_CACHE")


def _open_nofollow(path: str, flags: int, mode: int = 0o600) -> int:
    """os.open without following a link at `path`; only a regular file is kept open."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"{path!r} is not a regular file")
    return fd


class SessionCache:
    def __init__(self, man: Manifest, ort, prepack: bool, threads: int):
        self.ort, self.man, self.threads = ort, man, threads
        self.key = session_key(man, ort.__version__, dict(prepack=prepack))
        self.root = os.path.join(stamp.cache_root(), "ort")
        self._check_links()
        st = os.lstat(os.path.join(man.root, "manifest.json"))
        self.manifest_id = [st.st_dev, st.st_ino]
        self.dir = os.path.join(self.root, f"{st.st_dev}-{st.st_ino}")

    def _check_links(self) -> None:
        _no_link(os.path.dirname(self.root))
        _no_link(self.root)

    def load(self, providers) -> Optional[Any]:
        """The cached step session, or None (a miss)."""
        try:
            self._check_links()
            if not stat.S_ISDIR(os.lstat(self.dir).st_mode):
                return None
            entry = _read_entry(self.dir)
            if entry is None or entry.get("key") != self.key:
                return None
            for name in (GRAPH, DATA):
                if list(stamp.file_key(os.lstat(os.path.join(self.dir, name)))) != entry["files"][name]:
                    log.info("ONNX Runtime session cache: %s changed since it was written; rebuilding", name)
                    return None
            so = self.ort.SessionOptions()
            so.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_DISABLE_ALL   # saved optimised
            if self.threads:
                so.intra_op_num_threads = self.threads
            sess = self.ort.InferenceSession(os.path.join(self.dir, GRAPH), sess_options=so, providers=providers)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        except Exception as e:  # noqa: BLE001 - ONNX Runtime's own errors: a miss, rebuilt below
            log.warning("ONNX Runtime session cache in %s not usable (%s); rebuilding", self.dir, _last_line(e))
            return None
        want = self.man.graph("step")
        if [i.name for i in sess.get_inputs()] != [i["name"] for i in want["inputs"]] or \
                [o.name for o in sess.get_outputs()] != [o["name"] for o in want["outputs"]]:
            log.warning("ONNX Runtime session cache in %s has other inputs or outputs; rebuilding", self.dir)
            return None
        return sess

    def save(self, so, path: str, providers) -> Any:
        """Build the step session from `path` with options `so`; if this process can, have ONNX
        Runtime write the optimised graph and pre-packed weights into a new entry (replacing
        the old one). Whatever goes wrong with the cache, the session is still built."""
        lock = tmp = None
        try:
            os.makedirs(self.root, mode=0o700, exist_ok=True)
            self._check_links()
            try:
                lock = os.fdopen(_open_nofollow(self.dir + ".lock", os.O_WRONLY | os.O_CREAT | os.O_APPEND), "a")
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.EINVAL, errno.ENXIO, errno.EISDIR):
                    raise OSError(e.errno, f"{self.dir}.lock is not a regular file (a link?); remove it") from None
                raise
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # one writer per entry (replicas)
            except BlockingIOError:
                raise OSError("another process is writing it") from None
            self._sweep()
            _remove(self.dir, self.root)                          # a stale entry: its space counts
            need = SPACE_FACTOR * os.path.getsize(self.man.path(self.man.data["external_data"]["file"]))
            free = shutil.disk_usage(self.root).free
            if free < need:
                raise OSError(f"{self.root} has {free / 2**20:.0f} MiB free, an entry needs {need / 2**20:.0f} MiB")
            tmp = tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-", dir=self.root)
        except OSError as e:            # unwritable, too little space, or another process writes it
            log.warning("ONNX Runtime session cache not written (%s)", e)
            if lock is not None:
                lock.close()
            return self.ort.InferenceSession(path, sess_options=so, providers=providers)
        try:
            so.log_severity_level = 3            # ONNX Runtime's notes on saving are not the user's concern
            so.optimized_model_filepath = os.path.join(tmp, GRAPH)
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name", DATA)
            so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
            so.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
            try:
                sess = self.ort.InferenceSession(path, sess_options=so, providers=providers)
            except Exception as e:  # noqa: BLE001 - writing failed (or the graph itself does: raised below)
                log.warning("ONNX Runtime session cache not written (%s)", _last_line(e))
                so.optimized_model_filepath = ""                  # build as without the cache
                return self.ort.InferenceSession(path, sess_options=so, providers=providers)
            try:
                entry = dict(format=FORMAT, key=self.key, artifacts=os.path.abspath(self.man.root),
                             manifest=self.manifest_id,
                             files={n: list(stamp.file_key(os.lstat(os.path.join(tmp, n)))) for n in (GRAPH, DATA)})
                with os.fdopen(_open_nofollow(os.path.join(tmp, ENTRY), os.O_WRONLY | os.O_CREAT | os.O_EXCL),
                               "w") as f:
                    json.dump(entry, f)
                os.rename(tmp, self.dir)
            except OSError as e:
                log.warning("ONNX Runtime session cache not written (%s)", e)
            return sess
        finally:
            shutil.rmtree(tmp, ignore_errors=True)       # gone after the rename; removed after a failure
            lock.close()

    def _sweep(self) -> None:
        """Remove what would otherwise stay forever: what a killed writer left (`.tmp-PID-*`,
        `.old-PID-*` of a process that is gone) and entries whose artifacts' manifest is gone
        or was replaced (a re-export)."""
        for name in os.listdir(self.root):
            full = os.path.join(self.root, name)
            parts = name.split("-")
            try:
                is_dir = stat.S_ISDIR(os.lstat(full).st_mode)    # a link is never followed, never removed
            except OSError:
                continue
            if not is_dir:
                continue
            if name.startswith(".") and len(parts) >= 3 and parts[0] in (".tmp", ".old") and parts[1].isdigit():
                if not _alive(int(parts[1])):
                    shutil.rmtree(full, ignore_errors=True)
                continue
            if name.startswith(".") or full == self.dir:
                continue
            entry = _read_entry(full)
            if entry is None:
                continue
            try:
                st = os.lstat(os.path.join(str(entry.get("artifacts")), "manifest.json"))
                live = [st.st_dev, st.st_ino] == entry.get("manifest")
            except (OSError, ValueError):
                live = False
            if not live:
                _remove(full, self.root)
                try:
                    os.unlink(full + ".lock")
                except OSError:
                    pass


def _read_entry(folder: str) -> Optional[dict]:
    try:
        with open_regular(os.path.join(folder, ENTRY), follow_symlinks=False) as f:
            entry = json.loads(f.read(1 << 16).decode("utf-8"))
    except (OSError, ValueError):
        return None
    return entry if isinstance(entry, dict) and entry.get("format") == FORMAT else None


def _remove(folder: str, root: str) -> None:
    """Remove an entry folder: renamed out of the way first, so no reader finds half of it."""
    if not os.path.lexists(folder):
        return
    if os.path.islink(folder) or not os.path.isdir(folder):
        os.unlink(folder)
        return
    old = tempfile.mkdtemp(prefix=f".old-{os.getpid()}-", dir=root)
    try:
        os.rename(folder, os.path.join(old, "entry"))
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:                 # another user's process
        return True
    return True


def _last_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(e).__name__)[:400]
