"""The ONNX Runtime session cache (opt-in: `--session-cache`): the step graph as ONNX Runtime
optimised it, with its pre-packed weights, kept in the user's cache so a later start loads it
instead of optimising and pre-packing again (DESIGN.md, "Start-up: the session cache").

    <cache>/ort/<dev>-<ino>/   one entry per artifacts directory (the manifest's device and inode)
        step.onnx  step.data   what ONNX Runtime wrote (the weights as given and pre-packed)
        entry.json             the key it was made for and both files' identity when written

The key covers what the saved session depends on: the step graph's and the weights' sha256
(from the verified manifest), the onnxruntime version, the CPU (model and feature flags: the
saved graph may hold CPU-specific layouts) and the session options. An entry is used only if
its key matches and both files still have the identity (device, inode, size, mtime_ns,
ctime_ns) they had when written, the verified stamp's rule; anything else is a miss, and a miss
with the cache on writes a new entry (a first start then builds the session once while saving
it). Any problem with the cache is logged and the session is built as without it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
from typing import Any, Optional

from common.files import open_regular
from contract import stamp
from contract.manifest import Manifest

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
    files = man.data["files"]
    parts = dict(format=FORMAT, ort=ort_version, machine=platform.machine(), cpu=_cpu(), options=repr(options),
                 graph=files[man.graph("step")["file"]]["sha256"],
                 weights=files[man.data["external_data"]["file"]]["sha256"])
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class SessionCache:
    def __init__(self, man: Manifest, ort, options: Any):
        self.ort, self.man = ort, man
        self.key = session_key(man, ort.__version__, options)
        self.root = os.path.join(stamp.cache_root(), "ort")
        st = os.lstat(os.path.join(man.root, "manifest.json"))
        self.dir = os.path.join(self.root, f"{st.st_dev}-{st.st_ino}")

    def load(self, providers) -> Optional[Any]:
        """The cached step session, or None (a miss)."""
        try:
            with open_regular(os.path.join(self.dir, ENTRY), follow_symlinks=False) as f:
                entry = json.loads(f.read(1 << 16).decode("utf-8"))
            if not isinstance(entry, dict) or entry.get("format") != FORMAT or entry.get("key") != self.key:
                return None
            for name in (GRAPH, DATA):
                if list(stamp.file_key(os.lstat(os.path.join(self.dir, name)))) != entry["files"][name]:
                    log.info("ONNX Runtime session cache: %s changed since it was written; rebuilding", name)
                    return None
            so = self.ort.SessionOptions()
            so.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_DISABLE_ALL   # saved optimised
            sess = self.ort.InferenceSession(os.path.join(self.dir, GRAPH), sess_options=so, providers=providers)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        except Exception as e:  # noqa: BLE001 - ONNX Runtime's own errors: a miss, rebuilt below
            log.warning("ONNX Runtime session cache in %s not usable (%s); rebuilding", self.dir, str(e)[:200])
            return None
        want = self.man.graph("step")
        if [i.name for i in sess.get_inputs()] != [i["name"] for i in want["inputs"]] or \
                [o.name for o in sess.get_outputs()] != [o["name"] for o in want["outputs"]]:
            log.warning("ONNX Runtime session cache in %s has other inputs or outputs; rebuilding", self.dir)
            return None
        return sess

    def save(self, so, path: str, providers) -> Any:
        """Build the step session from `path` with options `so`, having ONNX Runtime write the
        optimised graph and pre-packed weights to a new entry (replacing the old one)."""
        need = SPACE_FACTOR * os.path.getsize(self.man.path(self.man.data["external_data"]["file"]))
        try:
            os.makedirs(self.root, mode=0o700, exist_ok=True)
            free = shutil.disk_usage(self.root).free
        except OSError as e:
            log.warning("ONNX Runtime session cache not written (%s)", e)
            return self.ort.InferenceSession(path, sess_options=so, providers=providers)
        if free < need:
            log.warning("ONNX Runtime session cache not written: %s has %.1f GB free, it needs %.1f GB",
                        self.root, free / 1e9, need / 1e9)
            return self.ort.InferenceSession(path, sess_options=so, providers=providers)
        self._sweep()
        tmp = tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-", dir=self.root)
        try:
            so.optimized_model_filepath = os.path.join(tmp, GRAPH)
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name", DATA)
            so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
            so.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
            try:
                sess = self.ort.InferenceSession(path, sess_options=so, providers=providers)
            except Exception as e:  # noqa: BLE001 - writing failed (or the graph itself does: raised below)
                log.warning("ONNX Runtime session cache not written (%s)", str(e).splitlines()[0][:200] if str(e) else e)
                so.optimized_model_filepath = ""                  # build as without the cache
                return self.ort.InferenceSession(path, sess_options=so, providers=providers)
            entry = dict(format=FORMAT, key=self.key,
                         files={n: list(stamp.file_key(os.lstat(os.path.join(tmp, n)))) for n in (GRAPH, DATA)})
            with open(os.path.join(tmp, ENTRY), "w") as f:
                json.dump(entry, f)
            self._publish(tmp)
            return sess
        finally:
            shutil.rmtree(tmp, ignore_errors=True)       # gone after a publish; removed after a failure

    def _sweep(self) -> None:
        """Remove what a killed writer left (`.tmp-PID-*`, `.old-PID-*` of a process that is gone)."""
        try:
            names = os.listdir(self.root)
        except OSError:
            return
        for name in names:
            parts = name.split("-")
            if len(parts) < 3 or parts[0] not in (".tmp", ".old") or not parts[1].isdigit():
                continue
            try:
                os.kill(int(parts[1]), 0)
                continue                       # its writer still runs
            except ProcessLookupError:
                pass
            except OSError:                    # another user's process: alive
                continue
            shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)

    def _publish(self, tmp: str) -> None:
        """Put the new entry in place of the old one (another process may be doing the same:
        whichever lands first stays)."""
        if os.path.lexists(self.dir):
            old = tempfile.mkdtemp(prefix=f".old-{os.getpid()}-", dir=self.root)
            try:
                os.rename(self.dir, os.path.join(old, "entry"))
            except OSError:
                pass
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, self.dir)
        except OSError as e:
            log.info("ONNX Runtime session cache: %s was written by another process (%s)", self.dir, e)
