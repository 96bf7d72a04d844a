"""manifest.json: the contract between export and runtime. The runtime reads only this."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict

import torch

from graphs.config import ConfigError, VARConfig, VQVAEConfig
from graphs.weights import sha256_file

FORMAT = "var-ssg-artifacts"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class ManifestError(ConfigError):
    pass


# dtype names as the manifest writes them: graph I/O in onnx_ir's names ("float", ...),
# kv_dtype in torch's ("float32", ...)
TORCH_DTYPES = {"float": torch.float32, "float32": torch.float32, "float16": torch.float16,
                "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32}


def config_to_json(cfg: VARConfig) -> Dict[str, Any]:
    v = cfg.vae
    return dict(name=cfg.name, depth=cfg.depth, width=cfg.width, num_heads=cfg.num_heads, head_dim=cfg.head_dim,
                num_classes=cfg.num_classes, L=cfg.L, patch_nums=list(cfg.patch_nums),
                vae=dict(vocab_size=v.vocab_size, z_channels=v.z_channels, ch=v.ch, ch_mult=list(v.ch_mult),
                         num_res_blocks=v.num_res_blocks, share_quant_resi=v.share_quant_resi,
                         quant_resi=v.quant_resi))


def config_from_json(d: Dict[str, Any]) -> VARConfig:
    v = d["vae"]
    vae = VQVAEConfig(vocab_size=v["vocab_size"], z_channels=v["z_channels"], ch=v["ch"], ch_mult=tuple(v["ch_mult"]),
                      num_res_blocks=v["num_res_blocks"], share_quant_resi=v["share_quant_resi"],
                      quant_resi=v["quant_resi"], patch_nums=tuple(d["patch_nums"]))
    return VARConfig(depth=d["depth"], vae=vae, num_classes=d["num_classes"], name=d["name"])


@dataclass
class Manifest:
    root: str
    data: Dict[str, Any]

    @property
    def cfg(self) -> VARConfig:
        return config_from_json(self.data["config"])

    @property
    def batch(self) -> int:
        return int(self.data["batch"])

    @property
    def precision(self) -> str:
        return self.data["precision"]

    @property
    def transform(self) -> str:
        return self.data["dse"]["transform"]

    @property
    def k_max(self) -> int:
        return int(self.data["sampler"]["k_max"])

    @property
    def weights(self) -> Dict[str, Any]:
        return self.data["weights"]

    def graph(self, name: str) -> Dict[str, Any]:
        for g in self.data["graphs"]:
            if g["name"] == name:
                return g
        raise ManifestError(f"{self.root}/{MANIFEST}: no graph named {name!r}")

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    @property
    def kv_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.data["kv_dtype"]]

    def alloc_outputs(self, idx: int, device, kv_out: torch.Tensor = None) -> Dict[str, torch.Tensor]:
        """Output buffers of graph `idx`; a step's `new_kv` is the cache slice itself."""
        return {o["name"]: (kv_out if o["name"] == "new_kv" else
                            torch.empty(o["shape"], dtype=TORCH_DTYPES[o["dtype"]], device=device))
                for o in self.data["graphs"][idx]["outputs"]}

    # ---- the unified graph (step_all.onnx: every scale, one graph; TensorRT's layout) ----
    @property
    def unified(self) -> Dict[str, Any]:
        u = self.data.get("unified")
        if not u:
            raise ManifestError(f"{self.root} has no unified step graph (step_all.onnx): re-export "
                                f"without --no-unified (it is exported by default)")
        return u

    def scale_consts(self, device="cpu") -> list:
        """Per scale, the unified graph's `scale_*` inputs as tensors."""
        import numpy as np
        with np.load(self.path(self.unified["consts"]), allow_pickle=False) as z:
            arrs = {key: z[key] for key in z.files}
        K = len(self.unified["profiles"])
        return [{key.split("/", 1)[1]: torch.from_numpy(v).to(device) for key, v in arrs.items()
                 if key.startswith(f"k{k}/")} for k in range(K)]

    def unified_feeds(self, k: int, feeds: Dict[str, torch.Tensor], kv_out: torch.Tensor,
                      consts: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """A static step's feeds -> the unified graph's at scale k (scale 0: empty past, one zero
        prior row with beta 0, which leaves the logits untouched)."""
        out = dict(feeds, **consts)
        if k == 0:
            prof = self.unified["profiles"][0]
            dev = kv_out.device
            out.update(past_kv=kv_out[:0], beta=torch.zeros(1, device=dev),
                       prev_logits=torch.zeros(prof["prev_logits"], device=dev))
        return out

    def alloc_unified_outputs(self, k: int, device, kv_out: torch.Tensor) -> Dict[str, torch.Tensor]:
        dt = {o["name"]: TORCH_DTYPES[o["dtype"]] for o in self.unified["graph"]["outputs"]}
        return {name: (kv_out if name == "new_kv" else torch.empty(shape, dtype=dt[name], device=device))
                for name, shape in self.unified["output_shapes"][k].items()}

    @property
    def source_note(self) -> str:
        w = self.weights
        if w["kind"] == "random":
            return f"RANDOM WEIGHTS (seed {w['seed']}) - not a trained model"
        return f"checkpoint {w.get('ckpt')} + {w.get('vae_ckpt')}"


def load_manifest(root: str, verify_hashes: bool = True) -> Manifest:
    p = os.path.join(root, MANIFEST)
    if not os.path.isdir(root):
        raise ManifestError(f"artifacts directory {root} does not exist (run scripts/export.py --out {root})")
    if not os.path.isfile(p):
        raise ManifestError(f"{p} is missing: {root} is not an artifacts directory (run scripts/export.py --out {root})")
    try:
        with open(p) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ManifestError(f"{p} is corrupt ({type(e).__name__}); re-export with scripts/export.py --force") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ManifestError(f"{p} is not a var-ssg manifest; re-export with scripts/export.py --force")
    if data.get("format_version") != FORMAT_VERSION:
        raise ManifestError(f"{p} has format version {data.get('format_version')}, this runtime reads "
                            f"{FORMAT_VERSION}: re-export with this version of scripts/export.py")
    for key in ("config", "batch", "precision", "dse", "sampler", "weights", "graphs", "files"):
        if key not in data:
            raise ManifestError(f"{p} lacks {key!r}; re-export with scripts/export.py --force")
    for rel, meta in data["files"].items():
        fp = os.path.join(root, rel)
        if not os.path.isfile(fp):
            raise ManifestError(f"{fp} is missing (listed in the manifest); re-export with --force")
        if os.path.getsize(fp) != meta["bytes"]:
            raise ManifestError(f"{fp} has {os.path.getsize(fp)} bytes, the manifest says {meta['bytes']}: "
                                f"the file was changed or truncated; re-export with --force")
        if verify_hashes and sha256_file(fp) != meta["sha256"]:
            raise ManifestError(f"{fp}: sha256 does not match the manifest (the file was modified); re-export with --force")
    return Manifest(root=os.path.abspath(root), data=data)


def write_manifest(root: str, data: Dict[str, Any]) -> None:
    files = {}
    for name in sorted(os.listdir(root)):
        fp = os.path.join(root, name)
        if name != MANIFEST and os.path.isfile(fp):
            files[name] = dict(bytes=os.path.getsize(fp), sha256=sha256_file(fp))
    data = dict(data, files=files)
    tmp = os.path.join(root, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, os.path.join(root, MANIFEST))
