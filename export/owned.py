"""What an export may delete (DESIGN.md "Never delete what the user owns").

    EXPORT_FILES            the fixed set of file names an export writes into --out
    replace_problem(out)    None if `out` holds nothing but those names, each listed in its var-ssg
                            manifest and matching the listed sha256; otherwise why not (one phrase)
"""
from __future__ import annotations

import json
import os
from typing import Optional

from var_ssg.common.files import open_regular, sha256_file
from var_ssg.contract.manifest import MANIFEST, artifacts_dir_problem

# Every name an export (onnx_export, trt_build, infinity_export) writes into --out; nothing else is ever ours.
EXPORT_FILES = frozenset({MANIFEST, "step_all.onnx", "decoder.onnx", "weights.bin", "scale_consts.npz",
                          "step_all.plan", "decoder.plan", "timing.cache", "text.onnx", "text.plan"})


def replace_problem(out: str) -> Optional[str]:
    """Why `out` (a non-empty directory) is not ours to replace, or None: every entry is one of
    EXPORT_FILES, the manifest is a var-ssg one listing every other entry under a plain name, and
    each file's sha256 is the listed one (a size that matches is not enough: a damaged artifact
    and someone's file of the same size look alike)."""
    why = artifacts_dir_problem(out)          # the manifest, the listing, plain regular files
    if why:
        return why
    for name in sorted(os.listdir(out)):
        if name not in EXPORT_FILES:
            return f"holds {name!r:.80}, which no export writes (not an artifact)"
    with open_regular(os.path.join(out, MANIFEST), follow_symlinks=False) as f:
        listed = json.loads(f.read().decode("utf-8"))["files"]
    for name in sorted(os.listdir(out)):
        if name == MANIFEST:
            continue
        try:
            ok = sha256_file(os.path.join(out, name), follow_symlinks=False) == listed[name]["sha256"]
        except (OSError, KeyError, TypeError):
            ok = False
        if not ok:
            return (f"holds {name!r}, whose sha256 is not the one its manifest lists (a damaged artifact or not an "
                    f"artifact; delete it yourself if it is damaged)")
    return None
