"""TensorRT: what can be proven without it (plan, guards, errors); GPU tests behind `gpu`."""
import json
import os

import pytest

from export.trt_build import engine_cache_key, import_tensorrt, plan, version_tuple
from graphs.config import ConfigError


def test_missing_tensorrt_is_a_clear_error():
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match="TensorRT is not installed: pip install"):
        import_tensorrt()


def test_plan_from_manifest(artifacts):
    man = json.load(open(os.path.join(artifacts(precision="fp16"), "manifest.json")))
    p = plan(man)
    assert [x.graph for x in p] == [f"step_{k}" for k in range(10)] + ["decoder"]
    s3 = p[3]
    assert s3.shapes["past_kv"][0] == 1 + 4 + 9 and s3.shapes["prev_logits"] == [1, 9, 64]
    assert s3.fp32_outputs == ["logits", "logits_cfg"]     # DSE/SSG arithmetic stays fp32
    assert s3.half_inputs == ["past_kv"]
    k1 = engine_cache_key(man, "10.13.0", "NVIDIA H200", "9.0")
    assert k1 != engine_cache_key(man, "11.0.0", "NVIDIA H200", "9.0")
    assert k1 != engine_cache_key(man, "10.13.0", "NVIDIA H200", "8.9")


def test_version_tuple():
    assert version_tuple("10.13.0.35") == (10, 13) and version_tuple("11.4.0.106") >= (10, 0)
