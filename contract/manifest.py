"""manifest.json: the one contract between export and runtime. export/ builds the manifest with
`build_manifest` and writes it with `write_manifest` (contract.writer); the runtime reads it with
`load_manifest` (here) and opens only the files it lists. One schema (contract.schema.validate)
checks both what is built and what is read, and refuses keys it does not know.

Sections: format/format_version, the preset and its config, batch, precision, opset, dse,
sampler, ssg (a fixed note), weights, kv, external_data, graphs {step, decoder}, [engines,
tensorrt: written by export.trt_build; the fields the TensorRT backend reads are checked], files
{name: {bytes, sha256}} (every other file of the directory), tools, cache_key, created, export
(the export options, recorded). Loading checks every listed file (contract.filecheck: a plain
name, a regular file: lstat before any open, size and sha256), then the schema: one-line errors.
What hashes do and do not promise, and what is checked against the graphs themselves
(contract.graphcheck): DESIGN.md "What the hashes promise".

The modules: contract.dtypes (the one dtype table), contract.schema (the schema and its
constants), contract.filecheck (reading manifest.json, checking a listed file), contract.replace
(the --force policy: `artifacts_dir_problem`), contract.writer (`build_manifest`,
`write_manifest`). Their public names are importable from here too.

Reading a manifest never imports torch (the shapes and dtypes come from graphs.io, plain
data; dtypes are names): `load_manifest(..., on_files=...)` hands the Manifest to a caller once
its files are verified, before the schema check, so ONNX Runtime can build its sessions while
the rest is checked (DESIGN.md, "Start-up"); the caller must not use them if the load then fails.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from var_ssg.common.errors import ConfigError
from var_ssg.graphs.config import VARConfig
from var_ssg.graphs.presets import get_model_preset
from var_ssg.graphs.source import WeightSource
from var_ssg.contract import schema, stamp
from .dtypes import DTYPE_NAMES, DTYPES, PRECISION_DTYPES, dtype_name, dtype_name_of, torch_dtype  # noqa: F401
from .filecheck import MAX_MANIFEST_BYTES, file_problem, read_manifest  # noqa: F401
from .replace import artifacts_dir_problem  # noqa: F401
from .schema import (FILE_NAME, FORMAT, FORMAT_VERSION, KV_LAYOUT, MANIFEST, MAX_BATCH, MAX_OPSET,  # noqa: F401
                     MIN_OPSET, SHA256, SSG_NOTE, TOP_LEVEL, WEIGHT_KEYS, Check, ManifestError, check_manifest,
                     config_to_json)
from .writer import build_manifest, write_manifest  # noqa: F401


def validate_any(path: str, data: Any):
    """The schema of the manifest's family: VAR's (contract.schema) or Infinity's
    (contract.infinity_schema). -> the preset's config (VARConfig or InfinityConfig)."""
    family = schema.family_of(data)
    if family == "infinity":
        from .infinity_schema import validate_infinity
        return validate_infinity(path, data)
    if family not in schema.FAMILIES:
        Check(path).fail("family", f"is {family!r:.40}, expected one of {', '.join(schema.FAMILIES)}")
    return schema.validate(path, data)


@dataclass
class Manifest:
    root: str
    data: Dict[str, Any]
    cfg: VARConfig              # an InfinityConfig for family "infinity"

    @property
    def family(self) -> str:
        return schema.family_of(self.data)

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
        return WeightSource(**self.weights).describe()

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
        from var_ssg.graphs.io import scale_constants
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
    data = read_manifest(root)
    path = os.path.join(root, MANIFEST)
    schema.validate_files(Check(path), data)
    entries, verified, hashed = stamp.read(root, MANIFEST) if verify_hashes and verify == "stamp" else {}, [], False
    for rel, meta in data["files"].items():
        fp = os.path.join(root, rel)
        why = file_problem(fp, meta, verify_hash=False)
        if not why:
            st = os.lstat(fp)
            verified.append((rel, stamp.file_key(st), meta["sha256"]))
            if verify_hashes and not stamp.vouches(entries, rel, meta, st):
                hashed |= meta["bytes"] >= stamp.SMALL_BYTES        # a stamp worth (re)writing
                why = file_problem(fp, meta, verify_hash=True)
        if why:
            raise ManifestError(f"{fp} {why}; artifacts must be plain files inside {root}: re-export with --force")
    if on_files is not None:
        try:
            early = get_model_preset(data.get("preset"))
        except (ConfigError, TypeError):
            early = None            # _validate names the problem
        if early is not None:
            on_files(Manifest(root=os.path.abspath(root), data=data, cfg=early))
    cfg = validate_any(path, data)
    if hashed:
        stamp.record(root, MANIFEST, verified)      # only for a manifest that passed the schema
    return Manifest(root=os.path.abspath(root), data=data, cfg=cfg)
