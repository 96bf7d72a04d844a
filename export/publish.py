"""Publish a directory atomically under a lock: the export transaction (nothing ONNX in it).

    check_out(out)               before any work: may `out` be replaced? Only an empty directory
                                 or one holding nothing but the names an export writes, each
                                 listed in its manifest with the file's sha256 (export.owned)
    with Transaction(out) as t:  missing parents created, exclusive lock .OUT.lock (a file this
                                 module made, never a user's), a killed export's .OUT.tmp-* and
                                 .OUT.old-* removed: only those holding this module's mark
                                 (TEMP_MARK, written when it made them), never by name alone
        tmp = t.tmp_dir()        .OUT.tmp-XXXXXXXX/out beside `out` (same file system: renames are
                                 atomic); the mark sits in .OUT.tmp-XXXXXXXX, outside the artifacts
        t.commit(tmp)            `out` checked again, then swapped in; the old directory goes to
                                 .OUT.old-XXXXXXXX/old (marked too) and comes back if the swap
                                 fails; the mode of the replaced directory is kept
    On leaving: temporaries removed, the lock released; parents created for a failed export removed.
See DESIGN.md "Never delete what the user owns".
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import secrets
import shutil
import stat
import tempfile
from typing import List, Optional, Tuple

from var_ssg.common.errors import ConfigError
from var_ssg.common.text import has_control, shown
from .owned import replace_problem

log = logging.getLogger(__name__)

# What an export's lock file holds: a file at .OUT.lock with anything else is someone's own file.
LOCK_MARK = b"var-ssg export lock: removed when the export ends\n"
# What marks a temporary directory an export made (the file TEMP_MARK_NAME inside it): the only
# kind of .OUT.tmp-*/.OUT.old-* folder a later export removes.
TEMP_MARK_NAME = ".var-ssg-export-temporary"
TEMP_MARK = b"var-ssg export temporary: removed when the export ends, or by the next export of this --out\n"


class ExportError(ConfigError):
    pass


class OutBusy(ExportError):
    """Another export holds the lock on this --out."""


class OutTaken(ExportError):
    """--out holds other artifacts; replacing them needs --force."""


def split_out(out: str) -> Tuple[str, str, str]:
    """(absolute out, parent, name)."""
    if not str(out).strip():
        raise ExportError("--out is empty")
    if has_control(str(out)):
        raise ExportError(f"--out {shown(str(out))} holds a control character (a newline, tab, escape...): "
                          f"give a name without one")
    out = os.path.abspath(out)
    parent, name = os.path.split(out)
    if not name:
        raise ExportError(f"--out {out} is the file-system root: name a directory below it")
    return out, parent, name


def check_out(out: str) -> None:
    """Refuse an --out that export may not replace, before any work: --force replaces only an
    artifacts directory holding nothing but the names an export writes, each listed with its
    sha256 (export.owned), or an empty one; never user files."""
    out, parent, name = split_out(out)
    if os.path.islink(out):
        raise ExportError(f"--out {out} is a symbolic link; give the directory it points to, or another --out")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ExportError(f"--out {out} exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out):
        why = replace_problem(out)
        if why:
            raise ExportError(f"--out {out} {why}; refusing to replace it (even with --force): choose another --out")
    p = parent
    while not os.path.exists(p):        # the nearest existing ancestor must take new entries
        p = os.path.dirname(p)
    if not os.path.isdir(p) or not os.access(p, os.W_OK | os.X_OK):
        raise ExportError(f"cannot create {out}: {p} is not a writable directory (choose another --out)")
    room = os.pathconf(p, "PC_NAME_MAX") - len(".tmp-XXXXXXXX.")       # the temporary directory's name
    if len(os.fsencode(name)) > room:
        raise ExportError(f"--out name {name[:40]}... is too long ({len(os.fsencode(name))} bytes; at most {room} here)")


# ------------------------------------------------------------------------------ the lock
def _not_ours(path: str) -> ExportError:
    out = os.path.join(os.path.dirname(path), os.path.basename(path)[1:-len(".lock")])
    return ExportError(f"{path} exists and is not an export's lock (a file of yours?); an export of {out} "
                       f"locks that name: move the file away or choose another --out")


def _create_lock(path: str) -> None:
    """Make the lock file with its mark in one step (written under another name, then hard-linked):
    an export that finds the file always finds it whole."""
    tmp = f"{path}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, LOCK_MARK)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass                            # another export made it first: lock that one
    except OSError as e:                # a file system without hard links: create it in place
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
            raise
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            os.write(fd, LOCK_MARK)
            os.close(fd)
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)


def lock(parent: str, name: str) -> Tuple[int, str]:
    """Exclusive, non-blocking lock on --out: the file .NAME.lock beside it, made here (with
    LOCK_MARK) and removed on release. A file of that name that is not such a lock is refused."""
    path = os.path.join(parent, f".{name}.lock")
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            _create_lock(path)
            continue
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.EACCES, errno.EPERM):
                raise _not_ours(path) from None        # a link, a folder, a socket, not ours to open
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise _not_ours(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutBusy(f"another export is writing {os.path.join(parent, name)} (lock {path}); wait for it to "
                          f"finish or choose another --out") from None
        try:        # the previous holder may have removed the file after we opened it: lock the one there now
            same = os.path.samestat(os.fstat(fd), os.lstat(path))
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        if os.pread(fd, len(LOCK_MARK) + 1, 0) != LOCK_MARK:
            os.close(fd)
            raise _not_ours(path)
        return fd, path


def unlock(held: Tuple[int, str]) -> None:
    fd, path = held
    try:            # while still held, so no one else locks the removed file; only the file we locked
        if os.path.samestat(os.fstat(fd), os.lstat(path)):
            os.unlink(path)
    except OSError:
        pass
    os.close(fd)


# ------------------------------------------------------------------------------ leftovers, parents, swap
_STALE = re.compile(r"\.(?P<name>.+)\.(tmp|old)-[a-z0-9_]{8}")
_STALE_LOCK = re.compile(r"\.(?P<name>.+)\.lock\.[0-9a-f]{8}")


def make_temp(parent: str, prefix: str) -> str:
    """A new directory `prefix`XXXXXXXX in `parent` carrying TEMP_MARK (made before anything else
    goes in it, so a killed export leaves it marked)."""
    d = tempfile.mkdtemp(prefix=prefix, dir=parent)
    fd = os.open(os.path.join(d, TEMP_MARK_NAME), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644)
    try:
        os.write(fd, TEMP_MARK)
    finally:
        os.close(fd)
    return d


def _is_marked_temp(path: str) -> bool:
    """`path` (not followed) is a directory holding a regular file TEMP_MARK_NAME with TEMP_MARK."""
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return False
        fd = os.open(os.path.join(path, TEMP_MARK_NAME), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode) and os.pread(fd, len(TEMP_MARK) + 1, 0) == TEMP_MARK
    finally:
        os.close(fd)


def _is_lock_leftover(path: str) -> bool:
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size != len(LOCK_MARK):
            return False
        with open(path, "rb") as f:
            return f.read() == LOCK_MARK
    except OSError:
        return False


def remove_stale(parent: str, name: str) -> None:
    """Temporary directories (and lock files being made) of an export of the same --out that was
    killed (kill -9, power loss) are never cleaned by their own process; under the lock, no live
    export owns them. A folder is one only if it carries TEMP_MARK: a name alone is never enough."""
    stale = [e.path for e in os.scandir(parent) if (m := _STALE.fullmatch(e.name)) and m.group("name") == name
             and _is_marked_temp(e.path)]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    for e in os.scandir(parent):
        if (m := _STALE_LOCK.fullmatch(e.name)) and m.group("name") == name and _is_lock_leftover(e.path):
            os.unlink(e.path)
    if stale:
        log.warning("removed %d temporary director%s left by an interrupted export of %s: %s", len(stale),
                    "y" if len(stale) == 1 else "ies", os.path.join(parent, name),
                    ", ".join(os.path.basename(p) for p in stale))


def make_parents(parent: str) -> List[str]:
    """Create `parent` and its missing ancestors; returns those created, outermost first (a
    failed export removes them again)."""
    missing, p = [], parent
    while not os.path.isdir(p):
        missing.insert(0, p)
        p = os.path.dirname(p)
    created: List[str] = []
    try:
        for p in missing:
            os.mkdir(p)
            created.append(p)
    except OSError:
        remove_dirs(created)
        raise
    return created


def remove_dirs(created: List[str]) -> None:
    for p in reversed(created):         # innermost first; only while empty
        try:
            os.rmdir(p)
        except OSError:
            return


def new_mode(out: str) -> int:
    """The replaced directory keeps its mode (a user's 0700 stays 0700); a new one gets the
    umask's default, like mkdir (mkdtemp would leave 0700)."""
    if os.path.isdir(out):
        return stat.S_IMODE(os.stat(out).st_mode)
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def swap(tmp: str, out: str, parent: str, name: str) -> None:
    """Put `tmp` at `out`; old artifacts go to a trash directory first and come back on failure."""
    if not (os.path.isdir(out) and os.listdir(out)):
        os.replace(tmp, out)                # nothing there, or an empty directory: one rename
        return
    trash = make_temp(parent, f".{name}.old-")
    os.replace(out, os.path.join(trash, "old"))
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(os.path.join(trash, "old"), out)
        raise
    shutil.rmtree(trash, ignore_errors=True)


# ------------------------------------------------------------------------------ the transaction
class Transaction:
    """`with Transaction(out) as t:` ... `t.commit(t.tmp_dir())`; see the module docstring.
    `t.keep()` ends it with `out` as it is (nothing to publish, the parents stay)."""

    def __init__(self, out: str):
        self.out, self.parent, self.name = split_out(out)
        self._created: List[str] = []
        self._lock: Optional[Tuple[int, str]] = None
        self._tmps: List[str] = []
        self._done = False

    def __enter__(self) -> "Transaction":
        check_out(self.out)
        try:
            self._created = make_parents(self.parent)
            self._lock = lock(self.parent, self.name)
        except (OSError, ExportError) as e:
            remove_dirs(self._created)
            if isinstance(e, ExportError):
                raise
            raise ExportError(f"cannot create {self.out}: {e.strerror} ({e.filename})") from None
        try:
            remove_stale(self.parent, self.name)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def tmp_dir(self) -> str:
        """An empty directory beside `out` to export into (inside a marked one: make_temp)."""
        box = make_temp(self.parent, f".{self.name}.tmp-")
        self._tmps.append(box)
        tmp = os.path.join(box, "out")
        os.mkdir(tmp)
        return tmp

    def commit(self, tmp: str) -> None:
        os.chmod(tmp, new_mode(self.out))
        check_out(self.out)                 # again: --out may have changed during a long export
        swap(tmp, self.out, self.parent, self.name)
        self._done = True

    def keep(self) -> None:
        self._done = True

    def __exit__(self, *exc) -> None:
        for tmp in self._tmps:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        if self._lock is not None:
            unlock(self._lock)
            self._lock = None
        if not self._done:
            remove_dirs(self._created)
