"""The ADM evaluation suite's metrics on feature arrays (no network involved).

Definitions follow OpenAI's guided-diffusion `evaluations/evaluator.py`, the suite VAR's and the
SSG paper's ImageNet numbers were measured with:
  FID / sFID  Fréchet distance between Gaussians fitted to features (mean, `np.cov(rowvar=False)`);
              `sqrtm(S1·S2)`, retried with `eps·I` added to both covariances when the product is
              singular, a small imaginary part dropped (a large one is an error).
  IS          exp(mean_x KL(p(y|x) || p(y))) per split of 5000 images, averaged over splits.
  precision / recall  k-NN manifolds (Kynkäänniemi et al. 2019, k = 3): a sample is "in" the
              reference manifold if its squared distance to some reference feature is <= that
              feature's squared distance to its 3rd nearest reference neighbour. Precision =
              share of samples inside the reference manifold; recall = share of references
              inside the sample manifold. Distances in float32 blocks (ADM tries float16 first;
              that can flip a few borderline points, ~1e-3 of the score).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, Tuple

import numpy as np
from scipy import linalg

log = logging.getLogger(__name__)

IS_SPLIT = 5000         # ADM: compute_inception_score(split_size=5000)
PR_K = 3                # ADM: ManifoldEstimator(nhood_sizes=(3,))
PR_BLOCK = 10000        # ADM: row/col batch size of the distance blocks (memory only)


@dataclass
class GaussianStats:
    mu: np.ndarray          # D
    sigma: np.ndarray       # D D

    @classmethod
    def of(cls, feats_ND: np.ndarray) -> "GaussianStats":
        feats_ND = np.asarray(feats_ND, dtype=np.float64)
        if feats_ND.ndim != 2 or len(feats_ND) < 2:
            raise ValueError(f"need an N x D feature array with N >= 2, got shape {feats_ND.shape}")
        return cls(feats_ND.mean(axis=0), np.cov(feats_ND, rowvar=False))


def frechet_distance(a: GaussianStats, b: GaussianStats, eps: float = 1e-6) -> float:
    """||mu_a - mu_b||² + tr(S_a) + tr(S_b) - 2 tr(sqrt(S_a S_b))."""
    mu1, mu2 = np.atleast_1d(a.mu), np.atleast_1d(b.mu)
    s1, s2 = np.atleast_2d(a.sigma), np.atleast_2d(b.sigma)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"feature sizes differ: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        # S_a S_b is (near) singular, e.g. fewer samples than feature dimensions
        log.warning("Fréchet distance: singular covariance product; adding %g to the diagonals", eps)
        off = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + off) @ (s2 + off))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Fréchet distance: imaginary component {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def inception_score(logits_NC: np.ndarray, split: int = IS_SPLIT) -> float:
    """IS from classifier logits (ADM: Inception's pool_3 times the softmax weights, no bias)."""
    logits_NC = np.asarray(logits_NC, dtype=np.float64)
    logp = logits_NC - logits_NC.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))          # log softmax, stable
    scores = []
    for i in range(0, len(logp), split):
        lp = logp[i:i + split]
        p = np.exp(lp)
        log_marginal = np.log(p.mean(axis=0, keepdims=True))
        scores.append(np.exp(np.mean(np.sum(p * (lp - log_marginal), axis=1))))
    return float(np.mean(scores))


def sq_dists(u_ND: np.ndarray, v_MD: np.ndarray) -> np.ndarray:
    """Pairwise squared Euclidean distances (N M), float32, clamped at 0 like ADM's block."""
    u = np.asarray(u_ND, dtype=np.float32)
    v = np.asarray(v_MD, dtype=np.float32)
    d = (u * u).sum(1)[:, None] - 2 * (u @ v.T) + (v * v).sum(1)[None, :]
    return np.maximum(d, 0)


def manifold_radii(feats_ND: np.ndarray, k: int = PR_K, block: int = PR_BLOCK) -> np.ndarray:
    """Squared distance of each feature to its k-th nearest neighbour in the same set (N)."""
    n = len(feats_ND)
    if n <= k:
        raise ValueError(f"precision/recall need more than k={k} features per set, got {n}")
    radii = np.empty(n, dtype=np.float32)
    for b in range(0, n, block):
        d = sq_dists(feats_ND[b:b + block], feats_ND)
        radii[b:b + block] = np.partition(d, k, axis=1)[:, k]    # index 0 is the point itself
    return radii


def precision_recall(ref_ND: np.ndarray, sample_MD: np.ndarray, k: int = PR_K,
                     block: int = PR_BLOCK) -> Tuple[float, float]:
    r_ref, r_smp = manifold_radii(ref_ND, k, block), manifold_radii(sample_MD, k, block)
    ref_in = np.zeros(len(ref_ND), dtype=bool)         # reference inside the sample manifold
    smp_in = np.zeros(len(sample_MD), dtype=bool)      # sample inside the reference manifold
    for i in range(0, len(ref_ND), block):
        for j in range(0, len(sample_MD), block):
            d = sq_dists(ref_ND[i:i + block], sample_MD[j:j + block])
            ref_in[i:i + block] |= (d <= r_smp[None, j:j + block]).any(axis=1)
            smp_in[j:j + block] |= (d <= r_ref[i:i + block, None]).any(axis=0)
    return float(smp_in.mean()), float(ref_in.mean())


def metrics_from_features(sample_ND: np.ndarray, ref_MD: np.ndarray) -> Dict[str, float]:
    """FID, precision and recall between two precomputed N x D feature arrays."""
    sample_ND, ref_MD = np.asarray(sample_ND), np.asarray(ref_MD)
    if sample_ND.ndim != 2 or ref_MD.ndim != 2 or sample_ND.shape[1] != ref_MD.shape[1]:
        raise ValueError(f"need two N x D arrays with the same D, got {sample_ND.shape} and {ref_MD.shape}")
    prec, rec = precision_recall(ref_MD, sample_ND)
    return {"fid": frechet_distance(GaussianStats.of(sample_ND), GaussianStats.of(ref_MD)),
            "precision": prec, "recall": rec}
