"""Infinity's TensorRT backend (runtime/backends/infinity_trt.py, DESIGN.md "Infinity") without a
GPU: infinity-tiny exported with --target trt, then the backend on the REAL TensorRT 10.8, 10.16
and 11.4 Python bindings through the strict fake of tests/trt_real (execution by ONNX Runtime):
ONNX Runtime's bits on several seeds and two aspect ratios, CUDA-graph capture and replay,
schedule switches, parity.py --backends onnxruntime,tensorrt, and planted bugs that must fail
(tests/trt_real/scenarios.py: infinity_backend_runs). The clear errors without TensorRT run here."""
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
