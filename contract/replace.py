"""The --force policy: which directory an export may replace (DESIGN.md "Decisions")."""
from __future__ import annotations

import os
from typing import Optional

from .filecheck import file_problem, read_manifest
from .infinity_schema import validate_infinity
from .schema import FILE_NAME, FORMAT, MANIFEST, SHA256, ManifestError, family_of, validate


def artifacts_dir_problem(root: str) -> Optional[str]:
    """None if `root` is an artifacts directory (a var-ssg manifest, any format version) that holds
    nothing but the files its manifest lists, each a plain artifact name with the listed size and
    sha256 (the size alone when the manifest is a complete one, as an export writes it: a changed
    artifact is then damage that a new export repairs): the only kind of directory export
    --force replaces. Otherwise the reason, for the error message. (A hand-made manifest naming
    someone's files does not make them artifacts.)"""
    try:
        data = read_manifest(root)
    except ManifestError:
        data = None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return "holds files that are not var-ssg artifacts (no var-ssg manifest.json)"
    listed = data.get("files") if isinstance(data.get("files"), dict) else {}
    try:        # a complete manifest as an export writes it: a file of the listed size whose hash
        (validate_infinity if family_of(data) == "infinity" else validate)(MANIFEST, data)   # differs is a damaged
        # artifact, which re-exporting repairs
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
        why = file_problem(e.path, meta, verify_hash=not complete)
        if why:
            return f"holds {e.name!r}, which {why.replace('is missing', 'vanished').split(':')[0]} (not the listed artifact)"
    return None
