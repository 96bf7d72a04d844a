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
Loading checks every field's type and bounds, that the shapes and dtypes are the ones the preset
and precision imply, and every listed file (a plain name, a regular file inside the directory
(no link, FIFO or device: checked with lstat before anything is opened), size and sha256): one-line
errors. The runtime opens only listed files (`Manifest.path`).
"""
from __future__ import annotations

import errno
import json
import os
import re
import stat
import zipfile
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from graphs.config import DSE_TRANSFORMS, PRECISIONS, ConfigError, VARConfig, get_preset
from common.files import open_regular, sha256_file
from contract import stamp

FORMAT = "var-ssg-artifacts"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
MAX_BATCH = 1024
MAX_MANIFEST_BYTES = 64 << 20
# Artifact file names: plain names inside the directory (no separators, no "..", no hidden files).
FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
SHA256 = re.compile(r"[0-9a-f]{64}")

# The one dtype table: manifest names -> torch dtypes (the names onnx_ir prints, "float" -> "float32").
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "int64": torch.int64, "int32": torch.int32, "bool": torch.bool}
PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


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

    def tensors(self, d, key, field) -> Dict[str, str]:
        """[{name, shape, dtype}] -> {name: dtype}, in order."""
        out = {}
        for i, t in enumerate(self.get(d, key, list, field)):
            f = f"{field}[{i}]"
            name = self.get(t, "name", str, f + ".name")
            out[name] = self.choice(t, "dtype", tuple(DTYPES), f + ".dtype")
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
        """Per scale, the step graph's `scale_*` inputs as tensors (checked against the profiles).
        Only the arrays the profiles name are read, each after its header's shape is checked, so
        a hostile archive cannot make the runtime allocate gigabytes."""
        import numpy as np
        from numpy.lib import format as npy
        path = self.path(self.graph("step")["consts"])
        out = []
        try:
            with np.load(path, allow_pickle=False) as z:
                for k in range(self.cfg.num_scales):
                    consts = {}
                    for name, shape in ((n, s) for n, s in self.profile(k).items() if n.startswith("scale_")):
                        key = f"k{k}/{name}"
                        if key not in z.files:
                            raise ValueError(f"{key} is missing")
                        with z.zip.open(key + ".npy") as f:
                            if npy.read_magic(f) != (1, 0):      # what np.savez writes for these arrays
                                raise ValueError(f"{key} has an unexpected .npy version")
                            got = list(npy.read_array_header_1_0(f)[0])
                        if got != shape:
                            raise ValueError(f"{key} has shape {got}, expected {shape}")
                        consts[name] = torch.from_numpy(z[key]).to(device)
                    out.append(consts)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise ManifestError(f"{path}: unusable ({type(e).__name__}: {e}); re-export with --force") from None
        return out


def _validate(path: str, data: Any) -> VARConfig:
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
    precision = c.choice(data, "precision", PRECISIONS)
    transform = c.choice(c.get(data, "dse", dict), "transform", DSE_TRANSFORMS, "dse.transform")
    k_max = c.int_in(c.get(data, "sampler", dict), "k_max", 0, cfg.V, "sampler.k_max")
    w = c.get(data, "weights", dict)
    if c.choice(w, "kind", ("random", "checkpoint"), "weights.kind") == "random":
        c.int_in(w, "seed", 0, 2 ** 63 - 1, "weights.seed")
    else:       # the eager reference reloads these files and compares their hashes
        for key in ("ckpt", "vae_ckpt"):
            if not c.get(w, key, str, f"weights.{key}"):
                c.fail(f"weights.{key}", "is empty")
        for key in ("ckpt_sha256", "vae_sha256"):
            if not SHA256.fullmatch(c.get(w, key, str, f"weights.{key}")):
                c.fail(f"weights.{key}", "is not a sha256 hex digest")
    kv = _DTYPE_NAMES[PRECISION_DTYPES[precision]]
    if c.choice(c.get(data, "kv", dict), "dtype", ("float32", "float16", "bfloat16"), "kv.dtype") != kv:
        c.fail("kv.dtype", f"is {data['kv']['dtype']}, precision {precision} needs {kv}")
    c.file(c.get(data, "external_data", dict), "file", "external_data.file")
    files = c.get(data, "files", dict)
    graphs = c.get(data, "graphs", dict)
    from graphs.components import StepComponent, DecoderComponent
    from graphs.step import StepSpec
    step = StepComponent(cfg, B, StepSpec(transform=transform, k_max=k_max, dtype=PRECISION_DTYPES[precision]))
    dec = DecoderComponent(cfg, B)
    # dtypes the runtime binds: inputs as the components' example feeds; outputs float32 except these
    out_dtypes = dict(tokens="int64", new_kv=kv)
    for name, comp, feeds in (("step", step, step.example_feeds(0)), ("decoder", dec, dec.example_feeds())):
        g = c.get(graphs, name, dict, f"graphs.{name}")
        c.file(g, "file", f"graphs.{name}.file")
        ins = c.tensors(g, "inputs", f"graphs.{name}.inputs")
        outs = c.tensors(g, "outputs", f"graphs.{name}.outputs")
        if list(ins) != list(comp.inputs) or list(outs) != list(comp.outputs):
            c.fail(f"graphs.{name}", f"has inputs {list(ins)} / outputs {list(outs)}, this runtime needs "
                                     f"{list(comp.inputs)} / {list(comp.outputs)}")
        want = {n: _DTYPE_NAMES.get(t.dtype) for n, t in feeds.items()}
        want.update({n: out_dtypes.get(n, "float32") for n in outs})
        for n, dt in list(ins.items()) + list(outs.items()):
            if dt != want[n]:
                c.fail(f"graphs.{name}", f"declares {n} as {dt}, the graph's {n} is {want[n]}")
    s, d = graphs["step"], graphs["decoder"]
    c.file(s, "consts", "graphs.step.consts")
    if c.get(s, "profiles", list, "graphs.step.profiles") != [step.profile(k) for k in range(cfg.num_scales)]:
        c.fail("graphs.step.profiles", f"are not the per-scale shapes of {preset} at batch {B}")
    if c.get(s, "output_shapes", list, "graphs.step.output_shapes") != [step.output_shapes(k) for k in range(cfg.num_scales)]:
        c.fail("graphs.step.output_shapes", f"are not the per-scale shapes of {preset} at batch {B}")
    if c.get(s, "dynamic_inputs", list, "graphs.step.dynamic_inputs") != step.dynamic_inputs:
        c.fail("graphs.step.dynamic_inputs", f"should be {step.dynamic_inputs}")
    if [o["shape"] for o in d["inputs"]] != [list(step.profile(0)["f_hat"])]:
        c.fail("graphs.decoder.inputs", "do not match the f_hat shape")
    needed = {s["file"], s["consts"], d["file"], data["external_data"]["file"]}
    needed |= _validate_engines(c, data, step, cfg)
    # every file: a plain name, listed with size and hash (each is lstat'ed and hashed on load)
    for rel in sorted(needed - set(files)):
        c.fail("files", f"does not list {rel!r} (every file the runtime opens is listed with its size and sha256)")
    for rel, meta in files.items():
        if not FILE_NAME.fullmatch(rel) or rel == MANIFEST:
            c.fail("files", f"names {rel!r:.80}: artifact files are plain names inside the artifacts directory")
        c.int_in(meta, "bytes", 0, 2 ** 50, f"files.{rel}.bytes")
        if not SHA256.fullmatch(c.get(meta, "sha256", str, f"files.{rel}.sha256")):
            c.fail(f"files.{rel}.sha256", "is not a sha256 hex digest")
    return cfg


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


def load_manifest(root: str, verify_hashes: bool = True, verify: str = "full") -> Manifest:
    """verify "full": hash every listed file; "stamp": skip the large files the verified stamp
    vouches for (contract.stamp). Either records a new stamp after hashing a large file."""
    if verify not in stamp.VERIFY_MODES:
        raise ConfigError(f"verify must be one of {', '.join(stamp.VERIFY_MODES)}, got {verify!r}")
    if not os.path.isdir(root):
        what = "is not a directory" if os.path.lexists(root) else "does not exist"
        raise ManifestError(f"artifacts directory {root} {what} (run scripts/export.py --out DIR and give that DIR)")
    data = _read_manifest(root)
    cfg = _validate(os.path.join(root, MANIFEST), data)
    entries, verified, hashed = stamp.read(root, MANIFEST) if verify_hashes and verify == "stamp" else {}, [], False
    for rel, meta in data["files"].items():
        fp = os.path.join(root, rel)
        try:
            st = os.lstat(fp)           # before any open: a FIFO would block, /dev/zero never ends
        except OSError:
            raise ManifestError(f"{fp} is missing (listed in the manifest); re-export with --force") from None
        if not stat.S_ISREG(st.st_mode):
            raise ManifestError(f"{fp} is not a regular file (a link, device or folder); artifacts must be plain "
                                f"files inside {root}: re-export with --force")
        if st.st_size != meta["bytes"]:
            raise ManifestError(f"{fp} has {st.st_size} bytes, the manifest says {meta['bytes']}: "
                                f"the file was changed or truncated; re-export with --force")
        verified.append((rel, stamp.file_key(st), meta["sha256"]))
        if verify_hashes and not stamp.vouches(entries, rel, meta, st):
            hashed |= meta["bytes"] >= stamp.SMALL_BYTES        # a stamp worth (re)writing
            try:
                ok = sha256_file(fp, follow_symlinks=False) == meta["sha256"]
            except OSError as e:
                raise ManifestError(f"{fp} cannot be read ({e.strerror}); re-export with --force") from None
            if not ok:
                raise ManifestError(f"{fp}: sha256 does not match the manifest (the file was modified); re-export with --force")
    if hashed:
        stamp.record(root, MANIFEST, verified)
    return Manifest(root=os.path.abspath(root), data=data, cfg=cfg)


def artifacts_dir_problem(root: str) -> Optional[str]:
    """None if `root` is an artifacts directory (a var-ssg manifest, any format version) that holds
    nothing but the files its manifest lists: the only kind of directory export --force replaces.
    Otherwise the reason, for the error message."""
    try:
        data = _read_manifest(root)
    except ManifestError:
        data = None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return "holds files that are not var-ssg artifacts (no var-ssg manifest.json)"
    listed = data.get("files") if isinstance(data.get("files"), dict) else {}
    for e in sorted(os.scandir(root), key=lambda e: e.name):
        if e.name != MANIFEST and (e.name not in listed or not e.is_file(follow_symlinks=False)):
            return f"holds {e.name!r}, which its manifest does not list (not an artifact)"
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
    tmp = os.path.join(root, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, os.path.join(root, MANIFEST))
    return data
