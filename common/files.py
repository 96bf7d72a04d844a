"""Files: the one place that opens inputs safely and writes outputs atomically.

* `open_regular` / `sha256_file` read only regular files (a FIFO or device is refused without
  blocking or reading).

* `check_outputs` runs before any work: every path is checked (suffix, an existing directory
  to write in, not a folder/FIFO/device, a name the file system takes, no two outputs and no
  input the same file), so a bad path fails in a second, not after the whole run.
* `write_outputs` writes every file under a temporary name beside it and renames them only
  when all were written: a failure (disk full) leaves the old files and no half-written ones.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
from contextlib import contextmanager
import secrets
import stat
import threading
from typing import Callable, Iterable, Optional, Sequence, Tuple

from .errors import ConfigError
from .text import has_control, shown

Writer = Callable[[str], None]          # writes the file at the path it is given


def open_regular(path: str, follow_symlinks: bool = True):
    """Open `path` for binary reading only if it is a regular file. Opened non-blocking and
    checked with fstat, so a FIFO or device (/dev/zero) is refused without blocking or reading."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | (0 if follow_symlinks else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", path)
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def sha256_file(path: str, chunk: int = 1 << 24, follow_symlinks: bool = True,
                stop: Optional[threading.Event] = None) -> Optional[str]:
    """The file's sha256 (hex); None if `stop` was set before the end (a hash on a background
    thread that its caller no longer needs)."""
    h = hashlib.sha256()
    with open_regular(path, follow_symlinks) as f:
        while True:
            if stop is not None and stop.is_set():
                return None
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _tmp_name(path: str) -> str:
    """A short, unique temporary name in the same directory (the rename stays atomic), with the
    same suffix (writers that infer the format from it keep working)."""
    d, base = os.path.split(os.path.abspath(path))
    return os.path.join(d, f".{base[:40]}.{secrets.token_hex(4)}.tmp{os.path.splitext(base)[1]}")


def check_outputs(*outputs: Tuple[str, Optional[str], Optional[str]],
                  inputs: Iterable[Optional[str]] = ()) -> None:
    """outputs: (flag, path or None, required suffix or None). inputs: files or directories the
    run reads; writing over or into them is refused."""
    seen = {}
    ins = [os.path.realpath(p) for p in inputs if p]
    for flag, path, suffix in outputs:
        if path is None:
            continue
        if not path.strip():
            raise ConfigError(f"{flag} is empty")
        if has_control(path):
            raise ConfigError(f"{flag} {shown(path)} holds a control character (a newline, tab, escape...): "
                              f"give a name without one")
        if suffix and not path.lower().endswith(suffix):
            raise ConfigError(f"{flag} must be a {suffix} file, got {path!r}")
        real = os.path.realpath(path)                 # what collides: the file a link points to
        d, base = os.path.split(os.path.abspath(path))  # where the temporary file and the rename go
        if not os.path.isdir(d):
            raise ConfigError(f"{flag} {path}: directory {d} does not exist")
        limit = os.pathconf(d, "PC_NAME_MAX")
        if len(os.fsencode(base)) > limit:
            raise ConfigError(f"{flag} {path[:60]}...: file name too long ({len(os.fsencode(base))} bytes, at most {limit})")
        try:
            st = os.stat(path)                          # stat never opens: a FIFO does not block here
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise ConfigError(f"{flag} {path}: {e.strerror}") from None
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"{flag} {path} is a directory; give a file name")
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{flag} {path} exists and is not a regular file")
        _probe(flag, path)
        for other_flag, other in seen.items():
            if real == other or (st is not None and os.path.exists(other) and os.path.samefile(real, other)):
                raise ConfigError(f"{flag} and {other_flag} are the same file ({path}): give them different names")
        for i in ins:
            if real == i or real.startswith(i.rstrip(os.sep) + os.sep):
                raise ConfigError(f"{flag} {path} would overwrite an input ({i}): choose another name")
        seen[flag] = real


def _probe(flag: str, path: str) -> None:
    """Create and remove the temporary file the write will use: permissions, a read-only or full
    file system show up now."""
    tmp = _tmp_name(path)
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        os.unlink(tmp)
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot write there ({e.strerror})") from None


def write_outputs(items: Sequence[Tuple[Optional[str], Writer]]) -> None:
    """items: (path or None, writer). All files are written under temporary names, then renamed."""
    todo = [(path, _tmp_name(path), w) for path, w in items if path]
    try:
        for _, tmp, w in todo:
            w(tmp)
        for path, tmp, _ in todo:
            os.replace(tmp, path)
    finally:
        for _, tmp, _ in todo:
            if os.path.lexists(tmp):
                os.unlink(tmp)


@contextmanager
def atomic_path(path: str):
    """Yield a temporary name beside `path`; rename it to `path` only if the block succeeds."""
    tmp = _tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def json_writer(obj, **kw) -> Writer:
    def write(path: str) -> None:
        with open(path, "w") as f:
            json.dump(obj, f, **kw)
    return write


def write_json(path: Optional[str], obj, **kw) -> None:
    write_outputs([(path, json_writer(obj, **kw))])
