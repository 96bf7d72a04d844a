"""contract.dtypes: the one dtype table. Each row's names are checked against the libraries that
define them (onnx, numpy/ml_dtypes, torch; TensorRT where installed), and the readers that use
it (the graph check, the weights reader) handle every dtype it holds."""
import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from var_ssg.contract import dtypes
from var_ssg.contract.graphcheck import check_values
from var_ssg.contract.manifest import ManifestError


@pytest.mark.parametrize("name", dtypes.DTYPE_NAMES)
def test_each_row_names_one_dtype_in_every_library(name):
    elem = dtypes.onnx_type(name)
    assert dtypes.name_of_onnx(elem) == name
    assert helper.tensor_dtype_to_np_dtype(elem) == dtypes.numpy_dtype(name)    # onnx's own mapping
    t = torch.zeros(2, dtype=dtypes.torch_dtype(name))
    assert dtypes.dtype_name_of(t.dtype) == name
    assert t.element_size() == dtypes.numpy_dtype(name).itemsize
    assert dtypes.name_of_trt(dtypes.DTYPES[name].trt) == name


def test_the_table_covers_what_the_exports_use():
    for name in ("float32", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "bool", "float8_e4m3fn"):
        assert name in dtypes.DTYPES
    assert set(dtypes.PRECISION_DTYPES.values()) <= set(dtypes.DTYPES)
    assert dtypes.name_of_onnx(onnx.TensorProto.STRING) is None and dtypes.name_of_trt("INT4") is None
    with pytest.raises(KeyError, match="complex64"):
        dtypes.torch_dtype("complex64")


def test_tensorrt_names_are_tensorrt_members():
    trt = pytest.importorskip("tensorrt")
    for d in dtypes.DTYPES.values():
        if d.name != "float64":         # TensorRT has no double
            assert hasattr(trt.DataType, d.trt), d


@pytest.mark.parametrize("name", ["float32", "float16", "bfloat16", "float64"])
def test_stored_values_are_checked_in_every_float_dtype(name):
    """A NaN in a bf16 initializer is refused like one in fp32 (bf16 arrays are ml_dtypes')."""
    a = np.ones(4, dtype=np.float32).astype(dtypes.numpy_dtype(name))
    check_values("g.onnx", "initializer w", a)
    a[1] = np.nan
    stored = numpy_helper.to_array(numpy_helper.from_array(a, "w"))      # as the graph check reads it
    with pytest.raises(ManifestError, match="initializer w holds NaN or infinite values"):
        check_values("g.onnx", "initializer w", stored)


# the parity modules, rewritten by the lead, still import it through graphs.config: each must
# still do so (this set empties as they are switched)
CONFIG_ERROR_PENDING = set()


def test_config_error_is_imported_from_one_place():
    """ConfigError is defined in common.errors and imported from there, never through another
    module that happens to import it (graphs.config did)."""
    import ast
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    others = set()
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if not x.startswith(".") and x not in ("build", "__pycache__")]
        for f in (f for f in files if f.endswith(".py")):
            path = os.path.join(d, f)
            rel = os.path.relpath(path, root)
            for n in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
                if isinstance(n, ast.ImportFrom) and any(a.name == "ConfigError" for a in n.names):
                    if not (n.module == "var_ssg.common.errors" or (n.module == "errors" and rel.startswith("common"))):
                        others.add(rel)
    assert others == CONFIG_ERROR_PENDING, sorted(others ^ CONFIG_ERROR_PENDING)
