"""The sampler: semantics against VAR's sort-based top-k/top-p, greedy, the bisection form."""
import torch

from var_ssg.graphs.sampling import bisect_candidates, sample_with_support, sorted_candidates


def sample_sorted(logits, u, temperature, top_k, top_p, k_max):
    return sample_with_support(logits, u, temperature, top_k, top_p, k_max)[0]


def sample_bisect(logits, u, temperature, top_p):
    return sample_with_support(logits, u, temperature, None, top_p, 0)[0]


def official_keep(logits, top_k, top_p):
    """FoundationVision/VAR's filter (sample_with_top_k_top_p_), returned as a keep-mask."""
    x = logits.clone()
    if top_k > 0:
        x[x < x.topk(top_k, dim=-1)[0].amin(dim=-1, keepdim=True)] = -torch.inf
    if top_p > 0:
        s, i = x.sort(dim=-1, descending=False)
        rm = s.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        rm[..., -1:] = False
        x.masked_fill_(rm.scatter(-1, i, rm), -torch.inf)
    return torch.isfinite(x)


def support(fn, logits, n=400):
    """Which tokens fn draws at each position of logits (B, R, V) for u on an n-point grid (one
    call: each position repeated n times)."""
    B, R, V = logits.shape
    u = ((torch.arange(n) + 0.5) / n).repeat(R).expand(B, R * n)
    t = fn(logits.repeat_interleave(n, dim=1), u).view(B, R, n)
    return torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, t, True)


def scal(v, dt=torch.float32):
    return torch.tensor([v], dtype=dt)


def _randn(seed, *shape):
    """Logits from a seeded generator of their own (the test's draw never depends on the order
    tests run in, and touches no global state)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_greedy_is_argmax():
    lg = _randn(10, 2, 7, 300)
    for u in (0.0, 0.5, 0.999):
        t = sample_sorted(lg, torch.full((2, 7), u), scal(1.0), scal(1, torch.int64), scal(0.96), 50)
        assert torch.equal(t, lg.argmax(-1))


def test_sorted_support_matches_official_filter():
    lg = _randn(0, 1, 3, 200) * 2
    for top_k, top_p in ((20, 0.9), (200, 0.5), (5, 2.0), (200, 0.96)):
        p, idx = sorted_candidates(lg, scal(1.0), scal(top_k, torch.int64), scal(top_p), 200)
        got = torch.zeros_like(lg, dtype=torch.bool).scatter(-1, idx, p > 0)
        want = official_keep(lg, top_k, top_p if top_p <= 1 else 0.0)
        assert torch.equal(got, want)
        # and the sampler only ever returns kept tokens
        fn = lambda x, u: sample_sorted(x, u, scal(1.0), scal(top_k, torch.int64), scal(top_p), 200)  # noqa: E731
        assert not (support(fn, lg, 500) & ~want).any()


def test_inverse_cdf_frequencies():
    lg = torch.log(torch.tensor([[[0.5, 0.3, 0.2]]]))
    n = 1000
    u = ((torch.arange(n) + 0.5) / n).view(1, n)
    t = sample_sorted(lg.expand(1, n, 3), u, scal(1.0), scal(3, torch.int64), scal(2.0), 3)
    counts = torch.bincount(t.view(-1), minlength=3).float() / n
    assert torch.allclose(counts, torch.tensor([0.5, 0.3, 0.2]), atol=2e-3)


def test_temperature_sharpens():
    lg = _randn(11, 1, 1, 50)
    hot = support(lambda x, u: sample_sorted(x, u, scal(5.0), scal(50, torch.int64), scal(0.5), 50), lg)
    cold = support(lambda x, u: sample_sorted(x, u, scal(0.2), scal(50, torch.int64), scal(0.5), 50), lg)
    assert cold.sum() < hot.sum()


def test_bisect_keeps_the_nucleus():
    lg = _randn(1, 2, 4, 4096) * 3
    for top_p in (0.5, 0.96):
        got = bisect_candidates(lg, scal(1.0), scal(top_p)) > 0
        want = official_keep(lg, 0, top_p)
        # bisection stops within 2^-24 of the threshold: the same set up to boundary ties
        assert (got != want).sum() <= 2
        assert got.sum() >= want.sum() - 2


def test_bisect_off_keeps_everything():
    lg = _randn(12, 1, 1, 10)
    fn = lambda x, u: sample_bisect(x, u, scal(1.0), scal(2.0))  # noqa: E731
    assert support(fn, lg, 20000).all()


def test_kept_set_matches_official_filter_with_top_p():
    """sample_with_support's kept set (what more_smooth's Gumbel-softmax runs over) is the
    official top-k/top-p filter, for the sorted and the bisection forms."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 300, generator=g) * 3
    u = torch.rand(2, 5, generator=g)
    for top_k, top_p, k_max in ((50, 0.8, 64), (300, 0.9, 300), (0, 0.7, 0)):
        tokens, keep = sample_with_support(logits, u, scal(1.0), scal(max(top_k, 1), torch.int64), scal(top_p), k_max)
        assert torch.equal(keep, official_keep(logits, top_k, top_p)), (top_k, top_p)
        assert keep.gather(-1, tokens.unsqueeze(-1)).all()          # every draw is a kept token
