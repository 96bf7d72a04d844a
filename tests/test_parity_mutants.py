"""Parity has teeth: ten plausible export bugs, planted in one fp32 and one fp16 var-d2
artifact set (V = 4096, batch 2) by editing the exported graph, weights or scale constants and
rewriting the manifest's hashes, are each caught with the scale and the measure named; the
unmodified artifacts pass a representative set of settings (the full sweep: README "Parity")."""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import pytest

from var_ssg.common.errors import ConfigError
from onnx import numpy_helper

from var_ssg.contract.manifest import load_manifest, write_manifest

pytestmark = pytest.mark.slow
PRECISIONS = ("fp32", "fp16")


@pytest.fixture(scope="module")
def clean(artifacts):
    """precision -> (artifacts dir, eager reference pipeline, reference-run cache): var-d2,
    batch 2 (the fp32 set is test_parity.py's), the same weights; one eager fp32 reference."""
    from var_ssg.runtime.backends import open_backend
    from var_ssg.runtime.pipeline import Pipeline
    out, cache = {}, {}
    for prec in PRECISIONS:
        d = Path(artifacts(preset="var-d2", batch=2, precision=prec))
        out[prec] = (d, out["fp32"][1] if out else Pipeline(open_backend("eager", load_manifest(str(d)))), cache)
    return out


def _check(clean, prec, d, rows=None, probe=True, images=True):
    """(report, weights failures) of ONNX Runtime on artifacts `d` against the clean set's
    reference; images=False: the step graph only (no decode; only the decoder mutant needs it)."""
    from var_ssg.runtime.backends import open_backend
    from var_ssg.runtime.parity import run_parity
    from var_ssg.runtime.weights_check import weights_check
    from var_ssg.runtime.pipeline import Pipeline, Row
    _, ref, cache = clean[prec]
    man = load_manifest(str(d))
    rows = rows or [Row(907, 3)]
    rep = run_parity(ref, Pipeline(open_backend("onnxruntime", man)), rows, man.precision, probe=probe,
                     ref_cache=cache, images=images)
    wbad = weights_check(man, {"var": ref.backend.var, "vae": ref.backend.vae}).failures
    return rep, wbad


# ------------------------------------------------------------------ planting
def _graph(d, name="step_all.onnx"):
    return onnx.load(str(d / name), load_external_data=False)


def _rewire(m, old, new, only=None):
    """Point the consumers of tensor `old` (optionally only nodes of these op types) at `new`."""
    for n in m.graph.node:
        if only is None or n.op_type in only:
            n.input[:] = [new if i == old else i for i in n.input]


def _insert(m, op, inputs, output, consts=(), **attrs):
    for name, value in consts:
        m.graph.initializer.append(numpy_helper.from_array(value, name))
    m.graph.node.insert(0, oh.make_node(op, inputs, [output], name="planted_" + output, **attrs))


def _consumer(m, op, inp):
    return next(n for n in m.graph.node if n.op_type == op and inp in n.input)


def ssg_sign(d):
    m = _graph(d)
    dse = _consumer(m, "MatMul", "prev_logits").output[0]
    sub = next(n for n in m.graph.node if n.op_type == "Sub" and list(n.input)[1:] == [dse])
    sub.input[:] = [sub.input[1], sub.input[0]]                 # prior - l instead of l - prior
    return m


def beta_101(d):
    m = _graph(d)
    _rewire(m, "beta", "beta_planted")
    _insert(m, "Mul", ["beta", "planted_101"], "beta_planted", [("planted_101", np.array([1.01], np.float32))])
    return m


def weight_1e3(d):
    m = _graph(d)
    t = next(t for t in m.graph.initializer if t.name == "var.blocks.1.ada_lin.1.weight")
    ext = {e.key: e.value for e in t.external_data}
    off, n = int(ext["offset"]), int(ext["length"])
    dt = np.float16 if t.data_type == onnx.TensorProto.FLOAT16 else np.float32
    raw = bytearray((d / "weights.bin").read_bytes())
    w = np.frombuffer(bytes(raw[off:off + n]), dtype=dt)
    raw[off:off + n] = (w.astype(np.float64) * (1 + 1e-3)).astype(dt).tobytes()
    (d / "weights.bin").write_bytes(bytes(raw))
    return None


def top_p_095(d):
    m = _graph(d)
    _rewire(m, "top_p", "top_p_planted")
    _insert(m, "Sub", ["top_p", "planted_001"], "top_p_planted", [("planted_001", np.array([0.01], np.float32))])
    return m


def top_k_minus_1(d):
    m = _graph(d)
    _rewire(m, "top_k", "top_k_planted")
    _insert(m, "Sub", ["top_k", "planted_1"], "top_k_planted", [("planted_1", np.array([1], np.int64))])
    return m


def temperature_ignored(d):
    m = _graph(d)
    _rewire(m, "temperature", "temperature_planted")
    _insert(m, "Div", ["temperature", "temperature"], "temperature_planted")       # = 1
    return m


def kv_off_by_one(d):
    m = _graph(d)
    _rewire(m, "past_kv", "past_kv_planted")                   # the past without its first token
    _insert(m, "Slice", ["past_kv", "planted_s", "planted_e", "planted_a"], "past_kv_planted",
            [("planted_s", np.array([1], np.int64)), ("planted_e", np.array([2 ** 62], np.int64)),
             ("planted_a", np.array([0], np.int64))])
    return m


def decoder_bias_dropped(d):
    m = _graph(d, "decoder.onnx")
    conv = next(n for n in m.graph.node if n.op_type == "Conv" and "vae.decoder.conv_out.bias" in n.input)
    conv.input[:] = conv.input[:2]
    return ("decoder.onnx", m)


NEAREST_SCALE = 3


def nearest_at_one_scale(d):
    from var_ssg.graphs.resample import kron2d
    z = dict(np.load(d / "scale_consts.npz"))
    k = NEAREST_SCALE
    up = z[f"k{k}/scale_up"]
    P, pn = int(round(up.shape[0] ** 0.5)), int(round(up.shape[1] ** 0.5))
    near = np.zeros((P, pn), np.float64)
    near[np.arange(P), np.minimum((np.arange(P) + 0.5) * pn / P, pn - 1).astype(int)] = 1.0
    z[f"k{k}/scale_up"] = kron2d(near, near).astype(np.float32)
    with open(d / "scale_consts.npz", "wb") as f:
        np.savez(f, **z)
    return None


def fp16_before_sampling(d):
    m = _graph(d)
    src = next(n for n in m.graph.node if n.op_type == "TopK").input[0]        # logits / T
    _rewire(m, src, "sampled_planted", only=("TopK", "GatherElements", "GreaterOrEqual"))
    i = next(i for i, n in enumerate(m.graph.node) if src in n.output) + 1      # right after the division
    m.graph.node.insert(i, oh.make_node("Cast", [src], ["half_planted"], name="planted_half", to=onnx.TensorProto.FLOAT16))
    m.graph.node.insert(i + 1, oh.make_node("Cast", ["half_planted"], ["sampled_planted"], name="planted_back",
                                            to=onnx.TensorProto.FLOAT))
    return m


# mutant -> (plant, the measure the failure must name, the scale it must name or None)
MUTANTS = {
    "ssg sign": (ssg_sign, "post-SSG logits", None),
    "beta x 1.01": (beta_101, "DSE prior", None),
    "one weight x (1 + 1e-3)": (weight_1e3, {"fp32": "CFG logits", "fp16": "weights"}, None),
    "top-p 0.95": (top_p_095, "sampler", None),
    "top-k off by one": (top_k_minus_1, "sampler", None),
    "temperature ignored": (temperature_ignored, "sampler", None),
    "KV past off by one": (kv_off_by_one, "CFG logits", None),
    "decoder bias dropped": (decoder_bias_dropped, "image", None),
    # the resampling matrices are checked against the preset when the artifacts load (DESIGN.md,
    # "What the hashes promise"): refused before parity runs, naming the scale's constant
    "nearest at one scale": (nearest_at_one_scale, f"k{NEAREST_SCALE}/scale_up", NEAREST_SCALE),
    "fp16 cast before sampling": (fp16_before_sampling, "sampler", None),
}


def _plant(clean, prec, name, tmp_path):
    d = tmp_path / "mutant"
    shutil.copytree(clean[prec][0], d)
    out = MUTANTS[name][0](d)
    if out is not None:
        fname, m = out if isinstance(out, tuple) else ("step_all.onnx", out)
        onnx.save(m, str(d / fname))
    man = json.loads((d / "manifest.json").read_text())
    write_manifest(str(d), {k: v for k, v in man.items() if k != "files"})      # hashes that match
    return d


@pytest.mark.parametrize("prec", PRECISIONS)
@pytest.mark.parametrize("name", list(MUTANTS))
def test_planted_mutant_is_caught_with_scale_and_measure(clean, tmp_path, prec, name):
    _, measure, scale = MUTANTS[name]
    measure = measure[prec] if isinstance(measure, dict) else measure
    planted = _plant(clean, prec, name, tmp_path)
    if "/" in measure:                       # a constant: refused at load, before any run
        with pytest.raises(ConfigError, match=re.escape(measure)):
            _check(clean, prec, planted)
        return
    rep, wbad = _check(clean, prec, planted, images=measure == "image")
    failures = rep.failures + wbad
    assert failures, f"{name} ({prec}) passed:\n{rep.table()}"
    hit = [f for f in failures if measure in f]
    assert hit, f"{name} ({prec}): no failure names {measure!r}: {failures}"
    if measure == "weights":
        assert "var.blocks.1.ada_lin.1.weight" in hit[0]
    elif measure == "image":
        assert "(the decoder)" in hit[0]
    else:
        got = re.search(r"scale (\d+): ", hit[0])
        assert got and (scale is None or int(got.group(1)) == scale), hit[0]


def test_unmodified_artifacts_pass_representative_settings(clean):
    from var_ssg.runtime.pipeline import Row
    rows = [[Row(-1, 11, guidance=4.0, ssg_beta="5", top_k=2, top_p=0.5, temperature=0.25),
             Row(5, 13, guidance=1.0, ssg_beta="0", more_smooth=True)],
            [Row(3, 12, guidance=10.0, ssg_beta="1", top_k=1, top_p=1.0, temperature=3.0, more_smooth=True)]]
    for prec in PRECISIONS:
        for i, r in enumerate(rows):
            rep, wbad = _check(clean, prec, clean[prec][0], r, probe=i == 0, images=i == 0)
            assert rep.ok and not wbad, f"{prec} {r}: {rep.failures + wbad}\n{rep.table()}"
            assert all(f["explained"] for f in rep.flips)
