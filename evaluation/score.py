"""Samples .npz + reference .npz → the ADM metrics (fid, sfid, is, precision, recall).

Feature extractors:
  inception  the FID Inception (evaluation/inception.py): the real metrics.
  pixels     8×8×3 block means of the pixels (192-d). For smoke tests and plumbing only: its
             numbers are NOT FID and carry other names (fd_pixels, precision_pixels, ...).
As in ADM: FID/sFID use the reference's precomputed mu/sigma (mu_s/sigma_s) when the file has
them; precision/recall always need the reference images' features; IS uses the samples only.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Callable, Dict, Optional

import numpy as np
import torch

from var_ssg.common.errors import ConfigError

from .metrics import PR_K, GaussianStats, frechet_distance, inception_score, precision_recall
from var_ssg.common.files import atomic_path

from .samples import NpzBatch

log = logging.getLogger(__name__)


class InceptionFeatures:
    name = "inception"

    def __init__(self, weights: Optional[str] = None, device: str = "cpu", batch: int = 64):
        from .inception import find_weights, load_inception
        self.weights = find_weights(weights)
        self.net = load_inception(self.weights, device)
        self.device, self.batch = device, batch
        st = os.stat(self.weights)
        self.key = f"inception:{os.path.basename(self.weights)}:{st.st_size}"

    def __call__(self, images_NHW3: np.ndarray) -> Dict[str, np.ndarray]:
        outs = [self.net(torch.from_numpy(np.ascontiguousarray(images_NHW3[i:i + self.batch])).to(self.device))
                for i in range(0, len(images_NHW3), self.batch)]
        return {k: torch.cat([o[k] for o in outs]).cpu().numpy() for k in ("pool", "spatial", "logits")}


class PixelFeatures:
    """Not FID: block-mean pixels, so the whole sweep can be smoke-tested without Inception weights."""
    name = "pixels"
    key = "pixels:8x8x3"

    def __call__(self, images_NHW3: np.ndarray) -> Dict[str, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(images_NHW3)).permute(0, 3, 1, 2).float() / 255
        return {"pool": torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1).numpy()}


def make_extractor(name: str, weights: Optional[str] = None, device: str = "cpu"):
    if name == "inception":
        return InceptionFeatures(weights, device)
    if name == "pixels":
        return PixelFeatures()
    raise ConfigError(f"unknown feature extractor {name!r}: choose inception or pixels")


def features_of(batch: NpzBatch, extractor, chunk: int = 256,
                progress: Optional[Callable[[int], None]] = None) -> Dict[str, np.ndarray]:
    parts = []
    for imgs in batch.iter_images(chunk):
        parts.append(extractor(imgs))
        if progress:
            progress(len(imgs))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def cached_features(path: str, extractor, cache_dir: Optional[str], **kw) -> Dict[str, np.ndarray]:
    """features_of(path), kept in cache_dir/<name>.<extractor>.feats.npz keyed by the file's
    size and mtime and the extractor (a reference batch is 10 000 images: compute it once)."""
    batch = NpzBatch(path)
    if not cache_dir:
        return features_of(batch, extractor, **kw)
    st = os.stat(path)
    key = json.dumps([os.path.abspath(path), st.st_size, st.st_mtime_ns, extractor.key])
    cache = os.path.join(cache_dir, f"{os.path.basename(path)}.{extractor.name}.feats.npz")
    if os.path.exists(cache):
        with np.load(cache) as z:
            if str(z["key"][0]) == key:
                return {k: z[k] for k in z.files if k != "key"}
    feats = features_of(batch, extractor, **kw)
    with atomic_path(cache) as tmp, open(tmp, "wb") as f:
        np.savez(f, key=np.array([key]), **feats)
    return feats


def score(sample_feats: Dict[str, np.ndarray], ref_feats: Optional[Dict[str, np.ndarray]],
          ref: NpzBatch, extractor_name: str) -> Dict[str, Optional[float]]:
    """The metrics dict. `ref_feats` may be None for a stats-only reference (no precision/recall)."""
    def stats(feats, kmu, ksig, kfeat):
        if extractor_name == "inception" and kmu in ref.keys:
            return GaussianStats(ref.get(kmu).astype(np.float64), ref.get(ksig).astype(np.float64))
        if ref_feats is None:
            raise ConfigError(f"{ref.path} has neither images (arr_0) nor precomputed {kmu}/{ksig}")
        return GaussianStats.of(ref_feats[kfeat])

    smp_pool = sample_feats["pool"]
    fid = frechet_distance(GaussianStats.of(smp_pool), stats(ref_feats, "mu", "sigma", "pool"))
    prec = rec = None
    if ref_feats is None:
        log.warning("%s has no images: precision and recall need them, left out", ref.path)
    elif min(len(smp_pool), len(ref_feats["pool"])) <= PR_K:
        log.warning("precision and recall need more than %d images in each set: left out", PR_K)
    else:
        prec, rec = precision_recall(ref_feats["pool"], smp_pool)
    if extractor_name == "pixels":
        return {"fd_pixels": fid, "precision_pixels": prec, "recall_pixels": rec}
    sfid = frechet_distance(GaussianStats.of(sample_feats["spatial"]), stats(ref_feats, "mu_s", "sigma_s", "spatial"))
    return {"fid": fid, "sfid": sfid, "is": inception_score(sample_feats["logits"]),
            "precision": prec, "recall": rec}


def evaluate_files(samples: str, ref: str, extractor, cache_dir: Optional[str] = None,
                   progress: Optional[Callable[[int], None]] = None) -> Dict[str, Optional[float]]:
    smp, rb = NpzBatch(samples), NpzBatch(ref)
    if len(smp) == 0:
        raise ConfigError(f"{samples} has no images (arr_0)")
    if rb.shape is not None and rb.shape[1:] != smp.shape[1:]:
        log.warning("samples are %s px, the reference %s px: the metrics compare different sizes",
                    smp.shape[1:3], rb.shape[1:3])
    ref_feats = cached_features(ref, extractor, cache_dir, progress=progress) if rb.shape is not None else None
    return score(features_of(smp, extractor, progress=progress), ref_feats, rb, extractor.name)
