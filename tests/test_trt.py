"""TensorRT without a GPU: engine plans, cache keys, version and machine rules, engine I/O checks,
CUDA-graph fallback (plain Python), and the real code paths (engine builds with every option and
the timing cache; the backend's load, I/O checks and full pipeline runs with plain, captured and
replayed scales and the decoder; export's engine-only rebuilds) run against the REAL TensorRT
10.8, 10.16 and 11.4 Python bindings through the strict fake of tests/trt_real (every call bound
against the real signatures). The GPU test sits behind the `gpu` marker."""
import contextlib
import json
import logging
import os
import shutil
import sys
import time
from types import SimpleNamespace

import pytest
import numpy as np
import torch

from var_ssg.contract.tensorrt import check_compat, engine_cache_key, import_tensorrt, version_ok, version_tuple
from var_ssg.export.trt_build import engines_stale, plan
from var_ssg.graphs.config import get_preset
from var_ssg.common.errors import ConfigError
from tests.conftest import ROOT, TINY, run_cli, run_script
from tests.trt_real import VERSIONS, run_under_real_trt, skip_reason


def _have_trt():
    try:
        import tensorrt  # noqa: F401
        return True
    except ImportError:
        return False


# ------------------------------------------------------------------ the real bindings
real_bindings = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))
SCEN = "tests.trt_real.scenarios:"


MAN = dict(cache_key="graphs-key", graphs=dict(
    step=dict(file="step_all.onnx", dynamic_inputs=["x"], profiles=[{"x": [1, 4], "y": [1]}, {"x": [3, 4], "y": [1]}]),
    decoder=dict(file="decoder.onnx")))


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
    r = run_cli("export.py", "--model", TINY, "--random-init", "0", "--out", out, "--target", "trt")
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
    # engine profile 0 is the last scale (the first profile's weight layouts are unconstrained);
    # the others are asked (a hint) to add no weight memory
    K = cfg.num_scales
    assert step.profile_scales == [K - 1] + list(range(K - 1))
    assert step.extra_memory_target == [1.0] + [0.0] * (K - 1)
    assert dec.profiles == [] and dec.file == "decoder.plan"
    # TF32 is off unless asked for; the flags are part of the plan (and of the manifest's engines)
    assert not step.tf32 and not dec.tf32 and plan(man, tf32=True)[0].tf32
    # fp16 artifacts: the KV cache is half, the DSE/SSG arithmetic and the logits stay fp32
    # (strongly typed networks take their types from the ONNX)
    io = {t["name"]: t["dtype"] for t in man["graphs"]["step"]["inputs"] + man["graphs"]["step"]["outputs"]}
    assert {n for n, d in io.items() if d == "float16"} == {"past_kv", "new_kv"}
    assert all(io[n] == "float32" for n in ("logits", "logits_cfg", "prev_logits", "beta", "scale_dse", "noise"))
    # LayerNorm statistics are fp32 in the graph itself: every LayerNormalization reads a Cast to
    # float32 and is cast back to float16 (not left to stash_type)
    import onnx
    g = onnx.load(os.path.join(artifacts(precision="fp16"), "step_all.onnx"), load_external_data=False).graph
    made = {o: n for n in g.node for o in n.output}
    used = {i: n for n in g.node for i in n.input}
    lns = [n for n in g.node if n.op_type == "LayerNormalization"]
    assert len(lns) == 2 * cfg.depth + 1
    for n in lns:
        src, dst = made[n.input[0]], used[n.output[0]]
        assert src.op_type == "Cast" and src.attribute[0].i == onnx.TensorProto.FLOAT, src
        assert dst.op_type == "Cast" and dst.attribute[0].i == onnx.TensorProto.FLOAT16, dst


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
    with pytest.raises(ConfigError, match="TensorRT promises an engine only to the GPU model that built it"):
        check_compat(SEC, "10.13.0.35", "NVIDIA H100 80GB HBM3", "9.0")          # same cc, another GPU
    check_compat(dict(SEC, hardware_compatible=True), "10.13.0.35", "NVIDIA H100 80GB HBM3", "9.0")
    with pytest.raises(ConfigError, match="re-export with --target trt on this GPU"):   # pre-Ampere
        check_compat(dict(SEC, hardware_compatible=True), "10.13.0.35", "Tesla T4", "7.5")


def test_profile_order_last_scale_first():
    from var_ssg.contract.tensorrt import check_profile_scales, profile_scales
    assert profile_scales(10) == [9, 0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert check_profile_scales(None, 3) == [0, 1, 2]                      # engines built before the order
    assert check_profile_scales([2, 0, 1], 3) == [2, 0, 1]
    with pytest.raises(ConfigError, match=r"profile_scales \[2, 0, 0\] is not an order of the 3 scales"):
        check_profile_scales([2, 0, 0], 3)


def test_version_tuple():
    assert version_tuple("10.13.0.35") == (10, 13, 0) and version_tuple("11.4.0.106") >= (10, 0)
    assert version_tuple("10.0.0b6") == (10, 0, 0) and version_tuple("10.1") == (10, 1)


# ------------------------------------------------------------------ on the real bindings (strict fake)
@real_bindings
@pytest.mark.parametrize("version", VERSIONS)
def test_engine_builds_under_real_bindings(version, artifacts, tmp_path):
    """Flags (TF32 cleared unless asked, version/hardware compatibility), strongly typed networks,
    profiles (last scale first, shapes, memory targets) and the timing cache: fresh, reused,
    refused for another GPU, never handed to TensorRT from another TensorRT version."""
    r = run_under_real_trt(version, SCEN + "build_every_option", artifacts(), str(tmp_path))
    assert r["builds"] == 10 and r["version"].startswith(version)


@real_bindings
@pytest.mark.parametrize("version", VERSIONS)
def test_int8_engine_builds_under_real_bindings(version, artifacts, tmp_path):
    """The int8 QDQ step graph builds as a strongly typed network with no precision flag."""
    r = run_under_real_trt(version, SCEN + "build_int8", artifacts(precision="int8"), str(tmp_path))
    assert r["builds"] == 2 and r["step"] == "step_all.plan" and r["version"].startswith(version)


@real_bindings
@pytest.mark.parametrize("version", VERSIONS)
def test_backend_pipeline_under_real_bindings(version, artifacts, tmp_path):
    """export --target trt on up-to-date graphs builds only the engines; TrtBackend loads them
    (version/GPU, I/O per profile), and three full runs (plain, CUDA-graph capture, replay) with
    the decoder give ONNX Runtime's tokens and images; a new GPU rebuilds only the engines."""
    r = run_under_real_trt(version, SCEN + "pipeline_runs", artifacts(), str(tmp_path))
    assert r["executions"] == 3 * (get_preset(TINY).num_scales + 1) and r["version"].startswith(version)


@real_bindings
def test_runtime_refusals_under_real_bindings(tmp_path):
    msgs = run_under_real_trt("11", SCEN + "refusals", str(tmp_path))
    assert "promises an engine only to the GPU model that built it" in msgs[0]
    assert msgs[1].startswith("TensorRT 10.7.0 is too old: var-ssg needs >= 10.8")


@real_bindings
def test_strict_fake_refuses_wrong_calls():
    """The strict fake has teeth: each wrong use of the real API is refused as pybind would."""
    out = run_under_real_trt("10", SCEN + "strict_fake_refuses")
    assert all(out.values()), [k for k, v in out.items() if not v]
    assert "incompatible function arguments" in out["wrong_keyword"] and "ignore_mismatch" in out["wrong_keyword"]
    assert out["unknown_attribute"] == "AttributeError: 'IBuilderConfig' object has no attribute 'set_tf32'"
    assert "has no setter" in out["read_only_property"]


def test_real_bindings_setup_is_cached():
    """setup_bindings.ensure is idempotent: a stamp names the wheel and the stub source."""
    if skip_reason():
        pytest.skip(skip_reason())
    from tests.trt_real.setup_bindings import BINDINGS, ensure
    for v in VERSIONS:
        site, lib = ensure(v)
        before = {p: os.stat(os.path.join(lib, p)).st_mtime_ns for p in os.listdir(lib)}
        assert ensure(v) == (site, lib)
        assert {p: os.stat(os.path.join(lib, p)).st_mtime_ns for p in os.listdir(lib)} == before   # nothing rebuilt
        assert os.path.isfile(os.path.join(site, "tensorrt_bindings", "tensorrt.so"))
        major = BINDINGS[v][1].split(".")[0]
        assert sorted(os.listdir(lib)) == [f"lib{n}.so.{major}" for n in ("nvinfer", "nvinfer_plugin", "nvonnxparser")]


# ------------------------------------------------------------------ Infinity's engines
INF = "infinity-tiny"


def _inf_man(batch=1):
    from var_ssg.graphs.infinity_config import get_infinity_preset
    from var_ssg.graphs.infinity_io import InfinityStepIO
    cfg = get_infinity_preset(INF)
    return cfg, dict(family="infinity", preset=INF, batch=batch, cache_key="k", graphs=dict(
        text=dict(file="text.onnx"), step=dict(file="step_all.onnx", dynamic_inputs=InfinityStepIO(cfg, batch).dynamic_inputs),
        decoder=dict(file="decoder.onnx", dynamic_inputs=["summed"])))


@pytest.mark.parametrize("batch", [1, 2])
def test_infinity_plan_profiles_span_every_aspect_ratio(batch):
    """Infinity's step engine: one profile per scale (last first), each spanning that scale's
    shapes over every aspect-ratio template (one graph serves them all); the text inputs are
    static at the preset's padded length (not in any profile); the decoder's one profile spans
    every final grid; the text engine is static."""
    from var_ssg.graphs.infinity_io import InfinityDecoderIO, InfinityStepIO, template_schedules
    cfg, man = _inf_man(batch)
    text, step, dec = plan(man)
    K = cfg.schedule(1.0).num_scales
    assert K == 7 and (text.file, step.file, dec.file) == ("text.plan", "step_all.plan", "decoder.plan")
    assert text.profiles == [] and step.profile_scales == [K - 1] + list(range(K - 1)) and dec.profile_scales == [0]
    assert step.extra_memory_target == [1.0] + [0.0] * (K - 1)
    io, wider = InfinityStepIO(cfg, batch), set()
    for sched in template_schedules(cfg):
        for k in range(K):
            prof = step.shapes(k)
            assert set(prof) == set(man["graphs"]["step"]["dynamic_inputs"])
            assert not set(prof) & {"cond", "text_kv", "text_mask2"}          # static: padded text
            for name, shape in io.profile(sched, k).items():
                if name not in prof:
                    assert shape == io.profile(cfg.schedule(1.0), k)[name]      # the same for every template
                    continue
                mn, opt, mx = prof[name]
                assert all(a <= s <= b for a, s, b in zip(mn, shape, mx)), (sched.template, k, name)
                assert opt == io.profile(cfg.schedule(1.0), k)[name]
                if shape != opt:
                    wider.add(name)
        (mn, _, mx), = dec.shapes(0).values()
        assert all(a <= s <= b for a, s, b in zip(mn, InfinityDecoderIO(cfg, batch).summed_shape(sched), mx))
    # the spans are real: 1:1's shapes alone would refuse other aspect ratios' n, m, Lp and F
    assert wider == set(man["graphs"]["step"]["dynamic_inputs"])
    assert step.shapes(0)["past_kv"][2][0] == 0 and step.shapes(K - 1)["noise"][0][1] < step.shapes(K - 1)["noise"][2][1]
    assert plan(man, tf32=True)[1].tf32


@pytest.fixture(scope="module")
def inf_onnx(tmp_path_factory):
    from var_ssg.tools.commands.export import main
    out = str(tmp_path_factory.mktemp("inf") / "art")
    assert main(["--model", INF, "--random-init", "0", "--out", out]) == 0
    return out


@pytest.mark.slow
@real_bindings
@pytest.mark.parametrize("version", VERSIONS)
def test_infinity_engines_under_real_bindings(version, inf_onnx, tmp_path):
    """`export.py --model infinity-tiny --target trt` on up-to-date graphs builds the three
    engines on the real API; every aspect ratio's shapes at every scale are taken by its profile,
    the text engine gives ONNX Runtime's outputs, the manifest validates (tests/trt_real/scenarios.py)."""
    r = run_under_real_trt(version, SCEN + "infinity_engines", inf_onnx, str(tmp_path))
    assert r["builds"] == 6 and r["version"].startswith(version) and r["K"] == 7
    assert r["shapes_taken"] == 15 * 7 * 21              # templates x scales x step inputs


@pytest.mark.slow
@real_bindings
def test_infinity_fresh_export_target_trt_under_real_bindings(tmp_path):
    r = run_under_real_trt("11", SCEN + "infinity_fresh_export", str(tmp_path))
    assert {"text.plan", "step_all.plan", "decoder.plan", "timing.cache", "text.onnx"} <= set(r["files"])


@pytest.mark.slow
def test_infinity_export_target_trt_without_tensorrt_is_a_clear_error(tmp_path):
    if _have_trt() and torch.cuda.is_available():
        pytest.skip("TensorRT and a GPU are present: --target trt would build")
    from var_ssg.tools.commands.export import main
    out = tmp_path / "a"
    with pytest.raises(ConfigError, match="TensorRT is not installed|needs an NVIDIA GPU"):
        main(["--model", INF, "--random-init", "0", "--out", str(out), "--target", "trt"])
    assert not out.exists() and not list(tmp_path.iterdir())      # nothing half-written


# ------------------------------------------------------------------ the runtime's loading checks
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
    from var_ssg.runtime.backends.trt import check_engine_io

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
    from var_ssg.runtime.backends.trt import TrtBackend

    modes = []

    @contextlib.contextmanager
    def capture_that_fails(g, stream=None, capture_error_mode="global"):    # capture_end raises, as after
        modes.append(capture_error_mode)                                      # an error inside capture
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
    assert modes == ["thread_local"]              # other threads' CUDA calls are not disturbed
    ctx = SimpleNamespace(execute_async_v3=lambda s: False)       # the engine itself fails
    b.runs[5] = 1                                 # scale 5's capture run: the plain run's error is raised
    with pytest.raises(RuntimeError, match="TensorRT execution failed"):
        b._execute(5, ctx)


@pytest.mark.gpu
def test_tensorrt_matches_eager_on_gpu(tmp_path):
    if not (torch.cuda.is_available() and _have_trt()):
        pytest.skip("needs an NVIDIA GPU and TensorRT")
    from var_ssg.graphs.config import SamplerConfig, make_ssg
    from var_ssg.runtime.backends import open_backend
    from var_ssg.runtime.pipeline import Pipeline
    out = tmp_path / "a"
    r = run_script("export.py", "--model", TINY, "--random-init", "0", "--out", out, "--target", "trt", "--top-k", "64")
    assert r.returncode == 0, r.stderr
    s, ssg = SamplerConfig(top_k=40, top_p=0.9), make_ssg("linear:0.1,0.3", "dct")
    eager = Pipeline(open_backend("eager", str(out), device="cuda"))
    trt = Pipeline(open_backend("tensorrt", str(out)))
    a = eager.run([207], 0, guidance=1.5, sampler=s, ssg=ssg)
    for _ in range(3):                  # plain run, CUDA graph capture, replay
        b = trt.run([207], 0, guidance=1.5, sampler=s, ssg=ssg)
        assert all(np.array_equal(x, y) for x, y in zip(a.tokens, b.tokens))
        assert np.abs(a.images - b.images).max() <= 1e-3
