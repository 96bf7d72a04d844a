"""File checks: manifest.json read safely (a regular file by lstat, bounded size), and whether a
listed file is the one the manifest lists (lstat before any open, size, sha256)."""
from __future__ import annotations

import errno
import json
import os
import stat
from typing import Any, Optional

from var_ssg.common.files import open_regular, sha256_file
from .schema import MANIFEST, ManifestError

MAX_MANIFEST_BYTES = 64 << 20


def read_manifest(root: str) -> Any:
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

def file_problem(fp: str, meta: Any, verify_hash: bool = True) -> Optional[str]:
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
