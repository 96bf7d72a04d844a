"""DSE properties (DESIGN.md, "SSG and DSE") for both transforms on every VAR scale pair (256px and 512px), and the
folded matrix form against the torch.fft form."""
import numpy as np
import pytest
import torch

from var_ssg.graphs.dse import dse_matrix
from var_ssg.graphs.config import PATCH_NUMS_256, PATCH_NUMS_512
from var_ssg.graphs.dse import TRANSFORMS, band_read, dse_chain_matrices, dse_fft, forward_transform, inverse_transform

# every scale pair of both schedules: 256px (1→2→…→16) and 512px (1→2→3→4→6→9→13→18→24→32)
PAIRS = sorted({p for pn in (PATCH_NUMS_256, PATCH_NUMS_512) for p in zip(pn[:-1], pn[1:])})


def read_band(S, src, transform):
    """The coarse block of a fine spectrum (the inverse of DSE's band placement)."""
    (h, w), (H, W) = src, S.shape[-2:]
    Ry = torch.from_numpy(band_read(h, H, transform)).to(S.dtype)
    Rx = torch.from_numpy(band_read(w, W, transform)).to(S.dtype)
    return torch.einsum("hH,...HW,wW->...hw", Ry, S, Rx)


def apply(M, l):   # l: (n, h, w)
    H = int(round(M.shape[0] ** 0.5))
    return (torch.as_tensor(M, dtype=l.dtype) @ l.reshape(l.shape[0], -1).T).T.reshape(-1, H, H)


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("h,H", PAIRS)
def test_constant_stays_constant(transform, h, H):
    l = torch.full((1, h, h), -3.25, dtype=torch.float64)
    assert torch.allclose(dse_fft(l, (H, H), transform), torch.full((1, H, H), -3.25, dtype=torch.float64), atol=1e-12)
    assert np.allclose(dse_matrix((h, h), (H, H), transform).sum(1), 1.0, atol=1e-12)


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("h,H", PAIRS)
def test_band_limited_map_reproduced_by_low_band(transform, h, H):
    """Sample a function band-limited to the coarse grid on both grids: the prior's low band
    equals the fine samples' low band."""
    g = torch.Generator().manual_seed(h)
    if transform == "dct":   # cosines cos(pi u x) at half-pixel centres, u < h
        xs_c, xs_f = (torch.arange(h, dtype=torch.float64) + 0.5) / h, (torch.arange(H, dtype=torch.float64) + 0.5) / H
        fn = lambda x, u: torch.cos(torch.pi * u * x)  # noqa: E731
        us = range(h)
    else:                    # real trig polynomials with |u| < h/2 at pixel starts
        xs_c, xs_f = torch.arange(h, dtype=torch.float64) / h, torch.arange(H, dtype=torch.float64) / H
        fn = lambda x, u: torch.cos(2 * torch.pi * u * x + 0.3 * u)  # noqa: E731
        us = range((h + 1) // 2)
    coarse = torch.zeros(h, h, dtype=torch.float64)
    fine = torch.zeros(H, H, dtype=torch.float64)
    for u in us:
        for v in us:
            a = torch.randn((), generator=g, dtype=torch.float64)
            coarse += a * fn(xs_c.double(), u)[:, None] * fn(xs_c.double(), v)[None, :]
            fine += a * fn(xs_f.double(), u)[:, None] * fn(xs_f.double(), v)[None, :]
    prior = dse_fft(coarse[None], (H, H), transform)[0]
    got = read_band(forward_transform(prior, transform), (h, h), transform)
    want = read_band(forward_transform(fine, transform), (h, h), transform)
    assert torch.allclose(got, want, atol=1e-10)


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("h,H", PAIRS)
def test_round_trip(transform, h, H):
    l = torch.randn(4, h, h, dtype=torch.float64, generator=torch.Generator().manual_seed(h * 100 + H))
    prior = dse_fft(l, (H, H), transform)
    P = read_band(forward_transform(prior, transform), (h, h), transform) / np.sqrt(H * H / (h * h))
    back = inverse_transform(P, transform)
    assert torch.allclose(back, l, atol=1e-10)


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("h,H", PAIRS)
def test_matrix_equals_fft(transform, h, H):
    l64 = torch.randn(6, h, h, dtype=torch.float64, generator=torch.Generator().manual_seed(h * 100 + H))
    M = dse_matrix((h, h), (H, H), transform)
    assert M.dtype == np.float64 and M.shape == (H * H, h * h)
    ref = dse_fft(l64, (H, H), transform)
    assert (apply(M, l64) - ref).abs().max() <= 1e-12
    # the fp32 matrix in fp32 against the exact result: rounding grows with the h*h terms summed
    # (worst seen over 120 draws: 0.55 of eps*h*max|ref|); a wrong matrix is off by O(1)
    got = apply(M.astype(np.float32), l64.float()).double()
    assert (got - ref).abs().max() <= 4 * np.finfo(np.float32).eps * h * max(1.0, float(ref.abs().max()))


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_chain_equals_folded(transform):
    h, H = 10, 13
    c = {k: torch.from_numpy(v) for k, v in dse_chain_matrices((h, h), (H, H), transform).items()}
    l = torch.randn(h * h, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    I = c["interp"] @ l
    Sr = c["fwd_re"] @ I * c["keep"][:, None] + c["coarse_re"] @ l
    Si = c["fwd_im"] @ I * c["keep"][:, None] + c["coarse_im"] @ l
    prior = c["inv_re"] @ Sr - c["inv_im"] @ Si
    assert torch.allclose(prior, torch.from_numpy(dse_matrix((h, h), (H, H), transform)) @ l, atol=1e-12)


def test_dse_is_not_plain_interpolation():
    """The low band really comes from the coarse map (not just bilinear)."""
    from var_ssg.graphs.resample import bilinear_matrix
    M = dse_matrix((5, 5), (6, 6), "dct")
    B = np.kron(bilinear_matrix(5, 6), bilinear_matrix(5, 6))
    assert np.abs(M - B).max() > 1e-3
