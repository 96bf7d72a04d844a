"""The verified stamp: which artifact files were hashed and found equal to the manifest, and
the file-system identity they had then, so a later start re-hashes only what may have changed
(DESIGN.md, "Start-up: what each verify mode protects against").

A stamp is one small JSON file in the user's cache (`$VAR_SSG_CACHE`, else
`$XDG_CACHE_HOME/var-ssg`, else `~/.cache/var-ssg`), under `verified/`, named after the device
and inode of the artifacts' manifest.json. It lives outside the artifacts directory, so that
directory still holds only the files its manifest lists (the rule `export --force` relies on).
For each file it records (device, inode, size, mtime_ns, ctime_ns) and the sha256 it had. A
file is vouched for only if all five still match and the manifest lists the same sha256;
ctime cannot be set by a program (utime sets it to now), so a rewrite that restores the old
mtime is still noticed. Files under SMALL_BYTES are always hashed (they are cheap).
A cache that cannot be read or written is no error: every file is then hashed, as in full mode.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Dict, Iterable, Optional, Tuple

from var_ssg.common.files import atomic_path, open_regular

log = logging.getLogger(__name__)

VERIFY_MODES = ("stamp", "full")
SMALL_BYTES = 16 << 20          # always hashed: graphs, constants, engines' small files
STAMP_FORMAT = 1
Key = Tuple[int, int, int, int, int]


def file_key(st: os.stat_result) -> Key:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def cache_root() -> str:
    """The user's var-ssg cache: $VAR_SSG_CACHE, else $XDG_CACHE_HOME/var-ssg, else ~/.cache/var-ssg."""
    return os.environ.get("VAR_SSG_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "var-ssg")


def cache_dir() -> str:
    return os.path.join(cache_root(), "verified")


def _stamp_path(root: str, manifest: str) -> Optional[str]:
    try:
        st = os.lstat(os.path.join(root, manifest))
    except OSError:
        return None
    return os.path.join(cache_dir(), f"{st.st_dev}-{st.st_ino}.json")


def read(root: str, manifest: str) -> Dict[str, Dict]:
    """The stamp's entries for the artifacts at `root` ({} when there is none or it is unusable)."""
    path = _stamp_path(root, manifest)
    if path is None:
        return {}
    try:
        with open_regular(path, follow_symlinks=False) as f:
            data = json.loads(f.read(1 << 20).decode("utf-8"))
        entries = data["files"] if data.get("format") == STAMP_FORMAT else {}
        return entries if isinstance(entries, dict) else {}
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return {}


def vouches(entries: Dict[str, Dict], name: str, meta: Dict, st: os.stat_result) -> bool:
    """True if the stamp vouches for listed file `name` (`meta`: its manifest entry, `st`: its
    lstat now): a large file, with the identity and manifest sha256 it had when it was verified."""
    e = entries.get(name)
    return (meta["bytes"] >= SMALL_BYTES and isinstance(e, dict) and e.get("sha256") == meta["sha256"]
            and isinstance(e.get("key"), list) and tuple(e["key"]) == file_key(st))


def record(root: str, manifest: str, verified: Iterable[Tuple[str, Key, str]]) -> None:
    """Write the stamp: (name, lstat key taken BEFORE the file was hashed, its sha256) for each
    verified file. A file changed while it was hashed has a newer key, so it is not vouched for."""
    path = _stamp_path(root, manifest)
    if path is None:
        return
    data = dict(format=STAMP_FORMAT, files={name: dict(key=list(key), sha256=sha) for name, key, sha in verified})
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        with atomic_path(path) as tmp:
            with open(tmp, "w") as f:
                json.dump(data, f)
    except OSError as e:
        log.debug("verified stamp not written (%s): the next start hashes every file", e)
