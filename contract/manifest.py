"""manifest.json: the one contract between export and runtime. One schema, here: export/ builds
the manifest with `build_manifest` (every derived field computed by this module) and writes it
with `write_manifest`; the runtime reads it with `load_manifest` and opens only the files it
lists. `_validate` is the schema: `build_manifest` runs it on what it built, `load_manifest` on
what it reads, and it refuses keys it does not know (so no field is written that nothing checks).

Sections: format/format_version, the preset and its config, batch, precision, opset, dse,
sampler, ssg (a fixed note), weights, kv, external_data, graphs {step, decoder}, [engines,
tensorrt: written by export.trt_build; the fields the TensorRT backend reads are checked], files
{name: {bytes, sha256}} (every other file of the directory), tools, cache_key, created, export
(the export options, recorded). Loading checks types and bounds, that shapes and dtypes are the
ones the preset and precision imply, and every listed file (a plain name, a regular file: lstat
before any open, size and sha256): one-line errors. What hashes do and do not promise, and what is
checked against the graphs themselves (contract.graphcheck): DESIGN.md "What the hashes promise".

Reading a manifest never imports torch (the shapes and dtypes come from graphs.io, plain
data; dtypes are names): `load_manifest(..., on_files=...)` hands the Manifest to a caller once
its files are verified, before the schema check, so ONNX Runtime can build its sessions while
the rest is checked (DESIGN.md, "Start-up"); the caller must not use them if the load then fails.
"""
from __future__ import annotations

import datetime
import errno
import json
import os
import re
import stat
import zipfile
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from graphs.config import DSE_TRANSFORMS, PRECISIONS, TRT_TOPK_LIMIT, ConfigError, VARConfig, get_preset, topk_bake
from common.files import open_regular, sha256_file, write_json
from contract import stamp

FORMAT = "var-ssg-artifacts"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
MAX_BATCH = 1024
MAX_MANIFEST_BYTES = 64 << 20
# Artifact file names: plain names inside the directory (no separators, no "..", no hidden files).
FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
SHA256 = re.compile(r"[0-9a-f]{64}")
MIN_OPSET, MAX_OPSET = 17, 20       # LayerNormalization needs 17; TensorRT 10's parser documents <= 20
KV_LAYOUT = "(L, depth, 2, 2B, heads, head_dim)"
SSG_NOTE = dict(beta="graph input per scale (scales 1..K-1)", prior="DSE of the previous scale's CFG logits")
WEIGHT_KEYS = ("kind", "seed", "ckpt", "vae_ckpt", "ckpt_sha256", "vae_sha256")
TOP_LEVEL = ("format", "format_version", "preset", "config", "batch", "precision", "opset", "dse", "sampler", "ssg",
             "weights", "kv", "external_data", "graphs", "engines", "tensorrt", "files", "tools", "cache_key",
             "created", "export", "quantization")

# The one dtype table: the manifest's dtype names (the names onnx_ir prints, "float" -> "float32"),
# each a torch dtype of the same name; a precision's KV cache dtype.
DTYPE_NAMES = ("float32", "float16", "bfloat16", "int64", "int32", "bool")
# int8 quantizes the transformer's weight MatMuls in the graph (QDQ); its tensors, the KV cache
# included, stay float32 between them (contract.quantization)
PRECISION_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "int8": "float32"}


def torch_dtype(name: str):
    """The torch dtype of a manifest dtype name (torch is imported here, on first use)."""
    import torch
    if name not in DTYPE_NAMES:
        raise KeyError(name)
    return getattr(torch, name)


def dtype_name_of(dtype) -> Optional[str]:
    """The manifest name of a torch dtype (None if it has none)."""
    name = str(dtype).replace("torch.", "")
    return name if name in DTYPE_NAMES else None


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
    def kv_dtype(self) -> str:
        """The KV cache's dtype (a name of DTYPE_NAMES)."""
        return self.data["kv"]["dtype"]

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
        """name -> (shape, dtype name) of a graph's outputs (the step's at scale k)."""
        g = self.graph(name)
        shapes = g["output_shapes"][k] if name == "step" else {o["name"]: o["shape"] for o in g["outputs"]}
        return {o["name"]: (shapes[o["name"]], o["dtype"]) for o in g["outputs"]}

    def input_dtypes(self, name: str) -> Dict[str, str]:
        """name -> dtype name of a graph's inputs."""
        return {i["name"]: i["dtype"] for i in self.graph(name)["inputs"]}

    def scale_consts(self) -> List[Dict[str, Any]]:
        """Per scale, the step graph's `scale_*` inputs as numpy arrays. Each array's header (dtype,
        order, shape) is checked before it is read, so a hostile archive cannot make the runtime
        allocate more than the profiles imply; then its values must be the ones graphs.io
        computes for this preset and DSE transform (position ids in range, the DCT matrix under
        `dse.transform: dct`)."""
        import numpy as np
        from numpy.lib import format as npy
        from graphs.io import scale_constants
        path = self.path(self.graph("step")["consts"])
        out = []
        try:
            with np.load(path, allow_pickle=False) as z:
                for k in range(self.cfg.num_scales):
                    want_k = scale_constants(self.cfg, self.transform, k)
                    consts = {}
                    for name, shape in ((n, s) for n, s in self.profile(k).items() if n.startswith("scale_")):
                        key, want = f"k{k}/{name}", want_k[name]
                        if key not in z.files:
                            raise ValueError(f"{key} is missing")
                        with z.zip.open(key + ".npy") as f:
                            if npy.read_magic(f) != (1, 0):      # what np.savez writes for these arrays
                                raise ValueError(f"{key} has an unexpected .npy version")
                            got, fortran, dtype = npy.read_array_header_1_0(f)
                        if list(got) != shape:
                            raise ValueError(f"{key} has shape {list(got)}, expected {shape}")
                        if dtype != want.dtype or fortran:
                            raise ValueError(f"{key} has dtype {dtype.str}{' (Fortran order)' if fortran else ''}, "
                                             f"expected {want.dtype.name}")
                        a = z[key]
                        tol = 1e-5 * max(1.0, float(np.abs(want).max(initial=0)))
                        if not (np.array_equal(a, want) if want.dtype.kind != "f" else
                                np.isfinite(a).all() and np.abs(a.astype(np.float64) - want).max(initial=0) <= tol):
                            raise ValueError(f"{key} does not hold the values {self.cfg.name} with DSE "
                                             f"{self.transform} needs (from other artifacts, or edited)")
                        consts[name] = a
                    out.append(consts)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise ManifestError(f"{path}: unusable ({type(e).__name__}: {e}); re-export with --force") from None
        return out


def _validate(path: str, data: Any, listed: bool = True) -> VARConfig:
    """The schema. `listed`: `files` is present (on load, and after write_manifest); the builder
    validates before the files are listed."""
    c = _Check(path)
    _check_header(path, data)
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
    kv = PRECISION_DTYPES[precision]
    kvd = c.get(data, "kv", dict)
    c.only(kvd, ("layout", "dtype"), "kv")
    if c.choice(kvd, "dtype", ("float32", "float16", "bfloat16"), "kv.dtype") != kv:
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
    c.get(data, "created", str)
    c.get(data, "export", dict)         # the options as given (recorded; the cache key covers them)
    from .quantization import validate as validate_quantization
    validate_quantization(c, data, precision, cfg.num_scales)
    graphs = c.get(data, "graphs", dict)
    c.only(graphs, ("step", "decoder"), "graphs")
    from graphs.io import DecoderIO, StepIO
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
    if [o["shape"] for o in d["inputs"]] != [dec.f_hat_shape()]:
        c.fail("graphs.decoder.inputs", "do not match the f_hat shape")
    needed = {s["file"], s["consts"], d["file"], data["external_data"]["file"]}
    needed |= _validate_engines(c, data, step, cfg)
    if not listed:
        return cfg
    files = _validate_files(c, data)
    # every file the runtime opens is listed (each is lstat'ed and hashed on load)
    for rel in sorted(needed - set(files)):
        c.fail("files", f"does not list {rel!r} (every file the runtime opens is listed with its size and sha256)")
    return cfg


def _check_header(path: str, data: Any) -> None:
    """A var-ssg manifest of the format version this runtime reads."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ManifestError(f"{path} is not a var-ssg manifest; re-export with scripts/export.py --force")
    if data.get("format_version") != FORMAT_VERSION:
        raise ManifestError(f"{path} has format version {data.get('format_version')!r:.20}, this runtime reads "
                            f"{FORMAT_VERSION}: re-export with this version of scripts/export.py (--force)")


def _validate_files(c: _Check, data: Any) -> Dict[str, Any]:
    """The `files` listing: plain names, each with its size and sha256 (no torch needed: it runs
    before the schema on load, so the files are verified first)."""
    _check_header(c.path, data)             # before any file is hashed
    files = c.get(data, "files", dict)
    for rel, meta in files.items():
        if not FILE_NAME.fullmatch(rel) or rel == MANIFEST:
            c.fail("files", f"names {rel!r:.80}: artifact files are plain names inside the artifacts directory")
        c.only(c.get(files, rel, dict, f"files.{rel}"), ("bytes", "sha256"), f"files.{rel}")
        c.int_in(meta, "bytes", 0, 2 ** 50, f"files.{rel}.bytes")
        if not SHA256.fullmatch(c.get(meta, "sha256", str, f"files.{rel}.sha256")):
            c.fail(f"files.{rel}.sha256", "is not a sha256 hex digest")
    return files


def build_manifest(cfg: VARConfig, *, batch: int, precision: str, opset: int, transform: str, top_k: int,
                   weights: Dict[str, Any], external_data: Dict[str, int | str], step: Dict[str, Any],
                   decoder: Dict[str, Any], consts: str, tools: Dict[str, str], cache_key: str,
                   export: Dict[str, Any], quantization: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The manifest of an export (before its files are listed: write_manifest does that). The
    caller gives what only it knows (the graphs' files and inputs/outputs as exported, the
    weights' source, the options); everything derived (config, k_max, kv, per-scale profiles and
    output shapes, dynamic inputs) is computed here, and the result is validated by the schema."""
    from graphs.io import StepIO
    k_max = topk_bake(top_k, cfg.V)
    comp = StepIO(cfg, batch, PRECISION_DTYPES[precision])
    io = ("file", "inputs", "outputs")
    data = dict(
        format=FORMAT, format_version=FORMAT_VERSION, preset=cfg.name, config=config_to_json(cfg),
        batch=batch, precision=precision, opset=opset, dse=dict(transform=transform),
        sampler=dict(k_max=k_max, top_k_requested=top_k), ssg=dict(SSG_NOTE), weights=dict(weights),
        kv=dict(layout=KV_LAYOUT, dtype=PRECISION_DTYPES[precision]),
        external_data=dict(external_data),
        graphs=dict(step=dict({k: step[k] for k in io}, consts=consts, dynamic_inputs=comp.dynamic_inputs,
                              profiles=[comp.profile(k) for k in range(cfg.num_scales)],
                              output_shapes=[comp.output_shapes(k) for k in range(cfg.num_scales)]),
                    decoder=dict({k: decoder[k] for k in io}, precision="fp32")),
        tools=dict(tools), cache_key=cache_key,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), export=dict(export))
    if quantization is not None:
        data["quantization"] = quantization
    check_manifest(data)
    return data


def check_manifest(data: Dict[str, Any]) -> None:
    """The schema's check of a manifest being written (before write_manifest lists the files)."""
    _validate("the manifest being written", data, listed=False)


def _validate_engines(c: _Check, data: Dict[str, Any], step, cfg: VARConfig) -> set:
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


def _read_manifest(root: str) -> Any:
    """manifest.json as JSON: a regular file (lstat'ed: no link, FIFO or device), bounded size."""
    p = os.path.join(root, MANIFEST)
    try:
        with open_regular(p, follow_symlinks=False) as f:
            if os.fstat(f.fileno()).st_size > MAX_MANIFEST_BYTES:
                raise ValueError("too large")
            return json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{p} is missing: {root} is not an artifacts directory (run scripts/export.py --out {root})") from None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EINVAL):      # O_NOFOLLOW on a link / not a regular file
            raise ManifestError(f"{p} is not a regular file (a link, device or folder); re-export with --force") from None
        raise ManifestError(f"{p} cannot be read ({e.strerror})") from None
    except (ValueError, RecursionError) as e:
        raise ManifestError(f"{p} is corrupt ({type(e).__name__}); re-export with scripts/export.py --force") from None


def _file_problem(fp: str, meta: Any, verify_hash: bool = True) -> Optional[str]:
    """Why the file at `fp` is not the one `meta` ({bytes, sha256}) lists, or None. lstat first:
    a link, FIFO or device is never opened (a FIFO would block, /dev/zero never ends)."""
    try:
        st = os.lstat(fp)
    except OSError:
        return "is missing (listed in the manifest)"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file (a link, device or folder)"
    if st.st_size != meta["bytes"]:
        return f"has {st.st_size} bytes, the manifest says {meta['bytes']}: the file was changed or truncated"
    if verify_hash:
        try:
            ok = sha256_file(fp, follow_symlinks=False) == meta["sha256"]
        except OSError as e:
            return f"cannot be read ({e.strerror})"
        if not ok:
            return "sha256 does not match the manifest (the file was modified)"
    return None


def load_manifest(root: str, verify_hashes: bool = True, verify: str = "full",
                  on_files: Optional[Callable[[Manifest], None]] = None) -> Manifest:
    """verify "full": hash every listed file; "stamp": skip the large files the verified stamp
    vouches for (contract.stamp). Either records a new stamp after hashing a large file.
    Order: the listing, the files, then the schema. `on_files(manifest)` is called between the
    last two (files verified, schema not yet checked: see the module docstring)."""
    if verify not in stamp.VERIFY_MODES:
        raise ConfigError(f"verify must be one of {', '.join(stamp.VERIFY_MODES)}, got {verify!r}")
    if not os.path.isdir(root):
        what = "is not a directory" if os.path.lexists(root) else "does not exist"
        raise ManifestError(f"artifacts directory {root} {what} (run scripts/export.py --out DIR and give that DIR)")
    data = _read_manifest(root)
    path = os.path.join(root, MANIFEST)
    _validate_files(_Check(path), data)
    entries, verified, hashed = stamp.read(root, MANIFEST) if verify_hashes and verify == "stamp" else {}, [], False
    for rel, meta in data["files"].items():
        fp = os.path.join(root, rel)
        why = _file_problem(fp, meta, verify_hash=False)
        if not why:
            st = os.lstat(fp)
            verified.append((rel, stamp.file_key(st), meta["sha256"]))
            if verify_hashes and not stamp.vouches(entries, rel, meta, st):
                hashed |= meta["bytes"] >= stamp.SMALL_BYTES        # a stamp worth (re)writing
                why = _file_problem(fp, meta, verify_hash=True)
        if why:
            raise ManifestError(f"{fp} {why}; artifacts must be plain files inside {root}: re-export with --force")
    if on_files is not None:
        try:
            early = get_preset(data.get("preset"))
        except (ConfigError, TypeError):
            early = None            # _validate names the problem
        if early is not None:
            on_files(Manifest(root=os.path.abspath(root), data=data, cfg=early))
    cfg = _validate(path, data)
    if hashed:
        stamp.record(root, MANIFEST, verified)      # only for a manifest that passed the schema
    return Manifest(root=os.path.abspath(root), data=data, cfg=cfg)


def artifacts_dir_problem(root: str) -> Optional[str]:
    """None if `root` is an artifacts directory (a var-ssg manifest, any format version) that holds
    nothing but the files its manifest lists, each a plain artifact name with the listed size and
    sha256 (the size alone when the manifest is a complete one, as an export writes it: a changed
    artifact is then damage that a new export repairs): the only kind of directory export
    --force replaces. Otherwise the reason, for the error message. (A hand-made manifest naming
    someone's files does not make them artifacts.)"""
    try:
        data = _read_manifest(root)
    except ManifestError:
        data = None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return "holds files that are not var-ssg artifacts (no var-ssg manifest.json)"
    listed = data.get("files") if isinstance(data.get("files"), dict) else {}
    try:        # a complete manifest as an export writes it: a file of the listed size whose hash
        _validate(MANIFEST, data)       # differs is a damaged artifact, which re-exporting repairs
        complete = True
    except ManifestError:
        complete = False
    for e in sorted(os.scandir(root), key=lambda e: e.name):
        if e.name == MANIFEST:
            continue
        meta = listed.get(e.name)
        if meta is None:
            return f"holds {e.name!r}, which its manifest does not list (not an artifact)"
        if not FILE_NAME.fullmatch(e.name):
            return f"holds {e.name!r}, which is not an artifact's name (artifacts are plain names, never hidden files)"
        if not (isinstance(meta, dict) and isinstance(meta.get("bytes"), int) and not isinstance(meta["bytes"], bool)
                and isinstance(meta.get("sha256"), str) and SHA256.fullmatch(meta["sha256"])):
            return f"holds {e.name!r}, which its manifest lists without a size and sha256 (not an artifact)"
        why = _file_problem(e.path, meta, verify_hash=not complete)
        if why:
            return f"holds {e.name!r}, which {why.replace('is missing', 'vanished').split(':')[0]} (not the listed artifact)"
    return None


def write_manifest(root: str, data: Dict[str, Any], hashed: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """List and hash every file in `root`, then write manifest.json atomically. `hashed`: name ->
    sha256 of files their writer hashed while writing them (export.store), not read again."""
    files = {}
    for name in sorted(os.listdir(root)):
        fp = os.path.join(root, name)
        if name != MANIFEST and os.path.isfile(fp) and not os.path.islink(fp):
            files[name] = dict(bytes=os.path.getsize(fp), sha256=(hashed or {}).get(name) or sha256_file(fp))
    data = dict(data, files=files)
    write_json(os.path.join(root, MANIFEST), data, indent=2)
    return data
