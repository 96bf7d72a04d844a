"""Sample batches in ADM's .npz layout, written and read in chunks (50 000 images at 256 px are
9.8 GB: never all in memory).

    arr_0     uint8  N H W 3        (what ADM's evaluator reads)
    labels    int64  N
    settings  str    [1]            JSON: every generation setting (sample.py), so runs are comparable

The file is a function of the settings alone (fixed zip timestamps, no clock readings inside):
the same arguments give the same bytes, in one process or on any number of workers. How long
sampling took lives beside it in OUT.timing.json (`read_timing`); files written before that
carry a `timing` member (seconds, rows), which `read_timing` still reads.

Reference batches (VIRTUAL_imagenet256_labeled.npz) have arr_0 and may carry precomputed
`mu, sigma` (pool_3) and `mu_s, sigma_s` (spatial) statistics.
"""
from __future__ import annotations

import json
import os
import re
import zipfile
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from var_ssg.common.errors import ConfigError
from var_ssg.common.files import atomic_path


def parse_classes(spec: str, num_classes: int = 1000) -> List[int]:
    """'0-999', '1,5,7-9', '207' → ids in the order given, each once."""
    out: List[int] = []
    seen = set()
    for part in str(spec).replace(" ", "").split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ConfigError(f"malformed --classes {spec!r}: use ids and ranges like '0-999' or '1,5,7-9'")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if a > b:
            raise ConfigError(f"malformed --classes {spec!r}: range {a}-{b} runs backwards")
        if b >= num_classes:
            raise ConfigError(f"--classes {spec!r}: class id {b} is outside 0..{num_classes - 1}")
        out.extend(c for c in range(a, b + 1) if c not in seen)
        seen.update(range(a, b + 1))
    return out


_EPOCH = (1980, 1, 1, 0, 0, 0)        # zip's earliest date: members carry no clock reading


def _entry(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name + ".npy", date_time=_EPOCH)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    return info


def _write_member(zf: zipfile.ZipFile, name: str, arr: np.ndarray) -> None:
    with zf.open(_entry(name), "w", force_zip64=True) as f:
        np.lib.format.write_array(f, np.asarray(arr), allow_pickle=False)


def write_npz_stream(path: str, shape_NHW3: Tuple[int, ...], chunks: Iterator[np.ndarray],
                     extra: Dict[str, np.ndarray]) -> None:
    """Write arr_0 (uint8, `shape`) from chunks in order, plus small arrays, atomically."""
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open(_entry("arr_0"), "w", force_zip64=True) as f:
                np.lib.format.write_array_header_2_0(
                    f, {"descr": "|u1", "fortran_order": False, "shape": tuple(shape_NHW3)})
                n = 0
                for c in chunks:
                    f.write(np.ascontiguousarray(c, dtype=np.uint8).tobytes())
                    n += len(c)
                if n != shape_NHW3[0]:
                    raise RuntimeError(f"wrote {n} images, expected {shape_NHW3[0]}")
            for name, arr in extra.items():
                _write_member(zf, name, arr)


def settings_array(settings: Dict) -> np.ndarray:
    return np.array([json.dumps(settings, sort_keys=True)])


class NpzBatch:
    """A samples or reference .npz: small members loaded, arr_0 streamed in chunks."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: no such file")
        self.path = path
        try:
            with zipfile.ZipFile(path) as zf:
                names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
        except zipfile.BadZipFile:
            raise ConfigError(f"{path} is not an .npz file") from None
        self.keys = names
        self.shape: Optional[Tuple[int, ...]] = None
        if "arr_0" in names:
            with self._open("arr_0") as (f, shape, dtype):
                if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
                    raise ConfigError(f"{path}: arr_0 must be uint8 N x H x W x 3, got {dtype} {shape}")
                self.shape = tuple(shape)

    @contextmanager
    def _open(self, name: str):
        with zipfile.ZipFile(self.path) as zf, zf.open(name + ".npy") as f:
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise ConfigError(f"{self.path}: {name} uses .npy format {version}; re-save it with numpy")
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            if fortran:
                raise ConfigError(f"{self.path}: {name} is Fortran-ordered; re-save it C-ordered")
            yield f, shape, dtype

    def get(self, name: str) -> Optional[np.ndarray]:
        if name not in self.keys:
            return None
        with np.load(self.path, allow_pickle=False) as z:
            return z[name]

    @property
    def settings(self) -> Optional[Dict]:
        s = self.get("settings")
        return None if s is None else json.loads(str(s[0]))

    def __len__(self) -> int:
        return 0 if self.shape is None else self.shape[0]

    def iter_images(self, chunk: int = 256, limit: Optional[int] = None) -> Iterator[np.ndarray]:
        """arr_0 in chunks of `chunk` images (N H W 3 uint8), the first `limit` images only."""
        if self.shape is None:
            raise ConfigError(f"{self.path} has no images (arr_0)")
        n_total = len(self) if limit is None else min(limit, len(self))
        per = int(np.prod(self.shape[1:]))
        with self._open("arr_0") as (f, _, _):
            for i in range(0, n_total, chunk):
                n = min(chunk, n_total - i)
                buf = bytearray(f.read(n * per))          # writable, unlike bytes
                if len(buf) != n * per:
                    raise ConfigError(f"{self.path}: arr_0 is truncated")
                yield np.frombuffer(buf, dtype=np.uint8).reshape(n, *self.shape[1:])

    def images(self, limit: Optional[int] = None) -> np.ndarray:
        return np.concatenate(list(self.iter_images(limit=limit)), axis=0)


def timing_path(out: str) -> str:
    return (out[:-4] if out.endswith(".npz") else out) + ".timing.json"


def read_timing(out: str) -> Optional[Tuple[float, float]]:
    """(seconds, rows) spent sampling `out` (padding rows included), or None if not recorded."""
    try:
        with open(timing_path(out)) as f:
            t = json.load(f)
        return float(t["seconds"]), float(t["rows"])
    except (OSError, ValueError, TypeError, KeyError):
        pass
    old = NpzBatch(out).get("timing")
    return None if old is None else (float(old[0]), float(old[1]))


def diff_settings(old: Dict, new: Dict) -> Sequence[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
