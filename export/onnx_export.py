"""Turn VAR + VQVAE into ONNX artifacts: ten static per-scale step graphs and the decoder,
one shared external-data file, and manifest.json.

    out.tmp-XXXX/                      (written first, renamed to --out at the very end)
      step_0.onnx ... step_9.onnx      per-scale graphs (static shapes), weights by reference
      step_all.onnx                    (unless --no-unified) one graph for every scale,
                                       dynamic token axis; per-scale constants in scale_consts.npz
      decoder.onnx                     f_hat -> image in [0, 1]
      weights.bin                      every initializer once (content-deduplicated)
      manifest.json                    the runtime's contract (runtime/manifest.py)
"""
from __future__ import annotations

import copy
import datetime
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch

from graphs.config import ConfigError, TRT_TOPK_LIMIT, VARConfig, topk_bake
from graphs.step import OUTPUT_NAMES, ScaleStep, StepSpec, input_names
from graphs.var import VAR
from graphs.vqvae import VQVAE, FhatDecoder
from graphs.weights import WeightSource
from runtime.manifest import FORMAT, FORMAT_VERSION, config_to_json, load_manifest, write_manifest

from .lint import MAX_OPSET, lint_files
from .store import SharedWeights

log = logging.getLogger(__name__)
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ExportError(ConfigError):
    pass


@dataclass(frozen=True)
class ExportConfig:
    precision: str = "fp32"
    batch: int = 1
    transform: str = "dct"
    dse_form: str = "folded"          # "folded" (one MatMul) | "chain" (inspectable)
    top_k: int = 900                  # baked TopK K (runtime top_k <= this); 0 = no top-k
    opset: int = 18
    target: str = "onnx"              # "onnx" | "trt"
    unified: bool = True              # also export step_all.onnx (ORT's fastest layout; TensorRT needs it)
    trt_hardware_compatible: bool = False   # engines run on Ampere and newer, not only this GPU
    trt_version_compatible: bool = False    # engines run on later TensorRT of the same major

    @property
    def with_unified(self) -> bool:
        return self.unified or self.target == "trt"

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.batch < 1:
            raise ConfigError(f"--batch must be >= 1, got {self.batch}")
        if self.dse_form not in ("folded", "chain"):
            raise ConfigError(f"--dse-form must be folded or chain, got {self.dse_form!r}")
        if not 17 <= self.opset <= MAX_OPSET:
            raise ConfigError(f"--opset must be in 17..{MAX_OPSET} (LayerNormalization needs 17; TensorRT 10 parses <= {MAX_OPSET})")
        if self.target not in ("onnx", "trt"):
            raise ConfigError(f"--target must be onnx or trt, got {self.target!r}")
        if self.top_k > TRT_TOPK_LIMIT:
            raise ConfigError(f"--top-k {self.top_k} exceeds TensorRT's TopK limit {TRT_TOPK_LIMIT}; use <= {TRT_TOPK_LIMIT} or 0 (no top-k)")


def cache_key(cfg: VARConfig, ec: ExportConfig, weights_id: str) -> str:
    blob = json.dumps(dict(config=config_to_json(cfg), export=asdict(ec), weights=weights_id,
                           format=FORMAT_VERSION, torch=torch.__version__), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def weights_id(src: WeightSource) -> str:
    if src.random:
        return f"random:{src.seed}"
    return f"ckpt:{src.ckpt_sha256}:{src.vae_sha256}"


def sample_feeds(cfg: VARConfig, k: int, batch: int, kv_dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    B = batch
    b, _ = cfg.begin_ends[k]
    n = cfg.patch_nums[k] ** 2
    feeds = dict(label=torch.arange(B, dtype=torch.int64) % cfg.num_classes,
                 f_hat=torch.zeros(B, cfg.Cvae, cfg.patch_nums[-1], cfg.patch_nums[-1]),
                 noise=torch.rand(B, n), cfg=torch.tensor([1.5]), temperature=torch.tensor([1.0]),
                 top_k=torch.tensor([1], dtype=torch.int64), top_p=torch.tensor([0.96]))
    if k > 0:
        feeds.update(past_kv=torch.zeros(b, cfg.depth, 2, 2 * B, cfg.num_heads, cfg.head_dim, dtype=kv_dtype),
                     prev_logits=torch.zeros(B, cfg.patch_nums[k - 1] ** 2, cfg.V),
                     beta=torch.tensor([0.0]))
    return feeds


def _dim(d):
    return d if isinstance(d, int) else str(d)     # symbolic dims (step_all.onnx) by name


def _io(values) -> List[Dict]:
    return [dict(name=v.name, shape=[_dim(d) for d in v.shape], dtype=str(v.dtype).lower()) for v in values]


def _export_one(module: torch.nn.Module, feeds: Dict[str, torch.Tensor], in_names: List[str],
                out_names: List[str], opset: int, dynamic_shapes=None):
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(module, (), kwargs=feeds, dynamo=True, input_names=in_names,
                                 output_names=out_names, opset_version=opset, optimize=True, verbose=False,
                                 dynamic_shapes=dynamic_shapes)
    return prog.model


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


def prepare_out(out: str, force: bool, key: str) -> bool:
    """True if `out` already holds up-to-date artifacts (skip). Raise if it holds something else."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ExportError(f"--out {out} exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out):
        if not force:
            try:
                if load_manifest(out, verify_hashes=False).data.get("cache_key") == key:
                    return True
            except ConfigError:
                pass
            raise ExportError(f"--out {out} is not empty and does not hold these artifacts; "
                              f"pass --force to replace it, or choose another --out")
    parent = os.path.dirname(os.path.abspath(out)) or "."
    if not os.path.isdir(parent):
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as e:
            raise ExportError(f"cannot create {parent}: {e.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise ExportError(f"cannot write to {parent}: permission denied (choose a writable --out)")
    return False


def export_artifacts(var: VAR, vae: VQVAE, src: WeightSource, out: str, ec: ExportConfig,
                     force: bool = False, progress: Optional[Callable[[str], None]] = None) -> Dict:
    """Export everything into `out` atomically. Returns the manifest dict."""
    cfg = var.cfg
    key = cache_key(cfg, ec, weights_id(src))
    if ec.target == "trt":            # fail before a long export, not after it
        from .trt_build import require_gpu
        require_gpu()
    if prepare_out(out, force, key):
        log.info("%s is up to date (cache key %s); nothing to do", out, key[:12])
        return load_manifest(out, verify_hashes=False).data
    parent = os.path.dirname(os.path.abspath(out)) or "."
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.tmp-", dir=parent)
    try:
        old_cache = os.path.join(out, "timing.cache")
        if ec.target == "trt" and os.path.isfile(old_cache):     # reuse the TensorRT timing cache
            shutil.copyfile(old_cache, os.path.join(tmp, "timing.cache"))
        man = _export_into(var, vae, src, tmp, ec, key, progress)
        if os.path.isdir(out):
            trash = tempfile.mkdtemp(prefix=".old-", dir=parent)
            os.replace(out, os.path.join(trash, "old"))
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
        return man
    except OSError as e:
        raise ExportError(f"export failed while writing ({e.strerror or e}: {e.filename or ''}); "
                          f"nothing was written to {out}") from None
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _export_into(var, vae, src, tmp, ec: ExportConfig, key, progress) -> Dict:
    import onnx
    cfg: VARConfig = var.cfg
    dtype = PRECISIONS[ec.precision]
    k_max = topk_bake(ec.top_k, cfg.V)
    spec = StepSpec(transform=ec.transform, dse=ec.dse_form, resample="matrix", k_max=k_max, dtype=dtype)
    var_x = var if dtype == torch.float32 else copy.deepcopy(var).to(dtype)
    store = SharedWeights(tmp)
    graphs = []
    try:
        for k in range(cfg.num_scales):
            if progress:
                progress(f"step_{k}")
            step = ScaleStep(var_x, vae, k, spec).eval()
            model = _export_one(step, sample_feeds(cfg, k, ec.batch, dtype), input_names(k), OUTPUT_NAMES, ec.opset)
            graphs.append(_save(model, store, tmp, f"step_{k}", dict(kind="step", scale=k)))
            del model, step
        unified = None
        if ec.with_unified:
            if progress:
                progress("step_all")
            unified = _export_unified(var_x, vae, tmp, store, ec, spec)
        if progress:
            progress("decoder")
        f_hat = torch.zeros(ec.batch, cfg.Cvae, cfg.patch_nums[-1], cfg.patch_nums[-1])
        model = _export_one(FhatDecoder(vae).eval(), dict(f_hat=f_hat), ["f_hat"], ["image"], ec.opset)
        graphs.append(_save(model, store, tmp, "decoder", dict(kind="decoder", precision="fp32")))
    finally:
        store.close()
    param_bytes = sum(p.numel() * p.element_size() for p in var_x.parameters()) + \
        sum(p.numel() * p.element_size() for n, p in vae.named_parameters() if not n.startswith("encoder."))
    if progress:
        progress("check")
    for g in graphs + ([unified["graph"]] if unified else []):
        onnx.checker.check_model(os.path.join(tmp, g["file"]), full_check=True)
    issues = lint_files([os.path.join(tmp, g["file"]) for g in graphs], max_opset=MAX_OPSET)
    if unified:
        issues += lint_files([os.path.join(tmp, unified["graph"]["file"])], max_opset=MAX_OPSET,
                             dynamic=set(unified["dynamic_inputs"]))
    if issues:
        raise ExportError("TensorRT-compatibility lint failed:\n  " + "\n  ".join(map(str, issues)))
    data = dict(
        format=FORMAT, format_version=FORMAT_VERSION, preset=cfg.name, config=config_to_json(cfg),
        batch=ec.batch, precision=ec.precision, opset=ec.opset,
        dse=dict(transform=ec.transform, form=ec.dse_form),
        sampler=dict(k_max=k_max, top_k_requested=ec.top_k),
        ssg=dict(beta="graph input per scale (scales 1..K-1)", prior="DSE of the previous scale's CFG logits"),
        weights=src.to_json(), external_data=dict(file=store.filename, bytes=store.bytes_written,
                                                  referenced_bytes=store.bytes_referenced,
                                                  parameter_bytes=param_bytes),
        graphs=graphs, kv_layout="(L, depth, 2, 2B, heads, head_dim)", kv_dtype=str(dtype).replace("torch.", ""),
        unified=unified, tools=_versions(), cache_key=key,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        export=asdict(ec),
    )
    if ec.target == "trt":
        from .trt_build import build_engines
        data["tensorrt"] = build_engines(tmp, data, hardware_compat=ec.trt_hardware_compatible,
                                         version_compat=ec.trt_version_compatible)
    write_manifest(tmp, data)
    return data


def _export_unified(var_x, vae, tmp: str, store: SharedWeights, ec: ExportConfig, spec: StepSpec) -> Dict:
    """step_all.onnx + scale_consts.npz, and the per-scale shapes (TensorRT's profiles)."""
    import numpy as np
    from graphs.unified import (UNIFIED_INPUTS, UNIFIED_OUTPUTS, UnifiedStep, dynamic_shapes,
                                scale_constants, unified_feeds)
    cfg = var_x.cfg
    dtype = PRECISIONS[ec.precision]
    ex = 3 if cfg.num_scales > 3 else cfg.num_scales - 1      # an example scale with n, m, Lp all > 1
    model = _export_one(UnifiedStep(var_x, vae, spec).eval(), unified_feeds(cfg, vae, ec.transform, ex, ec.batch, dtype),
                        UNIFIED_INPUTS, UNIFIED_OUTPUTS, ec.opset, dynamic_shapes=dynamic_shapes(cfg))
    g = _save(model, store, tmp, "step_all", dict(kind="step_unified"))
    consts = {f"k{k}/{n}": v for k in range(cfg.num_scales)
              for n, v in scale_constants(cfg, vae, ec.transform, k).items()}
    with open(os.path.join(tmp, "scale_consts.npz"), "wb") as f:
        np.savez(f, **consts)
    profiles, out_shapes = [], []
    for k in range(cfg.num_scales):
        feeds = unified_feeds(cfg, vae, ec.transform, k, ec.batch, dtype)
        profiles.append({n: list(feeds[n].shape) for n in UNIFIED_INPUTS})
        b, e = cfg.begin_ends[k]
        n, B = e - b, ec.batch
        out_shapes.append(dict(tokens=[B, n], logits=[B, n, cfg.V], logits_cfg=[B, n, cfg.V],
                               f_hat_out=[B, cfg.Cvae, cfg.patch_nums[-1], cfg.patch_nums[-1]],
                               new_kv=[n, cfg.depth, 2, 2 * B, cfg.num_heads, cfg.head_dim]))
    dyn = sorted({name for name, spec_ in dynamic_shapes(cfg).items() if spec_})
    return dict(graph=g, consts="scale_consts.npz", profiles=profiles, output_shapes=out_shapes,
                dynamic_inputs=dyn)


def _save(model, store: SharedWeights, tmp: str, name: str, extra: Dict) -> Dict:
    import onnx_ir as ir
    # node names follow the module path already (dynamo); give the graph a readable name
    model.graph.name = name
    store.externalize(model)
    path = os.path.join(tmp, f"{name}.onnx")
    ir.save(model, path)
    return dict(name=name, file=f"{name}.onnx", inputs=_io(model.graph.inputs),
                outputs=_io(model.graph.outputs), **extra)
