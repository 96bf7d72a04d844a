"""Infinity through export and runtime (infinity-tiny): the step graph's module against the eager
per-scale reference and the eager loop, ONNX Runtime against eager (bits equal on several seeds
and aspect ratios), teacher-forced parity catching planted bugs, the manifest (family, hashes,
lint), the CLI (export, generate on both backends with a local tiny T5, parity)."""
import json
import os

import numpy as np
import pytest
import torch

from var_ssg.common.errors import ConfigError
from var_ssg.graphs.config import make_ssg
from var_ssg.graphs.infinity_config import InfinityRunConfig, get_infinity_preset
from var_ssg.graphs.infinity_generate import TextCondition, generate
from var_ssg.graphs.infinity_io import scale_constants
from var_ssg.graphs.infinity_step import InfinityText, InfinityUnifiedStep, build_scale_steps
from var_ssg.graphs.infinity_weights import random_infinity

TINY = "infinity-tiny"


def _text(cfg, B=2, lens=(7, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(B, cfg.text_maxlen, cfg.text_dim, generator=g)
    mask = torch.arange(cfg.text_maxlen)[None, :] < torch.tensor(lens)[:, None]
    return emb, mask


def _t5(path, width):
    """A tiny random T5 encoder with a tokenizer built here (no download)."""
    transformers = pytest.importorskip("transformers")
    words = "a photo of cat dog on the red blue chair sitting under tree".split()
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0 - i * 0.1) for i, w in enumerate(words)]
    tok = transformers.T5TokenizerFast(vocab=vocab, extra_ids=0)
    c = transformers.T5Config(vocab_size=len(vocab), d_model=width, d_kv=32, d_ff=64, num_layers=2, num_heads=2,
                              decoder_start_token_id=0)
    torch.manual_seed(0)
    transformers.T5EncoderModel(c).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


# ---------------------------------------------------------------- the graph's module, no export
@pytest.mark.parametrize("preset,ratio", [(TINY, 0.75), ("infinity-tiny-patchify", 1.0)])
def test_unified_step_equals_reference_and_eager_loop(preset, ratio):
    """The exported module (matrices: resampling, pixel (un)shuffle, DSE, RoPE as inputs) and the
    eager per-scale reference (F.interpolate, torch.fft) give the eager loop's bits at every
    scale, with SSG on and a negative prompt for one row."""
    cfg = get_infinity_preset(preset)
    model, vae = random_infinity(cfg, 1)
    sched = cfg.schedule(ratio)
    K, B = sched.num_scales, 2
    emb, mask = _text(cfg)
    g = torch.Generator().manual_seed(3)
    noise = [torch.rand(B, h * w, cfg.d_vae, generator=g) for h, w in sched.hw]
    run = InfinityRunConfig(cfg=tuple(2.0 + 0.3 * k for k in range(K)), tau=(0.9,) * K)
    with torch.no_grad():
        ref = generate(model, None, TextCondition(emb, mask), sched, run, noise, make_ssg("0.6", "dct", K),
                       keep_logits=True)
        cond, tkv, m2 = InfinityText(model)(emb, mask.float(), torch.zeros_like(emb), torch.zeros(B, cfg.text_maxlen),
                                            torch.zeros(B))
        fh, fw = cfg.vae_hw(sched.hw[-1])
        for unified, hpc in ((False, 0), (True, 0), (True, 1)):     # hpc 1: attention one head at a time
            steps, us = build_scale_steps(model, sched, "dct"), InfinityUnifiedStep(model, hpc)
            summed = torch.zeros(B, fh * fw, cfg.vae.bits)
            past = torch.zeros(0, cfg.depth, 2, 2 * B, cfg.num_heads, cfg.head_dim)
            prev = torch.zeros(B, 1, cfg.V)
            for k, (h, w) in enumerate(sched.hw):
                f = dict(cond=cond, text_kv=tkv, text_mask2=m2, summed=summed, noise=noise[k],
                         cfg=torch.full((B,), run.cfg[k]), tau=torch.full((B,), 0.9), top_k=torch.full((B,), 2),
                         top_p=torch.full((B,), 0.97), beta=torch.full((B,), 0.6), past_kv=past, prev_logits=prev,
                         forced=torch.zeros(B, h * w, cfg.d_vae, dtype=torch.int64), force=torch.zeros(B))
                if unified:
                    f.update({n: torch.from_numpy(v) for n, v in scale_constants(cfg, sched, "dct", k).items()})
                bits, lg, lgc, summed, nkv = (us if unified else steps[k])(**f)
                past, prev = torch.cat((past, nkv)), lgc
                assert torch.equal(bits, ref.bits[k]), (unified, k)
                assert (lg - ref.logits[k]).abs().max() <= 1e-5 * ref.logits[k].abs().max(), (unified, k)
            got = summed.transpose(1, 2).reshape(B, cfg.vae.bits, fh, fw)
            assert (got - ref.summed).abs().max() <= 1e-5
    from var_ssg.graphs.infinity import rope_tables
    from var_ssg.graphs.infinity_io import rope_cos_sin
    for k in range(K):                      # the runtime's numpy tables are the model's
        for a, b in zip(rope_tables(cfg, sched, k), rope_cos_sin(cfg, sched, k)):
            assert np.abs(a.numpy() - b).max() <= 1e-6


def test_eager_pipeline_follows_the_loop_and_checks_rows():
    """runtime.infinity on the eager backend: the row's seed gives torch.rand's uniforms (seeds
    below 2**32), so its bits are the eager loop's; bad requests are refused with what to do."""
    from var_ssg.runtime.backends.infinity_eager import InfinityEagerBackend
    from var_ssg.runtime.infinity import InfinityPipeline, PromptRow
    cfg = get_infinity_preset(TINY)
    model, vae = random_infinity(cfg, 0)
    pipe = InfinityPipeline(InfinityEagerBackend(model, vae))
    emb, mask = _text(cfg, B=1, lens=(5,))
    sched = cfg.schedule(1.0)
    K = sched.num_scales
    res = pipe.run([PromptRow(emb[0].numpy()[:9], mask[0].numpy()[:9], seed=11, cfg=2.5, ssg_beta="0.4")])
    g = torch.Generator().manual_seed(11)
    noise = [torch.rand(1, h * w * cfg.d_vae, generator=g).reshape(1, h * w, cfg.d_vae) for h, w in sched.hw]
    ref = generate(model, vae, TextCondition(emb, mask), sched, InfinityRunConfig.constant(K, 2.5, 1.0), noise,
                   make_ssg("0.4", "dct", K))
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(res.bits, ref.bits))
    assert np.abs(res.images - (ref.image.numpy() + 1) / 2).max() <= 1e-6 and res.images.shape == (1, 3, 64, 64)
    row = PromptRow(emb[0].numpy(), mask[0].numpy())
    for bad, msg in ((dict(cfg=(1.0, 2.0)), "2 values for 7 scales"), (dict(tau=0.0), "--tau"),
                     (dict(mask=np.zeros(cfg.text_maxlen)), "at least one token"),
                     (dict(text=emb[0].numpy()[:, :100]), "(Lt <= 32, 256)"), (dict(ssg_beta="1,2"), "exactly 6 values")):
        with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            pipe.run([PromptRow(**{**row.__dict__, **bad})])


# ---------------------------------------------------------------- exported artifacts
@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return _t5(tmp_path_factory.mktemp("t5") / "t5", get_infinity_preset(TINY).text_dim)


@pytest.fixture(scope="module")
def inf_art(tmp_path_factory):
    """infinity-tiny exported by the CLI (random weights, seed 0)."""
    from var_ssg.tools.commands.export import main
    out = str(tmp_path_factory.mktemp("inf") / "art")
    assert main(["--model", TINY, "--random-init", "0", "--out", out]) == 0
    return out


@pytest.mark.slow
def test_ort_bits_equal_eager_on_seeds_and_ratios(inf_art):
    from var_ssg.runtime.infinity import PromptRow, open_infinity
    ort_pipe, note = open_infinity(artifacts=inf_art)
    eager, _ = open_infinity(artifacts=inf_art, backend="eager")
    assert ort_pipe.info.name == "onnxruntime" and "seed 0" in note
    cfg = ort_pipe.info.cfg
    emb, mask = _text(cfg, B=2, lens=(6, 2), seed=4)
    for i, (seed, ratio) in enumerate(((0, 1.0), (1, 0.75), (2, 1.333), (3, 0.5))):
        row = PromptRow(emb[i % 2].numpy(), mask[i % 2].numpy(), seed=seed, cfg=(1.0, 2, 3, 3, 4, 4, 4), tau=0.8,
                        ssg_beta="linear:0.2,0.6",
                        neg_text=emb[1 - i % 2].numpy() if i == 3 else None, neg_mask=mask[1 - i % 2].numpy() if i == 3 else None)
        a, b = ort_pipe.run([row], ratio), eager.run([row], ratio)
        assert all(np.array_equal(x, y) for x, y in zip(a.bits, b.bits)), (seed, ratio)
        assert a.images.shape == b.images.shape == (1, 3, *cfg.image_size(cfg.schedule(ratio)))
        assert np.abs(a.images - b.images).max() <= 1e-5


@pytest.mark.slow
def test_head_chunked_attention_export(tmp_path):
    """A step graph whose score tables would exceed the export's budget computes self-attention
    a head at a time (one Softmax per head and block, recorded in the manifest) and gives the
    same bits as eager; the budget that fits keeps one Softmax per block. ONNX Runtime's weight
    pre-packing is kept for weights that are a small share of memory, and skipped for
    infinity-2b's 8.7 GB on a 24 GB machine."""
    import onnx
    from var_ssg.export.infinity_export import InfinityExportConfig, export_infinity
    from var_ssg.graphs.infinity_io import heads_per_chunk
    from var_ssg.graphs.weights import WeightSource
    from var_ssg.runtime.backends.infinity_ort import prepack_fits
    from var_ssg.runtime.infinity import PromptRow, open_infinity
    cfg = get_infinity_preset(TINY)
    assert heads_per_chunk(cfg, 1, 512 * 2 ** 20) == 0 and heads_per_chunk(cfg, 1, 1) == 1
    assert heads_per_chunk(get_infinity_preset("infinity-2b"), 1, 512 * 2 ** 20) == 1
    assert prepack_fits(10 ** 6, 24 * 2 ** 30) and not prepack_fits(8_659 * 2 ** 20, 24 * 2 ** 30)
    model, vae = random_infinity(cfg, 0)
    out = str(tmp_path / "chunked")
    export_infinity(model, vae, WeightSource(kind="random", seed=0), out, InfinityExportConfig(attn_table_bytes=1))
    man = json.load(open(os.path.join(out, "manifest.json")))
    assert man["export"]["attn_heads_per_chunk"] == 1
    step = onnx.load(os.path.join(out, "step_all.onnx"), load_external_data=False)
    def in_self_attention(n):
        return any(p.key == "pkg.torch.onnx.class_hierarchy" and "infinity.SelfAttention" in p.value
                   for p in n.metadata_props)
    softmax = [in_self_attention(n) for n in step.graph.node if n.op_type == "Softmax"]
    assert sum(softmax) == cfg.depth * cfg.num_heads and len(softmax) == sum(softmax) + cfg.depth + 1   # + CA, sampler
    ort_pipe, _ = open_infinity(artifacts=out)
    eager, _ = open_infinity(artifacts=out, backend="eager")
    assert ort_pipe.backend.prepack
    emb, mask = _text(cfg, B=1, lens=(6,), seed=2)
    row = PromptRow(emb[0].numpy(), mask[0].numpy(), seed=5, cfg=3.0, ssg_beta="0.5")
    a, b = ort_pipe.run([row], 0.75), eager.run([row], 0.75)
    assert all(np.array_equal(x, y) for x, y in zip(a.bits, b.bits))


def test_self_attention_head_chunks_of_any_size():
    """Head-chunked self-attention gives the unchunked numbers for chunk sizes that do not divide
    the heads (8 heads in chunks of 3: 3 + 3 + 2), larger than the heads, with an empty past and
    with an additive mask."""
    import dataclasses
    from var_ssg.graphs.infinity import SelfAttention
    cfg = dataclasses.replace(get_infinity_preset(TINY), num_heads=8)
    torch.manual_seed(0)
    sa = SelfAttention(cfg).eval()
    for p in sa.parameters():
        torch.nn.init.normal_(p, std=0.3)
    B, n, Lp, hd = 2, 5, 7, cfg.head_dim
    x, rope = torch.randn(B, n, cfg.width), (torch.randn(n, hd // 2), torch.randn(n, hd // 2))
    past = (torch.randn(B, 8, Lp, hd), torch.randn(B, 8, Lp, hd))
    empty = (torch.zeros(B, 8, 0, hd), torch.zeros(B, 8, 0, hd))
    bias = torch.zeros(n, n + Lp)
    bias[:, -2:] = float("-inf")
    with torch.no_grad():
        for pst, b in ((past, None), (empty, None), (past, bias)):
            ref, _ = sa(x, rope, pst, b)
            for hpc in (1, 3, 5, 7, 8, 9):
                assert torch.equal(sa(x, rope, pst, b, hpc)[0], ref), (hpc, pst[0].shape[2], b is not None)


@pytest.mark.slow
def test_ort_without_prepacking_and_arena_and_the_cache_freed_before_decode(inf_art, monkeypatch):
    """Weights above PREPACK_MAX_SHARE of memory (physical memory faked small): every session has
    pre-packing and the memory arena off, with the default's bits and images. The KV cache the
    pipeline allocated is gone when the decoder runs (DESIGN.md, "Infinity")."""
    import weakref
    from var_ssg.runtime.backends import infinity_ort
    from var_ssg.runtime.infinity import PromptRow, open_infinity
    default, _ = open_infinity(artifacts=inf_art)
    assert default.backend.prepack
    assert default.backend.sessions["step"].get_session_options().enable_cpu_mem_arena
    monkeypatch.setattr(infinity_ort, "physical_memory", lambda: 1024)
    small, _ = open_infinity(artifacts=inf_art)
    assert not small.backend.prepack
    for name, sess in small.backend.sessions.items():
        so = sess.get_session_options()
        assert not so.enable_cpu_mem_arena and so.get_session_config_entry("session.disable_prepacking") == "1", name
    cfg = small.info.cfg
    emb, mask = _text(cfg, B=1, lens=(5,), seed=3)
    row = PromptRow(emb[0].numpy(), mask[0].numpy(), seed=2, cfg=3.0, ssg_beta="0.5")
    be, kv_alive = small.backend, []
    alloc, decode = be.alloc_kv, be.decode

    def tracked_alloc(shape):
        kv = alloc(shape)
        kv_alive.append(weakref.ref(kv))
        return kv

    def checked_decode(summed):
        freed = bool(kv_alive) and kv_alive[-1]() is None
        assert freed, "the KV cache is still alive when the decoder runs"
        return decode(summed)
    monkeypatch.setattr(be, "alloc_kv", tracked_alloc)
    monkeypatch.setattr(be, "decode", checked_decode)
    a, b = small.run([row], 0.75), default.run([row], 0.75)
    assert all(np.array_equal(x, y) for x, y in zip(a.bits, b.bits))
    assert np.abs(a.images - b.images).max() <= 1e-6


@pytest.mark.slow
def test_parity_catches_planted_bugs(inf_art):
    """Teacher-forced parity passes as exported; a backend whose text mask is dropped (padding
    attended) fails the logit bound, and one whose top-p threshold is off fails on unexplained
    flips (its logits are right)."""
    from var_ssg.runtime.infinity import PromptRow, open_infinity
    from var_ssg.runtime.infinity_parity import run_infinity_parity
    ref, _ = open_infinity(artifacts=inf_art, backend="eager")
    test, _ = open_infinity(artifacts=inf_art)
    cfg = ref.info.cfg
    emb, mask = _text(cfg, B=1, lens=(4,), seed=7)
    rows = [PromptRow(emb[0].numpy(), mask[0].numpy(), seed=5, ssg_beta="0.5")]
    ok = run_infinity_parity(ref, test, rows, 0.75)
    assert ok.ok and max(s.logits_rel for s in ok.scales) <= 1e-4, ok.table()
    be = test.backend
    encode = be.encode

    def no_mask(feeds):
        out = encode(feeds)
        return dict(out, text_mask2=np.ones_like(out["text_mask2"]))
    be.encode = no_mask
    bad = run_infinity_parity(ref, test, rows, 0.75)
    be.encode = encode
    assert not bad.ok and "CFG bit logits differ" in bad.failures[0] and "scale 0" in bad.failures[0]
    step = be.step

    def top_p_off(sched, k, feeds, kv_out):
        return step(sched, k, dict(feeds, top_p=np.full_like(feeds["top_p"], 0.8)), kv_out)
    be.step = top_p_off
    bad = run_infinity_parity(ref, test, rows, 0.75)
    be.step = step
    assert not bad.ok and all("unexplained flips" in f for f in bad.failures)
    assert all(s.logits_rel <= 1e-4 for s in bad.scales)


@pytest.mark.slow
def test_manifest_family_hashes_and_lint(inf_art, tmp_path):
    import shutil
    import onnx
    from var_ssg.contract.manifest import ManifestError, load_manifest
    from var_ssg.contract.schema import validate
    from var_ssg.export.lint import lint_files
    man = load_manifest(inf_art)
    assert man.family == "infinity" and man.cfg.name == TINY and man.data["sampler"] == {"k_max": 2}
    assert set(man.data["graphs"]) == {"text", "step", "decoder"}
    with pytest.raises(ManifestError, match="family"):
        validate("m", man.data)                            # VAR's schema refuses Infinity's manifest
    ops = {n.op_type for n in onnx.load(os.path.join(inf_art, "step_all.onnx"), load_external_data=False).graph.node}
    assert "MatMul" in ops and not ops & {"DFT", "STFT", "Loop", "If", "RandomUniform", "Multinomial"}
    assert lint_files([os.path.join(inf_art, "step_all.onnx")], dynamic=set(man.graph("step")["dynamic_inputs"])) == []
    from var_ssg.runtime.backends import open_backend
    from var_ssg.runtime.opener import PipelineSource, open_pipelines
    with pytest.raises(ConfigError, match="family infinity.*runs VAR artifacts"):      # sample, sweep, serve...
        open_backend("onnxruntime", inf_art)
    with pytest.raises(ConfigError, match="--model infinity-tiny: this command runs VAR"):
        open_pipelines(PipelineSource(model=TINY, random_init=0))
    bad = tmp_path / "bad"
    shutil.copytree(inf_art, bad)
    data = json.loads((bad / "manifest.json").read_text())
    data["config"]["depth"] = 3
    (bad / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="'config' does not match the preset infinity-tiny"):
        load_manifest(str(bad))
    shutil.rmtree(bad)
    shutil.copytree(inf_art, bad)
    with open(bad / "weights.bin", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ManifestError, match="weights.bin"):
        load_manifest(str(bad), verify="full")


@pytest.mark.slow
def test_cli_generate_both_backends_and_parity(inf_art, t5_dir, tmp_path, capsys):
    from var_ssg.tools.commands.generate import main as gen
    from var_ssg.tools.commands.parity import main as parity
    common = ["--prompt", "a cat", "a red chair", "--text-encoder", t5_dir, "--seed", "3", "--aspect-ratio", "3:4",
              "--negative-prompt", "dog", "--cfg-list", "1,2,3,3,3,3,3", "--tau", "0.9"]
    outs = {}
    for name, src in (("ort", ["--artifacts", inf_art]), ("eager", ["--model", TINY, "--random-init", "0"])):
        png, js = tmp_path / f"{name}.png", tmp_path / f"{name}.json"
        assert gen(src + common + ["--out", str(png), "--save-tokens", str(js)]) == 0
        outs[name] = json.loads(js.read_text())["bits"]
        from PIL import Image
        assert Image.open(png).size == (2 * 80, 60)           # two prompts side by side, 3:4
    assert outs["ort"] == outs["eager"]
    assert parity(["--artifacts", inf_art, "--prompt", "a cat on the chair", "--text-encoder", t5_dir,
                   "--seeds", "0-2", "--ssg-beta", "0.5"]) == 0
    assert "3 runs: parity OK" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="--text-encoder DIR"):
        gen(["--artifacts", inf_art, "--prompt", "a cat", "--out", str(tmp_path / "x.png")])
    with pytest.raises(ConfigError, match="give --prompt"):
        gen(["--artifacts", inf_art, "--out", str(tmp_path / "x.png")])
    with pytest.raises(ConfigError, match="for Infinity"):
        gen(["--model", "var-d2-tiny", "--random-init", "0", "--prompt", "a cat", "--out", str(tmp_path / "x.png")])
    from var_ssg.tools.commands.export import main as export
    with pytest.raises(ConfigError, match="fp32 only"):
        export(["--model", TINY, "--random-init", "0", "--precision", "fp16", "--out", str(tmp_path / "y")])
    capsys.readouterr()
    assert export(["--model", TINY, "--random-init", "0", "--out", inf_art]) == 0       # reused, verified
    assert "is up to date" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="holds other artifacts; pass --force"):
        export(["--model", TINY, "--random-init", "1", "--out", inf_art])


def test_export_refuses_a_model_that_cannot_fit_before_loading(tmp_path, monkeypatch):
    """infinity-8b's fp32 export would hold 33.7 GB of weights: on a 24 GB machine export.py says
    so at once (exit 2, nothing written) instead of being killed for memory; infinity-2b fits."""
    import var_ssg.common.proc as proc
    from var_ssg.tools.commands.export import main
    from var_ssg.tools.infinity_cli import check_export_memory
    monkeypatch.setattr(proc, "physical_memory", lambda: 24 * 2 ** 30)
    out = tmp_path / "a8"
    with pytest.raises(ConfigError, match=r"infinity-8b holds its 33.7 GB of fp32 weights .* about 42 GB at peak"):
        main(["--model", "infinity-8b", "--random-init", "0", "--out", str(out)])
    assert not out.exists() and not list(tmp_path.iterdir())
    check_export_memory(get_infinity_preset("infinity-2b"), 24 * 2 ** 30)
    with pytest.raises(ConfigError, match="infinity-2b holds its 9.1 GB"):
        check_export_memory(get_infinity_preset("infinity-2b"), 8 * 2 ** 30)
