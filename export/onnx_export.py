"""Turn VAR + VQVAE into ONNX artifacts: the step graph for every scale, the decoder, one
external-data file and manifest.json (contract.manifest). The directory is published by
export.publish (lock, temporary directory, swap, the --force rules).

    .OUT.tmp-XXXXXXXX/out/             (written first, swapped in at --out at the very end)
      step_all.onnx                    graphs.components.StepComponent: every scale, dynamic
                                       token axes; per-scale constants in scale_consts.npz
      decoder.onnx                     graphs.components.DecoderComponent: f_hat -> image
      weights.bin                      every initializer once (content-deduplicated)
      manifest.json                    the runtime's contract
      [step_all.plan decoder.plan timing.cache]     with --target trt
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Optional

import numpy as np
import torch

from var_ssg.contract import stamp
from var_ssg.contract.dtypes import PRECISION_DTYPES, dtype_name, torch_dtype
from var_ssg.contract.manifest import (MANIFEST, MAX_BATCH, MAX_OPSET, MIN_OPSET, FORMAT_VERSION, build_manifest, check_manifest,
                               config_to_json, load_manifest, write_manifest)
from var_ssg.graphs.components import DecoderComponent, StepComponent
from var_ssg.graphs.config import DEFAULT_TOP_K, DSE_TRANSFORMS, TRT_TOPK_LIMIT, VARConfig, topk_bake
from var_ssg.common.errors import ConfigError
from var_ssg.graphs.step import StepSpec
from var_ssg.graphs.var import VAR
from var_ssg.graphs.vqvae import VQVAE
from var_ssg.graphs.weights import WeightSource

from .decoder_job import DecoderJob, DecoderSpec
from .dynamo import export_one
from .lint import lint_files
from .quantize import DECODER_RECIPE, QUANTIZED_GRAPHS, SCHEMES, CalibrationConfig
from .quantize_fp8 import MIN_OPSET as FP8_MIN_OPSET
from .publish import ExportError, OutBusy, OutTaken, Transaction, check_out, split_out  # noqa: F401 (public here too)
from .store import SharedWeights

log = logging.getLogger(__name__)
# precisions whose step graph is quantized (QDQ) and calibrated: int8 (export.quantize), fp8
# (export.quantize_fp8: TensorRT only)
QUANTIZED = (*SCHEMES, "fp8")
DEFAULT_OPSET = 18


def default_opset(precision: str) -> int:
    """The opset a precision exports at unless --opset says otherwise: 18, fp8 19 (QuantizeLinear
    takes float8 from opset 19)."""
    return FP8_MIN_OPSET if precision == "fp8" else DEFAULT_OPSET


@dataclass(frozen=True)
class ExportConfig:
    precision: str = "fp32"
    batch: int = 1
    transform: str = "dct"
    top_k: int = DEFAULT_TOP_K                  # baked TopK K (runtime top_k <= this); 0 = no top-k
    opset: int = DEFAULT_OPSET          # fp8 needs >= 19 (default_opset)
    target: str = "onnx"              # "onnx" | "trt"
    trt_hardware_compatible: bool = False   # engines run on Ampere and newer, not only this GPU
    trt_version_compatible: bool = False    # engines run on later TensorRT (same major, or 10 -> 11)
    trt_tf32: bool = False                  # let TensorRT run fp32 MatMuls in TF32 (opt-in; off keeps fp32)
    calibration: CalibrationConfig = CalibrationConfig()    # int8/fp8: the runs that set activation ranges

    def __post_init__(self):
        if self.precision not in PRECISION_DTYPES:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISION_DTYPES)}, got {self.precision!r}")
        if not 1 <= self.batch <= MAX_BATCH:
            raise ConfigError(f"--batch must be in 1..{MAX_BATCH}, got {self.batch}")
        if self.transform not in DSE_TRANSFORMS:
            raise ConfigError(f"--dse must be dct or dft, got {self.transform!r}")
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise ConfigError(f"--opset must be in {MIN_OPSET}..{MAX_OPSET} (LayerNormalization needs {MIN_OPSET}; "
                              f"TensorRT 10 parses <= {MAX_OPSET})")
        if self.target not in ("onnx", "trt"):
            raise ConfigError(f"--target must be onnx or trt, got {self.target!r}")
        if self.top_k < 0:
            raise ConfigError(f"--top-k must be >= 0 (0 = no top-k), got {self.top_k}")
        if self.top_k > TRT_TOPK_LIMIT:
            raise ConfigError(f"--top-k {self.top_k} exceeds TensorRT's TopK limit {TRT_TOPK_LIMIT}; use <= {TRT_TOPK_LIMIT} or 0 (no top-k)")
        if self.precision == "fp8" and self.opset < FP8_MIN_OPSET:
            raise ConfigError(f"--precision fp8 needs --opset {FP8_MIN_OPSET} or {MAX_OPSET} (QuantizeLinear takes float8 "
                              f"from opset {FP8_MIN_OPSET}), got {self.opset}; leave --opset out to get {FP8_MIN_OPSET}")


def cache_key(cfg: VARConfig, ec: ExportConfig, weights_id: str) -> str:
    """The graphs' key. The TensorRT options (target, trt_*) are left out: they, the TensorRT
    version and the GPU make the engines' key (contract.tensorrt.engine_cache_key)."""
    graph_opts = {k: v for k, v in asdict(ec).items() if k != "target" and not k.startswith("trt_")}
    if ec.precision not in QUANTIZED:
        del graph_opts["calibration"]            # only quantized graphs depend on it
    else:
        # int8 artifacts of before the int8 decoder are stale; fp8 quantizes the step only
        graph_opts["quantized"] = list(QUANTIZED_GRAPHS) if ec.precision in SCHEMES else ["step"]
        if ec.precision in SCHEMES:
            graph_opts["decoder_recipe"] = DECODER_RECIPE
    blob = json.dumps(dict(config=config_to_json(cfg), export=graph_opts, weights=weights_id,
                           format=FORMAT_VERSION, torch=torch.__version__), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _trt_options(ec: ExportConfig) -> Dict:
    return dict(tf32=ec.trt_tf32, hardware_compat=ec.trt_hardware_compatible, version_compat=ec.trt_version_compatible)


def weights_id(src: WeightSource) -> str:
    if src.random:
        return f"random:{src.seed}"
    return f"ckpt:{src.ckpt_sha256}:{src.vae_sha256}"


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


@dataclass(frozen=True)
class ExportResult:
    manifest: Dict
    reused: bool            # --out already held these artifacts (same cache key, verified): nothing exported


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


def export_artifacts(var: VAR, vae: VQVAE, src: WeightSource, out: str, ec: ExportConfig,
                     force: bool = False, progress: Optional[Callable[[str], None]] = None) -> ExportResult:
    """Export everything into `out` atomically (export.publish: a temporary directory beside it,
    swapped in at the end, under an exclusive lock on `out`). Reuses up-to-date artifacts unless
    `force`."""
    key = cache_key(var.cfg, ec, weights_id(src))
    machine = None
    if ec.target == "trt":            # fail before a long export, not after it; engines are for this machine
        from .trt_build import check_precision, this_machine
        machine = this_machine()
        check_precision(ec.precision, machine)
    return publish(out, key, force, machine, ec, lambda tmp: _export_into(var, vae, src, tmp, ec, key, progress))


def publish(out: str, key: str, force: bool, machine, ec, export_into: Callable[[str], Dict]) -> ExportResult:
    """The export transaction of any model family: reuse `out` when its cache key is `key` (new
    engines only when they are stale for `machine`), else `export_into(tmp)` writes the artifacts
    (the manifest returned) into the transaction's folder, swapped in whole (export.publish)."""
    try:
        with Transaction(out) as txn:
            out = txn.out
            data = _existing(out, key, force)
            if data is not None:
                txn.keep()
                why = None
                if machine is not None:
                    from .trt_build import engines_stale
                    why = engines_stale(data, machine, **_trt_options(ec))
                if why is None:
                    log.info("%s is up to date (cache key %s); nothing to do", out, key[:12])
                    return ExportResult(data, reused=True)
                log.info("%s: %s; building new engines (the ONNX graphs are reused)", out, why)
                return ExportResult(_rebuild_engines(out, ec), reused=False)
            tmp = txn.tmp_dir()
            old_cache = os.path.join(out, "timing.cache")
            if ec.target == "trt" and os.path.isfile(old_cache):     # reuse the TensorRT timing cache
                shutil.copyfile(old_cache, os.path.join(tmp, "timing.cache"))
            man = export_into(tmp)
            txn.commit(tmp)
            return ExportResult(man, reused=False)
    except OSError as e:
        raise ExportError(f"export failed while writing ({e.strerror or e}: {e.filename or ''}); "
                          f"nothing was written to {split_out(out)[0]}") from None


def _rebuild_engines(out: str, ec) -> Dict:
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
        if data.get("family") == "infinity":          # export.infinity_export reuses this
            from var_ssg.contract.infinity_schema import validate_infinity
            validate_infinity("the manifest being written", data, listed=False)
        else:
            check_manifest(data)
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
    dtype = torch_dtype(PRECISION_DTYPES[ec.precision])
    k_max = topk_bake(ec.top_k, cfg.V)
    step = StepComponent(cfg, ec.batch, StepSpec(transform=ec.transform, k_max=k_max, dtype=dtype))
    dec = DecoderComponent(cfg, ec.batch)
    var_x = var if dtype == torch.float32 else copy.deepcopy(var).to(dtype)
    clock = StageClock(progress)
    store = SharedWeights(tmp)
    graphs, quant = {}, None
    scratch = tempfile.mkdtemp(prefix=".decoder-", dir=tmp)      # the child's; removed before the manifest
    job = DecoderJob(vae, DecoderSpec(cfg, vae.cfg, ec.batch, ec.opset), scratch)
    try:
        clock.start("step_export")
        # the decoder is exported by a child process on the other core meanwhile (the export is
        # Python and holds the GIL; DESIGN.md, "Export cost")
        job.start()
        model = export_one(step.module(var_x, vae).eval(), step.example_feeds(step.example_scale()),
                           step.inputs, step.outputs, ec.opset, dynamic_shapes=step.dynamic_shapes())
        if ec.precision in QUANTIZED:
            import onnx_ir as ir
            qdir = tempfile.mkdtemp(prefix="quant-", dir=scratch)
            clock.start("calibrate")
            fp32_step = os.path.join(qdir, "fp32.onnx")
            ir.save(model, fp32_step, external_data="fp32.data")
            del model                   # on disk while the model's own runs calibrate (DESIGN.md "Low precision")
            model, quant, f_hats = _quantize(fp32_step, qdir, var, vae, ec, k_max, clock)
        clock.start("write")
        graphs["step"] = _save(model, store, tmp, step.file, step.name)
        del model
        consts = {f"k{k}/{n}": v for k in range(cfg.num_scales) for n, v in step.scale_consts(k).items()}
        with open(os.path.join(tmp, step.consts_file), "wb") as f:
            np.savez(f, **consts)
        clock.start("decoder")          # what is left of the child's export, then its weights
        try:
            dec_model = job.result()
        except RuntimeError as e:
            raise ExportError(str(e)) from None
        if quant is not None and ec.precision in SCHEMES:      # int8; fp8 (TensorRT) keeps the fp32 decoder
            dec_model, quant["decoder"] = _quantize_decoder(dec_model, vae, ec, f_hats, qdir, clock)
        graphs["decoder"] = _save(dec_model, store, tmp, dec.file, dec.name)
        del dec_model
        clock.start("flush")
    finally:
        job.close()                     # nothing left running or writing, even on Ctrl-C
        store.close()
        shutil.rmtree(scratch, ignore_errors=True)
    param_bytes = sum(p.numel() * p.element_size() for p in var_x.parameters()) + \
        sum(p.numel() * p.element_size() for n, p in vae.named_parameters() if not n.startswith("encoder."))
    clock.start("check")
    for g in graphs.values():
        onnx.checker.check_model(os.path.join(tmp, g["file"]), full_check=True)
    issues = lint_files([os.path.join(tmp, step.file)], max_opset=MAX_OPSET, dynamic=set(step.dynamic_inputs))
    issues += lint_files([os.path.join(tmp, dec.file)], max_opset=MAX_OPSET)
    if issues:
        raise ExportError("TensorRT-compatibility lint failed:\n  " + "\n  ".join(map(str, issues)))
    data = build_manifest(
        cfg, batch=ec.batch, precision=ec.precision, opset=ec.opset, transform=ec.transform, top_k=ec.top_k,
        weights=src.to_json(), external_data=dict(file=store.filename, bytes=store.bytes_written,
                                                  referenced_bytes=store.bytes_referenced, parameter_bytes=param_bytes),
        step=graphs["step"], decoder=graphs["decoder"], consts=step.consts_file, tools=_versions(), cache_key=key,
        export=asdict(ec), quantization=quant)
    if ec.target == "trt":
        from .trt_build import build_engines
        clock.start("engines")
        data["engines"], data["tensorrt"] = build_engines(tmp, data, **_trt_options(ec))
        check_manifest(data)
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


def _quantize(src: str, qdir: str, var, vae, ec: ExportConfig, k_max: int, clock: StageClock):
    """The fp32 step graph at `src` → its QDQ form (export.quantize), calibrated on the model's own
    runs (export.calibrate), whose feeds are streamed through `qdir` on disk. -> (the quantized
    graph, the manifest's `quantization` record, the runs' final latents for the decoder)."""
    import onnx_ir as ir
    from .calibrate import calibration_feeds
    from .quantize import quantize_step, scheme
    feeds, f_hats, record = calibration_feeds(var, vae, ec.transform, k_max, ec.batch, ec.calibration,
                                              os.path.join(qdir, "feeds"))
    clock.start("quantize")
    params = {"var." + n: p.detach().float().numpy() for n, p in var.named_parameters()}
    dst = os.path.join(qdir, "quant.onnx")
    if ec.precision == "fp8":
        from .quantize_fp8 import quantize_step_fp8, scheme as fp8_scheme
        q = quantize_step_fp8(src, dst, params, feeds, qdir, ec.calibration.keep_fp32)
        recipe = fp8_scheme()
        clip, rule = (), "minmax"           # float8's step is relative: its MinMax range keeps the tail
    else:
        cc = ec.calibration
        q = quantize_step(src, dst, ec.precision, params, feeds, qdir, cc.keep_fp32, cc.clip, cc.clip_rule)
        recipe = scheme(ec.precision)
        clip, rule = cc.clip, cc.clip_rule
    shutil.rmtree(feeds.root, ignore_errors=True)
    import onnxruntime
    record["keep_fp32"] = list(ec.calibration.keep_fp32)
    record.update(clip=list(clip), clip_rule=rule, clipped=q.clipped)
    info = dict(recipe, tool_version=onnxruntime.__version__, calibration=record, nodes=q.nodes,
                weights=q.weights)
    return ir.load(dst), info, f_hats


def _quantize_decoder(model, vae, ec: ExportConfig, f_hats, qdir: str, clock: StageClock):
    """The fp32 decoder → its QDQ convs (export.quantize.quantize_decoder), calibrated on the
    calibration runs' final latents. -> (the quantized graph, the manifest's `quantization.decoder`)."""
    import onnx_ir as ir
    from .quantize import decoder_scheme, quantize_decoder
    clock.start("decoder_quantize")
    ddir = tempfile.mkdtemp(prefix="decoder-", dir=qdir)
    src, dst = os.path.join(ddir, "fp32.onnx"), os.path.join(ddir, "quant.onnx")
    ir.save(model, src)
    del model
    params = {"vae." + n: p.detach().float().numpy() for n, p in vae.named_parameters()}
    q = quantize_decoder(src, dst, ec.precision, params, f_hats, ddir)
    return ir.load(dst), decoder_scheme(q)


def _save(model, store: SharedWeights, tmp: str, file: str, name: str) -> Dict:
    import onnx_ir as ir
    model.graph.name = name          # node names already follow the module path (dynamo)
    store.externalize(model)
    ir.save(model, os.path.join(tmp, file))
    return dict(file=file, inputs=_io(model.graph.inputs), outputs=_io(model.graph.outputs))


def _io(values):
    return [dict(name=v.name, shape=[d if isinstance(d, int) else str(d) for d in v.shape], dtype=dtype_name(v.dtype))
            for v in values]
