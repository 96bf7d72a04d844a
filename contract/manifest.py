"""manifest.json: the one contract between export and runtime. export/ writes it with
`write_manifest`; the runtime reads it with `load_manifest` and opens only the files it lists.

Schema (format_version 2):
    format, format_version, preset, config (must equal the preset's), batch, precision, opset,
    dse {transform}, sampler {k_max, top_k_requested}, weights {kind, seed | ckpt, sha256s},
    kv {layout, dtype}, external_data {file, bytes, parameter_bytes},
    graphs {step: {file, inputs, outputs, consts, dynamic_inputs, profiles[K], output_shapes[K]},
            decoder: {file, inputs, outputs}}          inputs/outputs: [{name, shape, dtype}]
    engines {step: {file, onnx, profiles[K], extra_memory_target[K]}, decoder: {...}}   (--target trt)
    tensorrt {version, gpu, compute_capability, hardware_compatible, version_compatible, tf32, key}
    files {name: {bytes, sha256}}    every other file of the directory, flat, hashed
    tools, cache_key, created, export
Loading checks every field's type and bounds, that the shapes are the ones the preset implies,
and every listed file (regular, inside the directory, size and sha256): one-line errors.
"""
from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from typing import Any, Dict, List

import torch

from graphs.config import ConfigError, VARConfig, get_preset
from graphs.weights import sha256_file

FORMAT = "var-ssg-artifacts"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
MAX_BATCH = 1024
PRECISIONS = ("fp32", "fp16", "bf16")

# The one dtype table: manifest names -> torch dtypes (the names onnx_ir prints, "float" -> "float32").
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "int64": torch.int64, "int32": torch.int32, "bool": torch.bool}
PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def dtype_name(onnx_ir_dtype) -> str:
    s = str(onnx_ir_dtype).lower().replace("datatype.", "")
    return {"float": "float32", "double": "float64"}.get(s, s)


class ManifestError(ConfigError):
    pass


def config_to_json(cfg: VARConfig) -> Dict[str, Any]:
    v = cfg.vae
    return dict(name=cfg.name, depth=cfg.depth, width=cfg.width, num_heads=cfg.num_heads, head_dim=cfg.head_dim,
                num_classes=cfg.num_classes, L=cfg.L, patch_nums=list(cfg.patch_nums), shared_aln=cfg.shared_aln,
                vae=dict(vocab_size=v.vocab_size, z_channels=v.z_channels, ch=v.ch, ch_mult=list(v.ch_mult),
                         num_res_blocks=v.num_res_blocks, share_quant_resi=v.share_quant_resi,
                         quant_resi=v.quant_resi))


# ------------------------------------------------------------------------------ validation
class _Check:
    """Typed field access with one-line errors that name the manifest and the field."""

    def __init__(self, path: str):
        self.path = path

    def fail(self, field: str, what: str):
        raise ManifestError(f"{self.path}: field {field!r} {what}; re-export with scripts/export.py --force")

    def get(self, d: Any, key: str, typ, field: str = ""):
        field = field or key
        if not isinstance(d, dict) or key not in d:
            self.fail(field, "is missing")
        v = d[key]
        if typ is int and (isinstance(v, bool) or not isinstance(v, int)):
            self.fail(field, f"must be an integer, got {v!r:.60}")
        if typ is not int and not isinstance(v, typ):
            self.fail(field, f"must be {getattr(typ, '__name__', typ)}, got {type(v).__name__}")
        return v

    def int_in(self, d, key, lo, hi, field=""):
        v = self.get(d, key, int, field)
        if not lo <= v <= hi:
            self.fail(field or key, f"is {v}, outside {lo}..{hi}")
        return v

    def choice(self, d, key, choices, field=""):
        v = self.get(d, key, str, field)
        if v not in choices:
            self.fail(field or key, f"is {v!r:.60}, expected one of {', '.join(choices)}")
        return v

    def tensors(self, d, key, field):
        out = []
        for i, t in enumerate(self.get(d, key, list, field)):
            f = f"{field}[{i}]"
            name = self.get(t, "name", str, f + ".name")
            self.choice(t, "dtype", tuple(DTYPES), f + ".dtype")
            for s in self.get(t, "shape", list, f + ".shape"):
                if not (isinstance(s, str) or (isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2 ** 31)):
                    self.fail(f + ".shape", f"has a bad dimension {s!r:.40}")
            out.append(name)
        return out


@dataclass
class Manifest:
    root: str
    data: Dict[str, Any]
    cfg: VARConfig

    # ---- what the artifacts are
    @property
    def batch(self) -> int:
        return self.data["batch"]

    @property
    def precision(self) -> str:
        return self.data["precision"]

    @property
    def transform(self) -> str:
        return self.data["dse"]["transform"]

    @property
    def k_max(self) -> int:
        return self.data["sampler"]["k_max"]

    @property
    def weights(self) -> Dict[str, Any]:
        return self.data["weights"]

    @property
    def kv_dtype(self) -> torch.dtype:
        return DTYPES[self.data["kv"]["dtype"]]

    @property
    def source_note(self) -> str:
        w = self.weights
        if w["kind"] == "random":
            return f"RANDOM WEIGHTS (seed {w['seed']}) - not a trained model"
        return f"checkpoint {w.get('ckpt')} + {w.get('vae_ckpt')}"

    # ---- graphs, engines and files by name
    def graph(self, name: str) -> Dict[str, Any]:
        g = self.data["graphs"].get(name)
        if g is None:
            raise ManifestError(f"{self.root}/{MANIFEST}: no graph named {name!r}")
        return g

    @property
    def engines(self) -> Dict[str, Any]:
        if not self.data.get("engines"):
            raise ManifestError(f"{self.root} has no TensorRT engines: re-export with --target trt on this GPU")
        return self.data["engines"]

    def path(self, rel: str) -> str:
        """The path of a file the manifest lists (and verified at load); nothing else opens."""
        if rel not in self.data["files"]:
            raise ManifestError(f"{self.root}: {rel!r} is not listed in {MANIFEST}; re-export with --force")
        return os.path.join(self.root, rel)

    # ---- the step graph's per-scale contract
    def profile(self, k: int) -> Dict[str, List[int]]:
        return self.graph("step")["profiles"][k]

    def output_specs(self, name: str, k: int = 0) -> Dict[str, tuple]:
        """name -> (shape, torch dtype) of a graph's outputs (the step's at scale k)."""
        g = self.graph(name)
        shapes = g["output_shapes"][k] if name == "step" else {o["name"]: o["shape"] for o in g["outputs"]}
        return {o["name"]: (shapes[o["name"]], DTYPES[o["dtype"]]) for o in g["outputs"]}

    def input_dtypes(self, name: str) -> Dict[str, torch.dtype]:
        return {i["name"]: DTYPES[i["dtype"]] for i in self.graph(name)["inputs"]}

    def scale_consts(self, device="cpu") -> List[Dict[str, torch.Tensor]]:
        """Per scale, the step graph's `scale_*` inputs as tensors (checked against the profiles)."""
        import numpy as np
        path = self.path(self.graph("step")["consts"])
        try:
            with np.load(path, allow_pickle=False) as z:
                arrs = {key: z[key] for key in z.files}
        except (OSError, ValueError) as e:
            raise ManifestError(f"{path}: unreadable ({type(e).__name__}); re-export with --force") from None
        out = []
        for k in range(self.cfg.num_scales):
            prof = self.profile(k)
            consts = {}
            for name in (n for n in prof if n.startswith("scale_")):
                a = arrs.get(f"k{k}/{name}")
                if a is None or list(a.shape) != prof[name]:
                    raise ManifestError(f"{path}: k{k}/{name} is missing or has the wrong shape; re-export with --force")
                consts[name] = torch.from_numpy(a).to(device)
            out.append(consts)
        return out


def _validate(path: str, data: Any, root: str) -> VARConfig:
    c = _Check(path)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ManifestError(f"{path} is not a var-ssg manifest; re-export with scripts/export.py --force")
    if data.get("format_version") != FORMAT_VERSION:
        raise ManifestError(f"{path} has format version {data.get('format_version')!r:.20}, this runtime reads "
                            f"{FORMAT_VERSION}: re-export with this version of scripts/export.py (--force)")
    preset = c.get(data, "preset", str)
    try:
        cfg = get_preset(preset)
    except ConfigError as e:
        c.fail("preset", f"is not usable ({e})")
    if c.get(data, "config", dict) != config_to_json(cfg):
        c.fail("config", f"does not match the preset {preset}")
    B = c.int_in(data, "batch", 1, MAX_BATCH)
    c.choice(data, "precision", PRECISIONS)
    c.choice(c.get(data, "dse", dict), "transform", ("dct", "dft"), "dse.transform")
    c.int_in(c.get(data, "sampler", dict), "k_max", 0, cfg.V, "sampler.k_max")
    w = c.get(data, "weights", dict)
    if c.choice(w, "kind", ("random", "checkpoint"), "weights.kind") == "random":
        c.int_in(w, "seed", 0, 2 ** 63 - 1, "weights.seed")
    c.choice(c.get(data, "kv", dict), "dtype", ("float32", "float16", "bfloat16"), "kv.dtype")
    c.get(c.get(data, "external_data", dict), "file", str, "external_data.file")
    files = c.get(data, "files", dict)
    graphs = c.get(data, "graphs", dict)
    from graphs.components import StepComponent, DecoderComponent
    from graphs.step import StepSpec
    step = StepComponent(cfg, B, StepSpec(transform=data["dse"]["transform"], k_max=data["sampler"]["k_max"]))
    for name, comp in (("step", step), ("decoder", DecoderComponent(cfg, B))):
        g = c.get(graphs, name, dict, f"graphs.{name}")
        c.get(g, "file", str, f"graphs.{name}.file")
        ins = c.tensors(g, "inputs", f"graphs.{name}.inputs")
        outs = c.tensors(g, "outputs", f"graphs.{name}.outputs")
        if ins != list(comp.inputs) or outs != list(comp.outputs):
            c.fail(f"graphs.{name}", f"has inputs {ins} / outputs {outs}, this runtime needs {list(comp.inputs)} / "
                                     f"{list(comp.outputs)}")
    s = graphs["step"]
    c.get(s, "consts", str, "graphs.step.consts")
    if c.get(s, "profiles", list, "graphs.step.profiles") != [step.profile(k) for k in range(cfg.num_scales)]:
        c.fail("graphs.step.profiles", f"are not the per-scale shapes of {preset} at batch {B}")
    if c.get(s, "output_shapes", list, "graphs.step.output_shapes") != [step.output_shapes(k) for k in range(cfg.num_scales)]:
        c.fail("graphs.step.output_shapes", f"are not the per-scale shapes of {preset} at batch {B}")
    if c.get(s, "dynamic_inputs", list, "graphs.step.dynamic_inputs") != step.dynamic_inputs:
        c.fail("graphs.step.dynamic_inputs", f"should be {step.dynamic_inputs}")
    d = graphs["decoder"]
    if [o["shape"] for o in d["inputs"]] != [list(step.profile(0)["f_hat"])]:
        c.fail("graphs.decoder.inputs", "do not match the f_hat shape")
    # every file: flat name, regular file inside root, listed with size and hash
    needed = {s["file"], s["consts"], d["file"], data["external_data"]["file"]}
    for e in (data.get("engines") or {}).values():
        needed.add(c.get(e, "file", str, "engines.*.file"))
    for rel in needed - set(files):
        c.fail("files", f"does not list {rel!r}")
    for rel, meta in files.items():
        if rel in ("", ".", "..") or os.path.basename(rel) != rel or rel == MANIFEST:
            c.fail("files", f"names {rel!r:.80}: artifact files are plain names inside the directory")
        c.int_in(meta, "bytes", 0, 2 ** 50, f"files.{rel}.bytes")
        h = c.get(meta, "sha256", str, f"files.{rel}.sha256")
        if len(h) != 64:
            c.fail(f"files.{rel}.sha256", "is not a sha256 hex digest")
    return cfg


def load_manifest(root: str, verify_hashes: bool = True) -> Manifest:
    p = os.path.join(root, MANIFEST)
    if not os.path.isdir(root):
        raise ManifestError(f"artifacts directory {root} does not exist (run scripts/export.py --out {root})")
    if not os.path.isfile(p):
        raise ManifestError(f"{p} is missing: {root} is not an artifacts directory (run scripts/export.py --out {root})")
    try:
        if os.path.getsize(p) > 64 << 20:
            raise ValueError("too large")
        with open(p) as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise ManifestError(f"{p} is corrupt ({type(e).__name__}); re-export with scripts/export.py --force") from None
    cfg = _validate(p, data, root)
    for rel, meta in data["files"].items():
        fp = os.path.join(root, rel)
        try:
            st = os.lstat(fp)
        except OSError:
            raise ManifestError(f"{fp} is missing (listed in the manifest); re-export with --force") from None
        if not stat.S_ISREG(st.st_mode):
            raise ManifestError(f"{fp} is not a regular file (a link, device or folder); artifacts must be plain "
                                f"files inside {root}: re-export with --force")
        if st.st_size != meta["bytes"]:
            raise ManifestError(f"{fp} has {st.st_size} bytes, the manifest says {meta['bytes']}: "
                                f"the file was changed or truncated; re-export with --force")
        if verify_hashes and sha256_file(fp) != meta["sha256"]:
            raise ManifestError(f"{fp}: sha256 does not match the manifest (the file was modified); re-export with --force")
    return Manifest(root=os.path.abspath(root), data=data, cfg=cfg)


def is_artifacts_dir(root: str) -> bool:
    """A directory written by scripts/export.py (any format version): safe to replace with --force."""
    try:
        with open(os.path.join(root, MANIFEST)) as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def write_manifest(root: str, data: Dict[str, Any]) -> None:
    """List and hash every file in `root`, then write manifest.json atomically."""
    files = {}
    for name in sorted(os.listdir(root)):
        fp = os.path.join(root, name)
        if name != MANIFEST and os.path.isfile(fp) and not os.path.islink(fp):
            files[name] = dict(bytes=os.path.getsize(fp), sha256=sha256_file(fp))
    data = dict(data, files=files)
    tmp = os.path.join(root, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, os.path.join(root, MANIFEST))
