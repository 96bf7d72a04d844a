"""Clipped int8 activation ranges (DESIGN.md "Low precision"): the rules on known data, the
quantizer taking the clipped range (planted: a quantizer that ignores the override fails the
export's own check), and the record in var-d2-tiny's manifest matching its graph."""
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper as oh, numpy_helper

from var_ssg.common.errors import ConfigError
from var_ssg.contract.manifest import load_manifest


def _gelu_like(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    return (0.5 * x * (1 + np.tanh(0.7978845 * (x + 0.044715 * x ** 3)))).astype(np.float32)


def _int8_mse(x: np.ndarray, c: float) -> float:
    s = c / 127
    return float(np.mean((np.clip(np.rint(x / s), -127, 127) * s - x) ** 2))


def test_clip_rules_on_known_data():
    """minmax is max|x|; pQ the Q-th percentile of |x| (to the bin: < 0.8 % above); mse within 1 %
    of the brute-force optimum's error, well below MinMax's; bad rules are refused."""
    from var_ssg.export.clip import AbsHistogram, clip_bound, saturated
    from var_ssg.export.quantize import CalibrationConfig
    x = _gelu_like(400_000)
    h = AbsHistogram()
    h.add(x[:150_000])
    h.add(x[150_000:].reshape(50, -1))             # streamed in pieces of any shape
    amax = float(np.abs(x).max())
    assert h.amax == amax and h.n == x.size and clip_bound(h, "minmax") == amax
    p = clip_bound(h, "p99.9")
    assert np.percentile(np.abs(x), 99.9) <= p <= 1.008 * np.percentile(np.abs(x), 99.9)
    assert 0.0005 <= saturated(h, p) <= 0.001 and saturated(h, amax) == 0
    c = clip_bound(h, "mse")
    best = min(_int8_mse(x, b) for b in np.linspace(amax / 4, amax, 400))
    assert c < 0.85 * amax and _int8_mse(x, c) <= 1.01 * best < 0.8 * _int8_mse(x, amax)
    for bad in ("p12", "p", "max", "pabc", "p100.5"):
        with pytest.raises(ConfigError, match="clip_rule"):
            CalibrationConfig(clip_rule=bad)
    with pytest.raises(ConfigError, match="inf or NaN"):
        h.add(np.array([1.0, np.inf], np.float32))


def _gelu_matmul(tmp_path, w_nk: np.ndarray) -> str:
    """x -> fc1 MatMul -> GELU (tanh, as VAR's) -> fc2 MatMul: fc2's input has GELU's tail."""
    K, N = w_nk.shape[1], w_nk.shape[0]
    x = oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", K])
    y = oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", N])
    w1 = np.eye(K, dtype=np.float32) * 1.5
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(np.ascontiguousarray(w_nk.T), "w2")]
    nodes = [oh.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             oh.make_node("Gelu", ["h"], ["g"], name="gelu", approximate="tanh"),
             oh.make_node("MatMul", ["g", "w2"], ["y"], name="fc2")]
    m = oh.make_model(oh.make_graph(nodes, "g", [x], [y], inits), opset_imports=[oh.make_opsetid("", 20)],
                      ir_version=10)
    path = str(tmp_path / "m.onnx")
    onnx.save(m, path)
    return path


def test_quantizer_takes_the_clipped_range_and_ignoring_it_fails(tmp_path, monkeypatch):
    """quantize_step hands fc2's input a clipped range: its scale is range / 127, below MinMax's
    amax / 127, while fc1's input keeps MinMax; planted, a quantizer that drops the override
    (MinMax for everything) is caught by the export's own check, naming the parameter."""
    from var_ssg.export import quantize as qz
    rng = np.random.default_rng(1)
    w1, w2 = np.eye(16, dtype=np.float32) * 1.5, rng.standard_normal((8, 16)).astype(np.float32)
    src = _gelu_matmul(tmp_path, w2)
    feeds = [{"x": rng.standard_normal((n, 16)).astype(np.float32)} for n in (64, 256, 1024)]
    params = {"var.blocks.0.ffn.fc1.weight": w1.T.copy(), "var.blocks.0.ffn.fc2.weight": w2}
    # fc1's weight (1.5 I) is symmetric: it matches fc1.weight either way round
    q = qz.quantize_step(src, str(tmp_path / "q.onnx"), "int8", params, feeds, str(tmp_path),
                         clip=("blocks.*.ffn.fc2.weight",), clip_rule="p99.9")
    assert list(q.clipped) == ["g"] and q.clipped["g"]["parameter"] == "var.blocks.0.ffn.fc2.weight"
    r = q.clipped["g"]
    gelu = [np.asarray(0.5 * h * (1 + np.tanh(0.7978845 * (h + 0.044715 * h ** 3))), np.float32)
            for h in (f["x"] @ w1 for f in feeds)]
    assert r["amax"] == pytest.approx(max(float(np.abs(g).max()) for g in gelu), rel=1e-5)
    assert 0 < r["range"] < 0.9 * r["amax"] and 0 < r["saturated"] < 0.01
    scales = qz.activation_scales(str(tmp_path / "q.onnx"))
    assert scales["g"] == pytest.approx(r["range"] / 127, rel=1e-6)
    assert scales["x"] == pytest.approx(max(float(np.abs(f["x"]).max()) for f in feeds) / 127, rel=1e-5)

    import onnxruntime.quantization as oq           # quantize_step imports it from here at each call
    orig = oq.quantize_static

    def ignoring(*a, extra_options=None, **kw):           # the planted bug: overrides dropped
        return orig(*a, extra_options={k: v for k, v in extra_options.items() if k != "TensorQuantOverrides"}, **kw)
    monkeypatch.setattr(oq, "quantize_static", ignoring)
    with pytest.raises(ConfigError, match="did not apply the clipped range of var.blocks.0.ffn.fc2.weight"):
        qz.quantize_step(src, str(tmp_path / "q2.onnx"), "int8", params, feeds, str(tmp_path),
                         clip=("blocks.*.ffn.fc2.weight",), clip_rule="p99.9")
    with pytest.raises(ConfigError, match="names no quantized MatMul"):
        qz.quantize_step(src, str(tmp_path / "q3.onnx"), "int8", params, feeds, str(tmp_path),
                         keep_fp32=("blocks.*.ffn.fc2.*",), clip=("blocks.*.ffn.fc2.weight",), clip_rule="p99.9")


@pytest.mark.slow
def test_int8_manifest_records_the_clip_its_graph_applies(artifacts):
    """var-d2-tiny int8 (the default CalibrationConfig): the manifest's calibration names the
    rule and the range of each quantized MatMul's input, and the step graph quantizes each with
    scale = range / 127 (the record reproduces the graph); the schema refuses a range > amax."""
    from var_ssg.contract.manifest import ManifestError
    from var_ssg.export.quantize import CalibrationConfig, activation_scales
    d = artifacts(precision="int8")
    man = load_manifest(d)
    cal = man.data["quantization"]["calibration"]
    cc = CalibrationConfig()
    assert cal["clip"] == list(cc.clip) and cal["clip_rule"] == cc.clip_rule
    got = sorted(r["parameter"] for r in cal["clipped"].values())       # every quantized MatMul's input
    assert got == sorted(man.data["quantization"]["weights"].values()) and len(got) == 4 * man.cfg.depth
    scales = activation_scales(str(Path(d) / "step_all.onnx"))
    for t, r in cal["clipped"].items():
        assert 0 < r["range"] < r["amax"]
        assert scales[t] == pytest.approx(r["range"] / 127, rel=1e-6), t
    import copy
    from var_ssg.contract.quantization import validate
    from var_ssg.contract.schema import Check
    bad = copy.deepcopy(man.data)
    t = next(iter(bad["quantization"]["calibration"]["clipped"]))
    bad["quantization"]["calibration"]["clipped"][t]["range"] = 2 * cal["clipped"][t]["amax"]
    with pytest.raises(ManifestError, match="range"):
        validate(Check("m"), bad, "int8", man.cfg.num_scales)
