"""runtime: runs artifacts through their manifest (eager, ONNX Runtime, TensorRT)."""
