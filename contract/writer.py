"""The writer: `build_manifest` computes every derived field of an export's manifest and runs the
schema on it; `write_manifest` lists and hashes the directory's files and writes manifest.json
atomically (common.files.write_json: a temporary name, then a rename)."""
from __future__ import annotations

import datetime
import os
from typing import Any, Dict, Optional

from var_ssg.common.files import sha256_file, write_json
from var_ssg.graphs.config import VARConfig, topk_bake
from .dtypes import PRECISION_DTYPES
from .schema import FORMAT, FORMAT_VERSION, KV_LAYOUT, MANIFEST, SSG_NOTE, check_manifest, config_to_json


def build_manifest(cfg: VARConfig, *, batch: int, precision: str, opset: int, transform: str, top_k: int,
                   weights: Dict[str, Any], external_data: Dict[str, int | str], step: Dict[str, Any],
                   decoder: Dict[str, Any], consts: str, tools: Dict[str, str], cache_key: str,
                   export: Dict[str, Any], quantization: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The manifest of an export (before its files are listed: write_manifest does that). The
    caller gives what only it knows (the graphs' files and inputs/outputs as exported, the
    weights' source, the options); everything derived (config, k_max, kv, per-scale profiles and
    output shapes, dynamic inputs) is computed here, and the result is validated by the schema."""
    from var_ssg.graphs.io import StepIO
    k_max = topk_bake(top_k, cfg.V)
    comp = StepIO(cfg, batch, PRECISION_DTYPES[precision])
    io = ("file", "inputs", "outputs")
    data = dict(
        format=FORMAT, format_version=FORMAT_VERSION, family="var", preset=cfg.name, config=config_to_json(cfg),
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
        data["quantization"] = quantization      # int8: contract.quantization
    check_manifest(data)
    return data

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
