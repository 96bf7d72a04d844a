"""Sampling from supplied uniform noise (DESIGN.md, "Sampling"), identical on every backend.

temperature -> top-k -> top-p (inside the top-k set) -> inverse-CDF with one u in [0, 1) per
token. Every tunable broadcasts against B n V logits, so it can be one value per row (B 1 1).
Two exportable forms, chosen by the K baked into the graph:

* sorted (`k_max` > 0): TopK(k_max) sorted descending; the run's `top_k` <= k_max masks ranks.
* bisection (`k_max` == 0, "no top-k" with V above TensorRT's TopK limit): no sort; the top-p
  threshold is found by a fixed number of bisection steps on the probability mass, then the
  inverse CDF runs over the vocabulary in id order.
"""
from __future__ import annotations

import torch

BISECT_STEPS = 24


def _inverse_cdf(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """p: ... N (unnormalised, >= 0), u: ... in [0, 1) -> index of the bin u*sum(p) falls in."""
    cdf = p.cumsum(dim=-1)
    target = u.unsqueeze(-1) * cdf[..., -1:]
    j = (cdf <= target).to(torch.int64).sum(dim=-1, keepdim=True)
    # u*total can round up to total: stay on the last bin with mass
    last = ((p > 0).to(torch.int64) * torch.arange(p.shape[-1], device=p.device)).amax(dim=-1, keepdim=True)
    return torch.minimum(j, last)


def sorted_candidates(logits, temperature, top_k, top_p, k_max: int):
    """-> (p, idx): unnormalised kept probabilities over the k_max best, sorted descending."""
    vals, idx = torch.topk(logits / temperature, k_max, dim=-1, largest=True, sorted=True)   # B n K
    rank = torch.arange(k_max, device=logits.device)
    vals = torch.where(rank < top_k, vals, torch.full_like(vals, -torch.inf))
    p = vals.softmax(dim=-1)
    keep = (p.cumsum(dim=-1) - p) < top_p                     # exclusive mass before this token
    return torch.where(keep, p, torch.zeros_like(p)), idx


def bisect_candidates(logits, temperature, top_p, steps: int = BISECT_STEPS) -> torch.Tensor:
    """-> unnormalised kept probabilities over V (vocabulary order)."""
    p = (logits / temperature).softmax(dim=-1)                # B n V
    lo = torch.zeros_like(p[..., :1])
    hi = p.amax(dim=-1, keepdim=True)
    for _ in range(steps):                                    # unrolled: no Loop op
        mid = (lo + hi) * 0.5
        mass = torch.where(p >= mid, p, torch.zeros_like(p)).sum(dim=-1, keepdim=True)
        ok = mass >= top_p
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid)
    return torch.where(p >= lo, p, torch.zeros_like(p))


def sample_with_support(logits, u, temperature, top_k, top_p, k_max: int):
    """-> (tokens B n, keep B n V): the sampled ids and the kept (top-k/top-p) set over the
    vocabulary, which the official `more_smooth` update needs. The sorted form marks every
    logit >= the smallest kept one (no scatter); the bisection form keeps {p >= threshold}."""
    if k_max > 0:
        p, idx = sorted_candidates(logits, temperature, top_k, top_p, k_max)
        tokens = idx.gather(-1, _inverse_cdf(p, u)).squeeze(-1)
        vals = (logits / temperature).gather(-1, idx)                      # B n K, descending
        last = ((p > 0).to(torch.int64).sum(dim=-1, keepdim=True) - 1).clamp_min(0)
        keep = logits / temperature >= vals.gather(-1, last)
        return tokens, keep
    p = bisect_candidates(logits, temperature, top_p)
    return _inverse_cdf(p, u).squeeze(-1), p > 0
