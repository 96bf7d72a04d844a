"""The one dtype table (DESIGN.md: contract/ holds it; every layer reads it). A manifest names
dtypes by torch's names ("float32", "bfloat16", ...); each row says what that dtype is called by
ONNX (a `onnx.TensorProto` element type), by TensorRT (a `tensorrt.DataType` member) and by
numpy (bfloat16 and float8 come from ml_dtypes, onnx's own dependency, as onnx reads them).

Plain data here: nothing imports torch, onnx or ml_dtypes until a function that needs it is
called, so reading a manifest stays cheap (DESIGN.md "Start-up")."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional


@dataclass(frozen=True)
class DType:
    name: str           # the manifest's name = torch's (torch.<name>)
    onnx: str           # onnx.TensorProto.<onnx>, onnx_ir.DataType.<onnx>
    trt: str            # tensorrt.DataType.<trt>
    ml_dtypes: bool = False     # numpy has no such dtype: ml_dtypes.<name>

    @property
    def floating(self) -> bool:
        return self.name.startswith(("float", "bfloat"))


DTYPES: Dict[str, DType] = {d.name: d for d in (
    DType("float32", "FLOAT", "FLOAT"),
    DType("float16", "FLOAT16", "HALF"),
    DType("bfloat16", "BFLOAT16", "BF16", ml_dtypes=True),
    DType("float8_e4m3fn", "FLOAT8E4M3FN", "FP8", ml_dtypes=True),
    DType("float64", "DOUBLE", "DOUBLE"),
    DType("int64", "INT64", "INT64"),
    DType("int32", "INT32", "INT32"),
    DType("int8", "INT8", "INT8"),
    DType("uint8", "UINT8", "UINT8"),
    DType("bool", "BOOL", "BOOL"),
)}
DTYPE_NAMES = tuple(DTYPES)
# a precision's dtype (its KV cache, its transformer weights)
# int8 and fp8 quantize the transformer's weight MatMuls in the graph (QDQ: contract.quantization);
# the tensors between them, the KV cache included, stay float32
PRECISION_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "int8": "float32", "fp8": "float32"}
FLOAT_NAMES = tuple(n for n, d in DTYPES.items() if d.floating)
_BY_ONNX = {d.onnx: d.name for d in DTYPES.values()}
_BY_TRT = {d.trt: d.name for d in DTYPES.values()}


def torch_dtype(name: str):
    """The torch dtype of a manifest dtype name (torch is imported here, on first use)."""
    import torch
    if name not in DTYPES:
        raise KeyError(name)
    return getattr(torch, name)


def dtype_name_of(dtype) -> Optional[str]:
    """The manifest name of a torch (or numpy/ml_dtypes) dtype, None if it has none."""
    name = str(dtype).replace("torch.", "")
    return name if name in DTYPES else None


def dtype_name(onnx_ir_dtype) -> str:
    """The manifest name of an onnx_ir DataType (the element type an exported graph declares)."""
    s = str(onnx_ir_dtype).rsplit(".", 1)[-1].upper()
    if s not in _BY_ONNX:
        raise KeyError(f"ONNX element type {s} is not in contract.dtypes.DTYPES")
    return _BY_ONNX[s]


def onnx_type(name: str) -> int:
    """The onnx.TensorProto element type of a manifest dtype name."""
    import onnx
    return getattr(onnx.TensorProto, DTYPES[name].onnx)


def name_of_onnx(elem_type: int) -> Optional[str]:
    """The manifest name of an onnx.TensorProto element type, None if the table has none."""
    import onnx
    return _BY_ONNX.get(onnx.TensorProto.DataType.Name(elem_type)) if elem_type in onnx.TensorProto.DataType.values() \
        else None


def name_of_trt(member: str) -> Optional[str]:
    """The manifest name of a tensorrt.DataType member name ("HALF" -> "float16"), None if none."""
    return _BY_TRT.get(member)


def numpy_dtype(name: str):
    """The numpy dtype of a manifest dtype name (bfloat16 and float8 through ml_dtypes)."""
    import numpy as np
    d = DTYPES[name]
    if d.ml_dtypes:
        import ml_dtypes
        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)
