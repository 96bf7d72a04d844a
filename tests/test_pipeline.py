"""The eager reference: KV cache vs teacher forcing, official greedy semantics, SSG."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from var_ssg.graphs.config import SamplerConfig, make_ssg, parse_ssg_beta
from var_ssg.common.errors import ConfigError
from var_ssg.runtime.backends.eager import EagerBackend
from var_ssg.runtime.pipeline import Pipeline

GREEDY = SamplerConfig(top_k=1, top_p=0.0)


@pytest.fixture(scope="module")
def eager(tiny):
    cfg, var, vae = tiny
    return Pipeline(EagerBackend(var, vae, transform="dct", k_max=64))


def test_kv_cache_matches_teacher_forcing(tiny, eager):
    """Run the cached loop, then feed the same per-scale inputs through one full-sequence
    forward with the block-causal mask: logits agree at every scale."""
    cfg, var, vae = tiny
    res = eager.run([3, 7], seed=1, guidance=0.0, sampler=SamplerConfig(top_k=30), keep_logits=True).as_torch()
    # teacher-forcing input from the sampled tokens (VAR's idxBl_to_var_input semantics)
    B, P = 2, cfg.patch_nums[-1]
    f_hat = torch.zeros(B, cfg.Cvae, P, P)
    xs = []
    for k, pn in enumerate(cfg.patch_nums[:-1]):
        h = vae.quantize.embedding.weight[res.tokens[k]].transpose(1, 2).reshape(B, cfg.Cvae, pn, pn)
        f_hat = f_hat + vae.phi(k)(F.interpolate(h, size=(P, P), mode="bicubic"))
        nxt = cfg.patch_nums[k + 1]
        xs.append(F.interpolate(f_hat, size=(nxt, nxt), mode="area").flatten(2).transpose(1, 2))
    with torch.no_grad():
        full = var.forward_teacher(torch.tensor([3, 7]), torch.cat(xs, 1))    # 2B L V
    for k, (b, e) in enumerate(cfg.begin_ends):
        # cfg=0: the CFG logits are the conditional rows
        assert (full[:B, b:e] - res.logits_cfg[k]).abs().max() <= 1e-5, k


def official_blocks(var, x, cond, cache):
    """One scale through every block with the official per-block torch.cat KV cache (`cache`
    is updated in place) -> logits."""
    for i, blk in enumerate(var.blocks):
        past = cache[i]
        x, kk, vv = blk(x, cond, past)
        cache[i] = (kk, vv) if past is None else (torch.cat((past[0], kk), 2), torch.cat((past[1], vv), 2))
    return var.logits(x, cond)


def official_greedy(var, vae, labels, cfg_w):
    """FoundationVision/VAR's autoregressive_infer_cfg(top_k=1), derived independently:
    per-block torch.cat KV cache, t = cfg*k/(K-1), F.interpolate bicubic up / area down,
    phi chosen by the nearest of linspace(1/12, 11/12, 4) ticks to k/(K-1), decoder clamp."""
    c = var.cfg
    K, P, B = c.num_scales, c.patch_nums[-1], len(labels)
    label = torch.tensor(labels)
    cond = var.class_emb(torch.cat((label, torch.full_like(label, c.num_classes))))
    lvl_pos = var.lvl_embed(var.lvl_1L) + var.pos_1LC
    x = cond.unsqueeze(1) + var.pos_start + lvl_pos[:, :1]
    ticks = np.linspace(1 / 12, 11 / 12, 4)
    f_hat = torch.zeros(B, c.Cvae, P, P)
    cache = [None] * c.depth
    cur, toks = 0, []
    for k, pn in enumerate(c.patch_nums):
        cur += pn * pn
        lg = official_blocks(var, x, cond, cache)
        t = cfg_w * k / (K - 1)
        lg = (1 + t) * lg[:B] - t * lg[B:]
        idx = lg.argmax(-1)
        toks.append(idx)
        h = vae.quantize.embedding.weight[idx].transpose(1, 2).reshape(B, c.Cvae, pn, pn)
        phi = vae.quantize.quant_resi.qresi_ls[int(np.argmin(np.abs(ticks - k / (K - 1))))]
        if k != K - 1:
            f_hat = f_hat + phi(F.interpolate(h, size=(P, P), mode="bicubic"))
            nxt = c.patch_nums[k + 1]
            x = F.interpolate(f_hat, size=(nxt, nxt), mode="area").flatten(2).transpose(1, 2)
            x = var.word_embed(x) + lvl_pos[:, cur:cur + nxt * nxt]
            x = x.repeat(2, 1, 1)
        else:
            f_hat = f_hat + phi(h)
    img = vae.decoder(vae.post_quant_conv(f_hat)).clamp_(-1, 1).add_(1).mul_(0.5)
    return toks, img


def test_greedy_beta0_follows_official(tiny, eager):
    cfg, var, vae = tiny
    with torch.no_grad():
        toks, img = official_greedy(var, vae, [1, 999], 1.5)
    res = eager.run([1, 999], seed=123, guidance=1.5, sampler=GREEDY, ssg=make_ssg("0", "dct")).as_torch()
    for k in range(cfg.num_scales):
        assert torch.equal(res.tokens[k], toks[k]), k
    assert (res.images - img).abs().max() <= 1e-5


def test_same_seed_same_image(eager):
    a = eager.run([5], seed=7).as_torch()
    b = eager.run([5], seed=7).as_torch()
    c = eager.run([5], seed=8).as_torch()
    assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens))
    assert torch.equal(a.images, b.images)
    assert any(not torch.equal(x, y) for x, y in zip(a.tokens, c.tokens))


def test_beta0_leaves_logits_untouched(eager):
    res = eager.run([4], seed=3, ssg=make_ssg("0"), keep_logits=True).as_torch()
    for lg, lc in zip(res.logits, res.logits_cfg):
        assert torch.equal(lg, lc)


@pytest.mark.parametrize("transform", ["dct", "dft"])
def test_nonzero_beta_changes_tokens_and_follows_formula(tiny, transform):
    cfg, var, vae = tiny
    pipe = Pipeline(EagerBackend(var, vae, transform=transform, k_max=64))
    off = pipe.run([4], seed=3, ssg=make_ssg("0", transform)).as_torch()
    on = pipe.run([4], seed=3, ssg=make_ssg("1.0", transform), keep_logits=True).as_torch()
    assert sum((a != b).sum().item() for a, b in zip(off.tokens, on.tokens)) > 0
    # logits_k = l + beta (l - DSE(l_{k-1})) with the previous scale's CFG logits
    from var_ssg.graphs.dse import dse_fft
    k = 4
    pn, src = cfg.patch_nums[k], cfg.patch_nums[k - 1]
    prev = on.logits_cfg[k - 1].transpose(1, 2).reshape(1, cfg.V, src, src)
    prior = dse_fft(prev, (pn, pn), transform).reshape(1, cfg.V, -1).transpose(1, 2)
    want = on.logits_cfg[k] + 1.0 * (on.logits_cfg[k] - prior)
    assert torch.allclose(on.logits[k], want, atol=1e-5)
    assert torch.equal(on.logits[0], on.logits_cfg[0])     # scale 0 has no prior


def test_schedules():
    assert parse_ssg_beta("0") == (0.0,) * 9
    assert parse_ssg_beta("0.25") == (0.25,) * 9
    lin = parse_ssg_beta("linear:0,0.8")
    assert lin[0] == 0 and abs(lin[-1] - 0.8) < 1e-12 and len(lin) == 9
    assert parse_ssg_beta(",".join(["0.1"] * 9)) == (0.1,) * 9


@pytest.mark.parametrize("bad", ["", "abc", "linear:1", "linear:a,b", "0.1,0.2", "nan", "inf", "linear:0,inf"])
def test_bad_schedule_shows_accepted_forms(bad):
    with pytest.raises(ConfigError, match="accepted --ssg-beta forms: '0' \\(off\\), a float"):
        parse_ssg_beta(bad)


def test_bad_run_inputs(eager):
    with pytest.raises(ConfigError, match="outside 0..999"):
        eager.run([1000], seed=0)
    with pytest.raises(ConfigError, match="--cfg must be a finite"):
        eager.run([1], seed=0, guidance=float("nan"))


def test_unconditional_class_follows_official(tiny, eager):
    """Class -1 is the official unconditional label (num_classes) in both CFG rows."""
    cfg, var, vae = tiny
    with torch.no_grad():
        toks, img = official_greedy(var, vae, [cfg.num_classes, 5], 1.5)
    res = eager.run([-1, 5], seed=0, guidance=1.5, sampler=GREEDY, ssg=make_ssg("0", "dct")).as_torch()
    for k in range(cfg.num_scales):
        assert torch.equal(res.tokens[k], toks[k]), k
    assert (res.images - img).abs().max() <= 1e-5
    with pytest.raises(ConfigError, match=r"outside 0..999 \(or -1 for unconditional\)"):
        eager.run([-2], seed=0)


def official_smooth(var, vae, label, cfg_w, top_k, gumbels):
    """autoregressive_infer_cfg(more_smooth=True, top_k=top_k, top_p=0) derived independently:
    the logits are top-k filtered in place (-inf), and f_hat takes
    gumbel_softmax(filtered * (1 + r), tau = max(0.27 (1 - 0.95 r), 0.005)) @ codebook, with the
    Gumbel noise given (the official code draws it from its rng)."""
    c = var.cfg
    K, P = c.num_scales, c.patch_nums[-1]
    lab = torch.tensor([label])
    cond = var.class_emb(torch.cat((lab, torch.full_like(lab, c.num_classes))))
    lvl_pos = var.lvl_embed(var.lvl_1L) + var.pos_1LC
    x = cond.unsqueeze(1) + var.pos_start + lvl_pos[:, :1]
    ticks = np.linspace(1 / 12, 11 / 12, 4)
    f_hat = torch.zeros(1, c.Cvae, P, P)
    cache, cur = [None] * c.depth, 0
    for k, pn in enumerate(c.patch_nums):
        r = k / (K - 1)
        cur += pn * pn
        lg = official_blocks(var, x, cond, cache)
        lg = (1 + cfg_w * r) * lg[:1] - cfg_w * r * lg[1:]
        lg = lg.masked_fill(lg < lg.topk(top_k, dim=-1)[0].amin(-1, keepdim=True), -torch.inf)
        soft = ((lg * (1 + r) + gumbels[k]) / max(0.27 * (1 - r * 0.95), 0.005)).softmax(-1)
        h = (soft @ vae.quantize.embedding.weight).transpose(1, 2).reshape(1, c.Cvae, pn, pn)
        phi = vae.quantize.quant_resi.qresi_ls[int(np.argmin(np.abs(ticks - r)))]
        if k != K - 1:
            f_hat = f_hat + phi(F.interpolate(h, size=(P, P), mode="bicubic"))
            nxt = c.patch_nums[k + 1]
            x = F.interpolate(f_hat, size=(nxt, nxt), mode="area").flatten(2).transpose(1, 2)
            x = (var.word_embed(x) + lvl_pos[:, cur:cur + nxt * nxt]).repeat(2, 1, 1)
        else:
            f_hat = f_hat + phi(h)
    return vae.decoder(vae.post_quant_conv(f_hat)).clamp_(-1, 1).add_(1).mul_(0.5)


def test_more_smooth_follows_official(tiny, eager):
    from var_ssg.runtime.noise import draw_row_noise
    cfg, var, vae = tiny
    _, gumbel = draw_row_noise(11, cfg.patch_nums, cfg.V, smooth=True)
    with torch.no_grad():
        img = official_smooth(var, vae, 7, 1.5, 20, [torch.from_numpy(g).unsqueeze(0) for g in gumbel])
    res = eager.run([7], seed=11, guidance=1.5, sampler=SamplerConfig(top_k=20, top_p=0.0),
                    ssg=make_ssg("0", "dct"), more_smooth=True).as_torch()
    # 1/tau (up to 74 at the last scale) amplifies float32 rounding; the mean shows it is rounding
    d = (res.images - img).abs()
    assert d.max() <= 5e-3 and d.mean() <= 1e-4
    plain = eager.run([7], seed=11, guidance=1.5, sampler=SamplerConfig(top_k=20, top_p=0.0), ssg=make_ssg("0", "dct")).as_torch()
    assert (plain.images - img).abs().mean() > 100 * d.mean()          # the smooth path is really taken


def test_an_image_depends_only_on_its_own_row(eager):
    """Per-row noise: the same request gives the same pixels in any slot of any batch."""
    from var_ssg.runtime.pipeline import Row
    a = Row(5, 42, 2.0, "linear:0.1,0.5", 30, 0.9, 1.2)
    alone = eager.run_rows([a]).as_torch()
    mixed = eager.run_rows([Row(9, 1, 1.0, "0", 10, 0.5, 0.7), a, Row(3, 7, more_smooth=True)]).as_torch()
    assert all(torch.equal(x[0], y[1]) for x, y in zip(alone.tokens, mixed.tokens))
    # same tokens; pixels equal up to the float order of a batch-1 vs batch-3 matmul
    assert (alone.images[0] - mixed.images[1]).abs().max() <= 1e-5


def test_row_noise_is_torchs_stream_below_2_32_and_its_own_above():
    """A seed below 2**32 draws torch.rand's uniforms from manual_seed(seed), bit for bit (the
    images earlier versions made); every 64-bit seed has its own stream (torch's would repeat
    every 2**32), and a more_smooth row's Gumbel noise comes from a stream of its own."""
    from var_ssg.graphs.config import SEED_MAX, get_preset
    from var_ssg.runtime.noise import GUMBEL_STREAM, draw_row_noise, uniforms
    pn = get_preset("var-d16").patch_nums
    for seed in (0, 1, 123456789, 2 ** 32 - 1):
        g = torch.Generator().manual_seed(seed)
        got, gum = draw_row_noise(seed, pn, 4096, smooth=False)
        assert gum is None and all(a.dtype == np.float32 and a.shape == (p * p,) for a, p in zip(got, pn))
        assert all(np.array_equal(a, torch.rand(p * p, generator=g).numpy()) for a, p in zip(got, pn)), seed
    streams = {seed: uniforms(seed, [680])[0] for seed in (1, 2 ** 32 + 1, 2 ** 33 + 1, 2 ** 40 + 7, SEED_MAX)}
    assert len({a.tobytes() for a in streams.values()}) == len(streams)
    assert all(0 <= a.min() and a.max() < 1 for a in streams.values())
    u, gum = draw_row_noise(5, pn, 64, smooth=True)
    base = uniforms(5 + GUMBEL_STREAM, [64])[0]
    assert not np.array_equal(base[:1], u[0])                   # not the token stream
    want = (-np.log(-np.log(np.clip(base.astype(np.float64), 1e-20, 1.0)))).astype(np.float32)
    assert gum[0].shape == (1, 64) and gum[0].dtype == np.float32 and np.array_equal(gum[0][0], want)


def test_smooth_tau_is_the_official_temperature_in_both_forms():
    """graphs.step.smooth_tau, used by the exported step (tensor) and by the parity bound (float):
    both forms are max(0.27 (1 - 0.95 r), 0.005)."""
    from var_ssg.graphs.step import smooth_tau
    for r, want in ((0.0, 0.27), (0.5, 0.27 * 0.525), (1.0, 0.0135), (1.2, 0.005)):
        assert smooth_tau(r) == pytest.approx(want, rel=1e-12)
        assert float(smooth_tau(torch.tensor(r, dtype=torch.float64))) == pytest.approx(want, rel=1e-12)
