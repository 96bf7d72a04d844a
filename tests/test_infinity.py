"""Infinity (text-to-image, bitwise tokens): presets and schedules, strict loading, the eager loop
against an independent re-derivation of the official `autoregressive_infer_cfg`, SSG on bit
logits, the T5 front end."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import var_ssg.graphs.bitwise as bitwise
import var_ssg.graphs.infinity as infinity_mod
from var_ssg.common.errors import ConfigError
from var_ssg.graphs.config import make_ssg
from var_ssg.graphs.presets import get_model_preset
from var_ssg.graphs.dse import dse_matrix
from var_ssg.graphs.infinity_config import (ASPECT_TEMPLATES, INFINITY_PRESETS, PIXEL_CLASSES, InfinityRunConfig,
                                    get_infinity_preset, nearest_template, parse_aspect_ratio)
from var_ssg.graphs.infinity_generate import TextCondition, generate
from var_ssg.graphs.infinity_weights import (CheckpointError, load_infinity, load_state_dicts, meta_models, random_infinity,
                                     random_state_dicts)

TINY = "infinity-tiny"


@pytest.fixture(scope="module")
def tiny():
    cfg = get_infinity_preset(TINY)
    model, vae = random_infinity(cfg, 0)
    return cfg, model, vae


def _text(cfg, B=2, lens=(7, 3), seed=0):
    """Encoder-like states with non-zero garbage past each row's length (as T5 gives at pads)."""
    g = torch.Generator().manual_seed(seed)
    Lt = cfg.text_maxlen
    emb = torch.randn(B, Lt, cfg.text_dim, generator=g)
    mask = torch.arange(Lt)[None, :] < torch.tensor(lens)[:, None]
    return emb, mask


def _noise(cfg, sched, B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(B, h * w, cfg.d_vae, generator=g) for h, w in sched.hw]


# ---------------------------------------------------------------- presets and schedules
def test_presets_official_dims_and_exact_names():
    c2 = get_model_preset("infinity-2b")
    assert (c2.depth, c2.width, c2.num_heads, c2.head_dim, c2.text_dim) == (32, 2048, 16, 128, 2048)
    assert (c2.vae.bits, c2.d_vae, c2.V, c2.vae.patch_size, c2.pool_heads) == (32, 32, 64, 16, 16)
    c8 = get_infinity_preset("infinity-8b")
    assert (c8.depth, c8.width, c8.num_heads, c8.head_dim) == (40, 3584, 28, 128)
    assert (c8.vae.bits, c8.d_vae, c8.V, c8.vae.patch_size, c8.spatial_patchify) == (14, 56, 112, 8, True)
    # the official 8B notebook prints "model size: 8.38B" (parameters of the transformer)
    m8, _ = meta_models(c8)
    assert round(sum(p.numel() for p in m8.parameters()) / 1e9, 2) == 8.38
    for c in (c2, c8):
        s = c.schedule(1.0)
        assert s.num_scales == 13 and s.hw[-1] == (64, 64) and c.image_size(s) == (1024, 1024)
    for bad in ("infinity-2B", "infinity-2b ", "infinity", "", None):
        with pytest.raises(ConfigError) as e:
            get_infinity_preset(bad)
        assert all(n in str(e.value) for n in INFINITY_PRESETS)
    assert get_model_preset("var-d2-tiny").depth == 2      # VAR names still go to get_preset


def test_schedules_follow_the_templates():
    assert len(ASPECT_TEMPLATES) == 15
    for t, hws in ASPECT_TEMPLATES.items():
        assert len(hws) == 13 and abs(hws[-1][0] / hws[-1][1] - t) < 0.01
        for pixels, n in PIXEL_CLASSES.items():
            s = get_infinity_preset("infinity-2b").schedule(t, pixels)
            assert s.hw == hws[:n] and s.full == hws[-1]
    assert nearest_template(0.76) == 0.75 and nearest_template(1 / 3) == 0.333 and nearest_template(10) == 3.0
    assert parse_aspect_ratio("3:4") == 0.75
    for bad in ("1:0", "wide", "-1", "nan"):
        with pytest.raises(ConfigError):
            parse_aspect_ratio(bad)


def test_run_config_checks():
    run = InfinityRunConfig.constant(3, 4.0, 0.5)
    assert run.cfg == (4.0,) * 3 and run.tau == (0.5,) * 3 and run.top_k_pair == 2 and run.top_p_threshold == 0.97
    assert InfinityRunConfig.constant(3, top_k=1, top_p=0.0).top_k_pair == 1
    assert InfinityRunConfig.constant(3, top_p=0.0).top_p_threshold == 2.0
    for kw, msg in ((dict(cfg=(1.0,), tau=(1.0, 1.0)), "one value per scale"), (dict(cfg=(1e5,), tau=(1.0,)), "--cfg"),
                    (dict(cfg=(1.0,), tau=(0.0,)), "--tau"), (dict(cfg=(1.0,), tau=(1.0,), top_k=-1), "--top-k"),
                    (dict(cfg=(1.0,), tau=(1.0,), top_p=1.5), "--top-p")):
        with pytest.raises(ConfigError, match=msg):
            InfinityRunConfig(**kw)


# ---------------------------------------------------------------- weights
def test_random_weights_are_seeded():
    cfg = get_infinity_preset(TINY)
    a, av = random_state_dicts(cfg, 5)
    b, _ = random_state_dicts(cfg, 5)
    c, _ = random_state_dicts(cfg, 6)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["head.weight"], c["head.weight"])
    assert all(bool(v.ne(0).any()) for k, v in a.items() if not k.endswith("zero_k_bias"))   # biases too
    assert torch.equal(av["quantize.lfq.mask"], 2 ** torch.arange(7, -1, -1))


def test_strict_loading_round_trip_and_errors(tiny, tmp_path):
    cfg, model, vae = tiny
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    vsd = {k: v.clone() for k, v in vae.state_dict().items()}
    m2, v2 = load_state_dicts(cfg, dict(sd), dict(vsd))
    assert all(torch.equal(m2.state_dict()[k], sd[k]) for k in sd)
    assert all(torch.equal(v2.state_dict()[k], vsd[k]) for k in vsd)
    assert "block_chunks.1.module.0.sa.mat_qkv.weight" in sd and "head.weight" in sd
    # the derived buffers may be absent (filled) and stale buffers of old files are dropped
    lean = {k: v for k, v in sd.items() if not k.endswith("zero_k_bias")}
    load_state_dicts(cfg, {**lean, "attn_bias_for_masking": torch.zeros(3, 3)}, dict(vsd))
    cases = [({k: v for k, v in sd.items() if k != "head.bias"}, "missing key 'head.bias'"),
             ({**sd, "blocks.0.sa.proj.weight": torch.zeros(1)}, "unexpected key 'blocks.0.sa.proj.weight'"),
             ({**sd, "word_embed.weight": torch.zeros(cfg.width, cfg.d_vae + 1)}, "key 'word_embed.weight' has shape"),
             ({**sd, "block_chunks.0.module.0.sa.zero_k_bias": torch.ones(cfg.width)}, "zero_k_bias")]
    for bad, msg in cases:
        with pytest.raises(CheckpointError) as e:
            load_state_dicts(cfg, bad, dict(vsd), "x.pth")
        assert msg in str(e.value) and "x.pth" in str(e.value)
    with pytest.raises(CheckpointError, match="decoder.conv_out.conv.weight"):
        load_state_dicts(cfg, dict(sd), {**vsd, "decoder.conv_out.conv.weight": torch.zeros(3, 1, 3, 3)})
    # files: a plain state dict and the official VAE layout {'vae': state dict}
    torch.save(sd, tmp_path / "m.pth")
    torch.save({"vae": vsd}, tmp_path / "v.pth")
    m3, v3, src = load_infinity(cfg, str(tmp_path / "m.pth"), str(tmp_path / "v.pth"))
    assert torch.equal(m3.head.weight, model.head.weight) and torch.equal(v3.decoder.conv_in.conv.weight,
                                                                             vae.decoder.conv_in.conv.weight)
    assert not src.random
    with pytest.raises(ConfigError):
        load_infinity(cfg, str(tmp_path / "m.pth"), None)


# ---------------------------------------------------------------- the official loop, re-derived
def _off_rope_cache(cfg, sched):
    """The official precomputed table for the whole 1M schedule of the template: a 128x128 grid
    of (row·θ, col·θ) angles, the grid of each scale read at round(i·H/h), concatenated."""
    half = cfg.head_dim // 2
    inv = 1.0 / (10000.0 ** (torch.arange(0, half, 2, dtype=torch.int64).float() / half))
    t = torch.arange(128, dtype=torch.int64).float()
    fh, fw = torch.outer(t, inv), torch.outer(t, inv)
    grid = torch.cat([fh[:, None, :].expand(-1, 128, -1), fw[None, :, :].expand(128, -1, -1)], -1)
    grid = torch.stack([torch.cos(grid), torch.sin(grid)], 0)
    H, W = sched.full
    parts = []
    for ph, pw in ASPECT_TEMPLATES[sched.template]:
        idx = torch.stack([(torch.arange(ph) * (H / ph)).reshape(ph, 1).expand(ph, pw),
                           (torch.arange(pw) * (W / pw)).reshape(1, pw).expand(ph, pw)], -1).round().int().reshape(-1, 2)
        parts.append(grid[:, idx[:, 0], idx[:, 1], :])
    return torch.cat(parts, 1)                                   # 2 L half


def _off_rope(x, cache, start):
    n = x.shape[2]
    c = cache[:, start:start + n]
    xp = x.reshape(*x.shape[:-1], -1, 2)
    return torch.stack([c[0] * xp[..., 0] - c[1] * xp[..., 1], c[1] * xp[..., 0] + c[0] * xp[..., 1]], -1).reshape(x.shape)


def _off_varlen_attn(q_BnHc, kv_N2Hc, cu, scale):
    """flash_attn_varlen_kvpacked semantics: row i attends to kv[cu[i]:cu[i+1]] only."""
    outs = []
    for i in range(q_BnHc.shape[0]):
        k, v = kv_N2Hc[cu[i]:cu[i + 1]].unbind(1)                 # len H c
        a = torch.einsum("nhc,lhc->hnl", q_BnHc[i], k) * scale
        outs.append(torch.einsum("hnl,lhc->nhc", a.softmax(-1), v))
    return torch.stack(outs)                                     # B n H c


def _off_ca(ca, q_BnC, kv_compact, cu, pool):
    H = ca.num_heads
    hd = ca.mat_kv.weight.shape[0] // 2 // H
    kv = F.linear(kv_compact, ca.mat_kv.weight, torch.cat((torch.zeros_like(ca.v_bias), ca.v_bias))).view(-1, 2, H, hd)
    B = len(cu) - 1
    q = ca.mat_q.expand(B, H, hd).unsqueeze(1) if pool else ca.mat_q(q_BnC).view(B, q_BnC.shape[1], H, hd)
    o = _off_varlen_attn(q, kv, cu, 1 / math.sqrt(hd))
    return ca.proj(o.reshape(B, o.shape[1], -1))


def official_greedy(model, vae, cfg, sched, emb, mask, cfg_list, tau_list, neg=None):
    """FoundationVision/Infinity's autoregressive_infer_cfg (cfg_insertion_layer 0: CFG on
    logits, top_k=1), derived independently: packed text (each row's own tokens, the empty
    prompt = cfg_uncond[:len], or with `neg` = (states, mask) each negative prompt's own tokens
    at its own length), the fused block path (RoPE read from the scale's offset),
    logits·(1/tau) then cfg·cond + (1−cfg)·uncond, bits = argmax of each pair, codes
    (2b−1)/sqrt(d) summed with 5-D trilinear interpolation, decoder, clamp. The official
    branches on cfg: every cfg == 1 runs the B prompt rows alone (no unconditional rows at
    all); a scale with cfg == 1 among others takes the prompt rows' logits as they are."""
    B, C, eps = emb.shape[0], cfg.width, cfg.norm_eps
    lens = mask.sum(1).tolist()
    kv_c = torch.cat([emb[i, :n] for i, n in enumerate(lens)])
    with_uncond = any(c != 1 for c in cfg_list)
    if neg is None:
        lens_u = lens
        kv_u = torch.cat([model.cfg_uncond[:n] for n in lens])
    else:
        lens_u = neg[1].sum(1).tolist()
        kv_u = torch.cat([neg[0][i, :n] for i, n in enumerate(lens_u)])
    kv_compact = torch.cat((kv_c, kv_u)) if with_uncond else kv_c
    cu = np.concatenate([[0], np.cumsum(lens + lens_u if with_uncond else lens)])
    bs = 2 * B if with_uncond else B
    t = kv_compact * torch.rsqrt(kv_compact.pow(2).mean(-1, keepdim=True) + eps) * model.text_norm.weight
    sos = _off_ca(model.text_proj_for_sos.ca, None, t, cu, pool=True).squeeze(1)       # 2B D
    kv_compact = model.text_proj_for_ca(t)
    gss = model.shared_ada_lin(sos).view(-1, 1, 6, C)
    x = sos.unsqueeze(1) + model.pos_start
    rope = _off_rope_cache(cfg, sched)
    cache = [None] * cfg.depth
    vhw = [(1,) + cfg.vae_hw(hw) for hw in sched.hw]
    summed, bits_out, start = 0, [], 0
    ln = lambda z: F.layer_norm(z, (C,), eps=eps)
    for si, (h, w) in enumerate(sched.hw):
        x = x + model.lvl_embed(torch.full((bs, h * w), si))
        for i, b in enumerate(model.blocks):
            g1, g2, s1, s2, b1, b2 = (b.ada_gss + gss).unbind(2)
            xs = ln(x) * (s1 + 1) + b1
            sa = b.sa
            qkv = F.linear(xs, sa.mat_qkv.weight, torch.cat((sa.q_bias, torch.zeros_like(sa.q_bias), sa.v_bias)))
            q, k, v = qkv.view(bs, h * w, 3, cfg.num_heads, cfg.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            q = F.normalize(q, dim=-1) * sa.scale_mul_1H11.clamp_max(math.log(100)).exp()
            k = F.normalize(k, dim=-1)
            q, k = _off_rope(q, rope, start), _off_rope(k, rope, start)
            if cache[i] is not None:
                k, v = torch.cat((cache[i][0], k), 2), torch.cat((cache[i][1], v), 2)
            cache[i] = (k, v)
            o = F.scaled_dot_product_attention(q, k, v, scale=1.0).transpose(1, 2).reshape(bs, h * w, C)
            x = x + sa.proj(o) * g1
            x = x + _off_ca(b.ca, b.ca_norm(x), kv_compact, cu, pool=False)
            x = x + b.ffn.fc2(F.gelu(b.ffn.fc1(ln(x) * (s2 + 1) + b2), approximate="tanh")) * g2
        start += h * w
        sc, sh = model.head_nm.ada_lin(sos).view(-1, 1, 2, C).unbind(2)
        lg = model.head(ln(x) * (sc + 1) + sh) * (1 / tau_list[si])
        lg = cfg_list[si] * lg[:B] + (1 - cfg_list[si]) * lg[B:] if cfg_list[si] != 1 else lg[:B]
        idx = lg.reshape(B, -1, 2).argmax(-1).reshape(B, h * w, -1)           # B l d_vae
        bits_out.append(idx)
        idx = idx.reshape(B, h, w, -1)
        if cfg.spatial_patchify:
            idx = F.pixel_shuffle(idx.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
        s = 1 / math.sqrt(cfg.vae.bits)
        codes = F.normalize(idx.float() * s * 2 - s, dim=-1).unsqueeze(1).permute(0, 4, 1, 2, 3)   # B d 1 H W
        if si != len(sched.hw) - 1:
            summed = summed + F.interpolate(codes, size=vhw[-1], mode="trilinear")
            nxt = F.interpolate(summed, size=vhw[si + 1], mode="trilinear").squeeze(-3)
            if cfg.spatial_patchify:
                nxt = F.pixel_unshuffle(nxt, 2)
            x = model.word_embed(nxt.reshape(*nxt.shape[:2], -1).permute(0, 2, 1)).repeat(bs // B, 1, 1)
        else:
            summed = summed + codes
    return bits_out, summed.squeeze(-3), vae.decoder(summed.squeeze(-3)).clamp(-1, 1)


def _greedy_run(cfg, sched):
    K = sched.num_scales
    return InfinityRunConfig(cfg=tuple(2.0 + 0.5 * k for k in range(K)), tau=tuple(1.0 - 0.05 * k for k in range(K)),
                             top_k=1, top_p=0.0)


@pytest.mark.parametrize("preset,ratio", [(TINY, 1.0), (TINY, 0.75), ("infinity-tiny-patchify", 1.0)])
def test_greedy_beta0_follows_official(preset, ratio):
    cfg = get_infinity_preset(preset)
    model, vae = random_infinity(cfg, 3)
    sched = cfg.schedule(ratio)
    emb, mask = _text(cfg)
    run = _greedy_run(cfg, sched)
    with torch.no_grad():
        bits, summed, img = official_greedy(model, vae, cfg, sched, emb, mask, run.cfg, run.tau)
    out = generate(model, vae, TextCondition(emb, mask), sched, run, _noise(cfg, sched, 2), make_ssg("0", num_scales=sched.num_scales))
    for k in range(sched.num_scales):
        assert torch.equal(out.bits[k], bits[k]), k
    # the codes are summed in another order (bilinear vs trilinear kernels): float32 rounding only
    assert (out.summed - summed).abs().max() <= 1e-6
    assert (out.image - img).abs().max() <= 1e-4
    assert 0.2 < float(torch.cat([b.float().flatten() for b in bits]).mean()) < 0.8     # both values occur


@pytest.mark.parametrize("ratio", [3.0, 0.4])
def test_greedy_follows_official_on_the_extreme_templates(tiny, ratio):
    """The tallest and a wide template: RoPE positions round(i·H/h) with H/h not an integer
    (111/27 at 3.0), non-square grids at every scale but the first two."""
    cfg, model, vae = tiny
    sched = cfg.schedule(ratio)
    assert sched.template == ratio and sched.hw[-1][0] != sched.hw[-1][1]
    emb, mask = _text(cfg, seed=2)
    run = _greedy_run(cfg, sched)
    with torch.no_grad():
        bits, summed, _ = official_greedy(model, vae, cfg, sched, emb, mask, run.cfg, run.tau)
    out = generate(model, None, TextCondition(emb, mask), sched, run, _noise(cfg, sched, 2))
    assert all(torch.equal(a, b) for a, b in zip(out.bits, bits))


def test_greedy_follows_official_negative_prompt_and_cfg_one(tiny):
    """The official branches our loop folds into one graph: a negative prompt (the unconditional
    rows read its own tokens at its own length: pooled sos and cross-attention), a scale with
    cfg == 1 (the prompt rows' logits alone), and cfg == 1 everywhere (no unconditional rows
    at all); each gives the official greedy bits."""
    cfg, model, vae = tiny
    sched = cfg.schedule(1.333)
    K = sched.num_scales
    emb, mask = _text(cfg, lens=(6, 2), seed=5)
    nemb, nmask = _text(cfg, lens=(3, 9), seed=6)
    noise = _noise(cfg, sched, 2)
    cases = [(tuple(1.0 if k in (0, 3) else 2.5 + 0.25 * k for k in range(K)), None),
             ((3.0,) * K, (nemb, nmask)), ((1.0,) * K, None), ((1.0,) * K, (nemb, nmask))]
    official = []
    for cfgs, neg in cases:
        run = InfinityRunConfig(cfg=cfgs, tau=tuple(1.0 - 0.05 * k for k in range(K)), top_k=1, top_p=0.0)
        with torch.no_grad():
            bits, summed, _ = official_greedy(model, vae, cfg, sched, emb, mask, run.cfg, run.tau, neg=neg)
        tc = TextCondition(emb, mask) if neg is None else TextCondition(emb, mask, *neg)
        out = generate(model, None, tc, sched, run, noise)
        assert all(torch.equal(a, b) for a, b in zip(out.bits, bits)), (cfgs, neg is not None)
        assert (out.summed - summed).abs().max() <= 1e-6
        official.append(bits)
    # the negative prompt matters under guidance, and not at all when cfg == 1 everywhere
    assert any(not torch.equal(a, b) for a, b in zip(official[1], generate(
        model, None, TextCondition(emb, mask), sched, InfinityRunConfig(cfg=(3.0,) * K, tau=tuple(
            1.0 - 0.05 * k for k in range(K)), top_k=1, top_p=0.0), noise).bits))
    assert all(torch.equal(a, b) for a, b in zip(official[2], official[3]))


def test_planted_bugs_are_caught(tiny, monkeypatch):
    """Bit order reversed and the text mask dropped: the greedy comparison fails."""
    cfg, model, vae = tiny
    sched = cfg.schedule(1.0)
    emb, mask = _text(cfg)
    run = _greedy_run(cfg, sched)
    with torch.no_grad():
        ref, _, _ = official_greedy(model, vae, cfg, sched, emb, mask, run.cfg, run.tau)

    def differs():
        out = generate(model, None, TextCondition(emb, mask), sched, run, _noise(cfg, sched, 2))
        return any(not torch.equal(a, b) for a, b in zip(out.bits, ref))

    assert not differs()
    orig_grid = bitwise.bits_to_grid
    import var_ssg.graphs.infinity_generate as gen_mod
    monkeypatch.setattr(gen_mod, "bits_to_grid", lambda b, hw, p: orig_grid(b.flip(-1), hw, p))
    assert differs()
    monkeypatch.undo()
    monkeypatch.setattr(infinity_mod, "_masked_attention",
                        lambda q, k, v, m, s: F.scaled_dot_product_attention(q, k, v, scale=s))
    assert differs()


def test_kv_cache_matches_teacher_forcing(tiny):
    """The cached loop's CFG logits at every scale equal one block-causal forward over the whole
    sequence built from the loop's own bits (the official training forward)."""
    from var_ssg.graphs.bitwise import cfg_combine, grid_to_tokens, resize_codes
    from var_ssg.graphs.infinity_generate import _pair_text, vae_codes
    cfg, model, vae = tiny
    sched = cfg.schedule(0.75)
    emb, mask = _text(cfg)
    run = InfinityRunConfig(cfg=tuple(1.5 + k for k in range(sched.num_scales)), tau=(1.0,) * sched.num_scales)
    tc = TextCondition(emb, mask)
    out = generate(model, None, tc, sched, run, _noise(cfg, sched, 2, seed=9), keep_logits=True)
    final = sched.hw[-1]
    summed, xs = torch.zeros(2, cfg.vae.bits, *final), []
    for k in range(sched.num_scales - 1):
        summed = summed + resize_codes(vae_codes(out.bits[k], sched.hw[k], cfg.vae.bits, False), final)
        xs.append(grid_to_tokens(resize_codes(summed, sched.hw[k + 1]), False))
    with torch.no_grad():
        t2, m2 = _pair_text(model, tc)
        cond, gss, ca_kv = model.encode_text(t2, m2)
        full = model.forward_teacher(torch.cat(xs, 1).repeat(2, 1, 1), sched, cond, gss, model.text_kvs(ca_kv), m2)
    b = 0
    for k, (h, w) in enumerate(sched.hw):
        got = cfg_combine(full[:, b:b + h * w], run.cfg[k])
        assert (got - out.logits_cfg[k]).abs().max() <= 1e-5 * out.logits_cfg[k].abs().max(), k
        b += h * w


# ---------------------------------------------------------------- SSG on bit logits
def test_beta0_is_no_ssg_and_beta_follows_formula(tiny):
    cfg, model, vae = tiny
    sched = cfg.schedule(0.75)                     # rectangular grids: (4,3) -> (8,6) ...
    K = sched.num_scales
    emb, mask = _text(cfg)
    run = InfinityRunConfig.constant(K, 3.0, 1.0, top_k=0, top_p=0.97)
    tc, noise = TextCondition(emb, mask), _noise(cfg, sched, 2, seed=4)
    none = generate(model, None, tc, sched, run, noise, None, keep_logits=True)
    zero = generate(model, None, tc, sched, run, noise, make_ssg("0", num_scales=K), keep_logits=True)
    assert all(torch.equal(a, b) for a, b in zip(none.bits, zero.bits))
    assert all(torch.equal(a, b) for a, b in zip(zero.logits, zero.logits_cfg))
    on = generate(model, None, tc, sched, run, noise, make_ssg("0.8", "dct", K), keep_logits=True)
    assert torch.equal(on.bits[0], none.bits[0])                  # scale 0 has no prior
    assert sum(int((a != b).sum()) for a, b in zip(on.bits, none.bits)) > 0
    for k in range(1, K):                                          # matrix form, independent of torch.fft
        M = torch.from_numpy(dse_matrix(sched.hw[k - 1], sched.hw[k], "dct")).float()
        prior = torch.einsum("ij,bjv->biv", M, on.logits_cfg[k - 1])
        want = on.logits_cfg[k] + 0.8 * (on.logits_cfg[k] - prior)
        assert (on.logits[k] - want).abs().max() <= 1e-4 * on.logits[k].abs().max(), k


@pytest.mark.parametrize("transform", ["dct", "dft"])
def test_bit_prior_properties(transform):
    g = torch.Generator().manual_seed(0)
    B, d, src, dst = 2, 5, (4, 3), (8, 6)
    prev = torch.randn(B, src[0] * src[1], 2 * d, generator=g, dtype=torch.float64)
    prior = bitwise.bit_prior(prev, src, dst, transform)
    # the pair and the logit difference: the same SSG (DSE is linear)
    dprev = prev[..., 1::2] - prev[..., 0::2]
    dprior = bitwise.bit_prior(dprev, src, dst, transform)
    assert torch.allclose(prior[..., 1::2] - prior[..., 0::2], dprior, atol=1e-12)
    cur = torch.randn(B, dst[0] * dst[1], 2 * d, generator=g, dtype=torch.float64)
    out = bitwise.ssg(cur, prior, 0.7)
    dcur = cur[..., 1::2] - cur[..., 0::2]
    assert torch.allclose(out[..., 1::2] - out[..., 0::2], dcur + 0.7 * (dcur - dprior), atol=1e-12)
    # every channel alike = the folded matrix; a constant bit map stays that constant
    M = torch.from_numpy(dse_matrix(src, dst, transform))
    assert torch.allclose(prior, torch.einsum("ij,bjv->biv", M, prev), atol=1e-10)
    const = torch.full((1, src[0] * src[1], 2 * d), 1.5, dtype=torch.float64)
    assert torch.allclose(bitwise.bit_prior(const, src, dst, transform), torch.full((1, 48, 2 * d), 1.5, dtype=torch.float64))


def test_bit_sampler_semantics():
    """Over a pair: greedy picks the larger logit; top-p drops the minority value when its
    probability is <= 1 - top_p; otherwise bit 1 is drawn on a share sigmoid(δ/τ) of [0, 1)."""
    delta = torch.tensor([2.0, -1.0, 0.3, -3.5])             # l1 - l0
    lg = torch.stack((torch.zeros(4), delta), -1).reshape(1, 1, 8)     # one position, 4 bits
    u = torch.linspace(0, 1, 2001)[:-1]                        # one row per u
    ones = bitwise.sample_bits(lg.expand(2000, 1, 8), u.reshape(-1, 1, 1).expand(2000, 1, 4), 0.8, 2, 2.0)
    ones = ones[:, 0].float().mean(0)
    assert torch.allclose(ones, torch.sigmoid(delta / 0.8), atol=1e-3)
    greedy = bitwise.sample_bits(lg, torch.full((1, 1, 4), 0.999), 1.0, 1, 2.0)
    assert greedy.flatten().tolist() == [1, 0, 1, 0]
    p_min = torch.sigmoid(-delta.abs())                        # 0.119, 0.269, 0.426, 0.029
    kept = bitwise.sample_bits(lg, torch.full((1, 1, 4), 0.999), 1.0, 2, 0.9)   # drops p_min <= 0.1
    assert kept.flatten().tolist()[3] == 0 and bool(p_min[3] <= 0.1)
    assert kept.flatten().tolist()[:3] == [0, 1, 0]           # u near 1 lands on the minority value


def test_text_mask_and_negative_prompt(tiny):
    """Padded positions never matter; a negative prompt replaces the learned empty one."""
    cfg, model, vae = tiny
    sched = cfg.schedule(1.0)
    emb, mask = _text(cfg)
    run = InfinityRunConfig.constant(sched.num_scales, 3.0, 1.0)
    noise = _noise(cfg, sched, 2)
    a = generate(model, None, TextCondition(emb, mask), sched, run, noise)
    emb2 = torch.where(mask[..., None], emb, torch.randn_like(emb))
    b = generate(model, None, TextCondition(emb2, mask), sched, run, noise)
    assert all(torch.equal(x, y) for x, y in zip(a.bits, b.bits))
    neg = generate(model, None, TextCondition(emb, mask, emb.flip(0), mask.flip(0)), sched, run, noise)
    assert any(not torch.equal(x, y) for x, y in zip(a.bits, neg.bits))
    with pytest.raises(ValueError, match="at least one token"):
        TextCondition(emb, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="takes 256"):
        generate(model, None, TextCondition(emb[..., :100], mask), sched, run, noise)


# ---------------------------------------------------------------- T5 front end
def test_t5_front_end_tiny_local(tiny, tmp_path):
    transformers = pytest.importorskip("transformers")
    from var_ssg.graphs.infinity_text import load_t5, text_condition
    cfg, model, vae = tiny
    words = "a photo of cat dog on the red blue chair sitting under tree".split()
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0 - i * 0.1) for i, w in enumerate(words)]
    tok = transformers.T5TokenizerFast(vocab=vocab, extra_ids=0)
    t5cfg = transformers.T5Config(vocab_size=len(vocab), d_model=cfg.text_dim, d_kv=32, d_ff=64, num_layers=2,
                                  num_heads=2, decoder_start_token_id=0)
    torch.manual_seed(0)
    transformers.T5EncoderModel(t5cfg).save_pretrained(tmp_path / "t5")
    tok.save_pretrained(tmp_path / "t5")
    tokenizer, encoder = load_t5(str(tmp_path / "t5"))
    tc = text_condition(["a photo of a cat", "a red chair under the tree sitting"], tokenizer, encoder,
                        cfg.text_maxlen, negative=["", "dog"])
    assert tc.embeds.shape == (2, cfg.text_maxlen, cfg.text_dim) and tc.mask.dtype == torch.bool
    assert tc.mask.sum(1).tolist() == [6, 8]                  # words + </s>
    assert tc.neg_mask.sum(1).tolist() == [1, 2]
    sched = cfg.schedule(1.0)
    out = generate(model, vae, tc, sched, InfinityRunConfig.constant(sched.num_scales), _noise(cfg, sched, 2))
    assert out.image.shape == (2, 3, 64, 64) and bool(out.image.abs().le(1).all())
    with pytest.raises(ConfigError, match="cannot load the T5 encoder"):
        load_t5(str(tmp_path / "missing"))
