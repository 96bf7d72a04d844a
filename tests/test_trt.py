"""TensorRT: what can be proven without it (engine plans and the flags the builder applies,
cache keys and engine reuse, the timing cache, version rules, engine loading checks, CUDA graph
fallback), with a small fake `tensorrt` module where the real one would be
called; the GPU test sits behind the `gpu` marker."""
import contextlib
import json
import logging
import os
import shutil
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from contract.tensorrt import check_compat, engine_cache_key, import_tensorrt, version_ok, version_tuple
from export.trt_build import TIMING_CACHE, build_engines, engines_stale, plan
from graphs.config import ConfigError, get_preset
from tests.conftest import TINY, run_script


def _have_trt():
    try:
        import tensorrt  # noqa: F401
        return True
    except ImportError:
        return False


# ------------------------------------------------------------------ a fake tensorrt module
def fake_tensorrt(monkeypatch, version="10.13.0.35", gpu="NVIDIA H200", cc=(9, 0)):
    """Just enough of tensorrt for export/trt_build.py and the runtime's loaders, plus a CUDA
    device as PyTorch would report it. `trt.state` holds the GPU and what the builder saw."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.state = SimpleNamespace(gpu=gpu, cc=cc, configs=[], fail_build=False)
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, severity=None: None})
    trt.BuilderFlag = SimpleNamespace(TF32="TF32", VERSION_COMPATIBLE="VERSION_COMPATIBLE")
    trt.NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=0)
    trt.HardwareCompatibilityLevel = SimpleNamespace(AMPERE_PLUS="AMPERE_PLUS")

    class Cache:                                   # a timing cache knows the device it was made on
        def __init__(self, device):
            self.device = device

        def serialize(self):
            return f"cache:{self.device}".encode()

    class Config:
        def __init__(self):
            self.flags, self.hardware_compatibility_level, self.profiles, self.cache = {"TF32"}, None, [], None

        def set_flag(self, f):
            self.flags.add(f)

        def clear_flag(self, f):
            self.flags.discard(f)

        def create_timing_cache(self, data):
            s = bytes(data).decode()
            return Cache(trt.state.gpu) if not s else Cache(s[6:]) if s.startswith("cache:") else None

        def set_timing_cache(self, cache, ignore_mismatch):
            if cache.device != trt.state.gpu and not ignore_mismatch:
                return False
            self.cache = cache
            return True

        def add_optimization_profile(self, p):
            self.profiles.append(p)

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return SimpleNamespace(flags=flags)

        def create_builder_config(self):
            trt.state.configs.append(Config())
            return trt.state.configs[-1]

        def create_optimization_profile(self):
            return SimpleNamespace(set_shape=lambda *a: None, extra_memory_target=1.0)

        def build_serialized_network(self, network, config):
            if trt.state.fail_build:
                return None
            return json.dumps(dict(flags=sorted(config.flags), hw=config.hardware_compatibility_level,
                                   profiles=len(config.profiles), cache=config.cache.device)).encode()

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            return os.path.isfile(path)

    class Runtime:
        def __init__(self, logger):
            self.engine_host_code_allowed = False

        def deserialize_cuda_engine(self, data):
            return None

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, Runtime
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d=0: SimpleNamespace(name=trt.state.gpu, major=trt.state.cc[0], minor=trt.state.cc[1]))
    return trt


MAN = dict(cache_key="graphs-key", graphs=dict(
    step=dict(file="step_all.onnx", dynamic_inputs=["x"], profiles=[{"x": [1, 4], "y": [1]}, {"x": [3, 4], "y": [1]}]),
    decoder=dict(file="decoder.onnx")))


def _onnx_dir(tmp_path):
    for f in ("step_all.onnx", "decoder.onnx"):
        (tmp_path / f).write_bytes(b"onnx")
    return str(tmp_path)


# ------------------------------------------------------------------ guards, plan, keys, versions
def test_missing_tensorrt_is_a_clear_error():
    if _have_trt():
        pytest.skip("tensorrt is installed here")
    with pytest.raises(ConfigError, match="TensorRT is not installed: pip install"):
        import_tensorrt()


@pytest.mark.slow
def test_export_target_trt_fails_before_exporting(tmp_path):
    if _have_trt() and torch.cuda.is_available():
        pytest.skip("TensorRT and a GPU are present: --target trt would build")
    out = tmp_path / "a"
    r = run_script("export.py", "--model", TINY, "--random-init", "0", "--out", out, "--target", "trt")
    assert r.returncode == 2 and ("TensorRT is not installed" in r.stderr or "needs an NVIDIA GPU" in r.stderr)
    assert not out.exists() and not list(tmp_path.iterdir())      # nothing half-written


def test_plan_one_engine_one_profile_per_scale(artifacts):
    cfg = get_preset(TINY)
    man = json.load(open(os.path.join(artifacts(precision="fp16"), "manifest.json")))
    step, dec = plan(man)
    assert step.onnx == "step_all.onnx" and step.file == "step_all.plan"
    assert len(step.profiles) == cfg.num_scales
    # profiles come from the manifest's shapes; only the dynamic inputs need them (min = opt = max)
    for k, prof in enumerate(step.profiles):
        b, e = cfg.begin_ends[k]
        assert set(prof) == set(man["graphs"]["step"]["dynamic_inputs"])
        assert prof["past_kv"] == [b, cfg.depth, 2, 2, cfg.num_heads, cfg.head_dim]
        assert prof["noise"] == [1, e - b] and prof["scale_dse"] == [e - b, 1 if k == 0 else cfg.patch_nums[k - 1] ** 2]
    assert step.profiles[0]["past_kv"][0] == 0                      # scale 0: empty past
    # weights are not duplicated per profile
    assert step.extra_memory_target == [1.0] + [0.0] * (cfg.num_scales - 1)
    assert dec.profiles == [] and dec.file == "decoder.plan"
    # TF32 is off unless asked for; the flags are part of the plan (and of the manifest's engines)
    assert not step.tf32 and not dec.tf32 and plan(man, tf32=True)[0].tf32
    # fp16 artifacts: the KV cache is half, the DSE/SSG arithmetic and the logits stay fp32
    # (strongly typed networks take their types from the ONNX)
    io = {t["name"]: t["dtype"] for t in man["graphs"]["step"]["inputs"] + man["graphs"]["step"]["outputs"]}
    assert {n for n, d in io.items() if d == "float16"} == {"past_kv", "new_kv"}
    assert all(io[n] == "float32" for n in ("logits", "logits_cfg", "prev_logits", "beta", "scale_dse", "noise"))


def test_engine_cache_key_changes_with_what_makes_an_engine():
    k1 = engine_cache_key("graphs", "10.13.0", "NVIDIA H200", "9.0")
    assert k1 == engine_cache_key("graphs", "10.13.0", "NVIDIA H200", "9.0")
    assert len({k1, engine_cache_key("graphs", "11.0.0", "NVIDIA H200", "9.0"),
                engine_cache_key("graphs", "10.13.0", "NVIDIA H200", "8.9"),
                engine_cache_key("graphs", "10.13.0", "NVIDIA H100", "9.0"),
                engine_cache_key("graphs", "10.13.0", "NVIDIA H200", "9.0", hardware_compat=True),
                engine_cache_key("graphs", "10.13.0", "NVIDIA H200", "9.0", version_compat=True),
                engine_cache_key("graphs", "10.13.0", "NVIDIA H200", "9.0", tf32=True),
                engine_cache_key("other", "10.13.0", "NVIDIA H200", "9.0")}) == 8


def test_engines_stale_compares_the_stored_key():
    here = ("10.13.0.35", "NVIDIA H200", "9.0")
    assert engines_stale(dict(MAN), here) == "there are no TensorRT engines yet"
    data = dict(MAN, engines={"step": {}}, tensorrt=dict(version=here[0], gpu=here[1], compute_capability=here[2],
                                                          key=engine_cache_key("graphs-key", *here)))
    assert engines_stale(data, here) is None
    assert "this build is for TensorRT 10.14.1" in engines_stale(data, ("10.14.1", "NVIDIA H200", "9.0"))
    assert "on NVIDIA A100 (8.0)" in engines_stale(data, ("10.13.0.35", "NVIDIA A100", "8.0"))
    assert "tf32=True" in engines_stale(data, here, tf32=True)
    assert engines_stale(dict(data, cache_key="new graphs"), here) is not None


SEC = dict(version="10.13.0.35", gpu="NVIDIA H200", compute_capability="9.0",
           hardware_compatible=False, version_compatible=False)


def test_version_rules():
    """Runtime >= build for version-compatible engines (same major, or 10 -> 11); the exact
    version otherwise (contract/tensorrt.py cites NVIDIA's pages)."""
    assert version_ok("10.13.0.35", "10.13.0.35", False) and version_ok("10.13.0.35", "10.13.0", False)
    assert not version_ok("10.13.0", "10.13.1", False) and not version_ok("10.13.0", "10.14.1", False)
    assert version_ok("10.13.0", "10.14.1", True) and version_ok("10.13.0", "11.4.0", True)
    assert version_ok("11.0.0", "11.1.0", True)
    assert not version_ok("10.14.1", "10.13.0", True)              # an older runtime: never
    assert not version_ok("11.0.0", "10.16.1", True)
    assert not version_ok("10.13.0", "12.0.0", True)               # no other cross-major pair


def test_version_guards():
    check_compat(SEC, "10.13.0.35", "NVIDIA H200", "9.0")                     # same: fine
    with pytest.raises(ConfigError, match="built with TensorRT 10.13.0.35 and this is TensorRT 10.14.1"):
        check_compat(SEC, "10.14.1", "NVIDIA H200", "9.0")
    vc = dict(SEC, version_compatible=True)
    check_compat(vc, "10.14.1", "NVIDIA H200", "9.0")
    check_compat(vc, "11.4.0", "NVIDIA H200", "9.0")                          # 10 -> 11 is allowed
    with pytest.raises(ConfigError, match="only on the same or a later TensorRT"):
        check_compat(vc, "10.12.0", "NVIDIA H200", "9.0")                     # older runtime
    with pytest.raises(ConfigError, match=r"built for NVIDIA H200 \(compute capability 9.0\) and this GPU is NVIDIA L4 \(8.9\)"):
        check_compat(SEC, "10.13.0.35", "NVIDIA L4", "8.9")
    check_compat(dict(SEC, hardware_compatible=True), "10.13.0.35", "NVIDIA L4", "8.9")
    with pytest.raises(ConfigError, match="re-export with --target trt on this GPU"):   # pre-Ampere
        check_compat(dict(SEC, hardware_compatible=True), "10.13.0.35", "Tesla T4", "7.5")


def test_version_tuple():
    assert version_tuple("10.13.0.35") == (10, 13, 0) and version_tuple("11.4.0.106") >= (10, 0)
    assert version_tuple("10.0.0b6") == (10, 0, 0) and version_tuple("10.1") == (10, 1)


# ------------------------------------------------------------------ the builder, on a fake tensorrt
def test_builder_clears_tf32_unless_asked_and_records_the_flags(tmp_path, monkeypatch):
    trt = fake_tensorrt(monkeypatch)
    root = _onnx_dir(tmp_path)
    engines, sec = build_engines(root, MAN)
    assert [c.flags for c in trt.state.configs] == [set(), set()]           # TF32 (on by default) cleared
    assert json.loads((tmp_path / "step_all.plan").read_bytes())["profiles"] == 2
    assert engines["step"]["tf32"] is False and sec["tf32"] is False
    assert sec["key"] == engine_cache_key("graphs-key", "10.13.0.35", "NVIDIA H200", "9.0")
    engines, sec = build_engines(root, MAN, tf32=True, version_compat=True, hardware_compat=True)
    assert trt.state.configs[-1].flags == {"TF32", "VERSION_COMPATIBLE"}
    assert trt.state.configs[-1].hardware_compatibility_level == "AMPERE_PLUS"
    assert engines["step"]["tf32"] and engines["decoder"]["version_compatible"] and sec["tf32"]


def test_timing_cache_from_another_gpu_is_replaced_not_written_back(tmp_path, monkeypatch, caplog):
    trt = fake_tensorrt(monkeypatch, gpu="NVIDIA A100", cc=(8, 0))
    root = _onnx_dir(tmp_path)
    cache = tmp_path / TIMING_CACHE
    cache.write_bytes(b"cache:NVIDIA H200")
    trt.state.fail_build = True                           # a failed build writes nothing back
    with pytest.raises(ConfigError, match="failed to build"):
        build_engines(root, MAN)
    assert cache.read_bytes() == b"cache:NVIDIA H200"
    trt.state.fail_build = False
    with caplog.at_level(logging.WARNING):
        build_engines(root, MAN)
    assert "rejected the timing cache" in caplog.text
    assert {c.cache.device for c in trt.state.configs[1:]} == {"NVIDIA A100"}   # both builds used the fresh one
    assert cache.read_bytes() == b"cache:NVIDIA A100"
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        build_engines(root, MAN)                          # this GPU's cache: reused, no warning
    assert "rejected" not in caplog.text


def test_export_rebuilds_only_the_engines_for_a_new_tensorrt_or_gpu(artifacts, tiny, tmp_path, monkeypatch, caplog):
    from contract.manifest import load_manifest
    from export import onnx_export
    from export.onnx_export import ExportConfig, export_artifacts
    from graphs.weights import WeightSource
    out = tmp_path / "a"
    shutil.copytree(artifacts(), out)                     # ONNX artifacts (no engines) for these graphs
    trt = fake_tensorrt(monkeypatch)                      # (after the export: it fakes a CUDA device)
    _, var, vae = tiny

    def no_onnx_export(*a, **kw):
        raise AssertionError("the ONNX graphs are up to date: only the engines may be built")
    monkeypatch.setattr(onnx_export, "_export_into", no_onnx_export)
    src, ec = WeightSource(kind="random", seed=0), ExportConfig(top_k=64, target="trt")

    def export(ec=ec):
        n = len(trt.state.configs)
        man = export_artifacts(var, vae, src, str(out), ec).manifest
        assert load_manifest(str(out)).data["tensorrt"] == man["tensorrt"]      # hashes verified
        return man, (len(trt.state.configs) - n) // 2      # engines builds (step + decoder each)

    man, builds = export()
    assert builds == 1 and (out / "step_all.plan").exists() and man["tensorrt"]["version"] == "10.13.0.35"
    assert export()[1] == 0                               # same machine: up to date
    trt.__version__ = "10.14.1.1"                         # new TensorRT: new engines, same graphs
    man, builds = export()
    assert builds == 1 and man["tensorrt"]["version"] == "10.14.1.1"
    check_compat(man["tensorrt"], trt.__version__, "NVIDIA H200", "9.0")    # the runtime takes them
    trt.state.gpu, trt.state.cc = "NVIDIA A100", (8, 0)   # new GPU: the H200 timing cache is rejected
    with caplog.at_level(logging.WARNING):
        man, builds = export()
    assert builds == 1 and man["tensorrt"]["gpu"] == "NVIDIA A100" and "rejected the timing cache" in caplog.text
    assert (out / TIMING_CACHE).read_bytes() == b"cache:NVIDIA A100"
    man, builds = export(ExportConfig(top_k=64, target="trt", trt_tf32=True))    # an option: new engines
    assert builds == 1 and "TF32" in json.loads((out / "step_all.plan").read_bytes())["flags"]
    assert man["engines"]["step"]["tf32"] and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------ the runtime's loading checks
def test_runtime_allows_host_code_only_for_version_compatible_engines(tmp_path, monkeypatch):
    from runtime.backends.trt import deserialize, make_runtime
    trt = fake_tensorrt(monkeypatch)
    assert make_runtime(trt, dict(SEC, version_compatible=True)).engine_host_code_allowed is True
    rt = make_runtime(trt, SEC)
    assert rt.engine_host_code_allowed is False
    plan_file = tmp_path / "step_all.plan"
    plan_file.write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="could not deserialize the engine \\(TensorRT's log above says why") as e:
        deserialize(rt, str(plan_file), SEC)
    assert "another TensorRT" not in str(e.value)


class FakeEngine:
    """An engine's I/O as TensorRT reports it: name -> (mode, dtype, static shape, per-profile shapes)."""

    def __init__(self, tensors, n_profiles):
        self.t, self.num_optimization_profiles = tensors, n_profiles
        self.num_io_tensors = len(tensors)

    def get_tensor_name(self, i):
        return list(self.t)[i]

    def get_tensor_mode(self, n):
        return SimpleNamespace(name=self.t[n][0])

    def get_tensor_dtype(self, n):
        return SimpleNamespace(name=self.t[n][1])

    def get_tensor_shape(self, n):
        return self.t[n][2]

    def get_tensor_profile_shape(self, n, k):
        return [self.t[n][3][k]] * 3


IO = dict(inputs=[dict(name="x", shape=["n", 4], dtype="float16"), dict(name="label", shape=[1], dtype="int64")],
          outputs=[dict(name="y", shape=["n", 4], dtype="float32")],
          profiles=[{"x": [1, 4], "label": [1]}, {"x": [3, 4], "label": [1]}],
          output_shapes=[{"y": [1, 4]}, {"y": [3, 4]}])


def test_engine_io_is_checked_against_the_manifest():
    from runtime.backends.trt import check_engine_io

    def engine(**change):
        t = dict(x=("INPUT", "HALF", (-1, 4), [(1, 4), (3, 4)]), label=("INPUT", "INT64", (1,), None),
                 y=("OUTPUT", "FLOAT", (-1, 4), None))
        t.update(change)
        return FakeEngine(t, 2)

    check_engine_io(engine(), "e.plan", **IO)
    bad = [(engine(x=("INPUT", "FLOAT", (-1, 4), [(1, 4), (3, 4)])), r"x is float32 in the engine, float16 in the manifest"),
           (engine(x=("INPUT", "HALF", (-1, 4), [(1, 4), (2, 4)])), r"x has \(min, opt, max\) shapes .* in profile 1"),
           (engine(label=("INPUT", "INT32", (1,), None)), "label is int32 in the engine, int64"),
           (engine(y=("OUTPUT", "FLOAT", (-1, 5), None)), r"y has shape \[-1, 5\]"),
           (engine(y=("INPUT", "FLOAT", (-1, 4), None)), "y is an input of the engine, an output in the manifest"),
           (FakeEngine(dict(x=engine().t["x"], label=engine().t["label"]), 2), "engine tensors"),
           (FakeEngine(engine().t, 1), "1 optimization profiles, the manifest has 2")]
    for e, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            check_engine_io(e, "e.plan", **IO)


def test_failed_cuda_graph_capture_falls_back_without_hiding_the_real_error(monkeypatch, caplog):
    from runtime.backends.trt import TrtBackend

    @contextlib.contextmanager
    def capture_that_fails(g, stream=None):       # capture_end raises, as after an error inside capture
        yield
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", capture_that_fails)
    b = TrtBackend.__new__(TrtBackend)
    b.stream, b.cuda_graphs, b.graphs, b.no_graph, b.runs = SimpleNamespace(cuda_stream=0), True, {}, set(), {}
    calls = []
    ctx = SimpleNamespace(execute_async_v3=lambda s: calls.append(s) or True)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):                        # plain, capture fails -> plain, plain (no new capture)
            b._execute(4, ctx)
    assert caplog.text.count("CUDA graph capture failed for scale 4") == 1 and 4 in b.no_graph
    assert len(calls) == 4                        # 1 inside the failed capture + 3 real runs
    ctx = SimpleNamespace(execute_async_v3=lambda s: False)       # the engine itself fails
    b.runs[5] = 1                                 # scale 5's capture run: the plain run's error is raised
    with pytest.raises(RuntimeError, match="TensorRT execution failed"):
        b._execute(5, ctx)


@pytest.mark.gpu
def test_tensorrt_matches_eager_on_gpu(tmp_path):
    if not (torch.cuda.is_available() and _have_trt()):
        pytest.skip("needs an NVIDIA GPU and TensorRT")
    from graphs.config import SamplerConfig, make_ssg
    from runtime.backends import open_backend
    from runtime.pipeline import Pipeline
    out = tmp_path / "a"
    r = run_script("export.py", "--model", TINY, "--random-init", "0", "--out", out, "--target", "trt", "--top-k", "64")
    assert r.returncode == 0, r.stderr
    s, ssg = SamplerConfig(top_k=40, top_p=0.9), make_ssg("linear:0.1,0.3", "dct")
    eager = Pipeline(open_backend("eager", str(out), device="cuda"))
    trt = Pipeline(open_backend("tensorrt", str(out)))
    a = eager.run([207], 0, guidance=1.5, sampler=s, ssg=ssg)
    for _ in range(3):                  # plain run, CUDA graph capture, replay
        b = trt.run([207], 0, guidance=1.5, sampler=s, ssg=ssg)
        assert all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(a.tokens, b.tokens))
        assert (a.images.cpu() - b.images.cpu()).abs().max() <= 1e-3
