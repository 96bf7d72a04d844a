"""The TensorRT code paths, run by tests/test_trt.py in a child whose `tensorrt` is the strict
fake over the real bindings (run_under_real_trt). Each function asserts what it can see and
returns a JSON summary."""
from __future__ import annotations

import logging
import os
import shutil

import torch

from tests.trt_real.sim import MACHINE

TINY = "var-d2-tiny"


class _Log(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []
        logging.getLogger().addHandler(self)
        logging.getLogger().setLevel(logging.INFO)

    def emit(self, record):
        self.lines.append(record.getMessage())

    def take(self):
        out, self.lines = "\n".join(self.lines), []
        return out


def build_every_option(onnx_dir: str, work: str):
    """export.trt_build on the real API: flags, profiles (order, shapes, memory targets), strongly
    typed networks, and the timing cache's life (fresh, reused, from another GPU, from another
    TensorRT version, unreadable)."""
    from var_ssg.contract.manifest import load_manifest
    from var_ssg.contract.tensorrt import profile_scales
    from var_ssg.export.trt_build import TIMING_CACHE, TimingCache, build_engines
    log = _Log()
    man = load_manifest(onnx_dir).data
    step_profiles = man["graphs"]["step"]["profiles"]
    K = len(step_profiles)
    cache = os.path.join(work, TIMING_CACHE)

    engines, sec = build_engines(onnx_dir, man, out_dir=work)
    step, dec = MACHINE.builds[-2:]
    assert step["flags"] == [] and dec["flags"] == [], step["flags"]        # TF32 (on by default) cleared
    assert step["hw"] == dec["hw"] == "NONE" and step["strongly_typed"] and dec["strongly_typed"]
    assert engines["step"]["profile_scales"] == profile_scales(K) == [K - 1] + list(range(K - 1))
    for i, k in enumerate(profile_scales(K)):                             # engine profile i = scale k
        for name, (mn, op, mx) in step["profiles"][i].items():
            assert mn == op == mx == list(step_profiles[k][name]), (i, k, name)
    assert step["extra_memory_target"] == [1.0] + [0.0] * (K - 1)
    assert len(dec["profiles"]) == 1 and dec["extra_memory_target"] == []
    assert step["cache"] == dec["cache"] == dict(version=MACHINE.version, gpu=MACHINE.gpu)
    assert "reusing" not in log.take()
    with open(cache, "rb") as f:
        assert f.readline() == TimingCache.HEADER + MACHINE.version.encode() + b"\n"
    assert sec["version"] == MACHINE.version and sec["gpu"] == MACHINE.gpu and sec["compute_capability"] == "9.0"

    engines, sec = build_engines(onnx_dir, man, out_dir=work, tf32=True, hardware_compat=True, version_compat=True)
    step, dec = MACHINE.builds[-2:]
    assert step["flags"] == dec["flags"] == ["TF32", "VERSION_COMPATIBLE"] and step["hw"] == "AMPERE_PLUS"
    assert engines["step"]["tf32"] and engines["decoder"]["version_compatible"] and sec["hardware_compatible"]
    assert "reusing the timing cache" in log.take()

    def rewrite(old: bytes, new: bytes):
        with open(cache, "rb") as f:
            data = f.read()
        with open(cache, "wb") as f:
            f.write(data.replace(old, new, 1))

    rewrite(MACHINE.gpu.encode(), b"NVIDIA A100")                      # a cache made on another GPU
    build_engines(onnx_dir, man, out_dir=work)
    assert "rejected the timing cache" in log.take()
    assert MACHINE.builds[-1]["cache"]["gpu"] == MACHINE.gpu
    rewrite(b"TensorRT " + MACHINE.version.encode(), b"TensorRT 10.9.0.34")    # written by another TensorRT
    n = len(MACHINE.caches_created)
    build_engines(onnx_dir, man, out_dir=work)
    assert "written by TensorRT 10.9.0.34" in log.take()
    assert MACHINE.caches_created[n:] == [b""]                         # its bytes never reached TensorRT
    with open(cache, "wb") as f:                                       # no header: not ours
        f.write(b"\x00garbage")
    build_engines(onnx_dir, man, out_dir=work)
    assert "written by an unknown TensorRT" in log.take()
    with open(cache, "rb") as f:
        assert f.readline().startswith(TimingCache.HEADER)
    return dict(version=MACHINE.version, builds=len(MACHINE.builds))


def pipeline_runs(art_dir: str, work: str):
    """export (engines only: the graphs are up to date) -> TrtBackend: load, I/O checks, three
    full runs (plain, CUDA-graph capture, replay) with the decoder, each against ONNX Runtime."""
    from var_ssg.contract.manifest import load_manifest
    from var_ssg.export import onnx_export
    from var_ssg.export.onnx_export import ExportConfig, export_artifacts
    from var_ssg.graphs.config import SamplerConfig, get_preset, make_ssg
    from var_ssg.common.errors import ConfigError
    from var_ssg.graphs.weights import WeightSource, random_models
    from var_ssg.runtime.backends import open_backend
    from var_ssg.runtime.backends.trt import check_engine_io
    from var_ssg.runtime.pipeline import Pipeline
    from tests.trt_real import fake_cuda

    out = os.path.join(work, "a")
    shutil.copytree(art_dir, out)
    cfg = get_preset(TINY)
    var, vae = random_models(cfg, 0)

    def no_onnx_export(*a, **kw):
        raise AssertionError("the ONNX graphs are up to date: only the engines may be built")
    onnx_export._export_into = no_onnx_export
    man_data = load_manifest(art_dir).data
    ec = ExportConfig(**{k: v for k, v in man_data["export"].items() if k in ExportConfig.__dataclass_fields__})
    ec = ExportConfig(**{**ec.__dict__, "target": "trt"})
    export_artifacts(var, vae, WeightSource(kind="random", seed=0), out, ec)
    man = load_manifest(out)
    K = cfg.num_scales
    assert man.data["engines"]["step"]["profile_scales"] == [K - 1] + list(range(K - 1))

    s, ssg = SamplerConfig(top_k=40, top_p=0.9), make_ssg("linear:0.1,0.3", man.transform)
    cls = [3]
    ref = Pipeline(open_backend("onnxruntime", out, device="cpu")).run(cls, 5, guidance=1.5, sampler=s, ssg=ssg,
                                                                          keep_logits=True).as_torch()
    backend = open_backend("tensorrt", out)
    trt = Pipeline(backend)
    runs = []
    for r in range(3):                              # plain, capture (+ replay), replay
        n = len(MACHINE.executions)
        res = trt.run(cls, 5, guidance=1.5, sampler=s, ssg=ssg, keep_logits=True).as_torch()
        assert len(MACHINE.executions) - n == K + 1, (r, len(MACHINE.executions) - n)   # every scale + decoder ran
        for k in range(K):
            assert torch.equal(res.tokens[k], ref.tokens[k]), (r, k)
            assert torch.allclose(res.logits[k], ref.logits[k], atol=1e-5, rtol=0), (r, k)
        assert torch.allclose(res.images, ref.images, atol=1e-5, rtol=0)
        runs.append(dict(graphs=sorted(backend.graphs), replays={k: g.replays for k, g in backend.graphs.items()}))
    assert runs[0]["graphs"] == [] and runs[1]["graphs"] == runs[2]["graphs"] == list(range(-1, K))
    assert all(v == 2 for v in runs[2]["replays"].values()), runs[2]
    assert set(fake_cuda.STATE.capture_modes) == {"thread_local"}

    # the engine's I/O against a manifest it does not belong to; a shape outside the profile
    from var_ssg.runtime.backends.trt import deserialize, make_runtime
    import tensorrt
    sec = man.data["tensorrt"]
    path = man.path("step_all.plan")
    e = deserialize(make_runtime(tensorrt, sec), path, sec)
    step = man.graph("step")
    order = man.data["engines"]["step"]["profile_scales"]
    check_engine_io(e, path, step["inputs"], step["outputs"], [step["profiles"][k] for k in order],
                    [step["output_shapes"][k] for k in order])
    refused = []
    for profiles, msg in (([step["profiles"][k] for k in range(K)], "in profile 0"),       # scale order: wrong
                          ([step["profiles"][k] for k in order][:-1], "optimization profiles")):
        try:
            check_engine_io(e, path, step["inputs"], step["outputs"], profiles,
                            [step["output_shapes"][k] for k in order])
        except ConfigError as err:
            assert msg in str(err), str(err)
            refused.append(msg)
    assert len(refused) == 2
    ctx = backend.step_contexts[1]
    try:
        backend._bind_static(1, ctx, {}, {"noise": [1, 99]})
        raise AssertionError("a shape outside the profile was taken")
    except ConfigError as err:
        assert "TensorRT refused the shape [1, 99] of noise for scale 1" in str(err)

    # export again: up to date on this machine; on another GPU only the engines are rebuilt,
    # and that GPU's TensorRT refuses the H200's timing cache
    n = len(MACHINE.builds)
    assert export_artifacts(var, vae, WeightSource(kind="random", seed=0), out, ec).reused
    assert len(MACHINE.builds) == n
    log = _Log()
    MACHINE.gpu = torch.cuda.get_device_properties(0).name = "NVIDIA A100-SXM4-80GB"
    torch.cuda.get_device_properties(0).major, torch.cuda.get_device_properties(0).minor = 8, 0
    res = export_artifacts(var, vae, WeightSource(kind="random", seed=0), out, ec)
    assert not res.reused and len(MACHINE.builds) == n + 2 and res.manifest["tensorrt"]["gpu"] == MACHINE.gpu
    assert "rejected the timing cache" in log.take()
    return dict(version=MACHINE.version, executions=len(MACHINE.executions), runs=runs)


def refusals(work: str):
    """What the runtime refuses before TensorRT sees an engine: another GPU model of the same
    compute capability, and a TensorRT older than 10.8."""
    import tensorrt
    from var_ssg.contract.tensorrt import check_compat, import_tensorrt
    from var_ssg.common.errors import ConfigError
    sec = dict(version=tensorrt.__version__, gpu="NVIDIA H100 80GB HBM3", compute_capability="9.0",
               hardware_compatible=False, version_compatible=False)
    out = []
    try:
        check_compat(sec, tensorrt.__version__, MACHINE.gpu, "9.0")
    except ConfigError as e:
        out.append(str(e))
    check_compat(dict(sec, hardware_compatible=True), tensorrt.__version__, MACHINE.gpu, "9.0")
    real = tensorrt.__version__
    tensorrt.__version__ = "10.7.0"
    try:
        import_tensorrt()
    except ConfigError as e:
        out.append(str(e))
    tensorrt.__version__ = real
    assert import_tensorrt() is tensorrt

    # version-compatible plans carry host code: the runtime may load it only for those
    from var_ssg.runtime.backends.trt import deserialize, make_runtime
    assert make_runtime(tensorrt, dict(sec, version_compatible=True)).engine_host_code_allowed is True
    rt = make_runtime(tensorrt, sec)
    assert rt.engine_host_code_allowed is False
    garbage = os.path.join(work, "step_all.plan")
    with open(garbage, "wb") as f:
        f.write(b"garbage")
    try:
        deserialize(rt, garbage, sec)
        raise AssertionError("garbage deserialized")
    except ConfigError as e:
        assert "could not deserialize the engine (TensorRT's log above says why" in str(e)
    return out


def strict_fake_refuses():
    """The strict fake refuses what the real bindings would: each case is one wrong use."""
    import tensorrt as trt
    from tests.trt_real.strict import StrictError
    b = trt.Builder(trt.Logger(trt.Logger.WARNING))
    config = b.create_builder_config()
    prof = b.create_optimization_profile()
    cases = dict(
        wrong_keyword=lambda: config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatches=False),
        missing_argument=lambda: prof.set_shape("x", [1], [1]),
        wrong_type=lambda: config.set_flag("TF32"),
        float_for_int=lambda: b.create_network(1.0),
        unknown_attribute=lambda: config.set_tf32(True),
        read_only_property=lambda: setattr(config, "num_optimization_profiles", 2),
        setter_type=lambda: setattr(prof, "extra_memory_target", "0"),
        no_constructor=lambda: trt.IBuilderConfig(),
        wrong_enum=lambda: config.set_flag(trt.HardwareCompatibilityLevel.AMPERE_PLUS),
    )
    out = {}
    for name, fn in cases.items():
        try:
            fn()
            out[name] = None
        except (TypeError, AttributeError, StrictError) as e:
            out[name] = f"{type(e).__name__}: {e}"
    return out


def build_int8(onnx_dir: str, work: str):
    """export.trt_build on int8 (QDQ) artifacts: a strongly typed network takes its precision from
    the graph's QuantizeLinear/DequantizeLinear, so no precision flag is set (TensorRT 11 has none;
    10's INT8 flag is for weakly typed networks); the step engine keeps one profile per scale."""
    from var_ssg.contract.manifest import load_manifest
    from var_ssg.export.trt_build import build_engines
    man = load_manifest(onnx_dir).data
    assert man["precision"] == "int8"
    engines, _ = build_engines(onnx_dir, man, out_dir=work)
    step, dec = MACHINE.builds[-2:]
    assert step["flags"] == [] and dec["flags"] == [] and step["strongly_typed"] and dec["strongly_typed"], step
    assert len(step["profiles"]) == len(man["graphs"]["step"]["profiles"])
    return dict(version=MACHINE.version, builds=len(MACHINE.builds), step=engines["step"]["file"])


def build_fp8(onnx_dir: str, work: str):
    """export.trt_build on fp8 (float8 e4m3fn QDQ) artifacts. Our builder makes every network
    strongly typed (TensorRT 10: the STRONGLY_TYPED creation flag; 11: always), which takes its
    precision from the graph's QuantizeLinear/DequantizeLinear: no FP8 or INT8 builder flag is set,
    and none may be (TensorRT 10 keeps those flags for weakly typed networks only). On a GPU of
    compute capability < 8.9 (no FP8 tensor cores) the build is refused before anything is parsed."""
    import tensorrt as trt
    from var_ssg.common.errors import ConfigError
    from var_ssg.contract.manifest import load_manifest
    from var_ssg.export.trt_build import build_engines
    man = load_manifest(onnx_dir).data
    assert man["precision"] == "fp8"
    precision_flags = sorted(f for f in ("FP8", "INT8", "FP16", "BF16") if hasattr(trt.BuilderFlag, f))
    engines, sec = build_engines(onnx_dir, man, out_dir=work)
    step, dec = MACHINE.builds[-2:]
    assert step["strongly_typed"] and dec["strongly_typed"], step
    assert step["flags"] == [] and dec["flags"] == [], step["flags"]       # no precision flag, TF32 cleared
    assert len(step["profiles"]) == len(man["graphs"]["step"]["profiles"])
    assert sec["compute_capability"] == "9.0"
    n = len(MACHINE.builds)
    props = torch.cuda.get_device_properties(0)
    refused = {}
    for name, (major, minor) in (("NVIDIA A100-SXM4-80GB", (8, 0)), ("NVIDIA A10", (8, 6))):
        props.name, props.major, props.minor = name, major, minor
        try:
            build_engines(onnx_dir, man, out_dir=work)
            raise AssertionError(f"fp8 engines were built for compute capability {major}.{minor}")
        except ConfigError as e:
            refused[f"{major}.{minor}"] = str(e)
    assert len(MACHINE.builds) == n                 # nothing was built for them
    props.name, props.major, props.minor = "NVIDIA L4", 8, 9          # Ada: FP8 tensor cores
    build_engines(onnx_dir, man, out_dir=work)
    assert len(MACHINE.builds) == n + 2 and MACHINE.builds[-1]["flags"] == []
    return dict(version=MACHINE.version, step=engines["step"]["file"], refused=refused,
                precision_flags=precision_flags)
INF = "infinity-tiny"


def infinity_engines(art_dir: str, work: str):
    """`export.py --model infinity-tiny --target trt` on up-to-date Infinity graphs (DESIGN.md
    "Infinity (text-to-image)"): only the engines are built (text static; step one profile per
    scale, last scale first, spanning every aspect ratio's shapes; decoder one profile over the
    final grids); every template's shapes at every scale are taken by its profile; the text
    engine runs and gives ONNX Runtime's outputs; the manifest records and validates the engines;
    a second export is up to date, and --trt-tf32 rebuilds only the engines."""
    import numpy as np
    from var_ssg.contract.manifest import load_manifest
    from var_ssg.export import infinity_export
    from var_ssg.export.trt_build import plan
    from var_ssg.graphs.infinity_config import get_infinity_preset
    from var_ssg.graphs.infinity_io import InfinityDecoderIO, InfinityStepIO, InfinityTextIO, template_schedules
    from var_ssg.runtime.backends.trt import deserialize, make_runtime
    from var_ssg.tools.commands.export import main
    import tensorrt

    out = os.path.join(work, "a")
    shutil.copytree(art_dir, out)

    def no_onnx_export(*a, **kw):
        raise AssertionError("the ONNX graphs are up to date: only the engines may be built")
    infinity_export._export_into = no_onnx_export
    log = _Log()
    args = ["--model", INF, "--random-init", "0", "--out", out, "--target", "trt"]
    assert main(args) == 0
    assert "building new engines (the ONNX graphs are reused)" in log.take()
    man = load_manifest(out)                                         # the schema checks the engines
    assert {"text.plan", "step_all.plan", "decoder.plan", "timing.cache"} <= set(man.data["files"])
    cfg, B = get_infinity_preset(INF), man.data["batch"]
    K = cfg.schedule(1.0).num_scales
    text, step, dec = MACHINE.builds[-3:]
    assert len(MACHINE.builds) == 3
    for b in (text, step, dec):
        assert b["flags"] == [] and b["hw"] == "NONE" and b["strongly_typed"], b["flags"]
    assert len(text["profiles"]) == 1 and text["extra_memory_target"] == []         # static: TensorRT's default
    assert len(step["profiles"]) == K and step["extra_memory_target"] == [1.0] + [0.0] * (K - 1)
    assert man.data["engines"]["step"]["profile_scales"] == [K - 1] + list(range(K - 1))
    plans = {p.name: p for p in plan(man.data)}
    for i, k in enumerate(man.data["engines"]["step"]["profile_scales"]):
        for name, (mn, op, mx) in plans["step"].shapes(k).items():
            assert step["profiles"][i][name] == [mn, op, mx], (i, k, name)
    # every template's shapes at scale k fit engine profile i (set_input_shape as the runtime would)
    sec = man.data["tensorrt"]
    rt = make_runtime(tensorrt, sec)
    e = deserialize(rt, man.path("step_all.plan"), sec)
    ctx = e.create_execution_context()
    io = InfinityStepIO(cfg, B)
    taken = 0
    for sched in template_schedules(cfg):
        for i, k in enumerate(man.data["engines"]["step"]["profile_scales"]):
            assert ctx.set_optimization_profile_async(i, 0)
            for name, shape in io.profile(sched, k).items():
                assert ctx.set_input_shape(name, shape), (sched.template, k, name, shape)
                taken += 1
            assert not ctx.set_input_shape("noise", [B, 10 ** 6, cfg.d_vae])          # outside: refused
    d = deserialize(rt, man.path("decoder.plan"), sec).create_execution_context()
    for sched in template_schedules(cfg):
        assert d.set_input_shape("summed", InfinityDecoderIO(cfg, B).summed_shape(sched)), sched.template
    # the text engine runs: its outputs are ONNX Runtime's on text.onnx
    t = deserialize(rt, man.path("text.plan"), sec)
    tctx = t.create_execution_context()
    shapes = InfinityTextIO(cfg, B).shapes()
    g = torch.Generator().manual_seed(0)
    feeds = dict(text=torch.randn(*shapes["text"], generator=g), neg_text=torch.zeros(shapes["neg_text"]),
                 text_mask=(torch.arange(cfg.text_maxlen) < 5).float().expand(*shapes["text_mask"]).contiguous(),
                 neg_mask=torch.zeros(shapes["neg_mask"]), use_neg=torch.zeros(shapes["use_neg"]))
    outs = {n: torch.empty(shapes[n]) for n in ("cond", "text_kv", "text_mask2")}
    for n, v in {**feeds, **outs}.items():
        assert tctx.set_tensor_address(n, v.data_ptr())
    assert tctx.execute_async_v3(0)
    import onnxruntime as ort
    ref = ort.InferenceSession(os.path.join(out, "text.onnx"), providers=["CPUExecutionProvider"]).run(
        list(outs), {n: v.numpy() for n, v in feeds.items()})
    for (n, v), r in zip(outs.items(), ref):
        assert np.array_equal(v.numpy(), r), n

    n = len(MACHINE.builds)
    assert main(args) == 0 and len(MACHINE.builds) == n               # up to date on this machine
    assert main(args + ["--trt-tf32"]) == 0 and len(MACHINE.builds) == n + 3
    assert all(b["flags"] == ["TF32"] for b in MACHINE.builds[-3:])
    assert "reusing the timing cache" in log.take()
    assert load_manifest(out).data["engines"]["step"]["tf32"]
    # a profile that does not span every aspect ratio is refused when the artifacts load
    import json
    from var_ssg.contract.manifest import ManifestError, write_manifest
    data = json.load(open(os.path.join(out, "manifest.json")))
    data["engines"]["step"]["profile_max"][K - 1]["noise"][1] -= 1
    write_manifest(out, {k: v for k, v in data.items() if k != "files"})
    try:
        load_manifest(out)
        raise AssertionError("a step profile narrower than the templates was taken")
    except ManifestError as e:
        assert "engines.step.profile_max" in str(e) and "every aspect ratio" in str(e), str(e)
    return dict(version=MACHINE.version, builds=len(MACHINE.builds), shapes_taken=taken, K=K)


def infinity_fresh_export(work: str):
    """A fresh `export.py --model infinity-tiny --random-init 0 --target trt`: graphs and engines
    in one transaction, the manifest lists and validates them. The graphs are traced with the
    faked CUDA device hidden (this torch is CPU-only: torch.export would try to initialise it)."""
    from var_ssg.contract.manifest import load_manifest
    from var_ssg.export import infinity_export
    from var_ssg.tools.commands.export import main
    traced = infinity_export.export_one

    def export_one_on_cpu(*a, **kw):
        avail = torch.cuda.is_available
        torch.cuda.is_available = lambda: False
        try:
            return traced(*a, **kw)
        finally:
            torch.cuda.is_available = avail
    infinity_export.export_one = export_one_on_cpu
    out = os.path.join(work, "fresh")
    assert main(["--model", INF, "--random-init", "0", "--out", out, "--target", "trt"]) == 0
    man = load_manifest(out, verify="full")
    assert [b["profiles"] and len(b["profiles"]) for b in MACHINE.builds] == [1, len(man.data["engines"]["step"]
                                                                                        ["profiles"]), 1]
    assert "engines" in man.data["export"]["stage_seconds"]
    return dict(version=MACHINE.version, files=sorted(man.data["files"]))


def _inf_engines(art_dir: str, work: str) -> str:
    """A copy of Infinity ONNX artifacts with their engines built (`export.py --target trt` on
    up-to-date graphs: only the engines are built)."""
    from var_ssg.export import infinity_export
    from var_ssg.tools.commands.export import main
    out = os.path.join(work, "trt")
    shutil.copytree(art_dir, out)
    onnx_export = infinity_export._export_into

    def no_onnx_export(*a, **kw):
        raise AssertionError("the ONNX graphs are up to date: only the engines may be built")
    infinity_export._export_into = no_onnx_export
    import json
    batch = json.load(open(os.path.join(art_dir, "manifest.json")))["batch"]
    try:
        assert main(["--model", INF, "--random-init", "0", "--batch", str(batch), "--out", out, "--target", "trt"]) == 0
    finally:
        infinity_export._export_into = onnx_export
    return out


def _inf_rows(cfg, seeds, lens=(6, 2)):
    import numpy as np
    from var_ssg.runtime.infinity import PromptRow
    g = torch.Generator().manual_seed(4)
    emb = torch.randn(2, cfg.text_maxlen, cfg.text_dim, generator=g).numpy()
    mask = (torch.arange(cfg.text_maxlen)[None, :] < torch.tensor(lens)[:, None]).numpy().astype(np.float32)
    K = cfg.schedule(1.0).num_scales
    return [PromptRow(emb[i % 2], mask[i % 2], seed=s, cfg=tuple(1.0 + 0.5 * k for k in range(K)), tau=0.8,
                      ssg_beta="linear:0.2,0.6", neg_text=emb[1 - i % 2] if i % 3 == 2 else None,
                      neg_mask=mask[1 - i % 2] if i % 3 == 2 else None) for i, s in enumerate(seeds)]


def infinity_backend_runs(art_dir: str, t5_dir: str, work: str):
    """runtime.backends.infinity_trt on engines built by `export.py --target trt`: its bits are ONNX
    Runtime's (logits and images within 1e-5) on several seeds and two aspect ratios, through plain
    runs, CUDA-graph capture and replay, and schedule switches (which bind again); the text K/V
    and the KV cache are bound in place; scripts/parity.py --backends onnxruntime,tensorrt is OK
    and scripts/generate.py --backend tensorrt writes ONNX Runtime's bits. Planted bugs: a step
    context on the wrong profile is refused, a binding mix-up (cfg <-> tau) changes the bits and
    fails parity.py. Artifacts without engines, or --device cpu, are clear errors."""
    import json
    import numpy as np
    from var_ssg.common.errors import ConfigError
    from var_ssg.runtime.backends import infinity_trt
    from var_ssg.runtime.backends.infinity_trt import DECODER, TEXT, InfinityTrtBackend
    from var_ssg.runtime.infinity import open_infinity
    from var_ssg.tools.commands.generate import main as generate
    from var_ssg.tools.commands.parity import main as parity
    from tests.trt_real import fake_cuda

    errors = {}
    for dev in ("cuda", "cpu"):
        try:
            open_infinity(artifacts=art_dir, backend="tensorrt", device=dev)
            raise AssertionError(f"tensorrt opened ONNX-only artifacts on {dev}")
        except ConfigError as e:
            errors[dev] = str(e)
    assert "has no TensorRT engines: re-export with --target trt" in errors["cuda"], errors
    assert "pass --device cuda" in errors["cpu"], errors

    out = _inf_engines(art_dir, work)
    ort, _ = open_infinity(artifacts=out)
    trt, note = open_infinity(artifacts=out, backend="tensorrt", device="cuda")
    be: InfinityTrtBackend = trt.backend
    assert trt.info.name == "tensorrt" and trt.info.device == "cuda" and "seed 0" in note
    cfg = trt.info.cfg
    K = cfg.schedule(1.0).num_scales
    order = json.load(open(os.path.join(out, "manifest.json")))["engines"]["step"]["profile_scales"]
    assert order == [K - 1] + list(range(K - 1))
    assert all(be.step_contexts[k] is be.step_engine.contexts[i] for i, k in enumerate(order))
    # one scratch buffer for the three engines' contexts (they run in sequence on one stream)
    ctxs = be.text_engine.contexts + be.step_engine.contexts + be.dec_engine.contexts
    assert len(ctxs) == K + 2 and {c._m.memory for c in ctxs} == {(be.scratch.data_ptr(), be.scratch.numel())}
    plan = [(1.0, 0), (1.0, 1), (1.0, 2), (0.75, 3), (0.75, 4), (0.75, 5), (1.0, 6)]
    runs = []
    for (ratio, seed), row in zip(plan, _inf_rows(cfg, [s for _, s in plan])):
        n = len(MACHINE.executions)
        a = trt.run([row], ratio, keep_logits=True)
        assert len(MACHINE.executions) - n == K + 2, (ratio, seed)          # text, every scale, decoder
        b = ort.run([row], ratio, keep_logits=True)
        for k in range(K):
            assert np.array_equal(a.bits[k], b.bits[k]), (ratio, seed, k)
            assert np.abs(a.logits[k] - b.logits[k]).max() <= 1e-5
            assert np.abs(a.logits_cfg[k] - b.logits_cfg[k]).max() <= 1e-5
        assert a.images.shape == b.images.shape == (1, 3, *cfg.image_size(cfg.schedule(ratio)))
        assert np.abs(a.images - b.images).max() <= 1e-5 and np.abs(a.summed - b.summed).max() <= 1e-5
        runs.append(dict(ratio=ratio, graphs=sorted(be.graphs), replays=sum(g.replays for g in be.graphs.values())))
        for k in range(K):                     # text K/V and the cache are bound in place, not copied
            t = be.bound[k]
            assert t["text_kv"] is be.bound[TEXT]["text_kv"] and t["cond"] is be.bound[TEXT]["cond"]
            Lp = t["past_kv"].shape[0]
            assert t["past_kv"].data_ptr() == (be.kv.data_ptr() if Lp else 0)          # empty: no address
            assert t["new_kv"].data_ptr() == be.kv[Lp].data_ptr()
    steps = list(range(K))
    want = [[], [TEXT, DECODER] + steps, [TEXT, DECODER] + steps,         # 1:1: plain, capture, replay
            [TEXT], [TEXT, DECODER] + steps, [TEXT, DECODER] + steps,     # 3:4 binds again: plain, capture, replay
            [TEXT]]                                                       # back to 1:1: binds again, plain
    assert [r["graphs"] for r in runs] == [sorted(w) for w in want], runs
    assert set(fake_cuda.STATE.capture_modes) == {"thread_local"}
    # the KV cache is the backend's: a cache of the pipeline's own making is refused
    try:
        be.step(cfg.schedule(1.0), 0, {}, torch.empty(1))
        raise AssertionError("a foreign KV cache was taken")
    except ConfigError as e:
        assert "owns the KV cache" in str(e)

    # planted: a step context on the profile of the same index as its scale (not profile_scales)
    wrong, _ = open_infinity(artifacts=out, backend="tensorrt", device="cuda")
    wrong.backend.step_contexts = {k: wrong.backend.step_engine.contexts[k] for k in range(K)}
    try:
        wrong.run(_inf_rows(cfg, [0])[:1], 1.0)
        raise AssertionError("a step context on the wrong profile ran")
    except ConfigError as e:
        assert "TensorRT refused the shape" in str(e) and "for scale 0 (outside the engine's profile)" in str(e), str(e)

    # scripts: generate --backend tensorrt writes ONNX Runtime's bits; parity is OK
    toks = {}
    for name, extra in (("onnxruntime", []), ("tensorrt", ["--device", "cuda"])):
        js = os.path.join(work, f"{name}.json")
        assert generate(["--artifacts", out, "--backend", name, *extra, "--prompt", "a cat", "--text-encoder", t5_dir,
                         "--seed", "3", "--aspect-ratio", "3:4", "--out", os.path.join(work, f"{name}.png"),
                         "--save-tokens", js]) == 0
        toks[name] = json.load(open(js))["bits"]
    assert toks["tensorrt"] == toks["onnxruntime"]
    par = ["--artifacts", out, "--backends", "onnxruntime,tensorrt", "--prompt", "a cat on the chair", "--text-encoder",
           t5_dir, "--seeds", "0-1", "--ssg-beta", "0.5", "--aspect-ratio", "3:4"]
    ok = os.path.join(work, "ok.json")
    assert parity(par + ["--json", ok]) == 0
    backends = [r["backend"] for r in json.load(open(ok))["runs"]]
    assert backends == ["onnxruntime"] * 2 + ["tensorrt"] * 2, backends

    # planted: a binding mix-up (the step's cfg and tau inputs swapped): other bits, parity fails
    bind = InfinityTrtBackend._bind_static

    def swapped(self, key, ctx, tensors, shaped):
        bind(self, key, ctx, tensors, shaped)
        if key >= 0:                # the engine reads cfg where tau is copied, and tau where cfg is
            assert ctx.set_tensor_address("cfg", tensors["tau"].data_ptr())
            assert ctx.set_tensor_address("tau", tensors["cfg"].data_ptr())
    infinity_trt.InfinityTrtBackend._bind_static = swapped
    try:
        mixed, _ = open_infinity(artifacts=out, backend="tensorrt", device="cuda")
        row = _inf_rows(cfg, [0])[0]
        a, b = mixed.run([row], 1.0), ort.run([row], 1.0)
        differ = sum(int((x != y).sum()) for x, y in zip(a.bits, b.bits))
        assert differ > 0
        bad = os.path.join(work, "bad.json")
        assert parity(par + ["--json", bad]) == 1
        fails = json.load(open(bad))["failures"]
        assert fails and all(f.startswith("tensorrt") for f in fails), fails
    finally:
        infinity_trt.InfinityTrtBackend._bind_static = bind
    return dict(version=MACHINE.version, runs=runs, K=K, planted_bits_differ=differ, planted_failures=len(fails),
                errors=errors)


def infinity_backend_batch(art_dir: str, work: str):
    """The Infinity TensorRT backend on batch-B artifacts: B rows at 3:4, then fewer rows than B
    (padded by the pipeline) at 1:1, each run's bits equal to ONNX Runtime's."""
    import numpy as np
    from var_ssg.runtime.infinity import open_infinity
    out = _inf_engines(art_dir, work)
    ort, _ = open_infinity(artifacts=out)
    trt, _ = open_infinity(artifacts=out, backend="tensorrt", device="cuda")
    cfg, B = trt.info.cfg, trt.info.batch
    assert B >= 2 and tuple(trt.backend.kv.shape if trt.backend.kv is not None else ()) == ()
    rows = _inf_rows(cfg, list(range(10, 10 + B)))
    shapes = []
    for ratio, n in ((0.75, B), (1.0, B - 1), (0.75, B)):
        a, b = trt.run(rows[:n], ratio, keep_logits=True), ort.run(rows[:n], ratio, keep_logits=True)
        assert len(a.bits[0]) == n and all(np.array_equal(x, y) for x, y in zip(a.bits, b.bits)), (ratio, n)
        assert np.abs(a.images - b.images).max() <= 1e-5
        shapes.append(list(a.images.shape))
    assert trt.backend.kv.shape[3] == 2 * B                     # (L, depth, 2, 2B, heads, head_dim)
    return dict(version=MACHINE.version, B=B, shapes=shapes)
