"""Export: checker, lint, per-step parity with eager, fp16, shared weights, bad input."""
import json
import os

import numpy as np
import onnx
import onnx.helper as oh
import pytest
import torch
from onnx import TensorProto

from var_ssg.export.lint import lint_model
from var_ssg.graphs.config import get_preset
from var_ssg.graphs.step import ScaleStep, StepSpec
from tests.conftest import TINY, run_cli


def test_fp32_export_is_valid_and_lint_clean(artifacts, tiny):
    d = artifacts()
    man = json.load(open(os.path.join(d, "manifest.json")))
    assert sorted(man["graphs"]) == ["decoder", "step"]
    assert sorted(os.listdir(d)) == ["decoder.onnx", "manifest.json", "scale_consts.npz", "step_all.onnx", "weights.bin"]
    for name, g in man["graphs"].items():
        p = os.path.join(d, g["file"])
        onnx.checker.check_model(p, full_check=True)
        m = onnx.load(p, load_external_data=False)
        assert not lint_model(m, name, dynamic=set(g.get("dynamic_inputs", ())))
        ops = {n.op_type for n in m.graph.node}
        assert not ops & {"DFT", "STFT", "Loop", "Scan", "If"}
        ext = {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}
        assert ext <= {"weights.bin"}
    # weights once: the shared file holds the parameters (+ small constants), nothing twice
    e = man["external_data"]
    assert e["bytes"] <= 1.05 * e["parameter_bytes"] + 200_000
    assert man["weights"]["kind"] == "random" and man["sampler"]["k_max"] == 64
    assert man["kv"]["dtype"] == "float32"


def _feeds(cfg, k, B, dtype=torch.float32):
    """The step's feeds at scale k (scale 0: empty past, one prior row, beta 0)."""
    from var_ssg.graphs.io import prev_rows
    g = torch.Generator().manual_seed(k)
    b, _ = cfg.begin_ends[k]
    n = cfg.patch_nums[k] ** 2
    return dict(label=torch.tensor([11, 500, 3][:B]), f_hat=torch.randn(B, cfg.Cvae, 16, 16, generator=g),
                noise=torch.rand(B, n, generator=g), guidance=torch.full((B,), 1.5),
                temperature=torch.ones(B), top_k=torch.full((B,), 50), top_p=torch.full((B,), 0.9),
                past_kv=(torch.randn(b, cfg.depth, 2, 2 * B, cfg.num_heads, 64, generator=g) * 0.3).to(dtype),
                prev_logits=torch.randn(B, prev_rows(cfg, k), cfg.V, generator=g) * 2,
                beta=torch.full((B,), 0.7 if k else 0.0), forced=torch.zeros(B, n, dtype=torch.int64),
                force=torch.zeros(B), smooth=torch.zeros(B), gumbel=torch.zeros(B, n, cfg.V))


def _run_step(d, feeds, k, outputs=None):
    import onnxruntime as ort
    from var_ssg.graphs.io import scale_constants
    man = json.load(open(os.path.join(d, "manifest.json")))
    cfg = get_preset(man["preset"])
    sess = ort.InferenceSession(os.path.join(d, "step_all.onnx"), providers=["CPUExecutionProvider"])
    f = dict(feeds, **{n: torch.from_numpy(v) for n, v in scale_constants(cfg, man["dse"]["transform"], k).items()})
    return [torch.from_numpy(x) for x in sess.run(outputs, {i.name: f[i.name].numpy() for i in sess.get_inputs()})]


@pytest.mark.parametrize("k", [0, 1, 6, 9])
def test_step_graph_matches_eager(artifacts, tiny, k):
    """Same inputs and noise: step_all.onnx in ONNX Runtime == the eager reference step
    (torch.fft DSE, F.interpolate resampling) at scale k."""
    cfg, var, vae = tiny
    feeds = _feeds(cfg, k, 1)
    ref = ScaleStep(var, vae, k, StepSpec(transform="dct", k_max=64))(**feeds)
    tokens, logits, logits_cfg, f_hat, new_kv = _run_step(artifacts(), feeds, k)
    assert (logits - ref[1]).abs().max() <= 1e-4 * ref[1].abs().max()
    assert torch.equal(tokens, ref[0])
    assert (f_hat - ref[3]).abs().max() <= 1e-4
    assert (new_kv - ref[4]).abs().max() <= 1e-4


def test_fp16_export_within_bounds(artifacts, tiny):
    cfg, var, vae = tiny
    d = artifacts(precision="fp16")
    man = json.load(open(os.path.join(d, "manifest.json")))
    assert man["kv"]["dtype"] == "float16"
    # DSE/SSG arithmetic stays fp32: logits outputs are float
    assert {o["name"]: o["dtype"] for o in man["graphs"]["step"]["outputs"]}["logits"] == "float32"
    k = 3
    feeds = _feeds(cfg, k, 1, torch.float16)
    got = _run_step(d, feeds, k, ["logits"])[0]
    f32 = dict(feeds, past_kv=feeds["past_kv"].float())
    ref = ScaleStep(var, vae, k, StepSpec(k_max=64))(**f32)[1]
    assert (got - ref).abs().max() / ref.abs().max() <= 1e-2


def _graph(nodes, inputs, outputs, inits=(), opset=18):
    g = oh.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return oh.make_model(g, opset_imports=[oh.make_opsetid("", opset)])


F = TensorProto.FLOAT


def vi(name, shape, t=F):
    return oh.make_tensor_value_info(name, t, shape)


def test_lint_accepts_a_clean_graph():
    m = _graph([oh.make_node("Relu", ["x"], ["y"])], [vi("x", [2, 3])], [vi("y", [2, 3])])
    assert lint_model(m) == []


@pytest.mark.parametrize("case", ["DFT", "STFT", "complex", "Loop", "Scan", "If", "sequence", "topk", "dynamic", "opset"])
def test_lint_rejects(case):
    x, y = vi("x", [4, 8]), vi("y", [4, 8])
    if case == "DFT":
        m = _graph([oh.make_node("DFT", ["x"], ["y"])], [x], [y])
    elif case == "STFT":
        m = _graph([oh.make_node("STFT", ["x", "s"], ["y"])], [x], [y],
                   [oh.make_tensor("s", TensorProto.INT64, [], [1])])
    elif case == "complex":
        m = _graph([oh.make_node("Identity", ["x"], ["y"])], [vi("x", [2], TensorProto.COMPLEX64)],
                   [vi("y", [2], TensorProto.COMPLEX64)])
    elif case in ("Loop", "Scan", "If"):
        body = oh.make_graph([oh.make_node("Identity", ["x"], ["z"])], "b", [], [vi("z", [4, 8])])
        attr = {"Loop": "body", "Scan": "body", "If": "then_branch"}[case]
        m = _graph([oh.make_node(case, ["x"], ["y"], **{attr: body})], [x], [y])
    elif case == "sequence":
        m = _graph([oh.make_node("SequenceConstruct", ["x"], ["s"]),
                    oh.make_node("SequenceAt", ["s", "i"], ["y"])], [x], [y],
                   [oh.make_tensor("i", TensorProto.INT64, [], [0])])
    elif case == "topk":
        m = _graph([oh.make_node("TopK", ["x", "k"], ["y", "i"])], [vi("x", [1, 4096])],
                   [vi("y", [1, 4096]), vi("i", [1, 4096], TensorProto.INT64)],
                   [oh.make_tensor("k", TensorProto.INT64, [1], [4096])])
    elif case == "dynamic":
        m = _graph([oh.make_node("Relu", ["x"], ["y"])], [vi("x", ["B", 8])], [vi("y", ["B", 8])])
    else:
        m = _graph([oh.make_node("Relu", ["x"], ["y"])], [x], [y], opset=21)
    issues = lint_model(m)
    assert issues, case
    text = " ".join(map(str, issues))
    want = {"DFT": "DFT is not allowed", "STFT": "STFT is not allowed", "complex": "complex",
            "Loop": "control flow", "Scan": "control flow", "If": "control flow", "sequence": "sequence",
            "topk": "exceeds TensorRT's limit 3840", "dynamic": "dynamic shape", "opset": "opset 21"}[case]
    assert want in text


@pytest.mark.slow          # an export (V = 4096)
def test_bisection_sampler_exports_for_v4096():
    """'No top-k' with V=4096 must still export for TensorRT: the bisection sampler has no
    TopK, and ONNX Runtime agrees with torch."""
    import onnxruntime as ort
    from var_ssg.graphs.sampling import sample_with_support
    from var_ssg.export.dynamo import export_one
    import onnx_ir as ir

    class S(torch.nn.Module):
        def forward(self, logits, u, temperature, top_p):
            return sample_with_support(logits, u, temperature, None, top_p, 0)[0]
    g = torch.Generator().manual_seed(0)
    lg = torch.randn(1, 16, 4096, generator=g) * 3
    u = torch.rand(1, 16, generator=g)
    t, p = torch.tensor([1.0]), torch.tensor([0.9])
    model = export_one(S(), dict(logits=lg, u=u, temperature=t, top_p=p), ["logits", "u", "temperature", "top_p"], ["tokens"], 18)
    proto = ir.serde.serialize_model(model)
    assert lint_model(proto) == []
    assert "TopK" not in {n.op_type for n in proto.graph.node}
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, dict(logits=lg.numpy(), u=u.numpy(), temperature=t.numpy(), top_p=p.numpy()))[0]
    assert np.array_equal(got, S()(lg, u, t, p).numpy())


# ------------------------------------------------------------------ CLI and bad input
@pytest.mark.slow
def test_export_cli_bad_inputs(tmp_path):
    # non-empty --out without --force
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("keep me")
    for force in ((), ("--force",)):        # user files are never replaced, not even with --force
        r = run_cli("export.py", "--model", TINY, "--random-init", "0", "--out", tmp_path / "full", *force)
        assert r.returncode == 2 and "not var-ssg artifacts" in r.stderr
        assert (tmp_path / "full" / "x.txt").read_text() == "keep me"
    # unwritable location (a parent that is a file)
    (tmp_path / "afile").write_text("")
    r = run_cli("export.py", "--model", TINY, "--random-init", "0", "--out", tmp_path / "afile" / "out")
    assert r.returncode == 2 and "error:" in r.stderr
    # missing checkpoint
    r = run_cli("export.py", "--model", TINY, "--ckpt", tmp_path / "no.pth", "--vae-ckpt", tmp_path / "no2.pth",
                   "--out", tmp_path / "o")
    assert r.returncode == 2 and "no.pth: no such file" in r.stderr
    assert not (tmp_path / "o").exists()
    # unknown preset lists valid ones
    r = run_cli("export.py", "--model", "var-big", "--random-init", "0", "--out", tmp_path / "o")
    assert r.returncode == 2 and "valid presets" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_export_failing_half_way_leaves_nothing(tmp_path, tiny, monkeypatch):
    from var_ssg.export import store
    from var_ssg.export.onnx_export import ExportConfig, ExportError, export_artifacts
    from var_ssg.graphs.weights import WeightSource
    cfg, var, vae = tiny
    calls = {"n": 0}
    real = store.SharedWeights._put

    def flaky(self, data):
        calls["n"] += 1
        if calls["n"] > 30:
            raise OSError(28, "No space left on device", self.path)
        return real(self, data)
    monkeypatch.setattr(store.SharedWeights, "_put", flaky)
    out = tmp_path / "art"
    with pytest.raises(ExportError, match="No space left on device.*nothing was written"):
        export_artifacts(var, vae, WeightSource(kind="random", seed=0), str(out), ExportConfig(top_k=64))
    assert not out.exists()
    assert os.listdir(tmp_path) == []          # no temporary directory left either


def test_reexport_is_cached(artifacts, tiny):
    from var_ssg.export.onnx_export import ExportConfig, export_artifacts
    from var_ssg.graphs.weights import WeightSource
    cfg, var, vae = tiny
    d = artifacts()
    before = os.path.getmtime(os.path.join(d, "manifest.json"))
    export_artifacts(var, vae, WeightSource(kind="random", seed=0), d, ExportConfig(top_k=64))
    assert os.path.getmtime(os.path.join(d, "manifest.json")) == before
    # a different seed is a different cache key: refused without --force
    from var_ssg.common.errors import ConfigError
    with pytest.raises(ConfigError, match="holds other artifacts"):
        export_artifacts(var, vae, WeightSource(kind="random", seed=1), d, ExportConfig(top_k=64))
    # so is a different export option
    with pytest.raises(ConfigError, match="holds other artifacts"):
        export_artifacts(var, vae, WeightSource(kind="random", seed=0), d, ExportConfig(top_k=32))


def test_step_graph_profiles_and_dynamic_axes(artifacts, tiny):
    cfg = tiny[0]
    d = artifacts()
    man = json.load(open(os.path.join(d, "manifest.json")))
    step = man["graphs"]["step"]
    m = onnx.load(os.path.join(d, step["file"]), load_external_data=False)
    # the dynamic axes are exactly the ones the profiles pin (and the outputs that follow them);
    # without them the lint objects
    flagged = {i.node for i in lint_model(m, "step")}
    assert set(step["dynamic_inputs"]) == {"noise", "past_kv", "prev_logits", "forced", "gumbel", "scale_pos", "scale_down",
                                           "scale_up", "scale_dse"}
    assert flagged == set(step["dynamic_inputs"]) | {"tokens", "logits", "logits_cfg", "new_kv"}
    assert len(step["profiles"]) == cfg.num_scales
    for k, prof in enumerate(step["profiles"]):
        n, (b, _) = cfg.patch_nums[k] ** 2, cfg.begin_ends[k]
        assert prof["noise"] == [1, n] and prof["past_kv"][0] == b
        assert prof["prev_logits"] == [1, 1 if k == 0 else cfg.patch_nums[k - 1] ** 2, cfg.V]
        assert step["output_shapes"][k]["new_kv"][0] == n
    r = run_cli("lint.py", d)
    assert r.returncode == 0 and "2 graphs, 0 issues" in r.stdout


@pytest.mark.slow
def test_decoder_job_reports_the_childs_error_and_close_leaves_no_process(tiny, tmp_path):
    """The decoder's export runs in a child process: its failure is raised with its own message
    (all of it), and close() while it runs leaves no process behind."""
    from var_ssg.export.decoder_job import DecoderJob, DecoderSpec
    from var_ssg.graphs.config import get_preset
    cfg, _, vae = tiny
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    other = get_preset("var-d2")
    job = DecoderJob(vae, DecoderSpec(other, other.vae, 1, 18), str(tmp_path / "a"))   # weights of another size
    try:
        job.start()
        with pytest.raises(RuntimeError, match=r"(?s)decoder's export \(a child process\) failed: RuntimeError: "
                                               r"Error\(s\) in loading state_dict.*size mismatch"):
            job.result()        # the detail after the first line is kept
    finally:
        job.close()
    job = DecoderJob(vae, DecoderSpec(cfg, vae.cfg, 1, 18), str(tmp_path / "b"))
    job.close()                                              # never started: nothing to do
    job.start()
    pid = job._proc.pid
    job.close()
    assert not os.path.exists(f"/proc/{pid}")                # killed and reaped


@pytest.mark.parametrize("script, want", [
    ("echo 'ImportError: no module named x' >&2; exit 3", r"exit status 3; its last output:\nImportError: no module"),
    ("kill -9 $$", r"signal SIGKILL \(killed: out of memory\?\) and no output")])
def test_decoder_job_that_dies_before_it_can_say_why_is_reported_with_its_output(tiny, tmp_path, monkeypatch,
                                                                                 script, want):
    from var_ssg.export import decoder_job
    cfg, _, vae = tiny
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\n{script}\n")
    fake.chmod(0o755)
    monkeypatch.setattr(decoder_job.sys, "executable", str(fake))
    job = decoder_job.DecoderJob(vae, decoder_job.DecoderSpec(cfg, vae.cfg, 1, 18), str(tmp_path))
    try:
        job.start()
        with pytest.raises(RuntimeError, match="decoder's export \\(a child process\\) failed: it ended with " + want):
            job.result()
    finally:
        job.close()


@pytest.mark.slow
def test_decoder_job_imports_this_checkout_wherever_it_is_started(tiny, tmp_path, monkeypatch):
    """Started from a folder that holds a user's `export.py`, the child still imports this
    checkout's export package (not the folder's module), and its graph is the in-process
    export's, byte for byte."""
    import onnx_ir as ir
    from var_ssg.export.decoder_job import DecoderJob, DecoderSpec
    from var_ssg.export.dynamo import export_one
    from var_ssg.graphs.components import DecoderComponent
    cfg, _, vae = tiny
    here, scratch = tmp_path / "here", tmp_path / "scratch"
    here.mkdir(), scratch.mkdir()
    (here / "export.py").write_text("raise SystemExit('the wrong export')\n")
    (here / "graphs.py").write_text("raise SystemExit('the wrong graphs')\n")
    monkeypatch.chdir(here)
    job = DecoderJob(vae, DecoderSpec(cfg, vae.cfg, 1, 18), "../scratch")    # relative: made absolute
    try:
        job.start()
        model = job.result()
    finally:
        job.close()
    assert [v.name for v in model.graph.outputs] == ["image"]
    dec = DecoderComponent(cfg, 1)
    here = export_one(dec.module(None, vae).eval(), dec.example_feeds(), dec.inputs, dec.outputs, 18)
    assert ir.to_proto(model).SerializeToString() == ir.to_proto(here).SerializeToString()


@pytest.mark.parametrize("make", [
    lambda a: a.T,                                          # a transposed weight, as the optimiser folds it
    lambda a: a[::-1, ::2],                                 # negative and skipping strides
    lambda a: np.frombuffer(a.tobytes(), a.dtype).reshape(a.shape).T,     # read-only
    lambda a: a.astype(">f4").T,                            # big-endian: torch refuses it, numpy copies
    lambda a: a.astype(np.float16).T])
def test_strided_constants_are_written_in_c_order_without_a_warning(make):
    import warnings
    from var_ssg.export.store import _contiguous
    arr = make(np.arange(12 * 8, dtype=np.float32).reshape(12, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _contiguous(arr)
    assert got.flags.c_contiguous and got.dtype == arr.dtype and np.array_equal(got, arr)
