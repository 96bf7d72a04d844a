"""Calibration feeds for the quantized graphs: the model's own runs (DESIGN.md "Low precision").

The eager fp32 reference runs the calibration rows through the runtime's pipeline (the one loop:
the same noise, KV cache and feeds every backend gets); a recording backend writes what each
scale was fed, plus that scale's constants, i.e. exactly the step graph's inputs, to a folder on
disk (`FeedStore`), one feed at a time: the quantizer reads them back one at a time, so no more
than one scale's feeds (the largest: the last scale's KV past) is ever held in memory. Each run's
final latent f_hat (what the decoder reads) is kept too: it calibrates the decoder's convs.

    FeedStore root/
      00000/f_hat.npy past_kv.npy ...     feed 0: the step graph's inputs, one .npy per input
      00001/...
"""
from __future__ import annotations

import os
from typing import Dict, Iterator, List

import numpy as np

from var_ssg.graphs.io import scale_constants
from var_ssg.runtime.backends.eager import EagerBackend
from var_ssg.runtime.pipeline import Pipeline, Row

from .quantize import CalibrationConfig


class FeedStore:
    """Feed dicts written to `root` as they come (`add`) and read back lazily, one at a time
    (iteration: each pass reads the files again). Input names are the graph's, used as file names."""

    def __init__(self, root: str):
        self.root, self._n = root, 0
        os.makedirs(root, exist_ok=True)

    def add(self, feeds: Dict[str, np.ndarray]) -> None:
        d = os.path.join(self.root, f"{self._n:05d}")
        os.makedirs(d)
        for name, a in feeds.items():
            if os.sep in name or name.startswith("."):
                raise ValueError(f"a graph input named {name!r} cannot be a file name")
            np.save(os.path.join(d, name + ".npy"), np.asarray(a), allow_pickle=False)
        self._n += 1

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[Dict[str, np.ndarray]]:
        for i in range(self._n):
            d = os.path.join(self.root, f"{i:05d}")
            yield {f[:-len(".npy")]: np.load(os.path.join(d, f), allow_pickle=False) for f in sorted(os.listdir(d))}


class _Recorder:
    """A backend that runs `inner` and writes every step's feeds, as the step graph takes them,
    into `store`."""

    def __init__(self, inner: EagerBackend, batch: int, store: FeedStore):
        self.inner, self.source_note, self.store = inner, inner.source_note, store
        self.info = type(inner.info)(**{**inner.info.__dict__, "batch": batch})

    def alloc_kv(self, shape, dtype):
        return self.inner.alloc_kv(shape, dtype)

    def step(self, k, feeds, kv_out):
        rec = {n: v if isinstance(v, np.ndarray) else self.inner.host(v) for n, v in feeds.items()}
        rec.update(scale_constants(self.info.cfg, self.info.transform, k))
        self.store.add(rec)
        return self.inner.step(k, feeds, kv_out)

    def decode(self, f_hat):
        return self.inner.decode(f_hat)

    def host(self, x):
        return self.inner.host(x)

    def zeros(self, shape):
        return self.inner.zeros(shape)


def calibration_feeds(var, vae, transform: str, k_max: int, batch: int, cc: CalibrationConfig,
                      root: str) -> tuple[FeedStore, List[np.ndarray], Dict]:
    """(the step graph's feeds of every scale of every calibration run, on disk under `root`;
    each run's final latent f_hat (batch Cv P P: a last, partial run padded with its first row,
    as the pipeline pads), the decoder's calibration input; the record the manifest keeps)."""
    store = FeedStore(root)
    rec = _Recorder(EagerBackend(var, vae, transform=transform, k_max=k_max), batch, store)
    pipe = Pipeline(rec)
    rows = [Row(c, s, g) for c, s, g in cc.rows(var.cfg.num_classes)]
    f_hats = []
    for i in range(0, len(rows), batch):
        f = pipe.run_rows(rows[i:i + batch], decode=False).f_hat
        f_hats.append(np.concatenate([f, np.repeat(f[:1], batch - len(f), 0)]) if len(f) < batch else f)
    record = dict(method="MinMax", rows=[dict(class_id=r.class_id, seed=r.seed, guidance=r.guidance) for r in rows],
                  ssg_beta=str(Row(0, 0).ssg_beta), batch=batch, scales=list(range(var.cfg.num_scales)),
                  feeds=len(store))
    return store, f_hats, record
