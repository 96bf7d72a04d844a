"""Per-axis resampling matrices that reproduce torch's F.interpolate exactly.

They replace `mode='area'` (which the exporters lower badly) and `mode='bicubic'` with MatMuls:
for a map X (n_in x n_in), the 2-D resample is R @ X @ R.T with R (n_out x n_in).
All functions return float64 numpy arrays; callers cast.
"""
from __future__ import annotations

import math

import numpy as np


def area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Adaptive average pooling (torch 'area'): bins [floor(i*n_in/n_out), ceil((i+1)*n_in/n_out))."""
    R = np.zeros((n_out, n_in))
    for i in range(n_out):
        a = (i * n_in) // n_out
        b = -((-(i + 1) * n_in) // n_out)
        R[i, a:b] = 1.0 / (b - a)
    return R


def _cubic(t: float, A: float = -0.75):
    def near(x):   # |x| <= 1
        return ((A + 2) * x - (A + 3)) * x * x + 1

    def far(x):    # 1 < |x| < 2
        return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A
    return (far(t + 1), near(t), near(1 - t), far(2 - t))


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """torch bicubic (A=-0.75, align_corners=False, border taps clamped)."""
    R = np.zeros((n_out, n_in))
    scale = n_in / n_out
    for i in range(n_out):
        src = (i + 0.5) * scale - 0.5
        x0 = math.floor(src)
        for off, w in zip((-1, 0, 1, 2), _cubic(src - x0)):
            R[i, min(max(x0 + off, 0), n_in - 1)] += w
    return R


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """torch bilinear (align_corners=False, half-pixel centres, negative sources clamped to 0)."""
    R = np.zeros((n_out, n_in))
    scale = n_in / n_out
    for i in range(n_out):
        src = max((i + 0.5) * scale - 0.5, 0.0)
        x0 = min(math.floor(src), n_in - 1)
        x1 = min(x0 + 1, n_in - 1)
        lam = src - x0
        R[i, x0] += 1 - lam
        R[i, x1] += lam
    return R


def kron2d(Ry: np.ndarray, Rx: np.ndarray) -> np.ndarray:
    """The 2-D operator on row-major flattened maps: vec(Ry X Rx^T) = kron(Ry, Rx) vec(X)."""
    return np.kron(Ry, Rx)
