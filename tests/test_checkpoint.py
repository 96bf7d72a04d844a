"""Strict loading of official-format state dicts, and clear errors for bad ones."""

import re
import pytest
import torch

from var_ssg.graphs.config import get_preset
from var_ssg.common.errors import ConfigError
from var_ssg.graphs.weights import CheckpointError, check_state_dict, load_models, random_state_dicts
from var_ssg.graphs.var import VAR


def official_var_keys(depth, patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), shared_aln=False, V=4096, Cvae=32):
    """Key -> shape of FoundationVision/VAR's state dict, written out from its builder
    (width 64*depth, heads=depth, MLP 4x, attn_l2_norm; shared_aln as for var_d36)."""
    C, H = 64 * depth, depth
    L = sum(p * p for p in patch_nums)
    keys = {"pos_start": (1, 1, C), "pos_1LC": (1, L, C), "lvl_1L": (1, L),
            "attn_bias_for_masking": (1, 1, L, L), "word_embed.weight": (C, Cvae), "word_embed.bias": (C,),
            "class_emb.weight": (1001, C), "lvl_embed.weight": (len(patch_nums), C),
            "head_nm.ada_lin.1.weight": (2 * C, C), "head_nm.ada_lin.1.bias": (2 * C,),
            "head.weight": (V, C), "head.bias": (V,)}
    if shared_aln:
        keys.update({"shared_ada_lin.1.weight": (6 * C, C), "shared_ada_lin.1.bias": (6 * C,)})
    for i in range(depth):
        b = f"blocks.{i}."
        keys.update({b + "attn.q_bias": (C,), b + "attn.v_bias": (C,), b + "attn.zero_k_bias": (C,),
                     b + "attn.scale_mul_1H11": (1, H, 1, 1), b + "attn.mat_qkv.weight": (3 * C, C),
                     b + "attn.proj.weight": (C, C), b + "attn.proj.bias": (C,),
                     b + "ffn.fc1.weight": (4 * C, C), b + "ffn.fc1.bias": (4 * C,),
                     b + "ffn.fc2.weight": (C, 4 * C), b + "ffn.fc2.bias": (C,)})
        if shared_aln:
            keys[b + "ada_gss"] = (1, 1, 6, C)
        else:
            keys.update({b + "ada_lin.1.weight": (6 * C, C), b + "ada_lin.1.bias": (6 * C,)})
    return keys


def test_var_keys_match_official_builder():
    for depth in (2, 16):
        cfg = get_preset(f"var-d{depth}")
        with torch.device("meta"):
            m = VAR(cfg)
        got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
        assert got == official_var_keys(depth)


def test_vae_official_keys_spot_check():
    from var_ssg.graphs.vqvae import VQVAE
    with torch.device("meta"):
        vae = VQVAE(get_preset("var-d16").vae)
    sd = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    # a few keys (and shapes) of vae_ch160v4096z32.pth
    assert sd["quantize.embedding.weight"] == (4096, 32)
    assert sd["quantize.ema_vocab_hit_SV"] == (10, 4096)
    assert sd["quantize.quant_resi.qresi_ls.3.weight"] == (32, 32, 3, 3)
    assert sd["decoder.conv_in.weight"] == (640, 32, 3, 3)
    assert sd["decoder.up.4.attn.2.qkv.weight"] == (1920, 640, 1, 1)
    assert sd["decoder.up.1.block.0.nin_shortcut.weight"] == (160, 320, 1, 1)
    assert "decoder.up.0.block.0.nin_shortcut.weight" not in sd
    assert sd["decoder.up.1.upsample.conv.weight"] == (160, 160, 3, 3)
    assert sd["encoder.down.3.downsample.conv.weight"] == (320, 320, 3, 3)
    assert sd["encoder.mid.attn_1.proj_out.weight"] == (640, 640, 1, 1)
    assert sd["post_quant_conv.weight"] == (32, 32, 3, 3)
    assert "decoder.up.0.upsample.conv.weight" not in sd and "encoder.down.4.downsample.conv.weight" not in sd
    assert sum(k.startswith("quantize.quant_resi.") for k in sd) == 8   # 4 shared phi convs


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cfg = get_preset("var-d2-tiny")
    var_sd, vae_sd = random_state_dicts(cfg, 3)
    d = tmp_path_factory.mktemp("ckpt")
    torch.save(var_sd, d / "var_d2.pth")
    torch.save(vae_sd, d / "vae.pth")
    return cfg, d, var_sd, vae_sd


def test_official_format_loads_strictly(saved):
    cfg, d, var_sd, _ = saved
    assert set(var_sd) == set(official_var_keys(2, V=64, Cvae=8))
    var, vae, src = load_models(cfg, str(d / "var_d2.pth"), str(d / "vae.pth"))
    assert torch.equal(var.blocks[1].ffn.fc1.weight, var_sd["blocks.1.ffn.fc1.weight"])
    assert src.ckpt_sha256 and len(src.ckpt_sha256) == 64 and not src.random


def test_safetensors_loads(saved):
    from safetensors.torch import save_file
    cfg, d, var_sd, vae_sd = saved
    save_file({k: v.contiguous() for k, v in var_sd.items()}, str(d / "v.safetensors"))
    save_file({k: v.contiguous() for k, v in vae_sd.items()}, str(d / "q.safetensors"))
    var, _, _ = load_models(cfg, str(d / "v.safetensors"), str(d / "q.safetensors"))
    assert torch.equal(var.head.weight, var_sd["head.weight"])


def test_truncated_file_names_file(saved):
    cfg, d, *_ = saved
    data = (d / "var_d2.pth").read_bytes()
    bad = d / "trunc.pth"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="trunc.pth.*cannot be read"):
        load_models(cfg, str(bad), str(d / "vae.pth"))


def test_wrong_shape_names_key(saved):
    cfg, d, var_sd, _ = saved
    sd = dict(var_sd)
    sd["blocks.0.ffn.fc2.weight"] = torch.zeros(3, 3)
    torch.save(sd, d / "shape.pth")
    with pytest.raises(CheckpointError, match=r"shape.pth: key 'blocks.0.ffn.fc2.weight' has shape \(3, 3\)"):
        load_models(cfg, str(d / "shape.pth"), str(d / "vae.pth"))


def test_d16_weights_for_d24_name_the_preset():
    # shapes only (meta tensors): var_d16's state dict checked against var-d24
    with torch.device("meta"):
        d16 = VAR(get_preset("var-d16")).state_dict()
        d24 = VAR(get_preset("var-d24"))
    with pytest.raises(CheckpointError, match=r"var_d16.pth.*looks like var-d16 but the preset is var-d24"):
        check_state_dict(d24, d16, "var_d16.pth", "VAR", "var-d24")


def test_missing_file_and_mixed_flags(saved):
    cfg, d, *_ = saved
    with pytest.raises(CheckpointError, match="nope.pth: no such file"):
        load_models(cfg, str(d / "nope.pth"), str(d / "vae.pth"))
    with pytest.raises(ConfigError, match="go together"):
        load_models(cfg, str(d / "var_d2.pth"), None)


def test_offline_download_names_both_ways_out(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    with pytest.raises(CheckpointError, match=re.escape("--ckpt var_d16.pth --vae-ckpt vae_ch160v4096z32.pth")) as e:
        load_models(get_preset("var-d16"))
    assert "--ckpt var_d16.pth --vae-ckpt vae_ch160v4096z32.pth" in str(e.value)
    assert "--random-init SEED" in str(e.value)


def test_random_init_is_seeded():
    cfg = get_preset("var-d2-tiny")
    a, _ = random_state_dicts(cfg, 5)
    b, _ = random_state_dicts(cfg, 5)
    c, _ = random_state_dicts(cfg, 6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["head.weight"], c["head.weight"])


def test_unknown_preset_lists_valid():
    with pytest.raises(ConfigError, match="valid presets: var-d16, var-d20"):
        get_preset("var-x9")


# ------------------------------------------------------------------ hostile files and flags
def test_int_and_tuple_keys_are_refused(saved):
    cfg, d, _, _ = saved
    for i, sd in enumerate(({0: torch.zeros(1)}, {(1, 2): torch.zeros(1)})):
        p = d / f"keys{i}.pth"
        torch.save(sd, p)
        with pytest.raises(CheckpointError, match=r"keys.\.pth: not a state dict of tensors \(key .* is a"):
            load_models(cfg, str(p), str(d / "vae.pth"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused(saved, bad):
    cfg, d, var_sd, vae_sd = saved
    sd = dict(vae_sd)
    w = sd["quantize.embedding.weight"].clone()
    w[3, 1] = bad
    sd["quantize.embedding.weight"] = w
    torch.save(sd, d / "nan.pth")
    with pytest.raises(CheckpointError, match=r"nan.pth: key 'quantize.embedding.weight' holds NaN or infinite values"):
        load_models(cfg, str(d / "var_d2.pth"), str(d / "nan.pth"))


def test_safetensors_named_pth_is_read_as_safetensors(saved):
    from safetensors.torch import save_file
    cfg, d, var_sd, vae_sd = saved
    save_file({k: v.contiguous() for k, v in var_sd.items()}, str(d / "st_var.pth"))
    var, _, _ = load_models(cfg, str(d / "st_var.pth"), str(d / "vae.pth"))
    assert torch.equal(var.head.weight, var_sd["head.weight"])


def test_a_stray_high_block_index_suggests_no_preset():
    with torch.device("meta"):
        m = VAR(get_preset("var-d2"))
        sd = dict(m.state_dict())
    sd["blocks.999.attn.proj.bias"] = sd["blocks.1.attn.proj.bias"]
    with pytest.raises(CheckpointError, match=re.escape("unexpected key 'blocks.999.attn.proj.bias'")) as e:
        check_state_dict(m, sd, "x.pth", "VAR", "var-d2")
    assert "unexpected key 'blocks.999.attn.proj.bias'" in str(e.value) and "--model" not in str(e.value)
    del sd["blocks.999.attn.proj.bias"]
    for i in range(2, 120):       # a real var-d120 does not exist: no preset to suggest
        for k in [k for k in list(sd) if k.startswith("blocks.1.")]:
            sd[k.replace("blocks.1.", f"blocks.{i}.")] = sd[k]
    with pytest.raises(CheckpointError, match="the file looks like var-d120 but the preset is var-d2$") as e:
        check_state_dict(m, sd, "x.pth", "VAR", "var-d2")
    assert "--model" not in str(e.value)


def test_empty_checkpoint_paths_never_download(monkeypatch):
    from var_ssg.graphs import weights
    monkeypatch.setattr(weights, "download_official", lambda cfg: pytest.fail("started a download"))
    for args, flag in (("", ""), ("", "x.pth"), ("x.pth", "")):
        with pytest.raises(ConfigError, match="is empty"):
            load_models(get_preset("var-d16"), args, flag)
