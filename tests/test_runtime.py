"""Runtime: eager == ONNX Runtime end to end, parity tool, one KV cache per run, bad artifacts."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from var_ssg.graphs.config import SamplerConfig, make_ssg
from var_ssg.common.errors import ConfigError
from var_ssg.runtime.backends import open_backend
from var_ssg.contract.manifest import load_manifest, write_manifest
from var_ssg.runtime.pipeline import Pipeline
from tests.conftest import run_cli


def _same(a, b):
    for k, (x, y) in enumerate(zip(a.tokens, b.tokens)):
        assert np.array_equal(x, y), f"scale {k}"
    assert np.abs(np.asarray(a.images) - np.asarray(b.images)).max() <= 1e-4


@pytest.fixture(scope="module")
def b1(artifacts):
    d = artifacts()
    return d, Pipeline(open_backend("eager", d)), Pipeline(open_backend("onnxruntime", d))


@pytest.fixture(scope="module")
def b3(artifacts):
    d = artifacts(batch=3, transform="dft")
    return d, Pipeline(open_backend("eager", d)), Pipeline(open_backend("onnxruntime", d))


@pytest.mark.parametrize("seed,cls,beta", [(0, 1, "0"), (1, 207, "linear:0.1,0.3"), (2, 999, "1.0")])
def test_eager_equals_ort_batch1_dct(b1, seed, cls, beta):
    _, eager, ort = b1
    s = SamplerConfig(top_k=40, top_p=0.9)
    ssg = make_ssg(beta, "dct")
    _same(eager.run([cls], seed, 1.5, s, ssg), ort.run([cls], seed, 1.5, s, ssg))


@pytest.mark.parametrize("seed,beta", [(3, "0"), (4, "0.5")])
def test_eager_equals_ort_batch3_dft(b3, seed, beta):
    _, eager, ort = b3
    s = SamplerConfig(top_k=64, top_p=0.96)
    ssg = make_ssg(beta, "dft")
    a = eager.run([5, 6, 7], seed, 2.0, s, ssg, keep_logits=True).as_torch()
    b = ort.run([5, 6, 7], seed, 2.0, s, ssg, keep_logits=True).as_torch()
    _same(a, b)
    for x, y in zip(a.logits, b.logits):
        assert (x - y).abs().max() <= 1e-4 * x.abs().max()


def test_greedy_same_on_both(b1):
    _, eager, ort = b1
    g = SamplerConfig(top_k=1, top_p=0.0)
    _same(eager.run([3], 0, 1.5, g), ort.run([3], 0, 1.5, g))


def test_kv_cache_is_one_buffer(b1):
    """Every scale reads its past as a prefix view of one buffer and writes its keys/values
    into the next slice of the same buffer (no per-scale allocation, no concat)."""
    _, _, pipe = b1
    be = pipe.backend
    seen = []
    real = be.step

    def where(a):           # (the buffer's address, the view's offset in elements)
        buf = a.base if a.base is not None else a
        return buf.ctypes.data, (a.ctypes.data - buf.ctypes.data) // a.itemsize

    def spy(k, feeds, kv_out):
        past = feeds["past_kv"]
        seen.append((k, *where(kv_out), kv_out.flags.c_contiguous,
                     None if k == 0 else (*where(past), past.shape[0])))
        return real(k, feeds, kv_out)
    be.step = spy
    try:
        pipe.run([1], 0)
    finally:
        del be.step
    cfg = pipe.info.cfg
    base = {s[1] for s in seen}
    assert len(base) == 1 and len(seen) == cfg.num_scales
    row = cfg.depth * 2 * 2 * cfg.num_heads * cfg.head_dim      # elements per token (batch 1)
    for k, ptr, off, contig, past in seen:
        b, e = cfg.begin_ends[k]
        assert contig and off == b * row
        if past:
            assert past[0] == ptr and past[1] == 0 and past[2] == b


def test_parity_script_good_and_perturbed(artifacts, tmp_path):
    d = artifacts()
    r = run_cli("parity.py", "--artifacts", d, "--backends", "eager,onnxruntime", "--class", "3",
                   "--seed", "1", "--top-k", "50", "--json", tmp_path / "p.json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ssg logits rel" in r.stdout and "parity OK" in r.stdout
    rep = json.load(open(tmp_path / "p.json"))["runs"]
    assert rep[0]["ok"] and len(rep[0]["rows"]) == 20           # 10 scales of the user's rows + the probe row's
    # perturb one weight (the head's bias of the ONNX graphs only) and refresh the hashes
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    man = load_manifest(str(bad))
    import onnx
    m = onnx.load(str(bad / "step_all.onnx"), load_external_data=False)
    ext = next({e.key: e.value for e in t.external_data} for t in m.graph.initializer
               if t.data_location == onnx.TensorProto.EXTERNAL and t.name.endswith("head.weight") or
               (t.data_location == onnx.TensorProto.EXTERNAL and "head" in t.name))
    raw = bytearray((bad / "weights.bin").read_bytes())
    off = int(ext["offset"])
    v = np.frombuffer(raw, dtype=np.float32, count=1, offset=off).copy() + 5.0
    raw[off:off + 4] = v.tobytes()
    (bad / "weights.bin").write_bytes(bytes(raw))
    write_manifest(str(bad), {k: v for k, v in man.data.items() if k != "files"})
    r = run_cli("parity.py", "--artifacts", bad, "--class", "3", "--seed", "1", "--top-k", "50")
    assert r.returncode == 1 and "FAIL" in r.stdout


def test_generate_cli_eager_and_ort(artifacts, tmp_path):
    d = artifacts()
    out = tmp_path / "ort.png"
    # no --backend: onnxruntime with --artifacts, as sample, serve and the opener default
    r = run_cli("generate.py", "--artifacts", d, "--class", "9", "--seed", "4",
                   "--top-k", "30", "--out", out, "--save-tokens", tmp_path / "t.json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "RANDOM" in r.stdout and "[onnxruntime]" in r.stderr
    from PIL import Image
    im = Image.open(out)
    assert im.size == (256, 256) and "RANDOM WEIGHTS" in im.info["var-ssg"]
    assert im.info["var-ssg"].startswith("var-d2-tiny backend=onnxruntime class=9 seed=4 ")
    toks = json.load(open(tmp_path / "t.json"))["tokens"]
    assert [len(t[0]) for t in toks] == [p * p for p in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)]
    # the same run on eager from the same artifacts gives the same tokens
    r = run_cli("generate.py", "--backend", "eager", "--artifacts", d, "--class", "9", "--seed", "4",
                   "--top-k", "30", "--out", tmp_path / "e.png", "--save-tokens", tmp_path / "te.json")
    assert r.returncode == 0
    assert json.load(open(tmp_path / "te.json"))["tokens"] == toks


def _corrupt(d, tmp_path, how):
    bad = tmp_path / how
    shutil.copytree(d, bad)
    mp = bad / "manifest.json"
    if how == "missing":
        os.remove(mp)
    elif how == "corrupt":
        mp.write_text("{not json")
    elif how == "version":
        m = json.loads(mp.read_text())
        m["format_version"] = 99
        mp.write_text(json.dumps(m))
    elif how == "hash":
        with open(bad / "step_all.onnx", "r+b") as f:
            f.seek(100)
            b = f.read(1)
            f.seek(100)
            f.write(bytes([b[0] ^ 1]))
    elif how == "nofile":
        os.remove(bad / "decoder.onnx")
    return bad


@pytest.mark.parametrize("how,msg", [("missing", "manifest.json is missing"), ("corrupt", "is corrupt"),
                                     ("version", "format version 99"), ("hash", "sha256 does not match"),
                                     ("nofile", "decoder.onnx is missing")])
def test_bad_artifacts(artifacts, tmp_path, how, msg):
    bad = _corrupt(artifacts(), tmp_path, how)
    with pytest.raises(ConfigError, match=msg):
        open_backend("onnxruntime", str(bad))
    r = run_cli("generate.py", "--backend", "onnxruntime", "--artifacts", bad, "--out", tmp_path / "x.png")
    assert r.returncode == 2 and msg.split()[0] in r.stderr and not (tmp_path / "x.png").exists()


def test_tensorrt_missing_is_clear(artifacts, tmp_path):
    r = run_cli("generate.py", "--backend", "tensorrt", "--artifacts", artifacts(), "--out", tmp_path / "x.png")
    assert r.returncode == 2 and "tensorrt" in r.stderr.lower() and "pip install" in r.stderr


def test_cuda_fallback_is_an_error(artifacts, monkeypatch):
    import onnxruntime as ort
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no CUDA provider to fall back from")
    if torch.cuda.is_available():
        pytest.skip("a real GPU is present")
    art = artifacts()           # exported before CUDA is faked
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="fell back to the CPU"):
        open_backend("onnxruntime", art, device="cuda")


def test_batch_mismatch(b1):
    _, _, ort = b1
    with pytest.raises(ConfigError, match="exported for batch 1.*--batch 2"):
        ort.run([1, 2], 0)


@pytest.mark.slow
def test_generate_cli_bad_input(tmp_path):
    base = ["--model", "var-d2-tiny", "--random-init", "0"]
    for extra, msg in [(["--class", "1000"], "outside 0..999"), (["--ssg-beta", "linear:x"], "accepted --ssg-beta forms"),
                       (["--cfg", "nan"], "not finite"), (["--cfg", "inf"], "not finite")]:
        out = tmp_path / "o.png"
        r = run_cli("generate.py", *base, *extra, "--out", out)
        assert r.returncode == 2 and msg in r.stderr, (extra, r.stderr[-500:])
        assert not out.exists()
    r = run_cli("generate.py", "--model", "var-q", "--random-init", "0", "--out", tmp_path / "o.png")
    assert r.returncode == 2 and "valid presets" in r.stderr
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    r = run_cli("generate.py", "--model", "var-d2-tiny", "--ckpt", tmp_path / "junk.pth", "--vae-ckpt",
                   tmp_path / "junk.pth", "--out", tmp_path / "o.png")
    assert r.returncode == 2 and "junk.pth" in r.stderr and not (tmp_path / "o.png").exists()
    # mismatched checkpoint: var-d3 weights for var-d2
    from var_ssg.graphs.config import get_preset
    from var_ssg.graphs.weights import random_state_dicts
    v3, q = random_state_dicts(get_preset("var-d3-tiny"), 0)
    torch.save(v3, tmp_path / "var_d3.pth")
    torch.save(q, tmp_path / "vae.pth")
    r = run_cli("generate.py", "--model", "var-d2-tiny", "--ckpt", tmp_path / "var_d3.pth", "--vae-ckpt",
                   tmp_path / "vae.pth", "--out", tmp_path / "o.png")
    assert r.returncode == 2 and "looks like var-d3" in r.stderr and len(r.stderr.strip().splitlines()) == 1
