"""Infinity's TensorRT backend (runtime/backends/infinity_trt.py, DESIGN.md "Infinity") without a
GPU: infinity-tiny exported with --target trt, then the backend on the REAL TensorRT 10.8, 10.16
and 11.4 Python bindings through the strict fake of tests/trt_real (execution by ONNX Runtime):
ONNX Runtime's bits on several seeds and two aspect ratios, CUDA-graph capture and replay,
schedule switches, parity.py --backends onnxruntime,tensorrt, and planted bugs that must fail
(tests/trt_real/scenarios.py: infinity_backend_runs). The clear errors without TensorRT run here."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from var_ssg.common.errors import ConfigError
from var_ssg.graphs.infinity_config import get_infinity_preset
from tests.trt_real import VERSIONS, run_under_real_trt, skip_reason

INF = "infinity-tiny"
real_bindings = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))


def _have_trt():
    try:
        import tensorrt  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.fixture(scope="module")
def inf_onnx(tmp_path_factory):
    from var_ssg.tools.commands.export import main
    out = str(tmp_path_factory.mktemp("inf") / "art")
    assert main(["--model", INF, "--random-init", "0", "--out", out]) == 0
    return out


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    from tests.test_infinity_export import _t5
    return _t5(tmp_path_factory.mktemp("t5") / "t5", get_infinity_preset(INF).text_dim)


@pytest.mark.slow
@real_bindings
@pytest.mark.parametrize("version", VERSIONS)
def test_infinity_tensorrt_backend_under_real_bindings(version, inf_onnx, t5_dir, tmp_path):
    r = run_under_real_trt(version, "tests.trt_real.scenarios:infinity_backend_runs", inf_onnx, t5_dir, str(tmp_path))
    assert r["version"].startswith(version) and r["K"] == 7
    assert [x["ratio"] for x in r["runs"]] == [1.0, 1.0, 1.0, 0.75, 0.75, 0.75, 1.0]
    assert r["planted_bits_differ"] > 0 and r["planted_failures"] > 0


@pytest.mark.slow
@real_bindings
def test_infinity_tensorrt_backend_batch_2_under_real_bindings(tmp_path):
    """Batch-2 artifacts: two rows, then one row padded to two, on two aspect ratios (TensorRT 11:
    what batch changes is shapes, which every version handles alike)."""
    from var_ssg.tools.commands.export import main
    art = str(tmp_path / "b2")
    assert main(["--model", INF, "--random-init", "0", "--batch", "2", "--out", art]) == 0
    r = run_under_real_trt("11", "tests.trt_real.scenarios:infinity_backend_batch", art, str(tmp_path))
    assert r["B"] == 2 and [s[0] for s in r["shapes"]] == [2, 1, 2]


@pytest.mark.slow
def test_infinity_tensorrt_clear_errors_here(inf_onnx):
    """Without TensorRT (this process): open_infinity says to install it; --device cpu is refused
    before anything loads; an unknown backend names the three."""
    from var_ssg.runtime.infinity import open_infinity
    with pytest.raises(ConfigError, match="pass --device cuda, not cpu"):
        open_infinity(artifacts=inf_onnx, backend="tensorrt")
    with pytest.raises(ConfigError, match="Infinity runs on eager, onnxruntime and tensorrt"):
        open_infinity(artifacts=inf_onnx, backend="trt")
    if _have_trt() and torch.cuda.is_available():
        pytest.skip("TensorRT and a GPU are present")
    with pytest.raises(ConfigError, match="TensorRT is not installed: pip install|needs an NVIDIA GPU"):
        open_infinity(artifacts=inf_onnx, backend="tensorrt", device="cuda")


class RangedEngine:
    """An engine's I/O as TensorRT reports it, with (min, opt, max) per profile."""

    def __init__(self, tensors, n_profiles):
        self.t, self.num_optimization_profiles, self.num_io_tensors = tensors, n_profiles, len(tensors)

    def get_tensor_name(self, i):
        return list(self.t)[i]

    def get_tensor_mode(self, n):
        return SimpleNamespace(name=self.t[n][0])

    def get_tensor_dtype(self, n):
        return SimpleNamespace(name="FLOAT")

    def get_tensor_shape(self, n):
        return self.t[n][1]

    def get_tensor_profile_shape(self, n, k):
        return self.t[n][2][k]


GRAPH = dict(inputs=[dict(name="x", shape=["n", 4], dtype="float32"), dict(name="c", shape=[2], dtype="float32")],
             outputs=[dict(name="y", shape=["n", 4], dtype="float32")])
ENTRY = dict(profile_scales=[1, 0], profiles=[{"x": [2, 4]}, {"x": [5, 4]}],           # per scale: opt
             profile_min=[{"x": [1, 4]}, {"x": [3, 4]}], profile_max=[{"x": [2, 4]}, {"x": [8, 4]}])


def test_ranged_engine_io_is_checked_per_profile_in_profile_scales_order():
    """check_ranged_engine_io (Infinity's engines): engine profile i holds scale profile_scales[i]'s
    (min, opt, max); symbolic dimensions may be anything; static ones must be the graph's."""
    from var_ssg.runtime.backends.trt import check_ranged_engine_io
    ranges = [[[3, 4], [5, 4], [8, 4]], [[1, 4], [2, 4], [2, 4]]]          # engine profile 0 = scale 1

    def engine(**change):
        t = dict(x=("INPUT", (-1, 4), ranges), c=("INPUT", (2,), None), y=("OUTPUT", (-1, 4), None))
        t.update(change)
        return RangedEngine(t, 2)
    check_ranged_engine_io(engine(), "s.plan", GRAPH, ENTRY)
    check_ranged_engine_io(engine(y=("OUTPUT", (7, 4), None)), "s.plan", GRAPH, ENTRY)   # symbolic: any
    bad = [(engine(x=("INPUT", (-1, 4), ranges[::-1])), r"x has \(min, opt, max\) shapes .* in profile 0"),
           (engine(c=("INPUT", (3,), None)), r"c has shape \[3\] in the engine"),
           (engine(y=("OUTPUT", (-1, 5), None)), r"y has shape \[-1, 5\]"),
           (engine(c=("INPUT", (-1,), [[[2]] * 3] * 2)), "c is dynamic in the engine .* but in no profile"),
           (RangedEngine(engine().t, 1), "1 optimization profiles, the manifest has 2")]
    for e, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            check_ranged_engine_io(e, "s.plan", GRAPH, ENTRY)
    # a static engine (the text engine): one default profile, every shape the graph's
    check_ranged_engine_io(RangedEngine(dict(c=("INPUT", (2,), None), y=("OUTPUT", (3, 4), None)), 1), "t.plan",
                           dict(inputs=GRAPH["inputs"][1:], outputs=GRAPH["outputs"]), dict(profiles=[]))


@pytest.mark.gpu
def test_infinity_tensorrt_matches_onnxruntime_on_gpu(tmp_path):
    if not (torch.cuda.is_available() and _have_trt()):
        pytest.skip("needs an NVIDIA GPU and TensorRT")
    from var_ssg.runtime.infinity import PromptRow, open_infinity
    from var_ssg.tools.commands.export import main
    out = str(tmp_path / "a")
    assert main(["--model", INF, "--random-init", "0", "--out", out, "--target", "trt"]) == 0
    ort, _ = open_infinity(artifacts=out)
    trt, _ = open_infinity(artifacts=out, backend="tensorrt", device="cuda")
    cfg = ort.info.cfg
    g = torch.Generator().manual_seed(0)
    row = PromptRow(torch.randn(cfg.text_maxlen, cfg.text_dim, generator=g).numpy(),
                    (torch.arange(cfg.text_maxlen) < 5).float().numpy(), seed=1, cfg=3.0, ssg_beta="0.5")
    for ratio in (1.0, 0.75):
        a = ort.run([row], ratio)
        for _ in range(3):              # plain run, CUDA graph capture, replay
            b = trt.run([row], ratio)
            assert all(np.array_equal(x, y) for x, y in zip(a.bits, b.bits)), ratio
            assert np.abs(a.images - b.images).max() <= 1e-3
