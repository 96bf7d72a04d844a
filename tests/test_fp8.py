"""fp8 (DESIGN.md "Low precision"): the float8 e4m3fn QDQ step graph for TensorRT. The recipe
against ml_dtypes (fast), the conversion on a one-MatMul graph (fast), the refusals (opset < 19,
ONNX Runtime, compute capability < 8.9), and on var-d2-tiny artifacts: the graph's layers and
types, the weights check (clean, and a planted wrong scale and a flipped weight byte that fail),
and the TensorRT build under every TensorRT version CI covers (strict fake over the real
bindings)."""
import json
import re
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import helper as oh, numpy_helper

from var_ssg.common.errors import ConfigError
from var_ssg.contract.manifest import load_manifest, write_manifest
from var_ssg.contract.quantization import FP8_MAX, requantize
from tests.trt_real import VERSIONS, run_under_real_trt, skip_reason

FP8 = ml_dtypes.float8_e4m3fn


# ------------------------------------------------------------------ the recipe (fast)
def test_requantize_fp8_is_one_scale_per_tensor_and_the_e4m3_cast():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((24, 16)) * 0.05).astype(np.float32)          # W (N, K)
    w[3, 5] = -0.9                                                           # the tensor's max |.|
    q, s = requantize(w, "fp8")
    assert q.dtype == FP8 and q.shape == (16, 24) and s.shape == () and s.dtype == np.float32
    assert s == np.float32(0.9) / np.float32(FP8_MAX)
    assert np.array_equal(q.view(np.uint8), (w.T / s).astype(FP8).view(np.uint8))
    assert float(np.abs(q.astype(np.float32)).max()) == FP8_MAX               # the range is used up to 448
    back = q.astype(np.float32) * s
    normal = np.abs(w.T) >= s * 2.0 ** -6                                   # E4M3's normal range
    assert np.all(np.abs(back - w.T)[normal] <= np.abs(w.T)[normal] * 2.0 ** -4)   # 3 mantissa bits
    # max |B| = 448 gives s = 1: ties round to the even mantissa, the tail is E4M3's subnormals
    b = np.array([448, 1.0625, 1.1875, 17, 19, 1.5 * 2.0 ** -9, 2.0 ** -10, -3 * 2.0 ** -10, 300], np.float32)
    q1, s1 = requantize(b[:, None], "fp8")
    assert s1 == 1.0 and q1.astype(np.float32).ravel().tolist() == [448, 1, 1.25, 16, 20, 2.0 ** -8, 0, -2.0 ** -8, 288]
    q0, s0 = requantize(np.zeros((4, 4), np.float32), "fp8")
    assert s0 == 1.0 and not q0.astype(np.float32).any()
    with pytest.raises(ValueError, match="no quantization scheme for precision 'int4'"):
        requantize(w, "int4")


def _one_matmul(tmp_path, w_nk: np.ndarray, opset: int) -> str:
    """x (n, K) -> Linear(W) as the exporter writes it: MatMul(x, W^T), W^T stored."""
    K, N = w_nk.shape[1], w_nk.shape[0]
    x = oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", K])
    y = oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", N])
    g = oh.make_graph([oh.make_node("MatMul", ["x", "val_1"], ["y"], name="lin")], "g", [x], [y],
                      [numpy_helper.from_array(np.ascontiguousarray(w_nk.T), "val_1")])
    path = str(tmp_path / "m.onnx")
    onnx.save(oh.make_model(g, opset_imports=[oh.make_opsetid("", opset)], ir_version=10), path)
    return path


def test_fp8_conversion_on_one_matmul(tmp_path):
    """The stored weight is requantize's, bit for bit; the activation's scale is its calibrated
    max |x| / 448; the quantizer's tensors are float8, none int8 is left; opset 18 is refused."""
    from var_ssg.export.quantize_fp8 import quantize_step_fp8
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((8, 32)) * 0.1).astype(np.float32)
    feeds = [{"x": (rng.standard_normal((n, 32)) * (1 + n)).astype(np.float32)} for n in (1, 4, 9)]   # per-scale token counts
    amax = max(float(np.abs(f["x"]).max()) for f in feeds)
    dst = str(tmp_path / "q.onnx")
    q = quantize_step_fp8(_one_matmul(tmp_path, w, 19), dst, {"var.lin.weight": w}, feeds, str(tmp_path))
    assert q.nodes == 1 and q.weights == {"val_1_quantized": "var.lin.weight"}
    m = onnx.load(dst)
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    want_q, want_s = requantize(w, "fp8")
    assert inits["val_1_quantized"].dtype == FP8
    assert np.array_equal(inits["val_1_quantized"].view(np.uint8), want_q.view(np.uint8))
    assert inits["val_1_scale"].shape == () and inits["val_1_scale"] == want_s
    act = [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
    assert len(act) == 1
    s_x = inits[act[0].input[1]]
    assert s_x.shape == () and abs(float(s_x) * FP8_MAX / amax - 1) < 1e-6, (float(s_x), amax)
    assert {t.data_type for t in m.graph.initializer if "zero_point" in t.name} == {onnx.TensorProto.FLOAT8E4M3FN}
    assert not [t.name for t in m.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    dq_w = next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "val_1_quantized")
    assert not [a for a in dq_w.attribute if a.name == "axis"]
    onnx.checker.check_model(m, full_check=True)
    with pytest.raises(ConfigError, match="fp8 needs --opset 19 or later.*opset 18"):
        quantize_step_fp8(_one_matmul(tmp_path, w, 18), dst, {"var.lin.weight": w}, feeds, str(tmp_path))


def test_fp8_export_config_and_gpu_refusals():
    from var_ssg.export.onnx_export import ExportConfig, default_opset
    from var_ssg.export.trt_build import check_precision
    assert default_opset("fp8") == 19 and default_opset("int8") == default_opset("fp32") == 18
    with pytest.raises(ConfigError, match="fp8 needs --opset 19 or 20.*got 18; leave --opset out"):
        ExportConfig(precision="fp8")
    assert ExportConfig(precision="fp8", opset=19).precision == "fp8"
    for cc in ("8.0", "8.6"):
        with pytest.raises(ConfigError, match=f"compute capability 8.9 or later.*is {cc}: export --precision int8"):
            check_precision("fp8", ("10.8", "NVIDIA A10", cc))
    for cc in ("8.9", "9.0", "10.0", "12.0"):
        check_precision("fp8", ("10.8", "NVIDIA L4", cc))
    check_precision("int8", ("10.8", "NVIDIA T4", "7.5"))           # only fp8 has a floor here


def test_fp8_cli_refuses_opset_18_before_loading_anything(tmp_path):
    from tests.conftest import TINY, run_cli
    r = run_cli("export.py", "--model", TINY, "--random-init", "0", "--out", tmp_path / "a", "--precision", "fp8",
                "--opset", "18")
    assert r.returncode == 2 and "fp8 needs --opset 19" in r.stderr, r.stderr
    assert not (tmp_path / "a").exists()


# ------------------------------------------------------------------ artifacts (slow: the fixture exports)
@pytest.fixture(scope="module")
def fp8_tiny(artifacts):
    return artifacts(precision="fp8", opset=19)


def test_fp8_export_quantizes_the_int8_layers_in_float8(fp8_tiny):
    man = load_manifest(fp8_tiny)
    q = man.data["quantization"]
    assert man.precision == "fp8" and man.data["kv"]["dtype"] == "float32" and man.data["opset"] == 19
    assert q["weight_type"] == q["activation_type"] == "QFLOAT8E4M3FN"
    assert q["weight_granularity"] == "per-tensor" and q["weight_axis"] is None and q["activation_symmetric"]
    params = set(q["weights"].values())
    depth = man.cfg.depth
    assert params == {f"var.blocks.{i}.{p}.weight" for i in range(depth)
                      for p in ("attn.mat_qkv", "attn.proj", "ffn.fc1", "ffn.fc2")}
    assert q["nodes"] == 4 * depth and q["calibration"]["feeds"] == 6 * man.cfg.num_scales
    g = onnx.load(str(Path(fp8_tiny) / "step_all.onnx"), load_external_data=False)
    assert max(o.version for o in g.opset_import if o.domain in ("", "ai.onnx")) == 19
    inits = {t.name: t for t in g.graph.initializer}
    assert not [t.name for t in g.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    for name in q["weights"]:
        assert inits[name].data_type == onnx.TensorProto.FLOAT8E4M3FN
        assert list(inits[name[:-len("_quantized")] + "_scale"].dims) == []
    qs = [n for n in g.graph.node if n.op_type == "QuantizeLinear"]
    assert len(qs) == 4 * depth                      # one activation per quantized MatMul's input
    assert all(inits[n.input[2]].data_type == onnx.TensorProto.FLOAT8E4M3FN for n in qs)
    # every quantized MatMul reads a DequantizeLinear on both inputs; the others read none
    dq_out = {n.output[0] for n in g.graph.node if n.op_type == "DequantizeLinear"}
    mm = [n for n in g.graph.node if n.op_type == "MatMul"]
    assert sum(n.input[0] in dq_out and n.input[1] in dq_out for n in mm) == 4 * depth
    assert not any(n.input[0] in dq_out or n.input[1] in dq_out for n in mm
                   if not (n.input[0] in dq_out and n.input[1] in dq_out))


def test_fp8_manifest_schema_holds_the_fp8_layout(fp8_tiny):
    from var_ssg.contract.manifest import ManifestError, check_manifest
    data = load_manifest(fp8_tiny).data
    check_manifest(data)
    for key, value, msg in (("weight_axis", 1, "weight_axis.*must be null"),
                            ("weight_granularity", "per-channel", "weight_granularity"),
                            ("weight_type", "QInt8", "weight_type")):
        bad = json.loads(json.dumps(data))
        bad["quantization"][key] = value
        with pytest.raises(ManifestError, match=msg):
            check_manifest(bad)


def test_fp8_artifacts_are_refused_by_onnxruntime(fp8_tiny):
    from var_ssg.runtime.backends import open_backend
    with pytest.raises(ConfigError, match="fp8 artifacts are TensorRT-only.*--backend tensorrt.*8.9"):
        open_backend("onnxruntime", fp8_tiny, device="cpu")


def _weights_check(d):
    from var_ssg.graphs.weights import load_models
    from var_ssg.runtime.weights_check import weights_check
    man = load_manifest(d)
    var, vae, _ = load_models(man.cfg, None, None, 0)
    return weights_check(man, {"var": var, "vae": vae})


PARAM = "var.blocks.1.ffn.fc1.weight"


def _plant(src: str, dst: Path, what: str) -> str:
    """A copy with PARAM's stored scale x 1.01 or one weight byte's lowest bit flipped, the hashes
    rewritten (so only the weights check can notice)."""
    shutil.copytree(src, dst)
    g = onnx.load(str(dst / "step_all.onnx"), load_external_data=False)
    man = json.loads((dst / "manifest.json").read_text())
    name = next(n for n, p in man["quantization"]["weights"].items() if p == PARAM)
    inits = {t.name: t for t in g.graph.initializer}
    t = inits[name] if what == "weight" else inits[name[:-len("_quantized")] + "_scale"]
    raw = bytearray((dst / "weights.bin").read_bytes())
    if t.data_location == onnx.TensorProto.EXTERNAL:
        e = {x.key: x.value for x in t.external_data}
        off, ln = int(e.get("offset", 0)), int(e["length"])
        if what == "weight":
            raw[off] ^= 1
        else:
            raw[off:off + ln] = (np.frombuffer(bytes(raw[off:off + ln]), np.float32) * np.float32(1.01)).tobytes()
    else:
        a = numpy_helper.to_array(t).copy()
        if what == "weight":
            a.view(np.uint8).reshape(-1)[0] ^= 1
        else:
            a = (a * np.float32(1.01)).astype(np.float32)
        t.CopyFrom(numpy_helper.from_array(a, t.name))
    onnx.save(g, str(dst / "step_all.onnx"))
    (dst / "weights.bin").write_bytes(bytes(raw))
    write_manifest(str(dst), {k: v for k, v in man.items() if k != "files"})
    return str(dst)


def test_fp8_weights_check_rederives_every_weight_and_catches_planted_bugs(fp8_tiny, tmp_path):
    rep = _weights_check(fp8_tiny)
    assert not rep.failures, rep.failures
    assert rep.quantized == 4 * load_manifest(fp8_tiny).cfg.depth and "every parameter compared" in rep.summary()
    for what, msg in (("scale", "scales"), ("weight", "1 stored values")):
        rep = _weights_check(_plant(fp8_tiny, tmp_path / what, what))
        assert len(rep.failures) == 1 and PARAM in rep.failures[0], rep.failures
        assert re.search(msg, rep.failures[0]), rep.failures[0]


real_bindings = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))


@real_bindings
@pytest.mark.parametrize("version", VERSIONS)
def test_fp8_engine_builds_under_real_bindings(version, fp8_tiny, tmp_path):
    """Strongly typed, no precision flag (TF32 cleared), one profile per scale; refused for
    compute capability 8.0 and 8.6 (nothing built), built for 8.9."""
    r = run_under_real_trt(version, "tests.trt_real.scenarios:build_fp8", fp8_tiny, str(tmp_path))
    assert r["version"].startswith(version) and r["step"] == "step_all.plan"
    assert set(r["refused"]) == {"8.0", "8.6"}
    # TensorRT 10 has the FP8/INT8 flags (for weakly typed networks) and our build sets neither; 11 has none
    assert r["precision_flags"] == ([] if version == "11" else ["BF16", "FP16", "FP8", "INT8"]), r["precision_flags"]
    for cc, msg in r["refused"].items():
        assert "compute capability 8.9 or later" in msg and f"is {cc}" in msg, msg


# ------------------------------------------------------------------ the CPU emulation (benchmarks.fp8_emulation)
def test_fp8_emulation_equals_the_qdq_graph_run_as_written(tmp_path):
    """The emulated graph gives what ONNX Runtime computes from the QDQ graph with its fusions off
    (QuantizeLinear/DequantizeLinear run as the operators they are), to fp32 summation order."""
    import onnxruntime as ort
    from var_ssg.benchmarks.fp8_emulation import emulate_step_graph
    from var_ssg.export.quantize_fp8 import quantize_step_fp8
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((16, 32)) * 0.1).astype(np.float32)
    feeds = [{"x": (rng.standard_normal((n, 32)) * 3).astype(np.float32)} for n in (1, 4)]
    dst = str(tmp_path / "q.onnx")
    quantize_step_fp8(_one_matmul(tmp_path, w, 19), dst, {"var.lin.weight": w}, feeds, str(tmp_path))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    x = (rng.standard_normal((5, 32)) * 4).astype(np.float32)              # past the calibrated range: saturates
    want = ort.InferenceSession(dst, so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    m = onnx.load(dst)
    assert emulate_step_graph(m) == 3                                       # weight DQ, input Q and DQ
    assert not {n.op_type for n in m.graph.node} & {"QuantizeLinear", "DequantizeLinear"}
    got = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    # the same float8 values: only the MatMul kernels' summation order differs (a constant weight
    # is pre-packed); one input a float8 step off would move its outputs by ~1e-2
    assert np.allclose(got, want, rtol=1e-5, atol=1e-6), np.abs(got - want).max()
    q8 = np.clip(x / np.float32(np.abs(np.concatenate([f["x"] for f in feeds])).max() / 448), -448, 448)
    assert not np.array_equal(got, x @ w.T) and np.abs(q8).max() == 448      # quantized, and saturated


def test_fp8_emulation_takes_fp8_artifacts_only(tmp_path):
    from types import SimpleNamespace
    from var_ssg.benchmarks.fp8_emulation import emulated_backend
    with pytest.raises(ConfigError, match="fp8 emulation takes fp8 artifacts; these are int8"):
        emulated_backend(SimpleNamespace(precision="int8"), str(tmp_path))


def test_fp8_emulated_backend_runs_the_pipeline(fp8_tiny, tmp_path):
    from var_ssg.benchmarks.fp8_emulation import emulated_backend
    from var_ssg.runtime.pipeline import Pipeline
    res = Pipeline(emulated_backend(load_manifest(fp8_tiny), str(tmp_path))).run([3], 0)
    assert res.images.shape[0] == 1 and np.isfinite(res.images).all()
