"""Low precision (DESIGN.md "Low precision"): the int8 QDQ step graph, its manifest record, the
weights check that re-derives every quantized weight bit for bit (with planted quantizer bugs:
a wrong scale, the per-channel axis transposed, a zero point that is not 0, and one bf16 weight
changed), the quality gate against bf16 autocast, eager autocast and the CPU feature probe."""
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper as oh, numpy_helper

from var_ssg.contract.manifest import ManifestError, load_manifest, write_manifest
from var_ssg.contract.quantization import requantize
from var_ssg.common.errors import ConfigError


# ------------------------------------------------------------------ the scheme against the tool (fast)
def _one_matmul(tmp_path, w_nk: np.ndarray, gemm: bool) -> str:
    """X (n, K) -> Linear(W) as onnx exports it: MatMul(X, W^T) or Gemm(X, W, transB=1)."""
    K = w_nk.shape[1]
    x = oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", K])
    y = oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", w_nk.shape[0]])
    if gemm:
        inits = [numpy_helper.from_array(w_nk, "var.lin.weight"), numpy_helper.from_array(np.zeros(w_nk.shape[0], np.float32), "b")]
        node = oh.make_node("Gemm", ["x", "var.lin.weight", "b"], ["y"], name="lin", transB=1)
    else:
        inits = [numpy_helper.from_array(np.ascontiguousarray(w_nk.T), "val_1")]
        node = oh.make_node("MatMul", ["x", "val_1"], ["y"], name="lin")
    m = oh.make_model(oh.make_graph([node], "g", [x], [y], inits), opset_imports=[oh.make_opsetid("", 18)],
                      ir_version=10)
    path = str(tmp_path / "m.onnx")
    onnx.save(m, path)
    return path


@pytest.mark.parametrize("gemm", [False, True], ids=["matmul", "gemm"])
def test_stored_weights_are_the_scheme_requantized(tmp_path, gemm):
    """onnxruntime.quantization with our options stores exactly contract.quantization.requantize
    of the parameter (so the weights check compares like with like), per output channel."""
    from var_ssg.export.quantize import quantize_step
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((24, 16)) * np.linspace(0.1, 3, 24)[:, None]).astype(np.float32)   # N K
    src = _one_matmul(tmp_path, w, gemm)
    feeds = [{"x": rng.standard_normal((n, 16)).astype(np.float32)} for n in (1, 4, 9)]
    dst = str(tmp_path / "q.onnx")
    q = quantize_step(src, dst, "int8", {"var.lin.weight": w}, feeds, str(tmp_path), keep_fp32=())
    assert q.nodes == 1 and list(q.weights.values()) == ["var.lin.weight"]
    m = onnx.load(dst)
    got = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    name = next(iter(q.weights))
    base = name[:-len("_quantized")]
    want_q, want_s = requantize(w, "int8")
    assert got[name].dtype == np.int8 and np.array_equal(got[name], want_q)
    assert np.array_equal(got[base + "_scale"].view(np.uint32), want_s.view(np.uint32))
    assert got[base + "_scale"].shape == (24,) and not got[base + "_zero_point"].any()
    # the activation is quantized per tensor, symmetric (zero point 0: what TensorRT takes)
    act = [n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x"]
    assert len(act) == 1 and not got[act[0].input[2]].any() and got[act[0].input[1]].size == 1


def _three_convs(tmp_path, ws) -> str:
    """x (1, C, 6, 6) -> Conv(ws[0]) -> Relu -> Conv(ws[1]) -> Relu -> Conv(ws[2]) -> image, weights
    named as the VQVAE's parameters (vae.c{i}.weight), fp32 biases."""
    x = oh.make_tensor_value_info("f_hat", onnx.TensorProto.FLOAT, [1, ws[0].shape[1], 6, 6])
    y = oh.make_tensor_value_info("image", onnx.TensorProto.FLOAT, [1, ws[-1].shape[0], 6, 6])
    nodes, inits, prev = [], [], "f_hat"
    for i, w in enumerate(ws):
        inits += [numpy_helper.from_array(w, f"vae.c{i}.weight"),
                  numpy_helper.from_array(np.full(w.shape[0], 0.01 * (i + 1), np.float32), f"vae.c{i}.bias")]
        out = "image" if i == len(ws) - 1 else f"h{i}"
        nodes.append(oh.make_node("Conv", [prev, f"vae.c{i}.weight", f"vae.c{i}.bias"], [out + ("" if out == "image" else "_c")],
                                  name=f"conv{i}", pads=[1, 1, 1, 1]))
        if out != "image":
            nodes.append(oh.make_node("Relu", [out + "_c"], [out], name=f"relu{i}"))
        prev = out
    m = oh.make_model(oh.make_graph(nodes, "dec", [x], [y], inits), opset_imports=[oh.make_opsetid("", 18)],
                      ir_version=10)
    m = onnx.shape_inference.infer_shapes(m)
    path = str(tmp_path / "dec.onnx")
    onnx.save(m, path)
    return path


def test_decoder_conv_weights_are_the_scheme_requantized(tmp_path):
    """quantize_decoder stores contract.quantization.requantize(w, "int8", "Conv") of the middle
    conv's weight (one scale per output channel, axis 0), keeps the first and last conv fp32
    and their biases as they are, and measures the image's PSNR against the fp32 graph."""
    from var_ssg.export.quantize import quantize_decoder
    rng = np.random.default_rng(1)
    ws = [(rng.standard_normal((o, i, 3, 3)) * np.linspace(0.05, 1, o)[:, None, None, None]).astype(np.float32)
          for o, i in ((8, 4), (6, 8), (3, 6))]
    src = _three_convs(tmp_path, ws)
    f_hats = [rng.standard_normal((1, 4, 6, 6)).astype(np.float32) for _ in range(3)]
    params = {f"vae.c{i}.weight": w for i, w in enumerate(ws)}
    dst = str(tmp_path / "q.onnx")
    q = quantize_decoder(src, dst, "int8", params, f_hats, str(tmp_path))
    assert q.weights == {"vae.c1.weight_quantized": "vae.c1.weight"} and q.nodes == 1 and q.feeds == 3
    assert set(q.keep_fp32) == {"vae.c0.weight", "vae.c2.weight"} and np.isfinite(q.image_psnr_db)
    got = {t.name: numpy_helper.to_array(t) for t in onnx.load(dst).graph.initializer}
    want_q, want_s = requantize(ws[1], "int8", "Conv")
    assert want_q.shape == (6, 8, 3, 3) and want_s.shape == (6,)
    assert np.array_equal(got["vae.c1.weight_quantized"], want_q)
    assert np.array_equal(got["vae.c1.weight_scale"].view(np.uint32), want_s.view(np.uint32))
    assert not got["vae.c1.weight_zero_point"].any()
    assert np.array_equal(got["vae.c1.bias"], np.full(6, 0.02, np.float32))        # biases stay fp32
    assert np.array_equal(got["vae.c0.weight"], ws[0]) and np.array_equal(got["vae.c2.weight"], ws[2])


def _residual_convs(tmp_path, ws) -> str:
    """f_hat -> conv0 -> conv1 -> h1; h1 + conv2(h1) -> conv3 -> image: conv1's output is read by
    a conv and an Add (as a VQVAE conv_in's or upsample conv's output is), weights named as the
    VQVAE's parameters."""
    x = oh.make_tensor_value_info("f_hat", onnx.TensorProto.FLOAT, [1, ws[0].shape[1], 6, 6])
    y = oh.make_tensor_value_info("image", onnx.TensorProto.FLOAT, [1, ws[-1].shape[0], 6, 6])
    inits = [numpy_helper.from_array(w, f"vae.c{i}.weight") for i, w in enumerate(ws)]
    inits += [numpy_helper.from_array(np.full(w.shape[0], 0.01 * (i + 1), np.float32), f"vae.c{i}.bias")
              for i, w in enumerate(ws)]
    conv = lambda i, a, b: oh.make_node("Conv", [a, f"vae.c{i}.weight", f"vae.c{i}.bias"], [b], name=f"conv{i}",
                                        pads=[1, 1, 1, 1])
    nodes = [conv(0, "f_hat", "h0"), conv(1, "h0", "h1"), conv(2, "h1", "h2"),
             oh.make_node("Add", ["h1", "h2"], ["s"], name="residual"), conv(3, "s", "image")]
    m = oh.make_model(oh.make_graph(nodes, "dec", [x], [y], inits), opset_imports=[oh.make_opsetid("", 18)],
                      ir_version=10)
    path = str(tmp_path / "res.onnx")
    onnx.save(m, path)
    return path


def test_decoder_fan_out_lets_onnxruntime_fuse_every_conv(tmp_path):
    """A dequantized activation read by two nodes (a conv and the residual Add) gets one reader,
    an identity Max, and the conv its own Q/DQ pair with the same scale and zero point: the
    function is the same, and ONNX Runtime's CPU fuses both convs into QLinearConv, which it
    does not do without the fan-out (DESIGN.md "Low precision")."""
    import onnxruntime as ort
    from onnxruntime.quantization import quantize_static
    from var_ssg.export.quantize import _Feeds, _decoder_options, _unfused, quantize_decoder
    rng = np.random.default_rng(2)
    ws = [(rng.standard_normal((o, i, 3, 3)) * 0.3).astype(np.float32) for o, i in ((8, 4), (8, 8), (8, 8), (3, 8))]
    src = _residual_convs(tmp_path, ws)
    f_hats = [rng.standard_normal((1, 4, 6, 6)).astype(np.float32) for _ in range(3)]
    params = {f"vae.c{i}.weight": w for i, w in enumerate(ws)}
    plain = str(tmp_path / "plain.onnx")          # the tool's graph as it comes, for comparison
    quantize_static(src, plain, _Feeds([{"f_hat": f} for f in f_hats]), **_decoder_options("int8", ["conv1", "conv2"]))
    assert _unfused(plain, ["conv1", "conv2"], str(tmp_path)) == ["conv1", "conv2"]
    dst = str(tmp_path / "q.onnx")
    q = quantize_decoder(src, dst, "int8", params, f_hats, str(tmp_path))
    assert q.nodes == 2 and set(q.keep_fp32) == {"vae.c0.weight", "vae.c3.weight"}
    assert _unfused(dst, ["conv1", "conv2"], str(tmp_path)) == []
    m = onnx.load(dst)
    assert len(q.fan_out) == 1
    readers = [n for n in m.graph.node if q.fan_out[0] in n.input]
    assert [(n.op_type, list(n.input)) for n in readers] == [("Max", q.fan_out[0:1])]
    made_by = {o: n for n in m.graph.node for o in n.output}
    conv2 = next(n for n in m.graph.node if n.name == "conv2")
    dq2, fan_dq = made_by[conv2.input[0]], made_by[q.fan_out[0]]
    q2, fan_q = made_by[dq2.input[0]], made_by[fan_dq.input[0]]
    assert (dq2.op_type, q2.op_type) == ("DequantizeLinear", "QuantizeLinear") and q2.input[0] == readers[0].output[0]
    assert q2.input[1:] == fan_q.input[1:] and dq2.input[1:] == fan_dq.input[1:]      # the same scale and zero point
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL        # the graphs as written
    a, b = (ort.InferenceSession(p, so, providers=["CPUExecutionProvider"]) for p in (plain, dst))
    for f in f_hats:
        assert np.array_equal(a.run(None, {"f_hat": f})[0], b.run(None, {"f_hat": f})[0])


def test_feed_store_streams_what_it_was_given(tmp_path):
    """Calibration feeds go to disk as they come and are read back one at a time, equal."""
    from var_ssg.export.calibrate import FeedStore
    from var_ssg.export.quantize import _Feeds
    st = FeedStore(str(tmp_path / "f"))
    feeds = [{"x": np.arange(6, dtype=np.float32).reshape(2, 3) * i, "k": np.array([i], np.int64)} for i in range(3)]
    for f in feeds:
        st.add(f)
    assert len(st) == 3
    r = _Feeds(st)
    for f in feeds:
        g = r.get_next()
        assert g.keys() == f.keys() and all(np.array_equal(g[n], f[n]) and g[n].dtype == f[n].dtype for n in f)
    assert r.get_next() is None
    with pytest.raises(ValueError, match="file name"):
        st.add({"a/b": np.zeros(1)})


def test_requantize_axis_and_rounding():
    w = np.array([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]], np.float32)          # N=2 K=3
    q, s = requantize(w, "int8")
    assert q.shape == (3, 2) and s.shape == (2,)                            # stored B = W^T, a scale per n
    assert s[0] == np.float32(2.0) / np.float32(127) and s[1] == 1.0        # an all-zero channel: scale 1
    assert q[:, 0].tolist() == [64, -127, 32] and not q[:, 1].any()         # 63.5 -> 64 (half to even), 31.75 -> 32
    c = np.zeros((2, 1, 1, 3), np.float32)                                  # a conv weight O I kh kw
    c[0, 0, 0] = [1.0, -2.0, 0.5]
    qc, sc = requantize(c, "int8", "Conv")
    assert qc.shape == c.shape and sc.shape == (2,) and sc[1] == 1.0         # stored as it is, a scale per O
    assert qc[0, 0, 0].tolist() == [64, -127, 32] and not qc[1].any()
    with pytest.raises(ValueError, match="no quantization layout"):
        requantize(c, "int8", "Gemm")


def test_cpu_features_are_read_from_cpuinfo(tmp_path):
    from var_ssg.benchmarks.precision import cpu_features
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nmodel name\t: Some Xeon\nflags\t\t: fpu avx2 avx512f amx_int8 avx512_bf16\n\n"
                 "processor\t: 1\nmodel name\t: Other\nflags\t\t: fpu\n")
    assert cpu_features(str(f)) == dict(model="Some Xeon", features=["avx2", "avx512f", "avx512_bf16", "amx_int8"])
    assert cpu_features(str(tmp_path / "none")) == dict(model="unknown", features=[])


def test_precision_bench_splits_off_the_decoder():
    """bench.py --precisions: each of our rows shows the decoder's time (what follows the last
    scale), the official code's (no per-scale hook) none."""
    from var_ssg.benchmarks.precision import PrecisionBenchResult, precision_row
    ours = precision_row("onnxruntime-int8", [(5.0, [0.5, 1.5]), (4.0, [0.5, 1.0]), (6.0, [1.0, 1.0])])
    assert ours.per_image_s == 5.0 and ours.per_scale_s == [0.5, 1.0] and ours.decoder_s == 3.0
    off = precision_row("official-bf16-autocast", [(5.0, []), (4.0, [])])
    assert off.decoder_s is None
    res = PrecisionBenchResult(model="var-d2", cpu=dict(model="x", features=[]), threads=2,
                               rows={"onnxruntime-int8": ours, "official-bf16-autocast": off})
    lines = res.table().splitlines()
    assert "decoder s" in lines[1] and "3.000" in lines[2] and "3.000" not in lines[3]


def test_eager_autocast_runs_the_transformer_in_bf16_and_the_tail_in_fp32(tiny):
    """The baseline of the quality gate: fp32 weights, the transformer under bf16 autocast; the
    logits come out fp32 and differ from fp32's by bf16's error, not more."""
    from var_ssg.graphs.step import StepSpec
    from var_ssg.runtime.backends.eager import EagerBackend
    from var_ssg.runtime.pipeline import Pipeline, Row
    _, var, vae = tiny
    with pytest.raises(ValueError, match="autocast runs fp32 weights"):
        StepSpec(dtype=torch.bfloat16, autocast=torch.bfloat16)
    rows = [Row(3, 5)]
    ref = Pipeline(EagerBackend(var, vae, k_max=64)).run_rows(rows, keep_logits=True, decode=False)
    auto = Pipeline(EagerBackend(var, vae, k_max=64, autocast=torch.bfloat16))
    got = auto.run_rows(rows, keep_logits=True, force_tokens=ref.tokens, decode=False)
    for a, b in zip(ref.logits, got.logits):
        assert b.dtype == np.float32
        rel = np.abs(a - b).max() / np.abs(a).max()
        assert 1e-6 < rel < 5e-2, rel                # bf16's error: present, bounded


# ------------------------------------------------------------------ artifacts (slow)
def _plant(src: str, dst: Path, edit, graph: str = "step_all.onnx") -> str:
    """A copy of the artifacts with `edit(graph, weights bytearray, manifest)` applied to `graph`
    and the hashes rewritten (so only the weights check and parity can notice)."""
    shutil.copytree(src, dst)
    g = onnx.load(str(dst / graph), load_external_data=False)
    raw = bytearray((dst / "weights.bin").read_bytes())
    man = json.loads((dst / "manifest.json").read_text())
    edit(g, raw, man)
    onnx.save(g, str(dst / graph))
    (dst / "weights.bin").write_bytes(bytes(raw))
    write_manifest(str(dst), {k: v for k, v in man.items() if k != "files"})
    return str(dst)


def _ext(t):
    e = {x.key: x.value for x in t.external_data}
    return int(e.get("offset", 0)), int(e["length"])


def _weights_check(d):
    from var_ssg.graphs.weights import load_models
    from var_ssg.runtime.weights_check import weights_check
    man = load_manifest(d)
    var, vae, _ = load_models(man.cfg, None, None, 0)
    return weights_check(man, {"var": var, "vae": vae})


def _quantized(g, man, param):
    ws = man["quantization"]["weights"] if param.startswith("var.") else man["quantization"]["decoder"]["weights"]
    name = next(n for n, p in ws.items() if p == param)
    inits = {t.name: t for t in g.graph.initializer}
    base = name[:-len("_quantized")]
    return inits[name], inits[base + "_scale"], inits[base + "_zero_point"]


def _write(raw, t, arr):
    """Store `arr` as initializer t's bytes (external data in weights.bin, or inline)."""
    if t.data_location == onnx.TensorProto.EXTERNAL:
        off, ln = _ext(t)
        b = np.ascontiguousarray(arr).tobytes()
        assert len(b) == ln
        raw[off:off + ln] = b
    else:
        t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr), t.name))


PARAM = "var.blocks.0.attn.proj.weight"        # square (C x C): a transposed axis keeps every shape


def _read(raw, t, dtype):
    if t.data_location == onnx.TensorProto.EXTERNAL:
        off, ln = _ext(t)
        return np.frombuffer(bytes(raw[off:off + ln]), dtype).reshape(tuple(t.dims)).copy()
    return numpy_helper.to_array(t).copy()


def _scale_off(g, raw, man):
    _, s, _ = _quantized(g, man, PARAM)
    _write(raw, s, _read(raw, s, np.float32) * np.float32(1.01))


def _axis_transposed(g, raw, man):
    from var_ssg.graphs.config import get_preset
    from var_ssg.graphs.weights import load_models
    q, s, _ = _quantized(g, man, PARAM)
    var, _, _ = load_models(get_preset(man["preset"]), None, None, 0)
    w = var.state_dict()[PARAM[len("var."):]].numpy()             # N K, square
    qq, ss = requantize(w.T, "int8")          # one scale per INPUT channel: the wrong axis
    _write(raw, q, qq.T)
    _write(raw, s, ss)


def _dq_axis(g, raw, man):
    q, _, _ = _quantized(g, man, PARAM)
    dq = next(n for n in g.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.name)
    for a in dq.attribute:
        if a.name == "axis":
            a.i = 0                           # the stored values are right; the node reads them per row


def _zero_point(g, raw, man):
    _, _, z = _quantized(g, man, PARAM)
    zz = _read(raw, z, np.int8)
    zz.reshape(-1)[0] = 3
    _write(raw, z, zz)


@pytest.fixture(scope="module")
def int8_tiny(artifacts):
    return artifacts(precision="int8")


@pytest.mark.slow
def test_int8_export_records_its_scheme_and_runs(int8_tiny):
    man = load_manifest(int8_tiny)
    q = man.data["quantization"]
    assert man.precision == "int8" and man.data["kv"]["dtype"] == "float32"
    assert q["format"] == "QDQ" and q["weight_axis"] == 1 and q["weight_symmetric"] and q["activation_symmetric"]
    cal = q["calibration"]
    assert cal["scales"] == list(range(man.cfg.num_scales)) and len(cal["rows"]) == 6
    assert cal["feeds"] == 6 * man.cfg.num_scales and cal["keep_fp32"] == ["head.*", "*ada_lin.*", "word_embed.*"]
    assert len({r["class_id"] for r in cal["rows"]}) == 6 and len({r["guidance"] for r in cal["rows"]}) > 1
    params = set(q["weights"].values())
    depth = man.cfg.depth
    for i in range(depth):                      # every block's MatMuls are quantized, AdaLN and the head are not
        for p in ("attn.mat_qkv", "attn.proj", "ffn.fc1", "ffn.fc2"):
            assert f"var.blocks.{i}.{p}.weight" in params
        assert f"var.blocks.{i}.ada_lin.1.weight" not in params
    assert params.isdisjoint({"var.head.weight", "var.head_nm.ada_lin.1.weight", "var.word_embed.weight"})
    assert q["nodes"] == len(params) == 4 * depth
    g = onnx.load(str(Path(int8_tiny) / "step_all.onnx"), load_external_data=False)
    ops = {n.op_type for n in g.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "DFT" not in ops
    from var_ssg.runtime.backends import open_backend
    from var_ssg.runtime.pipeline import Pipeline
    res = Pipeline(open_backend("onnxruntime", man)).run([3], 0)
    assert res.images.shape[0] == 1 and np.isfinite(res.images).all()


@pytest.mark.slow
def test_weights_check_passes_clean_int8_and_bf16(int8_tiny, artifacts):
    for d in (int8_tiny, artifacts(precision="bf16"), artifacts()):
        rep = _weights_check(d)
        assert not rep.failures, rep.failures
        assert rep.compared > 100 and "every parameter compared" in rep.summary()
    q = load_manifest(int8_tiny).data["quantization"]
    assert _weights_check(int8_tiny).quantized == q["nodes"] + q["decoder"]["nodes"]      # the step's and the decoder's


@pytest.mark.slow
@pytest.mark.parametrize("plant, what", [
    ("scale", "scales"), ("zero_point", "zero point that is not 0"), ("axis", "stored values|scales"),
    ("dq_axis", "along axis 0")])
def test_planted_quantizer_bugs_fail_the_weights_check(int8_tiny, tmp_path, plant, what):
    edit = {"scale": _scale_off, "zero_point": _zero_point, "axis": _axis_transposed, "dq_axis": _dq_axis}[plant]
    d = _plant(int8_tiny, tmp_path / "m", edit)
    rep = _weights_check(d)
    assert len(rep.failures) == 1 and PARAM in rep.failures[0], rep.failures
    import re
    assert re.search(what, rep.failures[0]), rep.failures[0]


def _decoder_param(man) -> str:
    return sorted(man["quantization"]["decoder"]["weights"].values())[0]


@pytest.mark.slow
def test_int8_decoder_is_recorded_and_its_weights_rederived(int8_tiny):
    man = load_manifest(int8_tiny)
    d = man.data["quantization"]["decoder"]
    assert d["op_types"] == ["Conv"] and d["weight_axis"] == 0 and d["nodes"] == len(d["weights"]) > 0
    assert all(p.startswith("vae.") for p in d["weights"].values())
    assert "vae.post_quant_conv.weight" in d["keep_fp32"] and "vae.decoder.conv_out.weight" in d["keep_fp32"]
    assert d["calibration"]["latents"] == 6 and d["image_psnr_bound"] == 30.0 and d["image_psnr_latents"] == 2
    g = onnx.load(str(Path(int8_tiny) / "decoder.onnx"), load_external_data=False)
    assert sum(n.op_type == "DequantizeLinear" for n in g.graph.node) >= d["nodes"]
    rep = _weights_check(int8_tiny)
    assert not rep.failures and rep.quantized == man.data["quantization"]["nodes"] + d["nodes"]


@pytest.mark.slow
@pytest.mark.parametrize("plant, what", [("scale", "scales"), ("dq_axis", "along axis 1, the scheme's output "
                                                                          "channels are axis 0")])
def test_planted_decoder_conv_bugs_fail_the_weights_check(int8_tiny, tmp_path, plant, what):
    """A conv weight's scale x 1.01, or its DequantizeLinear along the input channels: the
    weights check names the VQVAE parameter."""
    param = _decoder_param(load_manifest(int8_tiny).data)

    def edit(g, raw, man):
        q, s, _ = _quantized(g, man, param)
        if plant == "scale":
            _write(raw, s, _read(raw, s, np.float32) * np.float32(1.01))
        else:
            dq = next(n for n in g.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.name)
            next(a for a in dq.attribute if a.name == "axis").i = 1
    d = _plant(int8_tiny, tmp_path / "m", edit, graph="decoder.onnx")
    rep = _weights_check(d)
    assert len(rep.failures) == 1 and param in rep.failures[0] and what in rep.failures[0], rep.failures


@pytest.mark.slow
@pytest.mark.parametrize("which, what", [("named", "differs from the reference's"),
                                         ("transposed", "is in no exported graph")])
def test_a_changed_bf16_weight_fails_the_weights_check(artifacts, tmp_path, which, what):
    """Before, bf16 tensors were skipped: "N tensors equal, bit for bit" whatever they held. A
    weight stored under its parameter's name and one folded (transposed, anonymous) both count."""
    src = artifacts(precision="bf16")

    def edit(g, raw, man):
        t = next(t for t in g.graph.initializer if t.data_type == onnx.TensorProto.BFLOAT16 and
                 t.data_location == onnx.TensorProto.EXTERNAL and len(t.dims) == 2 and
                 t.name.startswith("var.") == (which == "named"))
        off, _ = _ext(t)
        raw[off] ^= 1                          # one bf16 value, its lowest mantissa bit
    d = _plant(src, tmp_path / "m", edit)
    rep = _weights_check(d)
    assert len(rep.failures) == 1 and what in rep.failures[0], rep.failures


@pytest.mark.slow
def test_parity_cli_fails_on_a_planted_quantizer_bug(int8_tiny, tmp_path):
    from tests.conftest import run_cli

    d = _plant(int8_tiny, tmp_path / "m", _zero_point)
    r = run_cli("parity.py", "--artifacts", d, "--backends", "eager,onnxruntime", "--no-probe",
                "--json", tmp_path / "p.json")
    assert r.returncode == 1 and "zero point that is not 0" in r.stderr + r.stdout
    rep = json.loads((tmp_path / "p.json").read_text())
    assert any("zero point" in f for f in rep["failures"]) and rep["runs"][0]["precision"] == "int8"
    assert all(k in rep["runs"][0]["rows"][0] for k in ("tv", "kl", "tv_base", "kl_base", "bound"))


# ------------------------------------------------------------------ the gate on V = 4096 (slow)
@pytest.fixture(scope="module")
def int8_d2(artifacts):
    return artifacts(preset="var-d2", precision="int8")


def _gate(d, rows):
    from var_ssg.runtime.backends import open_backend
    from var_ssg.runtime.backends.eager import EagerBackend
    from var_ssg.runtime.pipeline import Pipeline
    from var_ssg.runtime.quality import run_quality
    man = load_manifest(d)
    ref = Pipeline(open_backend("eager", man))
    base = Pipeline(EagerBackend(ref.backend.var, ref.backend.vae, transform=man.transform, k_max=man.k_max,
                                 autocast=torch.bfloat16))
    return run_quality(ref, base, Pipeline(open_backend("onnxruntime", man)), rows, "int8", probe=False,
                       images=False)


@pytest.mark.slow
def test_the_gate_passes_var_d2_and_catches_a_wrong_activation_scale(int8_d2, tmp_path):
    """var-d2 (V = 4096) int8 passes the gate; one activation dequantized with twice its scale
    (which the weights check cannot see: it is no weight) fails it."""
    from var_ssg.runtime.pipeline import Row
    rows = [Row(207, 0)]
    clean = _gate(int8_d2, rows)
    assert clean.ok, clean.failures + clean.parity.failures
    assert all(r["tv"] <= r["bound"] for r in clean.rows) and len(clean.rows) == 10

    def edit(g, raw, man):                    # the first activation DequantizeLinear reads a scale 2x its Q's
        inits = {t.name: t for t in g.graph.initializer}
        q_out = {n.output[0] for n in g.graph.node if n.op_type == "QuantizeLinear"}
        dq = next(n for n in g.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in q_out)
        s = inits[dq.input[1]]
        g.graph.initializer.append(numpy_helper.from_array(_read(raw, s, np.float32) * np.float32(2), "planted_scale"))
        dq.input[1] = "planted_scale"
    bad = _gate(_plant(int8_d2, tmp_path / "m", edit), rows)
    assert not bad.ok and any("TV" in f for f in bad.failures), bad.failures
    assert not _weights_check(str(tmp_path / "m")).failures          # invisible to the weights check


@pytest.mark.slow
def test_the_gate_bounds_the_int8_decoders_image(int8_d2, tmp_path):
    """var-d2's int8 decoder keeps the image on fixed tokens >= 30 dB from the fp32 decoder's; one
    decoder activation dequantized with twice its scale (no weight: invisible to the weights
    check, and the sampling distributions do not see the decoder) fails on the image's PSNR."""
    from var_ssg.runtime.pipeline import Row
    from var_ssg.runtime.quality import run_quality
    from var_ssg.runtime.backends import open_backend
    from var_ssg.runtime.backends.eager import EagerBackend
    from var_ssg.runtime.pipeline import Pipeline
    from var_ssg.contract.quantization import IMAGE_PSNR_MIN

    def gate(d):
        man = load_manifest(d)
        ref = Pipeline(open_backend("eager", man))
        base = Pipeline(EagerBackend(ref.backend.var, ref.backend.vae, transform=man.transform, k_max=man.k_max,
                                     autocast=torch.bfloat16))
        return run_quality(ref, base, Pipeline(open_backend("onnxruntime", man)), [Row(207, 0)], "int8", probe=False,
                           image_psnr_min=IMAGE_PSNR_MIN)
    clean = gate(int8_d2)
    assert clean.ok, clean.failures + clean.parity.failures
    assert IMAGE_PSNR_MIN <= clean.parity.image_psnr < 60 and "PSNR" in clean.table()

    def edit(g, raw, man):
        inits = {t.name: t for t in g.graph.initializer}
        q_out = {n.output[0] for n in g.graph.node if n.op_type == "QuantizeLinear"}
        dq = [n for n in g.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in q_out][len(q_out) // 2]
        s = inits[dq.input[1]]
        g.graph.initializer.append(numpy_helper.from_array(_read(raw, s, np.float32) * np.float32(2), "planted_scale"))
        dq.input[1] = "planted_scale"
    bad = gate(_plant(int8_d2, tmp_path / "m", edit, graph="decoder.onnx"))
    assert not bad.ok and any("image PSNR" in f for f in bad.parity.failures), bad.parity.failures
    assert not bad.failures                                          # TV: the step graph is untouched
    assert not _weights_check(str(tmp_path / "m")).failures


def test_the_decoder_recipe_is_part_of_the_int8_cache_key(monkeypatch):
    """int8 artifacts written before the decoder's fan-out (DESIGN.md "Low precision") are stale:
    the recipe is in int8's graph key, and only in int8's."""
    from var_ssg.export import onnx_export
    from var_ssg.graphs.config import get_preset
    cfg = get_preset("var-d2")
    keys = lambda: {p: onnx_export.cache_key(cfg, onnx_export.ExportConfig(precision=p), "w") for p in ("fp32", "int8")}
    before = keys()
    monkeypatch.setattr(onnx_export, "DECODER_RECIPE", "another")
    after = keys()
    assert before["int8"] != after["int8"] and before["fp32"] == after["fp32"]
