"""Turn VAR + VQVAE into ONNX artifacts: the step graph for every scale, the decoder, one
external-data file and manifest.json (contract.manifest).

    .OUT.tmp-XXXXXXXX/                 (written first, renamed to --out at the very end, under
                                       an exclusive lock .OUT.lock; a killed export's leftovers
                                       are removed by the next export of the same --out)
      step_all.onnx                    graphs.components.StepComponent: every scale, dynamic
                                       token axes; per-scale constants in scale_consts.npz
      decoder.onnx                     graphs.components.DecoderComponent: f_hat -> image
      weights.bin                      every initializer once (content-deduplicated)
      manifest.json                    the runtime's contract
      [step_all.plan decoder.plan timing.cache]     with --target trt
"""
from __future__ import annotations

import copy
import datetime
import fcntl
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import stat
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Optional

import numpy as np
import torch

from contract import stamp
from contract.manifest import (MANIFEST, MAX_BATCH, FORMAT, FORMAT_VERSION, PRECISION_DTYPES, artifacts_dir_problem, config_to_json,
                               dtype_name, load_manifest, write_manifest)
from graphs.components import DecoderComponent, StepComponent
from graphs.config import DEFAULT_TOP_K, DSE_TRANSFORMS, TRT_TOPK_LIMIT, ConfigError, VARConfig, topk_bake
from graphs.step import StepSpec
from graphs.var import VAR
from graphs.vqvae import VQVAE
from graphs.weights import WeightSource

from .lint import MAX_OPSET, lint_files
from .store import SharedWeights

log = logging.getLogger(__name__)


class ExportError(ConfigError):
    pass


@dataclass(frozen=True)
class ExportConfig:
    precision: str = "fp32"
    batch: int = 1
    transform: str = "dct"
    top_k: int = DEFAULT_TOP_K                  # baked TopK K (runtime top_k <= this); 0 = no top-k
    opset: int = 18
    target: str = "onnx"              # "onnx" | "trt"
    trt_hardware_compatible: bool = False   # engines run on Ampere and newer, not only this GPU
    trt_version_compatible: bool = False    # engines run on later TensorRT (same major, or 10 -> 11)
    trt_tf32: bool = False                  # let TensorRT run fp32 MatMuls in TF32 (opt-in; off keeps fp32)

    def __post_init__(self):
        if self.precision not in PRECISION_DTYPES:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISION_DTYPES)}, got {self.precision!r}")
        if not 1 <= self.batch <= MAX_BATCH:
            raise ConfigError(f"--batch must be in 1..{MAX_BATCH}, got {self.batch}")
        if self.transform not in DSE_TRANSFORMS:
            raise ConfigError(f"--dse must be dct or dft, got {self.transform!r}")
        if not 17 <= self.opset <= MAX_OPSET:
            raise ConfigError(f"--opset must be in 17..{MAX_OPSET} (LayerNormalization needs 17; TensorRT 10 parses <= {MAX_OPSET})")
        if self.target not in ("onnx", "trt"):
            raise ConfigError(f"--target must be onnx or trt, got {self.target!r}")
        if self.top_k < 0:
            raise ConfigError(f"--top-k must be >= 0 (0 = no top-k), got {self.top_k}")
        if self.top_k > TRT_TOPK_LIMIT:
            raise ConfigError(f"--top-k {self.top_k} exceeds TensorRT's TopK limit {TRT_TOPK_LIMIT}; use <= {TRT_TOPK_LIMIT} or 0 (no top-k)")


def cache_key(cfg: VARConfig, ec: ExportConfig, weights_id: str) -> str:
    """The graphs' key. The TensorRT options (target, trt_*) are left out: they, the TensorRT
    version and the GPU make the engines' key (contract.tensorrt.engine_cache_key)."""
    graph_opts = {k: v for k, v in asdict(ec).items() if k != "target" and not k.startswith("trt_")}
    blob = json.dumps(dict(config=config_to_json(cfg), export=graph_opts, weights=weights_id,
                           format=FORMAT_VERSION, torch=torch.__version__), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _trt_options(ec: ExportConfig) -> Dict:
    return dict(tf32=ec.trt_tf32, hardware_compat=ec.trt_hardware_compatible, version_compat=ec.trt_version_compatible)


def weights_id(src: WeightSource) -> str:
    if src.random:
        return f"random:{src.seed}"
    return f"ckpt:{src.ckpt_sha256}:{src.vae_sha256}"


def _export_one(module: torch.nn.Module, feeds: Dict[str, torch.Tensor], in_names, out_names, opset: int,
                dynamic_shapes=None):
    """The dynamo export, then torch's ONNX optimisation without its one costly rule that never
    fires here, then the input/output names, in torch's order (export.optimize; DESIGN.md,
    "Export cost"): the same graph in half the time."""
    from .optimize import name_io, optimize
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(module, (), kwargs=feeds, dynamo=True, opset_version=opset, optimize=False,
                                 verbose=False, dynamic_shapes=dynamic_shapes)
    return name_io(optimize(prog.model), in_names, out_names)


def _versions() -> Dict[str, str]:
    import onnx
    import onnxscript
    out = dict(python=platform.python_version(), torch=torch.__version__, onnx=onnx.__version__,
               onnxscript=onnxscript.__version__)
    try:
        import onnxruntime
        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return out


class OutBusy(ExportError):
    """Another export holds the lock on this --out."""


class OutTaken(ExportError):
    """--out holds other artifacts; replacing them needs --force."""


@dataclass(frozen=True)
class ExportResult:
    manifest: Dict
    reused: bool            # --out already held these artifacts (same cache key, verified): nothing exported


def _split(out: str):
    if not str(out).strip():
        raise ExportError("--out is empty")
    out = os.path.abspath(out)
    parent, name = os.path.split(out)
    if not name:
        raise ExportError(f"--out {out} is the file-system root: name a directory below it")
    return out, parent, name


def check_out(out: str) -> None:
    """Refuse an --out that export may not replace, before any work: --force replaces only an
    artifacts directory holding nothing but its listed files, or an empty one; never user files."""
    out, parent, name = _split(out)
    if os.path.islink(out):
        raise ExportError(f"--out {out} is a symbolic link; give the directory it points to, or another --out")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ExportError(f"--out {out} exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out):
        why = artifacts_dir_problem(out)
        if why:
            raise ExportError(f"--out {out} {why}; refusing to replace it (even with --force): choose another --out")
    p = parent
    while not os.path.exists(p):        # the nearest existing ancestor must take new entries
        p = os.path.dirname(p)
    if not os.path.isdir(p) or not os.access(p, os.W_OK | os.X_OK):
        raise ExportError(f"cannot create {out}: {p} is not a writable directory (choose another --out)")
    room = os.pathconf(p, "PC_NAME_MAX") - len(".tmp-XXXXXXXX.")       # the temporary directory's name
    if len(os.fsencode(name)) > room:
        raise ExportError(f"--out name {name[:40]}... is too long ({len(os.fsencode(name))} bytes; at most {room} here)")


def _lock(parent: str, name: str):
    """Exclusive, non-blocking lock on --out (a lock file beside it); the file is removed on release."""
    path = os.path.join(parent, f".{name}.lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutBusy(f"another export is writing {os.path.join(parent, name)} (lock {path}); wait for it to "
                          f"finish or choose another --out") from None
        try:        # the previous holder may have removed the file after we opened it: lock the one there now
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd, path
        except FileNotFoundError:
            pass
        os.close(fd)


def _unlock(lock) -> None:
    fd, path = lock
    try:
        os.unlink(path)         # while still held, so no one else locks the removed file
    except OSError:
        pass
    os.close(fd)


_STALE = re.compile(r"\.(?P<name>.+)\.(tmp|old)-[a-z0-9_]{8}")


def _remove_stale(parent: str, name: str) -> None:
    """Temporary directories of an export of the same --out that was killed (kill -9, power loss)
    are never cleaned by their own process; under the lock, no live export owns them."""
    stale = [e.path for e in os.scandir(parent) if e.is_dir(follow_symlinks=False)
             and (m := _STALE.fullmatch(e.name)) and m.group("name") == name]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    if stale:
        log.warning("removed %d temporary director%s left by an interrupted export of %s: %s", len(stale),
                    "y" if len(stale) == 1 else "ies", os.path.join(parent, name),
                    ", ".join(os.path.basename(p) for p in stale))


def _make_parents(parent: str) -> list:
    """Create `parent` and its missing ancestors; returns those created, outermost first (a
    failed export removes them again)."""
    missing, p = [], parent
    while not os.path.isdir(p):
        missing.insert(0, p)
        p = os.path.dirname(p)
    created = []
    try:
        for p in missing:
            os.mkdir(p)
            created.append(p)
    except OSError:
        _remove_dirs(created)
        raise
    return created


def _remove_dirs(created: list) -> None:
    for p in reversed(created):         # innermost first; only while empty
        try:
            os.rmdir(p)
        except OSError:
            return


def _existing(out: str, key: str, force: bool) -> Optional[Dict]:
    """The manifest of up-to-date artifacts in `out` (reuse them), else None (export). `out` has
    passed check_out: empty, or an artifacts directory holding only its files. Raises OutTaken
    when it holds other artifacts and `force` is not given."""
    if not (os.path.isdir(out) and os.listdir(out)):
        return None
    try:
        man, damage = load_manifest(out), None      # hashed: "up to date" never covers corrupted files
    except ConfigError as e:
        man, damage = None, str(e).split("; re-export")[0]
    if man is not None and man.data.get("cache_key") == key:
        return None if force else man.data
    if force:
        return None
    if man is None and _manifest_key(out) == key:   # these very artifacts, damaged: build them again
        log.warning("%s: exporting these artifacts again", damage)
        return None
    raise OutTaken(f"--out {out} holds other artifacts; pass --force to replace them, or choose another --out")


def _manifest_key(out: str) -> Optional[str]:
    try:
        with open(os.path.join(out, "manifest.json")) as f:
            return json.load(f).get("cache_key")
    except (OSError, ValueError, AttributeError):
        return None


def _new_mode(out: str) -> int:
    """The replaced directory keeps its mode (a user's 0700 stays 0700); a new one gets the
    umask's default, like mkdir (mkdtemp would leave 0700)."""
    if os.path.isdir(out):
        return stat.S_IMODE(os.stat(out).st_mode)
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def _swap(tmp: str, out: str, parent: str, name: str) -> None:
    """Put `tmp` at `out`; old artifacts go to a trash directory first and come back on failure."""
    if not (os.path.isdir(out) and os.listdir(out)):
        os.replace(tmp, out)                # nothing there, or an empty directory: one rename
        return
    trash = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
    os.replace(out, os.path.join(trash, "old"))
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(os.path.join(trash, "old"), out)
        raise
    shutil.rmtree(trash, ignore_errors=True)


def export_artifacts(var: VAR, vae: VQVAE, src: WeightSource, out: str, ec: ExportConfig,
                     force: bool = False, progress: Optional[Callable[[str], None]] = None) -> ExportResult:
    """Export everything into `out` atomically (a temporary directory beside it, renamed at the
    end), under an exclusive lock on `out`. Reuses up-to-date artifacts unless `force`."""
    key = cache_key(var.cfg, ec, weights_id(src))
    machine = None
    if ec.target == "trt":            # fail before a long export, not after it; engines are for this machine
        from .trt_build import this_machine
        machine = this_machine()
    out, parent, name = _split(out)
    check_out(out)
    created = []
    try:
        created = _make_parents(parent)
        lock = _lock(parent, name)
    except (OSError, OutBusy) as e:
        _remove_dirs(created)
        if isinstance(e, OutBusy):
            raise
        raise ExportError(f"cannot create {out}: {e.strerror} ({e.filename})") from None
    tmp, ok = None, False
    try:
        _remove_stale(parent, name)
        data = _existing(out, key, force)
        if data is not None:
            why = None
            if machine is not None:
                from .trt_build import engines_stale
                why = engines_stale(data, machine, **_trt_options(ec))
            ok = True
            if why is None:
                log.info("%s is up to date (cache key %s); nothing to do", out, key[:12])
                return ExportResult(data, reused=True)
            log.info("%s: %s; building new engines (the ONNX graphs are reused)", out, why)
            return ExportResult(_rebuild_engines(out, ec), reused=False)
        tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
        old_cache = os.path.join(out, "timing.cache")
        if ec.target == "trt" and os.path.isfile(old_cache):     # reuse the TensorRT timing cache
            shutil.copyfile(old_cache, os.path.join(tmp, "timing.cache"))
        man = _export_into(var, vae, src, tmp, ec, key, progress)
        os.chmod(tmp, _new_mode(out))
        check_out(out)                      # again: --out may have changed during a long export
        _swap(tmp, out, parent, name)
        ok = True
        return ExportResult(man, reused=False)
    except OSError as e:
        raise ExportError(f"export failed while writing ({e.strerror or e}: {e.filename or ''}); "
                          f"nothing was written to {out}") from None
    finally:
        if tmp and os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        _unlock(lock)
        if not ok:
            _remove_dirs(created)


def _rebuild_engines(out: str, ec: ExportConfig) -> Dict:
    """New engines (and timing cache) for up-to-date graphs: built next to `out`, moved in,
    then the manifest is rewritten. A failed build leaves `out` as it was."""
    from .trt_build import TIMING_CACHE, build_engines
    data = load_manifest(out).data              # hashes checked: the engines are built from these graphs
    parent = os.path.dirname(os.path.abspath(out)) or "."
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.engines-", dir=parent)
    try:
        if os.path.isfile(os.path.join(out, TIMING_CACHE)):
            shutil.copyfile(os.path.join(out, TIMING_CACHE), os.path.join(tmp, TIMING_CACHE))
        data["engines"], data["tensorrt"] = build_engines(out, data, out_dir=tmp, **_trt_options(ec))
        data["export"] = asdict(ec)
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(out, name))
        write_manifest(out, data)
        return data
    except OSError as e:
        raise ExportError(f"rebuilding the engines failed while writing ({e.strerror or e}: {e.filename or ''})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class StageClock:
    """Names each export stage as it starts (`progress(name)`) and times it: `seconds` is
    {stage: wall seconds}, in order (the manifest's export record keeps it)."""

    def __init__(self, progress: Optional[Callable[[str], None]] = None):
        self.seconds: Dict[str, float] = {}
        self._progress, self._name, self._t0 = progress, None, 0.0

    def start(self, name: str) -> None:
        self.stop()
        self._name, self._t0 = name, time.perf_counter()
        if self._progress:
            self._progress(name)

    def stop(self) -> None:
        if self._name is not None:
            dt = time.perf_counter() - self._t0
            self.seconds[self._name] = round(self.seconds.get(self._name, 0.0) + dt, 2)
            self._name = None


def _export_into(var, vae, src, tmp, ec: ExportConfig, key, progress) -> Dict:
    import onnx
    cfg: VARConfig = var.cfg
    dtype = PRECISION_DTYPES[ec.precision]
    k_max = topk_bake(ec.top_k, cfg.V)
    step = StepComponent(cfg, ec.batch, StepSpec(transform=ec.transform, k_max=k_max, dtype=dtype))
    dec = DecoderComponent(cfg, ec.batch)
    var_x = var if dtype == torch.float32 else copy.deepcopy(var).to(dtype)
    clock = StageClock(progress)
    store = SharedWeights(tmp)
    graphs = {}
    try:
        clock.start("step_export")
        model = _export_one(step.module(var_x, vae).eval(), step.example_feeds(step.example_scale()),
                            step.inputs, step.outputs, ec.opset, dynamic_shapes=step.dynamic_shapes())
        clock.start("step_write")
        graphs["step"] = dict(_save(model, store, tmp, step.file, step.name), consts=step.consts_file,
                              dynamic_inputs=step.dynamic_inputs,
                              profiles=[step.profile(k) for k in range(cfg.num_scales)],
                              output_shapes=[step.output_shapes(k) for k in range(cfg.num_scales)])
        del model
        consts = {f"k{k}/{n}": v for k in range(cfg.num_scales) for n, v in step.scale_consts(k).items()}
        with open(os.path.join(tmp, step.consts_file), "wb") as f:
            np.savez(f, **consts)
        clock.start("decoder")
        model = _export_one(dec.module(var_x, vae).eval(), dec.example_feeds(), dec.inputs, dec.outputs, ec.opset)
        graphs["decoder"] = dict(_save(model, store, tmp, dec.file, dec.name), precision="fp32")
        del model
        clock.start("flush")
    finally:
        store.close()
    param_bytes = sum(p.numel() * p.element_size() for p in var_x.parameters()) + \
        sum(p.numel() * p.element_size() for n, p in vae.named_parameters() if not n.startswith("encoder."))
    clock.start("check")
    for g in graphs.values():
        onnx.checker.check_model(os.path.join(tmp, g["file"]), full_check=True)
    issues = lint_files([os.path.join(tmp, step.file)], max_opset=MAX_OPSET, dynamic=set(step.dynamic_inputs))
    issues += lint_files([os.path.join(tmp, dec.file)], max_opset=MAX_OPSET)
    if issues:
        raise ExportError("TensorRT-compatibility lint failed:\n  " + "\n  ".join(map(str, issues)))
    data = dict(
        format=FORMAT, format_version=FORMAT_VERSION, preset=cfg.name, config=config_to_json(cfg),
        batch=ec.batch, precision=ec.precision, opset=ec.opset,
        dse=dict(transform=ec.transform), sampler=dict(k_max=k_max, top_k_requested=ec.top_k),
        ssg=dict(beta="graph input per scale (scales 1..K-1)", prior="DSE of the previous scale's CFG logits"),
        weights=src.to_json(),
        kv=dict(layout="(L, depth, 2, 2B, heads, head_dim)", dtype=str(dtype).replace("torch.", "")),
        external_data=dict(file=store.filename, bytes=store.bytes_written, referenced_bytes=store.bytes_referenced,
                           parameter_bytes=param_bytes),
        graphs=graphs, tools=_versions(), cache_key=key,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        export=asdict(ec),
    )
    if ec.target == "trt":
        from .trt_build import build_engines
        clock.start("engines")
        data["engines"], data["tensorrt"] = build_engines(tmp, data, **_trt_options(ec))
    clock.stop()
    data["export"]["stage_seconds"] = dict(clock.seconds)     # the one field this adds to the record
    clock.start("manifest")
    written = write_manifest(tmp, data, hashed={store.filename: store.sha256})
    # the verified stamp (contract.stamp): these files were hashed as they were written, in a
    # directory no one else writes (under the lock); renaming the directory keeps their identity
    stamp.record(tmp, MANIFEST, [(n, stamp.file_key(os.lstat(os.path.join(tmp, n))), m["sha256"])
                                 for n, m in written["files"].items()])
    clock.stop()
    return data


def _save(model, store: SharedWeights, tmp: str, file: str, name: str) -> Dict:
    import onnx_ir as ir
    model.graph.name = name          # node names already follow the module path (dynamo)
    store.externalize(model)
    ir.save(model, os.path.join(tmp, file))
    return dict(file=file, inputs=_io(model.graph.inputs), outputs=_io(model.graph.outputs))


def _io(values):
    return [dict(name=v.name, shape=[d if isinstance(d, int) else str(d) for d in v.shape], dtype=dtype_name(v.dtype))
            for v in values]
