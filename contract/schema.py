"""The manifest's schema, once: `validate` is what both the builder (contract.writer) and the
loader (contract.manifest) run, and it refuses keys it does not know (so no field is written
that nothing checks). Types and bounds, shapes and dtypes = the ones the preset and precision
imply (graphs.io, plain data: no torch here), every file a plain name listed with its size and
sha256. Errors are one line that names the manifest and the field."""
from __future__ import annotations

import datetime
import re
from typing import Any, Dict

from var_ssg.common.errors import ConfigError
from var_ssg.graphs.config import DSE_TRANSFORMS, PRECISIONS, TRT_TOPK_LIMIT, VARConfig, get_preset, topk_bake
from .dtypes import DTYPE_NAMES, PRECISION_DTYPES

FORMAT = "var-ssg-artifacts"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
MAX_BATCH = 1024
# Artifact file names: plain names inside the directory (no separators, no "..", no hidden files).
FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
SHA256 = re.compile(r"[0-9a-f]{64}")
MIN_OPSET, MAX_OPSET = 17, 20       # LayerNormalization needs 17; TensorRT 10's parser documents <= 20
KV_LAYOUT = "(L, depth, 2, 2B, heads, head_dim)"
SSG_NOTE = dict(beta="graph input per scale (scales 1..K-1)", prior="DSE of the previous scale's CFG logits")
WEIGHT_KEYS = ("kind", "seed", "ckpt", "vae_ckpt", "ckpt_sha256", "vae_sha256")
FAMILIES = ("var", "infinity")      # the model family; absent = var (DESIGN.md, "Infinity")
TOP_LEVEL = ("format", "format_version", "family", "preset", "config", "batch", "precision", "opset", "dse", "sampler", "ssg",
             "weights", "kv", "external_data", "graphs", "engines", "tensorrt", "files", "tools", "cache_key",
             "created", "export", "quantization")


class ManifestError(ConfigError):
    pass


def config_to_json(cfg: VARConfig) -> Dict[str, Any]:
    v = cfg.vae
    return dict(name=cfg.name, depth=cfg.depth, width=cfg.width, num_heads=cfg.num_heads, head_dim=cfg.head_dim,
                num_classes=cfg.num_classes, L=cfg.L, patch_nums=list(cfg.patch_nums), shared_aln=cfg.shared_aln,
                vae=dict(vocab_size=v.vocab_size, z_channels=v.z_channels, ch=v.ch, ch_mult=list(v.ch_mult),
                         num_res_blocks=v.num_res_blocks, share_quant_resi=v.share_quant_resi,
                         quant_resi=v.quant_resi))


class Check:
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

    def only(self, d: Dict[str, Any], keys, field: str) -> None:
        """No key outside the schema: a field nothing checks is never written or trusted."""
        for k in d:
            if k not in keys:
                self.fail(f"{field}.{k}" if field else k, "is not part of this format")

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

    def tensors(self, d, key, field) -> Dict[str, str]:
        """[{name, shape, dtype}] -> {name: dtype}, in order."""
        out = {}
        for i, t in enumerate(self.get(d, key, list, field)):
            f = f"{field}[{i}]"
            name = self.get(t, "name", str, f + ".name")
            out[name] = self.choice(t, "dtype", DTYPE_NAMES, f + ".dtype")
            for s in self.get(t, "shape", list, f + ".shape"):
                if not (isinstance(s, str) or (isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2 ** 31)):
                    self.fail(f + ".shape", f"has a bad dimension {s!r:.40}")
        return out

    def file(self, d, key, field) -> str:
        """A file name: plain (no directory part, no '..', not absolute), listed in `files`."""
        v = self.get(d, key, str, field)
        if not FILE_NAME.fullmatch(v) or v == MANIFEST:
            self.fail(field, f"is {v!r:.80}: artifact files are plain names inside the artifacts directory")
        return v



def validate(path: str, data: Any, listed: bool = True) -> VARConfig:
    """The schema. `listed`: `files` is present (on load, and after write_manifest); the builder
    validates before the files are listed."""
    c = Check(path)
    check_header(path, data)
    if "family" in data:        # Infinity's manifests: contract.infinity_schema (contract.manifest dispatches)
        c.choice(data, "family", ("var",), "family")
    c.only(data, TOP_LEVEL, "")
    preset = c.get(data, "preset", str)
    try:
        cfg = get_preset(preset)
    except ConfigError as e:
        c.fail("preset", f"is not usable ({e})")
    if c.get(data, "config", dict) != config_to_json(cfg):
        c.fail("config", f"does not match the preset {preset}")
    B = c.int_in(data, "batch", 1, MAX_BATCH)
    precision = c.choice(data, "precision", PRECISIONS)
    c.int_in(data, "opset", MIN_OPSET, MAX_OPSET)
    dse = c.get(data, "dse", dict)
    c.only(dse, ("transform",), "dse")
    c.choice(dse, "transform", DSE_TRANSFORMS, "dse.transform")
    sampler = c.get(data, "sampler", dict)
    c.only(sampler, ("k_max", "top_k_requested"), "sampler")
    k_max = c.int_in(sampler, "k_max", 0, cfg.V, "sampler.k_max")
    top_k = c.int_in(sampler, "top_k_requested", 0, TRT_TOPK_LIMIT, "sampler.top_k_requested")
    if k_max != topk_bake(top_k, cfg.V):
        c.fail("sampler.k_max", f"is {k_max}, but top-k {top_k} with V = {cfg.V} bakes {topk_bake(top_k, cfg.V)}")
    if c.get(data, "ssg", dict) != SSG_NOTE:
        c.fail("ssg", "is not this format's note")
    validate_weights(c, data)
    kv = PRECISION_DTYPES[precision]
    kvd = c.get(data, "kv", dict)
    c.only(kvd, ("layout", "dtype"), "kv")
    if c.choice(kvd, "dtype", tuple(PRECISION_DTYPES.values()), "kv.dtype") != kv:
        c.fail("kv.dtype", f"is {data['kv']['dtype']}, precision {precision} needs {kv}")
    c.choice(kvd, "layout", (KV_LAYOUT,), "kv.layout")
    ext = c.get(data, "external_data", dict)
    c.only(ext, ("file", "bytes", "referenced_bytes", "parameter_bytes"), "external_data")
    c.file(ext, "file", "external_data.file")
    for key in ("bytes", "referenced_bytes", "parameter_bytes"):
        c.int_in(ext, key, 0, 2 ** 50, f"external_data.{key}")
    c.get(data, "tools", dict)
    if not SHA256.fullmatch(c.get(data, "cache_key", str)):
        c.fail("cache_key", "is not a sha256 hex digest")
    try:
        datetime.datetime.fromisoformat(c.get(data, "created", str))
    except ValueError:
        c.fail("created", "is not an ISO 8601 time")
    c.get(data, "export", dict)         # the options as given (recorded; the cache key covers them)
    from .quantization import validate as validate_quantization
    validate_quantization(c, data, precision, cfg.num_scales)
    graphs = c.get(data, "graphs", dict)
    c.only(graphs, ("step", "decoder"), "graphs")
    from var_ssg.graphs.io import DecoderIO, StepIO
    step, dec = StepIO(cfg, B, kv), DecoderIO(cfg, B)
    keys = dict(step=("file", "inputs", "outputs", "consts", "dynamic_inputs", "profiles", "output_shapes"),
                decoder=("file", "inputs", "outputs", "precision"))
    for name, comp in (("step", step), ("decoder", dec)):
        g = c.get(graphs, name, dict, f"graphs.{name}")
        c.only(g, keys[name], f"graphs.{name}")
        c.file(g, "file", f"graphs.{name}.file")
        ins = c.tensors(g, "inputs", f"graphs.{name}.inputs")
        outs = c.tensors(g, "outputs", f"graphs.{name}.outputs")
        if list(ins) != list(comp.inputs) or list(outs) != list(comp.outputs):
            c.fail(f"graphs.{name}", f"has inputs {list(ins)} / outputs {list(outs)}, this runtime needs "
                                     f"{list(comp.inputs)} / {list(comp.outputs)}")
        for n, dt in list(ins.items()) + list(outs.items()):
            if dt != comp.dtype(n):
                c.fail(f"graphs.{name}", f"declares {n} as {dt}, the graph's {n} is {comp.dtype(n)}")
    _declared_shapes(c, graphs["step"], [step.profile(k) for k in range(cfg.num_scales)],
                     [step.output_shapes(k) for k in range(cfg.num_scales)], "graphs.step")
    _declared_shapes(c, graphs["decoder"], [dict(f_hat=dec.f_hat_shape())], [dict(image=dec.image_shape())],
                     "graphs.decoder")
    s, d = graphs["step"], graphs["decoder"]
    c.choice(d, "precision", ("fp32",), "graphs.decoder.precision")
    c.file(s, "consts", "graphs.step.consts")
    if len({s["file"], s["consts"], d["file"], data["external_data"]["file"]}) != 4:
        c.fail("graphs", "names one file for two roles (graphs.step.file, graphs.step.consts, graphs.decoder.file "
                         "and external_data.file are four files)")
    if c.get(s, "profiles", list, "graphs.step.profiles") != [step.profile(k) for k in range(cfg.num_scales)]:
        c.fail("graphs.step.profiles", f"are not the per-scale shapes of {preset} at batch {B}")
    if c.get(s, "output_shapes", list, "graphs.step.output_shapes") != [step.output_shapes(k) for k in range(cfg.num_scales)]:
        c.fail("graphs.step.output_shapes", f"are not the per-scale shapes of {preset} at batch {B}")
    if c.get(s, "dynamic_inputs", list, "graphs.step.dynamic_inputs") != step.dynamic_inputs:
        c.fail("graphs.step.dynamic_inputs", f"should be {step.dynamic_inputs}")
    needed = {s["file"], s["consts"], d["file"], data["external_data"]["file"]}
    needed |= _validate_engines(c, data, step, cfg)
    if not listed:
        return cfg
    files = validate_files(c, data)
    # every file the runtime opens is listed (each is lstat'ed and hashed on load)
    for rel in sorted(needed - set(files)):
        c.fail("files", f"does not list {rel!r} (every file the runtime opens is listed with its size and sha256)")
    ext = data["external_data"]
    if files[ext["file"]]["bytes"] != ext["bytes"]:
        c.fail("external_data.bytes", f"is {ext['bytes']}, {ext['file']} is listed with {files[ext['file']]['bytes']}")
    return cfg


def validate_weights(c: Check, data: Dict[str, Any]) -> None:
    """`weights`: random (a seed) or checkpoint files with their sha256 (both families)."""
    w = c.get(data, "weights", dict)
    c.only(w, WEIGHT_KEYS, "weights")
    if c.choice(w, "kind", ("random", "checkpoint"), "weights.kind") == "random":
        c.int_in(w, "seed", 0, 2 ** 63 - 1, "weights.seed")
    else:       # the eager reference reloads these files and compares their hashes
        for key in ("ckpt", "vae_ckpt"):
            if not c.get(w, key, str, f"weights.{key}"):
                c.fail(f"weights.{key}", "is empty")
        for key in ("ckpt_sha256", "vae_sha256"):
            if not SHA256.fullmatch(c.get(w, key, str, f"weights.{key}")):
                c.fail(f"weights.{key}", "is not a sha256 hex digest")


def family_of(data: Any) -> str:
    """The model family of a manifest: "infinity" or "var" (manifests without the field are VAR's)."""
    return data.get("family", "var") if isinstance(data, dict) else "var"


def _declared_shapes(c: Check, g: Dict[str, Any], ins: list, outs: list, field: str) -> None:
    """A graph's declared input/output shapes against the per-scale shapes graphs.io gives: a
    fixed dimension is the one every scale has; a symbolic one (a name) only where the scales
    differ."""
    for kind, per_scale in (("inputs", ins), ("outputs", outs)):
        for i, t in enumerate(g[kind]):
            f, dims, want = f"{field}.{kind}[{i}].shape", t["shape"], [s[t["name"]] for s in per_scale]
            if any(len(w) != len(dims) for w in want):
                c.fail(f, f"is {dims}, {t['name']} has {len(want[0])} dimensions")
            for a, d in enumerate(dims):
                vals = sorted({w[a] for w in want})
                if isinstance(d, str) and len(vals) == 1:
                    c.fail(f, f"names dimension {a} ({d!r:.20}), but it is {vals[0]} at every scale")
                if not isinstance(d, str) and vals != [d]:
                    c.fail(f, f"is {dims}: dimension {a} of {t['name']} is "
                              f"{vals[0] if len(vals) == 1 else 'symbolic (it differs between scales)'}")


def check_header(path: str, data: Any) -> None:
    """A var-ssg manifest of the format version this runtime reads."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ManifestError(f"{path} is not a var-ssg manifest; re-export with scripts/export.py --force")
    if data.get("format_version") != FORMAT_VERSION:
        raise ManifestError(f"{path} has format version {data.get('format_version')!r:.20}, this runtime reads "
                            f"{FORMAT_VERSION}: re-export with this version of scripts/export.py (--force)")

def validate_files(c: Check, data: Any) -> Dict[str, Any]:
    """The `files` listing: plain names, each with its size and sha256 (no torch needed: it runs
    before the schema on load, so the files are verified first)."""
    check_header(c.path, data)             # before any file is hashed
    files = c.get(data, "files", dict)
    for rel, meta in files.items():
        if not FILE_NAME.fullmatch(rel) or rel == MANIFEST:
            c.fail("files", f"names {rel!r:.80}: artifact files are plain names inside the artifacts directory")
        c.only(c.get(files, rel, dict, f"files.{rel}"), ("bytes", "sha256"), f"files.{rel}")
        c.int_in(meta, "bytes", 0, 2 ** 50, f"files.{rel}.bytes")
        if not SHA256.fullmatch(c.get(meta, "sha256", str, f"files.{rel}.sha256")):
            c.fail(f"files.{rel}.sha256", "is not a sha256 hex digest")
    return files

def check_manifest(data: Dict[str, Any]) -> None:
    """The schema's check of a manifest being written (before write_manifest lists the files)."""
    validate("the manifest being written", data, listed=False)

def _validate_engines(c: Check, data: Dict[str, Any], step, cfg: VARConfig) -> set:
    """`engines` and `tensorrt` (--target trt): the files they name, and what TrtBackend reads."""
    if not data.get("engines"):
        return set()
    engines = c.get(data, "engines", dict)
    dyn = set(step.dynamic_inputs)
    want_profiles = dict(step=[{n: s for n, s in step.profile(k).items() if n in dyn} for k in range(cfg.num_scales)],
                         decoder=[])
    files = set()
    for name, profiles in want_profiles.items():
        e = c.get(engines, name, dict, f"engines.{name}")
        files.add(c.file(e, "file", f"engines.{name}.file"))
        if c.get(e, "onnx", str, f"engines.{name}.onnx") != data["graphs"][name]["file"]:
            c.fail(f"engines.{name}.onnx", f"is not graphs.{name}.file")
        if c.get(e, "profiles", list, f"engines.{name}.profiles") != profiles:
            c.fail(f"engines.{name}.profiles", "are not the per-scale shapes of the step graph")
    t = c.get(data, "tensorrt", dict)
    for key in ("version", "gpu", "compute_capability"):
        c.get(t, key, str, f"tensorrt.{key}")
    for key in ("hardware_compatible", "version_compatible"):
        c.get(t, key, bool, f"tensorrt.{key}")
    return files
