"""DSE: Discrete Spatial Enhancement (DESIGN.md, "SSG and DSE"), in two independent forms.

* `dse_fft`: the eager reference, with torch.fft (the DCT through the FFT of the symmetric
  extension). Works on (..., h, w) maps.
* `dse_matrix`: the whole DSE folded offline into one real (H*W x h*w) float64 matrix, built
  from explicit DCT/DFT matrices in numpy. Exported graphs use it as one MatMul;
  `dse_chain_matrices` keeps the unfolded interp -> transform -> band -> inverse chain as
  real matrices for inspection.

Band placement ("low band"): DCT, the top-left h x w block. DFT, the h frequencies nearest
zero per axis; an even grid's Nyquist bin is split in half between +n/2 and -n/2 of the fine
grid (and summed back when the coarse band is read out).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Tuple

import numpy as np

from .resample import bilinear_matrix
from .config import DSE_TRANSFORMS

if TYPE_CHECKING:       # the matrices are numpy; torch is imported by the reference's functions
    import torch

TRANSFORMS = DSE_TRANSFORMS


# ---------------------------------------------------------------- band placement, per axis
def band_embed(n: int, N: int, transform: str) -> np.ndarray:
    """E (N x n): places coarse coefficients into the fine spectrum."""
    E = np.zeros((N, n))
    if transform == "dct":
        E[:n, :n] = np.eye(n)
        return E
    for i in range(n):
        f = i if i < (n + 1) // 2 else i - n          # signed frequency
        if n % 2 == 0 and i == n // 2:                # Nyquist: split between +n/2 and -n/2
            E[n // 2, i] += 0.5
            E[N - n // 2, i] += 0.5
        else:
            E[f % N, i] = 1.0
    return E


def band_read(n: int, N: int, transform: str) -> np.ndarray:
    """R (n x N): reads the coarse band back out of a fine spectrum (R @ E = I)."""
    R = (band_embed(n, N, transform) > 0).astype(np.float64).T
    return R


def band_mask(n: int, N: int, transform: str) -> np.ndarray:
    """m (N,): 1 on the fine bins that the coarse band overwrites."""
    return (band_embed(n, N, transform).sum(1) > 0).astype(np.float64)


# ---------------------------------------------------------------- explicit transform matrices
def dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II (n x n): X = D @ x."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    D = np.cos(np.pi * k * (2 * i + 1) / (2 * n)) * np.sqrt(2.0 / n)
    D[0] /= np.sqrt(2.0)
    return D


def dft_matrix(n: int) -> np.ndarray:
    """Orthonormal DFT (complex, n x n)."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    return np.exp(-2j * np.pi * k * i / n) / np.sqrt(n)


def _axis_ops(n: int, N: int, transform: str):
    """Per-axis pieces: B (N x n) bilinear, T_n, T_N, T_N^-1, E, m."""
    if transform == "dct":
        Tn, TN = dct_matrix(n), dct_matrix(N)
        TNi = TN.T
    elif transform == "dft":
        Tn, TN = dft_matrix(n), dft_matrix(N)
        TNi = TN.conj().T
    else:
        raise ValueError(f"unknown DSE transform {transform!r}; use one of {TRANSFORMS}")
    return bilinear_matrix(n, N), Tn, TN, TNi, band_embed(n, N, transform), band_mask(n, N, transform)


def dse_matrix(src: Tuple[int, int], dst: Tuple[int, int], transform: str = "dct") -> np.ndarray:
    """The folded DSE operator: float64 (H*W, h*w) mapping a row-major flattened h x w map to
    the row-major flattened H x W prior.

    prior = T^-1 [ T(B l) - mask * T(B l) + c * E T_hw(l) ]   (c = sqrt(HW / hw))
          = B l - Re(kron(Ty^-1 My Ty By, Tx^-1 Mx Tx Bx)) l + c Re(kron(Ty^-1 Ey Ty_h, Tx^-1 Ex Tx_h)) l
    """
    (h, w), (H, W) = src, dst
    By, Tyh, TyH, TyHi, Ey, my = _axis_ops(h, H, transform)
    Bx, Txh, TxH, TxHi, Ex, mx = _axis_ops(w, W, transform)
    c = np.sqrt(H * W / (h * w))
    interp = np.kron(By, Bx)
    band_of_interp = np.kron(TyHi @ np.diag(my) @ TyH @ By, TxHi @ np.diag(mx) @ TxH @ Bx)
    coarse = np.kron(TyHi @ Ey @ Tyh, TxHi @ Ex @ Txh)
    M = interp - band_of_interp + c * coarse
    M = np.real(M) if np.iscomplexobj(M) else M
    return np.ascontiguousarray(M, dtype=np.float64)


def dse_chain_matrices(src: Tuple[int, int], dst: Tuple[int, int], transform: str = "dct") -> Dict[str, np.ndarray]:
    """The unfolded chain as real 2-D operators on flattened maps (complex ones as re/im halves):
    interp (HW x hw), fwd_re/fwd_im (HW x HW), coarse_re/coarse_im (HW x hw, includes c and the
    band placement), keep (HW,) = 1 - band mask, inv_re/inv_im (HW x HW)."""
    (h, w), (H, W) = src, dst
    By, Tyh, TyH, TyHi, Ey, my = _axis_ops(h, H, transform)
    Bx, Txh, TxH, TxHi, Ex, mx = _axis_ops(w, W, transform)
    c = np.sqrt(H * W / (h * w))
    fwd = np.kron(TyH, TxH).astype(np.complex128)
    inv = np.kron(TyHi, TxHi).astype(np.complex128)
    coarse = c * np.kron(Ey @ Tyh, Ex @ Txh).astype(np.complex128)
    return dict(interp=np.kron(By, Bx), fwd_re=fwd.real, fwd_im=fwd.imag,
                coarse_re=coarse.real, coarse_im=coarse.imag,
                keep=1.0 - np.kron(my, mx), inv_re=inv.real, inv_im=inv.imag)


# ---------------------------------------------------------------- torch.fft reference
def _dct_fft(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Orthonormal DCT-II along `dim` via the FFT of the symmetric extension."""
    import torch
    x = x.movedim(dim, -1)
    n = x.shape[-1]
    Y = torch.fft.fft(torch.cat((x, x.flip(-1)), dim=-1), dim=-1)[..., :n]
    k = torch.arange(n, dtype=x.dtype, device=x.device)
    X = (Y * torch.exp(-1j * torch.pi * k / (2 * n))).real / 2
    scale = torch.full((n,), np.sqrt(2.0 / n), dtype=x.dtype, device=x.device)
    scale[0] = np.sqrt(1.0 / n)
    return (X * scale).movedim(-1, dim)


def _idct_fft(X: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of `_dct_fft` (orthonormal DCT-III) via a length-2n inverse FFT."""
    import torch
    X = X.movedim(dim, -1)
    n = X.shape[-1]
    k = torch.arange(n, dtype=X.dtype, device=X.device)
    scale = torch.full((n,), np.sqrt(2.0 / n), dtype=X.dtype, device=X.device)
    scale[0] = np.sqrt(1.0 / n)
    Z = (X * scale) * torch.exp(1j * torch.pi * k / (2 * n))
    x = (torch.fft.ifft(Z, n=2 * n, dim=-1) * (2 * n)).real[..., :n]
    return x.movedim(-1, dim)


def forward_transform(x: torch.Tensor, transform: str) -> torch.Tensor:
    """Orthonormal 2-D transform over the last two axes (complex for the DFT)."""
    import torch
    if transform == "dct":
        return _dct_fft(_dct_fft(x, -1), -2)
    return torch.fft.fft2(x, norm="ortho")


def inverse_transform(X: torch.Tensor, transform: str) -> torch.Tensor:
    """Inverse of forward_transform (real part for the DFT)."""
    import torch
    if transform == "dct":
        return _idct_fft(_idct_fft(X, -1), -2)
    return torch.fft.ifft2(X, norm="ortho").real


def _place(P: torch.Tensor, S: torch.Tensor, transform: str) -> torch.Tensor:
    """Overwrite S's low band with the coarse spectrum P (last two dims)."""
    import torch
    h, w = P.shape[-2:]
    H, W = S.shape[-2:]
    if transform == "dct":
        S = S.clone()
        S[..., :h, :w] = P
        return S
    # DFT: index placement with the Nyquist split; E has only 0 / 0.5 / 1 entries, so this is
    # placement, not a transform.
    Ey = torch.from_numpy(band_embed(h, H, "dft")).to(S.real.dtype)
    Ex = torch.from_numpy(band_embed(w, W, "dft")).to(S.real.dtype)
    my = torch.from_numpy(band_mask(h, H, "dft")).to(S.real.dtype)
    mx = torch.from_numpy(band_mask(w, W, "dft")).to(S.real.dtype)
    keep = (1 - my[:, None] * mx[None, :])
    placed = torch.einsum("Hh,...hw,Ww->...HW", Ey.to(P.dtype), P, Ex.to(P.dtype))
    return S * keep + placed


def dse_fft(l_hw: torch.Tensor, dst: Tuple[int, int], transform: str = "dct") -> torch.Tensor:
    """DSE of (..., h, w) maps to (..., H, W), every leading index independently."""
    import torch
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown DSE transform {transform!r}; use one of {TRANSFORMS}")
    h, w = l_hw.shape[-2:]
    H, W = dst
    lead = l_hw.shape[:-2]
    x = l_hw.reshape(-1, 1, h, w)
    I = torch.nn.functional.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)
    S = forward_transform(I, transform)
    P = forward_transform(x, transform) * np.sqrt(H * W / (h * w))
    prior = inverse_transform(_place(P, S, transform), transform)
    return prior.reshape(*lead, H, W)
