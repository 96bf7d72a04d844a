"""VAR-d36 at 512px: presets, the official state-dict layout with shared AdaLN (checked on the
meta device, no 9 GB), clear errors for 256px files, greedy inference against an independent
re-derivation of the official autoregressive_infer_cfg, and DSE on the 512px scale pairs.

Official facts used here (FoundationVision/VAR): utils/arg_util.py `--pn 512` ->
1_2_3_4_6_9_13_18_24_32; README trains d36 with `--depth=36 --saln=1 --pn=512` (2.3B params,
var_d36.pth, same vae_ch160v4096z32.pth); models/__init__.py build_vae_var: width 64*depth,
heads = depth, norm_eps 1e-6, attn_l2_norm (train.py default anorm=True), 1000 classes;
models/var.py: `shared_ada_lin = Sequential(SiLU, SharedAdaLin(D, 6C))` -> B 1 6 C, computed once
per step and given to every block; head_nm keeps its own ada_lin on the class embedding;
models/basic_var.py: with shared_aln a block holds `ada_gss` (1, 1, 6, C), no ada_lin, and
modulates with (ada_gss + shared).unbind(2) = gamma1, gamma2, scale1, scale2, shift1, shift2.
"""
import dataclasses
import inspect
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from var_ssg.graphs.config import PATCH_NUMS_512, SamplerConfig, get_preset, make_ssg
from var_ssg.common.errors import ConfigError
from var_ssg.graphs.var import VAR
from var_ssg.graphs.vqvae import VQVAE
from var_ssg.graphs.weights import CheckpointError, check_state_dict, load_models, official_files, random_state_dicts
from var_ssg.runtime.backends.eager import EagerBackend
from var_ssg.runtime.pipeline import Pipeline
from tests.test_checkpoint import official_var_keys

PATCH_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)      # written out, not imported: the official list


def meta_state_dict(shapes):
    """A state dict of meta tensors: shapes without memory (var_d36 is 9 GB in fp32)."""
    return {k: torch.empty(s, device="meta", dtype=torch.int64 if k == "lvl_1L" else torch.float32)
            for k, s in shapes.items()}


def meta_var(name):
    with torch.device("meta"):
        return VAR(get_preset(name))


# ------------------------------------------------------------------ presets and the d36 layout
def test_d36_preset_is_the_official_512px_model():
    c = get_preset("var-d36")
    assert (c.depth, c.width, c.num_heads, c.head_dim) == (36, 2304, 36, 64)
    assert c.patch_nums == PATCH_512 == PATCH_NUMS_512 and c.L == 2240 and c.vae.image_size == 512
    assert c.shared_aln and c.attn_l2_norm and c.norm_eps == 1e-6 and c.num_classes == 1000 and c.mlp_ratio == 4
    assert c.vae.vocab_size == 4096 and c.vae.z_channels == 32 and c.vae.ch == 160
    assert dataclasses.replace(get_preset("var-d36-512"), name="var-d36") == c
    assert official_files(c) == ("var_d36.pth", "vae_ch160v4096z32.pth")
    # the 256px family is unchanged; -512 and -tiny compose
    d30 = get_preset("var-d30")
    assert d30.patch_nums == PATCH_256 and d30.L == 680 and not d30.shared_aln
    t = get_preset("var-d2-512-tiny")
    assert t.patch_nums == PATCH_512 and t.shared_aln and t.V == 64 and t.vae.image_size == 512
    assert get_preset("var-d36-tiny").patch_nums == PATCH_512


def test_presets_without_published_weights_say_so():
    with pytest.raises(CheckpointError, match="no published checkpoint for var-d16-512"):
        official_files(get_preset("var-d16-512"))
    with pytest.raises(ConfigError, match="valid presets: .*var-d36 .*var-dN-512"):
        get_preset("var-d36-256")


def test_d36_offline_download_names_its_files(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    with pytest.raises(CheckpointError, match="--ckpt var_d36.pth --vae-ckpt vae_ch160v4096z32.pth"):
        load_models(get_preset("var-d36"))


def test_d36_official_layout_loads_strictly_on_meta():
    var = meta_var("var-d36")
    want = official_var_keys(36, PATCH_512, shared_aln=True)
    assert {k: tuple(v.shape) for k, v in var.state_dict().items()} == want
    sd = meta_state_dict(want)
    check_state_dict(var, sd, "var_d36.pth", "VAR", "var-d36")
    res = var.load_state_dict(sd, strict=True, assign=True)
    assert not res.missing_keys and not res.unexpected_keys
    # README: VAR-d36 has 2.3B parameters (per-block AdaLN would make it 3.4B)
    n = sum(p.numel() for p in var.parameters())
    assert 2.3e9 <= n < 2.4e9, n
    # one VQVAE file serves both resolutions: same keys and shapes
    with torch.device("meta"):
        v512, v256 = VQVAE(get_preset("var-d36").vae), VQVAE(get_preset("var-d30").vae)
    assert {k: v.shape for k, v in v512.state_dict().items()} == {k: v.shape for k, v in v256.state_dict().items()}


def test_256px_d30_file_for_d36_names_the_mismatch():
    sd = meta_state_dict(official_var_keys(30, PATCH_256, shared_aln=False))
    with pytest.raises(CheckpointError, match=r"var_d30.pth: missing key 'shared_ada_lin.1.weight'.*"
                       r"looks like var-d30 for 256px \(pos_1LC for 680 tokens\) with per-block AdaLN.*"
                       r"the preset var-d36 is for 512px \(pos_1LC for 2240 tokens\) with shared AdaLN.*"
                       r"pass --model var-d30"):
        check_state_dict(meta_var("var-d36"), sd, "var_d30.pth", "VAR", "var-d36")
    # and the other way round, through real files
    sd36 = meta_state_dict(official_var_keys(36, PATCH_512, shared_aln=True))
    with pytest.raises(CheckpointError, match=r"looks like var-d36 for 512px.*preset var-d30 is for 256px.*--model var-d36"):
        check_state_dict(meta_var("var-d30"), sd36, "var_d36.pth", "VAR", "var-d30")


def test_256px_tiny_file_for_512px_preset_fails_through_load_models(tmp_path):
    var_sd, vae_sd = random_state_dicts(get_preset("var-d2-tiny"), 1)
    torch.save(var_sd, tmp_path / "v.pth")
    torch.save(vae_sd, tmp_path / "q.pth")
    with pytest.raises(CheckpointError, match=r"v.pth: .*256px .*per-block AdaLN.*preset var-d2-512-tiny is for 512px"):
        load_models(get_preset("var-d2-512-tiny"), str(tmp_path / "v.pth"), str(tmp_path / "q.pth"))


def test_depth_hint_still_works_within_512px_family():
    sd = meta_state_dict(official_var_keys(20, PATCH_512, shared_aln=True))
    with pytest.raises(CheckpointError, match=r"looks like var-d20 but the preset is var-d36 \(pass --model var-d20\)"):
        check_state_dict(meta_var("var-d36"), sd, "x.pth", "VAR", "var-d36")


# ------------------------------------------------------------------ official inference, shared AdaLN
def official_greedy_shared(sd, vae, labels, cfg_w, patch_nums, num_classes=1000):
    """autoregressive_infer_cfg(top_k=1) of FoundationVision/VAR with shared_aln=True, written
    from the state-dict tensors (not graphs/var.py): shared_ada_lin once per step, each block
    (ada_gss + shared).unbind(2), l2-normed attention with scale 1 over a torch.cat KV cache,
    head AdaLN on the class embedding, t = cfg*k/(K-1), bicubic up / area down, phi by nearest
    tick, decoder clamp."""
    C = sd["class_emb.weight"].shape[1]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    H, hd = C // 64, 64
    K, P, B = len(patch_nums), patch_nums[-1], len(labels)
    label = torch.tensor(labels)
    cond = sd["class_emb.weight"][torch.cat((label, torch.full_like(label, num_classes)))]    # 2B C
    gss = F.linear(F.silu(cond), sd["shared_ada_lin.1.weight"], sd["shared_ada_lin.1.bias"]).view(-1, 1, 6, C)
    lvl_1L = torch.cat([torch.full((p * p,), i) for i, p in enumerate(patch_nums)])
    lvl_pos = sd["lvl_embed.weight"][lvl_1L].unsqueeze(0) + sd["pos_1LC"]                     # 1 L C
    x = cond.unsqueeze(1) + sd["pos_start"] + lvl_pos[:, :1]
    ln = lambda t: F.layer_norm(t, (C,), eps=1e-6)  # noqa: E731
    ticks = np.linspace(1 / 12, 11 / 12, 4)
    f_hat = torch.zeros(B, vae.cfg.z_channels, P, P)
    cache = [None] * depth
    cur, toks = 0, []
    for k, pn in enumerate(patch_nums):
        cur += pn * pn
        for i in range(depth):
            b = f"blocks.{i}."
            g1, g2, s1, s2, sh1, sh2 = (sd[b + "ada_gss"] + gss).unbind(2)
            bias = torch.cat((sd[b + "attn.q_bias"], torch.zeros(C), sd[b + "attn.v_bias"]))
            qkv = F.linear(ln(x) * (s1 + 1) + sh1, sd[b + "attn.mat_qkv.weight"], bias)
            q, kk, vv = qkv.view(2 * B, -1, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
            q = F.normalize(q, dim=-1) * sd[b + "attn.scale_mul_1H11"].clamp_max(math.log(100)).exp()
            kk = F.normalize(kk, dim=-1)
            if cache[i] is not None:
                kk, vv = torch.cat((cache[i][0], kk), 2), torch.cat((cache[i][1], vv), 2)
            cache[i] = (kk, vv)
            o = F.scaled_dot_product_attention(q, kk, vv, scale=1.0).transpose(1, 2).reshape(2 * B, -1, C)
            x = x + F.linear(o, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"]) * g1
            h = F.linear(ln(x) * (s2 + 1) + sh2, sd[b + "ffn.fc1.weight"], sd[b + "ffn.fc1.bias"])
            x = x + F.linear(F.gelu(h, approximate="tanh"), sd[b + "ffn.fc2.weight"], sd[b + "ffn.fc2.bias"]) * g2
        scale, shift = F.linear(F.silu(cond), sd["head_nm.ada_lin.1.weight"],
                                sd["head_nm.ada_lin.1.bias"]).view(-1, 1, 2, C).unbind(2)
        lg = F.linear(ln(x) * (scale + 1) + shift, sd["head.weight"], sd["head.bias"])
        t = cfg_w * k / (K - 1)
        idx = ((1 + t) * lg[:B] - t * lg[B:]).argmax(-1)
        toks.append(idx)
        h = vae.quantize.embedding.weight[idx].transpose(1, 2).reshape(B, -1, pn, pn)
        phi = vae.quantize.quant_resi.qresi_ls[int(np.argmin(np.abs(ticks - k / (K - 1))))]
        if k != K - 1:
            f_hat = f_hat + phi(F.interpolate(h, size=(P, P), mode="bicubic"))
            nxt = patch_nums[k + 1]
            x = F.interpolate(f_hat, size=(nxt, nxt), mode="area").flatten(2).transpose(1, 2)
            x = (F.linear(x, sd["word_embed.weight"], sd["word_embed.bias"]) + lvl_pos[:, cur:cur + nxt * nxt]).repeat(2, 1, 1)
        else:
            f_hat = f_hat + phi(h)
    return toks, vae.decoder(vae.post_quant_conv(f_hat)).clamp(-1, 1).add(1).mul(0.5)


def run_guided(pipe, classes, seed, w, **kw):
    """Pipeline.run takes the guidance weight as `cfg=`; the main branch may rename it `guidance=`."""
    name = "guidance" if "guidance" in inspect.signature(pipe.run).parameters else "cfg"
    return pipe.run(classes, seed, **{name: w}, **kw).as_torch()


@pytest.fixture(scope="module")
def saved_512(tmp_path_factory):
    """var-d2-512-tiny weights in the official format, with AdaLN made strong enough that a
    wrong modulation changes tokens (random init keeps gammas near zero)."""
    cfg = get_preset("var-d2-512-tiny")
    var_sd, vae_sd = random_state_dicts(cfg, 11)
    g = torch.Generator().manual_seed(12)
    C = cfg.width
    var_sd["shared_ada_lin.1.weight"] = torch.randn(6 * C, C, generator=g) / math.sqrt(C)
    var_sd["shared_ada_lin.1.bias"] = torch.randn(6 * C, generator=g) * 0.3
    for i in range(cfg.depth):
        var_sd[f"blocks.{i}.ada_gss"] = torch.randn(1, 1, 6, C, generator=g) * 0.3
    d = tmp_path_factory.mktemp("d512")
    torch.save(var_sd, d / "var_d2_512.pth")
    torch.save(vae_sd, d / "vae.pth")
    return cfg, d


@pytest.mark.slow          # a whole 512px run beside the official code
def test_greedy_512px_shared_aln_follows_official(saved_512):
    cfg, d = saved_512
    var, vae, _ = load_models(cfg, str(d / "var_d2_512.pth"), str(d / "vae.pth"))
    sd = torch.load(d / "var_d2_512.pth", weights_only=True)
    labels = [1, 999]
    with torch.no_grad():
        toks, img = official_greedy_shared(sd, vae, labels, 1.5, PATCH_512)
    pipe = Pipeline(EagerBackend(var, vae, transform="dct", k_max=64))
    res = run_guided(pipe, labels, 123, 1.5, sampler=SamplerConfig(top_k=1, top_p=0.0), ssg=make_ssg("0"))
    assert [t.shape[1] for t in res.tokens] == [p * p for p in PATCH_512]
    for k in range(cfg.num_scales):
        assert torch.equal(res.tokens[k], toks[k]), k
    assert res.images.shape == (2, 3, 512, 512)
    assert (res.images - img).abs().max() <= 1e-5
    # the comparison can see a wrong modulation: another ada_gss gives other tokens
    sd["blocks.1.ada_gss"] = sd["blocks.1.ada_gss"].roll(1, dims=2)     # gammas/scales/shifts swapped
    with torch.no_grad():
        toks_alt, _ = official_greedy_shared(sd, vae, labels, 1.5, PATCH_512)
    assert any(not torch.equal(a, b) for a, b in zip(toks, toks_alt))


def test_512px_kv_cache_matches_teacher_forcing(saved_512):
    """The 2240-token block-causal mask and lvl_1L (the file's buffers) agree with the cached
    per-scale loop: logits of a sampled run equal one masked full-sequence forward."""
    cfg, d = saved_512
    var, vae, _ = load_models(cfg, str(d / "var_d2_512.pth"), str(d / "vae.pth"))
    assert var.attn_bias_for_masking.shape == (1, 1, 2240, 2240) and var.lvl_1L[0, -1] == 9
    pipe = Pipeline(EagerBackend(var, vae, transform="dct", k_max=64))
    res = run_guided(pipe, [3], 1, 0.0, sampler=SamplerConfig(top_k=30), keep_logits=True)
    P, f_hat, xs = cfg.patch_nums[-1], torch.zeros(1, cfg.Cvae, 32, 32), []
    for k, pn in enumerate(cfg.patch_nums[:-1]):
        h = vae.quantize.embedding.weight[res.tokens[k]].transpose(1, 2).reshape(1, cfg.Cvae, pn, pn)
        f_hat = f_hat + vae.phi(k)(F.interpolate(h, size=(P, P), mode="bicubic"))
        nxt = cfg.patch_nums[k + 1]
        xs.append(F.interpolate(f_hat, size=(nxt, nxt), mode="area").flatten(2).transpose(1, 2))
    with torch.no_grad():
        full = var.forward_teacher(torch.tensor([3]), torch.cat(xs, 1))      # 2 L V
    for k, (b, e) in enumerate(cfg.begin_ends):
        assert (full[:1, b:e] - res.logits_cfg[k]).abs().max() <= 2e-5, k     # measured <= 5e-6 (|logits| ~ 8)


# DSE on the 512px scale pairs: tests/test_dse.py runs its properties on both schedules' pairs.


@pytest.mark.slow
def test_512px_export_lint_and_parity(tmp_path):
    """var-d2-512-tiny through export (one step graph, 512x512 decoder), lint and teacher-forced
    parity of ONNX Runtime against eager, with SSG on."""
    from tests.conftest import run_cli
    out = tmp_path / "a512"
    r = run_cli("export.py", "--model", "var-d2-512-tiny", "--random-init", "0", "--top-k", "64", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    import json
    man = json.loads((out / "manifest.json").read_text())
    assert man["config"]["patch_nums"] == list(PATCH_NUMS_512) and man["config"]["shared_aln"]
    assert man["graphs"]["decoder"]["outputs"][0]["shape"] == [1, 3, 512, 512]
    assert man["graphs"]["step"]["profiles"][9]["scale_dse"] == [1024, 576]
    r = run_cli("lint.py", out)
    assert r.returncode == 0 and "2 graphs, 0 issues" in r.stdout
    r = run_cli("parity.py", "--artifacts", out, "--class", "3", "--seeds", "0", "--top-k", "40")
    assert r.returncode == 0 and "parity OK" in r.stdout, r.stdout[-2000:] + r.stderr[-1000:]
