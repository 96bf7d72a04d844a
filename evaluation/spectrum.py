"""The SSG paper's two spectral diagnostics, as numbers (plots: evaluation/plots.py).

1. Radial amplitude spectrum of images: per image, luma (ITU-R 601) minus its mean, |FFT2|,
   averaged over the integer radius bin r = round(|(fy, fx)|) in cycles per image, r = 0..N/2
   (the Nyquist frequency); then averaged over images. A cosine grating of f cycles per image
   peaks in bin f. Compared as a ratio: generated / reference (or with SSG / without).
2. Latent spectrum per scale: the same radial amplitude (no mean removed: the DC level is part
   of the latent) of f_hat after each scale k, averaged over batch and channels, and
   ΔlogMag_k(r) = log A_k(r) − log A_{k−1}(r): what scale k added at each frequency. Scale k's
   token map is pn_k × pn_k, so in the P × P latent it can only carry frequencies up to its
   Nyquist pn_k / 2 (cycles per latent width); SSG is about what happens around it.
"""
from __future__ import annotations

from typing import Iterable, List, Sequence

import numpy as np

LUMA = np.array([0.299, 0.587, 0.114])


def radial_bins(h: int, w: int) -> np.ndarray:
    """(h, w) integer radius of every FFT coefficient, in cycles per image (min side)."""
    fy = np.fft.fftfreq(h) * h
    fx = np.fft.fftfreq(w) * w
    return np.rint(np.hypot(fy[:, None], fx[None, :])).astype(np.int64)


def radial_profile(amp_NHW: np.ndarray) -> np.ndarray:
    """Mean over images of the mean amplitude per radius bin 0..min(H, W)//2  →  (R,)."""
    h, w = amp_NHW.shape[-2:]
    r = radial_bins(h, w)
    n_bins = min(h, w) // 2 + 1
    keep = r < n_bins                        # the corners beyond Nyquist are left out
    sums = np.bincount(r[keep], weights=amp_NHW.mean(axis=0)[keep], minlength=n_bins)
    return sums / np.bincount(r[keep], minlength=n_bins)


class ImageSpectrum:
    """Running radial amplitude spectrum of uint8 N H W 3 images (fed in chunks)."""

    def __init__(self):
        self.sum, self.n = None, 0

    def add(self, images_NHW3: np.ndarray) -> None:
        y = images_NHW3.astype(np.float64) @ LUMA                       # N H W luma
        y -= y.mean(axis=(1, 2), keepdims=True)                          # no DC: bin 0 ~ 0
        prof = radial_profile(np.abs(np.fft.fft2(y))) * len(y)
        self.sum = prof if self.sum is None else self.sum + prof
        self.n += len(y)

    @property
    def profile(self) -> np.ndarray:
        return self.sum / self.n


def image_spectrum(chunks: Iterable[np.ndarray]) -> np.ndarray:
    acc = ImageSpectrum()
    for c in chunks:
        acc.add(c)
    return acc.profile


def latent_profiles(f_hats: Sequence[np.ndarray]) -> np.ndarray:
    """K arrays B Cv P P (f_hat after each scale) → (K, P//2 + 1) mean amplitude per bin."""
    out = []
    for f in f_hats:
        f = np.asarray(f, dtype=np.float64)
        amp = np.abs(np.fft.fft2(f)).reshape(-1, *f.shape[-2:])        # (B·Cv) P P
        out.append(radial_profile(amp))
    return np.stack(out)


def latent_delta(profiles_KR: np.ndarray, floor: float = 1e-6) -> np.ndarray:
    """ΔlogMag (K−1, R): log A_k − log A_{k−1}, k = 1..K−1. Amplitudes are floored at
    `floor`·max so the constant scale-0 map (amplitude ~0 off DC) gives a finite first row."""
    a = np.maximum(profiles_KR, floor * profiles_KR.max())
    return np.diff(np.log(a), axis=0)


def nyquist_bins(patch_nums: Sequence[int]) -> List[float]:
    """Each scale's Nyquist frequency pn_k / 2 in the P × P latent's units (cycles per width)."""
    return [p / 2 for p in patch_nums]
