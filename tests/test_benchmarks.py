"""benchmarks/: the side-by-side bench (fields of BenchResult, the summary line scripts parse, the
JSON), SSG's graph, the roofline (FLOP count, the one choice of peaks), export-if-missing, and the
GPU check (its pure plan, the budget re-checked before every row, the CPU path end to end, the
shell wrapper on a machine without a GPU)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from var_ssg.graphs.config import get_preset
from var_ssg.common.errors import ConfigError
from tests.conftest import ROOT, TINY

from var_ssg.benchmarks.gpu_plan import (TRT_BUILD_S_PER_GPARAM, Env, Estimates, GpuCheckConfig,
                                 OnDisk, RowKey, choose_exported, model_gparams, plan)

H200_IMAGE = Env(cuda=True, gpu="NVIDIA H200", ort="1.23.2", providers=("CPUExecutionProvider",), trt=None)
FULL = Env(cuda=True, gpu="NVIDIA H200", ort="1.23.2", providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
           trt="10.16.1.11")


def _have_trt():
    try:
        import tensorrt  # noqa: F401
        return True
    except ImportError:
        return False


# ------------------------------------------------------------------ the side-by-side bench
@pytest.mark.slow
def test_bench_side_by_side_fields(artifacts):
    from var_ssg.benchmarks.bench import BenchConfig, run_bench
    d = artifacts()
    seen = []
    res = run_bench(BenchConfig(backends=("eager", "onnxruntime"), artifacts=d, repeats=1, peak_tflops=1,
                                bandwidth_gbs=10), on_batch=seen.append)
    assert seen == res.runs and len(res.runs) == 1
    run = res.runs[0]
    assert run.artifacts == d and run.batch == 1 and run.model == TINY and list(run.backends) == ["eager", "onnxruntime"]
    for t in run.backends.values():          # every backend timed per scale, SSG's cost measured in isolation
        assert len(t.per_scale_s) == 10 and all(x > 0 for x in t.per_scale_s) and len(t.runs_s) == 1
        assert sum(t.per_scale_s) < t.total_s                     # the decoder is in the total, not in a scale
        assert t.ssg_s > 0 and t.ssg_overhead_pct == pytest.approx(100 * t.ssg_s / t.total_s)
        assert t.x_floor == pytest.approx(t.total_s / run.floor.seconds) and t.x_floor > 1
    assert run.floor.source == "given" and run.floor.peak_flops == 1e12 and run.floor.bandwidth == 10e9
    assert set(res.dse) == {"folded", "chain", "fft"} and res.peak_rss_gib > 0
    m = re.fullmatch(r"summary: onnxruntime/eager=(\d+\.\d\d) ssg_overhead=(\d+\.\d)% dse_speedup=(\d+\.\d)x",
                     res.summary())
    ort, eager = run.backends["onnxruntime"], run.backends["eager"]
    assert m and float(m[1]) == pytest.approx(ort.total_s / eager.total_s, abs=0.006)


@pytest.mark.slow
def test_bench_command_prints_writes_json_and_plot(artifacts, tmp_path, capsys):
    from var_ssg.tools.commands import bench
    js, png = tmp_path / "b.json", tmp_path / "b.png"
    assert bench.main(["--artifacts", artifacts(), "--backends", "onnxruntime", "--repeats", "1", "--json", str(js),
                       "--plot", str(png), "--peak-tflops", "1", "--bandwidth-gbs", "10"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert any(line.endswith("x the floor") for line in out) and any(line.startswith("floor ") for line in out)
    data = json.loads(js.read_text())
    dse = data["dse"]                     # measured by this run; the summary's ratio is the JSON's
    assert all(dse[k] > 0 for k in ("folded", "chain", "fft"))
    assert re.fullmatch(r"summary: ssg_overhead=\d+\.\d% dse_speedup=(\d+\.\d)x", out[-1])[1] == \
        f"{dse['fft'] / dse['folded']:.1f}"
    b = data["runs"][0]["backends"]["onnxruntime"]
    assert data["runs"][0]["batch"] == 1 and len(b["per_scale_s"]) == 10 and b["x_floor"] > 1
    assert set(data["dse"]) == {"folded", "chain", "fft"} and "argv" in data
    from PIL import Image
    assert Image.open(png).size[0] > 100


def test_bench_dse_times_three_forms_of_the_same_dse():
    """bench_dse on a small size: the three forms it times compute the same DSE (it checks them
    against torch.fft first), each timed."""
    from var_ssg.benchmarks.bench import bench_dse
    t = bench_dse(repeats=2, V=64, src=5, dst=8)
    assert sorted(t) == ["chain", "fft", "folded"] and all(v > 0 for v in t.values())


def test_bench_dse_refuses_forms_that_disagree(monkeypatch):
    import var_ssg.graphs.dse as dse
    from var_ssg.benchmarks.bench import bench_dse
    real = dse.dse_chain_matrices
    monkeypatch.setattr(dse, "dse_chain_matrices", lambda *a: {**real(*a), "coarse_re": 0 * real(*a)["coarse_re"]})
    with pytest.raises(RuntimeError, match=r"the chain form differs from torch.fft"):
        bench_dse(repeats=1, V=64, src=5, dst=8)


def test_bench_config_refuses_bad_input(tmp_path):
    from var_ssg.benchmarks.bench import BenchConfig
    from var_ssg.export.ensure import ModelSource
    from var_ssg.tools.commands import bench
    with pytest.raises(ConfigError, match="--batch chooses artifacts per batch"):
        bench.main(["--artifacts", str(tmp_path), "--batch", "1,4"])
    with pytest.raises(ConfigError, match="give --model"):
        bench.main(["--backends", "eager"])
    with pytest.raises(ConfigError, match="--batch must be comma-separated integers"):
        bench.main(["--model", TINY, "--batch", "x"])
    for kw, msg in ((dict(backends=()), "--backends is empty"), (dict(repeats=0), "--repeats must be >= 1"),
                    (dict(batches=(0,)), "--batch sizes must be >= 1")):
        with pytest.raises(ConfigError, match=msg):
            BenchConfig(**{"source": ModelSource(TINY), **kw})


def test_bench_exports_one_directory_per_batch_when_asked(monkeypatch):
    """With a model, each batch's directory is resolved (exported if missing) when its turn comes."""
    import var_ssg.benchmarks.bench as bb
    from var_ssg.export.ensure import ModelSource
    asked = []
    monkeypatch.setattr(bb, "ensure_artifacts", lambda src, b: asked.append((src.root, b)) or f"{src.root}/b{b}")
    cfg = bb.BenchConfig(source=ModelSource(TINY, root="r", random_init=0), batches=(1, 4))
    dirs = cfg.directories()
    assert asked == [] and [d() for d in dirs] == ["r/b1", "r/b4"] and asked == [("r", 1), ("r", 4)]
    assert [d() for d in bb.BenchConfig(artifacts="a").directories()] == ["a"]


def test_ssg_graph_computes_the_fusion():
    """The ONNX Runtime side of SSG's cost runs l + beta (l - M prev), bound by pointer."""
    from var_ssg.benchmarks.ssg_graph import SsgSession
    g = torch.Generator().manual_seed(0)
    M = torch.randn(9, 4, generator=g)
    l, prev, beta = torch.randn(2, 9, 16, generator=g), torch.randn(2, 4, 16, generator=g), torch.tensor([0.3])
    s = SsgSession(M.numpy(), l, prev, beta)
    out = s.run()
    assert torch.allclose(out, l + beta * (l - M @ prev), atol=1e-5)
    l.add_(1.0)                                          # bound by pointer: a new run sees the new values
    assert torch.allclose(s.run(), l + beta * (l - M @ prev), atol=1e-5)


# ------------------------------------------------------------------ the roofline
@pytest.mark.parametrize("name", [TINY, "var-d4-tiny", "var-d2-512-tiny"])
def test_roofline_flops_match_a_flop_counter(name):
    """Our closed-form FLOPs per scale agree with torch's FlopCounterMode on the real step."""
    from torch.utils.flop_counter import FlopCounterMode
    from var_ssg.graphs.dse import dse_matrix
    from var_ssg.graphs.components import StepComponent
    from var_ssg.graphs.step import ScaleStep, StepSpec
    from var_ssg.graphs.weights import random_models
    from var_ssg.benchmarks.roofline import step_flops, transformer_bytes
    cfg = get_preset(name)
    var, vae = random_models(cfg, 0)
    comp = StepComponent(cfg, 2, StepSpec(k_max=64))
    for k in (0, 1, 5, 9):
        step = ScaleStep(var, vae, k, StepSpec(k_max=64))
        if k:       # the exported prior: one folded-matrix MatMul (torch.fft is not counted)
            M = torch.tensor(dse_matrix((cfg.patch_nums[k - 1],) * 2, (cfg.patch_nums[k],) * 2), dtype=torch.float32)
            step.prior = lambda prev, M=M: M @ prev
        feeds = {n: v for n, v in comp.example_feeds(k).items() if not n.startswith("scale_")}
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            step(**feeds)
        # the roofline leaves out the f_hat update (phi's 3x3 conv on the P x P latent)
        counts = {str(op): n for op, n in fc.get_flop_counts()["Global"].items()}
        assert step_flops(cfg, k, 2) == pytest.approx(fc.get_total_flops() - counts.get("aten.convolution", 0), rel=0.12)
    n = sum(p.numel() for n, p in var.named_parameters() if not n.startswith(("pos_", "lvl_")))
    assert transformer_bytes(cfg, 4) == 4 * n


def test_floor_is_the_larger_bound():
    from var_ssg.benchmarks.roofline import floor
    cfg = get_preset("var-d16")
    slow_mem = floor(cfg, 1, peak_flops=1e15, bandwidth=1e9)
    assert slow_mem.compute_bound_scales == [] and slow_mem.seconds == pytest.approx(slow_mem.weight_bytes / 1e9)
    slow_math = floor(cfg, 1, peak_flops=1e9, bandwidth=1e15)
    assert slow_math.compute_bound_scales == list(range(10)) and slow_math.seconds == pytest.approx(slow_math.flops / 1e9)


def test_choose_floor_given_peaks_win_then_the_data_sheet():
    from var_ssg.benchmarks.roofline import GPU_PEAKS, choose_floor, floor
    cfg = get_preset("var-d16")
    given = choose_floor(cfg, 1, "fp32", "NVIDIA H200", peak_flops=1e12, bandwidth=1e10)
    assert given.source == "given" and given.floor == floor(cfg, 1, 1e12, 1e10, 4)
    half = choose_floor(cfg, 4, "bf16", "NVIDIA H200")
    h200 = GPU_PEAKS["H200"]
    assert half.source == "NVIDIA H200 data sheet, fp16" and half.floor == floor(cfg, 4, h200["fp16"], h200["bandwidth"], 2)
    assert choose_floor(cfg, 1, "fp32", "NVIDIA H200").peak_flops == h200["fp32"]
    assert choose_floor(cfg, 1, "fp32", None, peak_flops=1e12) is None            # one peak alone: no floor
    assert choose_floor(cfg, 1, "fp32", "Some Other GPU") is None
    assert "ms per batch" in half.describe(cfg.num_scales)


# ------------------------------------------------------------------ export-if-missing
def test_ensure_artifacts_exports_into_root_model_batch(monkeypatch, tmp_path):
    import var_ssg.export.ensure as ens
    seen = {}
    monkeypatch.setattr(ens, "export_artifacts", lambda var, vae, src, out, ec: seen.update(out=out, ec=ec, src=src))
    out = ens.ensure_artifacts(ens.ModelSource(TINY, root=str(tmp_path), random_init=3), 4)
    assert out == os.path.join(str(tmp_path), f"{TINY}-b4") == seen["out"]
    assert seen["ec"].batch == 4 and seen["src"].random and seen["src"].seed == 3


@pytest.mark.slow
def test_ensure_artifacts_refuses_other_artifacts_clearly(artifacts, tmp_path):
    """<root>/<model>-b1 holding artifacts of other options (top-k 64, not 900) is never replaced."""
    from var_ssg.export.ensure import ModelSource, ensure_artifacts
    out = tmp_path / f"{TINY}-b1"
    shutil.copytree(artifacts(), out)
    before = sorted(os.listdir(out))
    with pytest.raises(ConfigError, match=rf"{re.escape(str(out))} holds other artifacts .*--artifacts {re.escape(str(out))}"
                                          rf".*--artifacts-root.*scripts/export.py --force --out"):
        ensure_artifacts(ModelSource(TINY, root=str(tmp_path), random_init=0), 1)
    assert sorted(os.listdir(out)) == before


# ------------------------------------------------------------------ the GPU check: the plan (pure)
def test_choose_exported_before_exporting():
    ok, why = choose_exported("cuda", H200_IMAGE)
    assert ok == [] and "no CUDAExecutionProvider" in why["onnxruntime"] and why["tensorrt"] == "tensorrt is not installed"
    assert choose_exported("cuda", FULL)[0] == ["tensorrt", "onnxruntime"]
    ok, why = choose_exported("cpu", Env(cuda=False, ort="1.23.2", providers=("CPUExecutionProvider",)))
    assert ok == ["onnxruntime"] and why["tensorrt"] == "tensorrt is not installed"
    ok, why = choose_exported("cuda", Env(cuda=False, ort="1.23.2", trt="10.16.1.11"))
    assert ok == [] and all(w.startswith("no CUDA device visible to PyTorch") for w in why.values())


def test_plan_with_tensorrt_and_ort_cuda_reaches_the_tensorrt_row_first():
    """The default budget reaches the TensorRT row: exported rows first, then eager ones."""
    rows = plan(GpuCheckConfig(), FULL)
    keys = [r.key for r in rows]
    assert keys[:2] == [RowKey("var-d16", "tensorrt", "fp32", 1), RowKey("var-d16", "onnxruntime", "fp32", 1)]
    assert [k.backend for k in keys[2:]] == ["eager"] * 12
    assert [(k.model, k.precision, k.batch) for k in keys[2:5]] == [("var-d16", p, 1) for p in ("fp32", "fp16", "bf16")]
    trt, ort = rows[0], rows[1]
    assert trt.blocked is None and trt.fits and trt.start_s == 0
    assert [s for s, _ in trt.stages] == ["random weights", "export", "TensorRT engines", "eager fp32 reference", "runs"]
    gp = model_gparams(["var-d16"])["var-d16"]
    assert dict(trt.stages)["TensorRT engines"] == TRT_BUILD_S_PER_GPARAM * gp
    assert trt.estimate_s <= GpuCheckConfig().budget_s
    assert ort.fits and [s for s, _ in ort.stages] == ["runs"] and ort.start_s == pytest.approx(trt.estimate_s)
    assert all(not r.fits for r in rows if r.key.model == "var-d24")        # the guesses leave d24 to measurements


def test_plan_on_the_lent_h200_image_skips_exported_rows_with_reasons():
    rows = plan(GpuCheckConfig(), H200_IMAGE)
    assert rows[0].blocked == "tensorrt is not installed" and "no CUDAExecutionProvider" in rows[1].blocked
    first = rows[2]
    assert first.key == RowKey("var-d16", "eager", "fp32", 1) and first.fits and first.start_s == 0
    assert [s for s, _ in first.stages] == ["random weights", "runs"]
    assert [s for s, _ in rows[3].stages] == ["runs"]                      # the weights are built once per model
    d24 = next(r for r in rows if r.key.model == "var-d24")
    assert d24.stages[0][0] == "random weights"


def test_plan_without_a_gpu_blocks_every_row():
    rows = plan(GpuCheckConfig(), Env(cuda=False, ort="1.23.2"))
    assert len(rows) == 2 + 12 and all(r.blocked.startswith("no CUDA device visible to PyTorch") for r in rows)


def test_plan_reuses_what_is_on_disk_and_walks_a_clock():
    cfg = GpuCheckConfig(models=("var-d16",), batches=(1,), precisions=("fp32",))
    rows = plan(cfg, FULL, disk={"var-d16": OnDisk(graphs=True, engines=True)})
    assert [s for s, _ in rows[0].stages] == ["random weights", "eager fp32 reference", "runs"]
    rows = plan(cfg, FULL, disk={"var-d16": OnDisk(graphs=True, engines=False)})
    assert [s for s, _ in rows[0].stages] == ["random weights", "TensorRT engines", "eager fp32 reference", "runs"]
    assert [s for s, _ in rows[2].stages] == ["runs"]                      # eager fp32 b1: the reference is done too
    est = Estimates(model_gparams(["var-d16"]), cfg.repeats)
    est.measured("var-d16", 1, 0.5)                                       # measurements replace the guesses
    assert est.run("var-d16", 1) == 0.5 and est.run("var-d16", 4) == 2.0
    tight = plan(GpuCheckConfig(models=("var-d16",), budget_s=60), FULL)
    assert not tight[0].fits and tight[1].fits and "export" in dict(tight[1].stages)   # ORT exports without engines
    assert all(r.start_s == 0 for r in plan(GpuCheckConfig(budget_s=0.01), FULL))


# ------------------------------------------------------------------ the GPU check: running the plan
class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _scripted(clock, took):
    """A GpuCheck class whose stages only advance a fake clock by `took[stage]` seconds."""
    from var_ssg.benchmarks.gpu_check import GpuCheck

    class Scripted(GpuCheck):
        def _weights(self):
            clock.t += took["weights"]
            self.model.var = self.model.vae = object()
            self.done.weights.add(self.model.cfg.name)

        def _export(self, backend):
            clock.t += took["export"]
            self.done.graphs.add(self.model.cfg.name)
            self.done.engines.add(self.model.cfg.name)
            return "export (trt)"

        def _reference(self):
            self.model.base[1] = took["run"]
            self.done.reference.add(self.model.cfg.name)

        def _pipeline(self, backend):
            return backend

        def _eager(self, precision):
            return "eager"

        def _measure(self, pipe, batch, repeats=None):
            clock.t += took["run"] * batch * 5
            self.est.measured(self.model.cfg.name, batch, took["run"] * batch)
            return took["run"] * batch, None, 3
    return Scripted


def _scripted_check(config, env, clock, took):
    from var_ssg.benchmarks.gpu_check import Budget
    return _scripted(clock, took)(config, env, Budget(config.budget_s, clock), disk={})


def test_each_row_is_checked_against_the_budget_left_before_it_runs():
    """The plan said eager fp32 batch 1 fits; the export took longer than guessed, so that row and
    the ones after are skipped with their estimate and the time left; measured run times replace
    the guesses in those estimates."""
    clock = FakeClock()
    config = GpuCheckConfig(models=("var-d16",), batches=(1, 8))
    check = _scripted_check(config, FULL, clock, dict(weights=5, export=310, run=0.2))
    assert [p.fits for p in check.plan[:3]] == [True, True, True]
    seen = []
    check.on_row = seen.append
    res = check.run()
    assert res.rows == seen
    assert [(r.key.backend, r.status) for r in res.rows] == [("tensorrt", "measured"), ("onnxruntime", "measured")] + \
        [("eager", "skipped")] * 6
    trt, ort, eager = res.rows[0], res.rows[1], res.rows[2]
    assert trt.note == "export (trt)" and trt.vs_fp32 == pytest.approx(1.0) and ort.note == ""
    assert all(r.note.startswith("budget: needs ~") and r.note.endswith("3 s left") for r in res.rows[2:])
    # eager fp32 b1: the measured 0.2 s per run x 5 runs + 5 s set-up, not the guess (~10 s)
    assert eager.note == "budget: needs ~6 s (runs 6 s), 3 s left"
    assert res.summary() == "summary: 2 measured, 6 skipped, 0 failed; 317 s of a 320 s budget"


def test_a_stop_keeps_the_rows_measured_so_far():
    from var_ssg.benchmarks.gpu_check import Stopped
    clock = FakeClock()
    config = GpuCheckConfig(models=("var-d16",), batches=(1,))
    check = _scripted_check(config, H200_IMAGE, clock, dict(weights=1, export=1, run=0.1))

    def on_row(row):
        if row.status == "measured":
            raise Stopped()
    check.on_row = on_row
    res = check.run()
    assert res.stopped and [r.status for r in res.rows] == ["skipped", "skipped", "measured"]
    assert "stopped by SIGTERM" in res.summary()


def test_gpu_check_budget_bounds_each_row_and_exports_nothing_unneeded(tmp_path):
    from var_ssg.benchmarks.gpu_check import GpuCheck, probe
    root = tmp_path / "gc"
    config = GpuCheckConfig(models=(TINY,), exported=(TINY,), device="cpu", budget_s=0.01, artifacts_root=str(root))
    res = GpuCheck(config, probe(config.device)).run()         # as scripts/gpu_check.py runs it
    assert res.rows[0].note == "tensorrt is not installed" or _have_trt()
    assert all(r.status == "skipped" and r.note.startswith("budget: needs ~") for r in res.rows[1:])
    assert not root.exists()                               # no export started


@pytest.mark.slow
def test_gpu_check_rows_on_cpu(artifacts, tmp_path):
    """The GPU check end to end on the CPU with the tiny model (the GPU run uses the same code):
    the exported rows first (TensorRT skipped, ONNX Runtime measured against an eager fp32
    reference), then eager fp32 and bf16 with parity."""
    from var_ssg.benchmarks.gpu_check import GpuCheck, artifacts_dir, probe
    from var_ssg.runtime.parity import BOUNDS
    config = GpuCheckConfig(models=(TINY,), exported=(TINY,), device="cpu", precisions=("fp32", "bf16"), batches=(1,),
                            top_k=64, repeats=1, artifacts_root=str(tmp_path / "gc"))
    shutil.copytree(artifacts(), artifacts_dir(config, TINY))        # reused by cache key, no export
    res = GpuCheck(config, probe(config.device)).run()         # as scripts/gpu_check.py runs it
    rows = {(r.key.backend, r.key.precision): r for r in res.rows}
    assert list(rows) == [("tensorrt", "fp32"), ("onnxruntime", "fp32"), ("eager", "fp32"), ("eager", "bf16")]
    assert rows["tensorrt", "fp32"].note == "tensorrt is not installed" or _have_trt()
    ort = rows["onnxruntime", "fp32"]
    assert ort.status == "measured" and ort.note == "" and ort.runs == 1 and ort.vs_fp32 > 0
    p = ort.parity
    assert p.tokens_equal == 1.0 and p.first_diff is None and p.within and p.unexplained_flips == 0
    assert len(p.logits_rel) == 10 and max(p.logits_rel) < BOUNDS["fp32"] and p.bound == BOUNDS["fp32"]
    assert rows["eager", "fp32"].reference and rows["eager", "fp32"].vs_fp32 == 1.0
    bf16 = rows["eager", "bf16"].parity
    assert bf16.bound == BOUNDS["bf16"] and len(bf16.logits_rel) == 10 and 0 < bf16.tokens_equal <= 1
    assert res.summary().startswith("summary: 3 measured, 1 skipped, 0 failed")


def test_gpu_check_command_stops_on_sigterm_with_its_summary(monkeypatch, capsys):
    """`timeout` sends SIGTERM: the rows printed so far stay and the summary line still comes."""
    from var_ssg.benchmarks import gpu_check as lib
    from var_ssg.tools.commands import gpu_check
    Scripted = _scripted(FakeClock(), dict(weights=0, export=0, run=0.01))
    measured = []

    class Terminated(Scripted):         # SIGTERM once a row was measured (and printed)
        def _row(self, p):
            if measured:
                os.kill(os.getpid(), signal.SIGTERM)
            r = super()._row(p)
            if r.status == "measured":
                measured.append(r)
            return r
    monkeypatch.setattr(lib, "GpuCheck", Terminated)
    old = signal.getsignal(signal.SIGTERM)
    try:
        rc = gpu_check.main(["--device", "cpu", "--models", TINY, "--exported", "", "--precisions", "fp32,bf16",
                             "--batches", "1,2", "--top-k", "64", "--repeats", "0"])
    finally:
        signal.signal(signal.SIGTERM, old)
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and lines[0].startswith("device: cpu")
    assert [line for line in lines if line.startswith(f"| {TINY} | eager")] == [lines[-2]]
    assert lines[-1].startswith("summary: 1 measured, 0 skipped, 0 failed; stopped by SIGTERM")


@pytest.mark.slow          # runs a script (the fast lane runs none)
def test_gpu_check_sh_without_a_gpu_skips_every_row_with_its_reason(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    log = tmp_path / "gpu_check.log"
    t = time.time()
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh")], capture_output=True, text=True,
                       env=dict(os.environ, GPU_CHECK_LOG=str(log), PYTHON=sys.executable), cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [line.split("|")[1:-1] for line in r.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| model")]
    assert len(rows) == 2 * 6 + 2                          # var-d16/d24 x 3 precisions x 2 batches; d16 exported
    assert [row[1].strip() for row in rows[:3]] == ["tensorrt", "onnxruntime", "eager"]
    assert all(row[-1].strip().startswith("skipped: no CUDA device visible to PyTorch") for row in rows)
    assert r.stdout.strip().splitlines()[-1].startswith("summary: 0 measured, 14 skipped, 0 failed")
    assert log.read_text() == r.stdout and time.time() - t < 60


# ------------------------------------------------------------------ Infinity's bench
@pytest.mark.slow
def test_bench_on_infinity_artifacts(tmp_path, capsys):
    """bench.py on Infinity artifacts: both backends alternate, per-scale medians of the aspect
    ratio's schedule, the decoder's share, the JSON and the summary line; Infinity without
    artifacts, or with VAR-only options, is refused with what to do."""
    from var_ssg.tools.commands import bench, export
    from var_ssg.benchmarks.infinity_bench import InfinityBenchConfig
    from var_ssg.graphs.infinity_config import get_infinity_preset
    art = str(tmp_path / "inf")
    assert export.main(["--model", "infinity-tiny", "--random-init", "0", "--out", art]) == 0
    js = tmp_path / "b.json"
    assert bench.main(["--artifacts", art, "--repeats", "1", "--aspect-ratio", "3:4", "--json", str(js)]) == 0
    out = capsys.readouterr().out
    r = json.loads(js.read_text())
    K = get_infinity_preset("infinity-tiny").schedule(0.75).num_scales
    assert r["model"] == "infinity-tiny" and r["schedule"][2] == [3, 4] and set(r["backends"]) == {"eager", "onnxruntime"}
    for t in r["backends"].values():
        assert len(t["per_scale_s"]) == K and len(t["runs_s"]) == 1 and t["decode_s"] > 0
        assert sum(t["per_scale_s"]) + t["decode_s"] == pytest.approx(t["runs_s"][0], rel=1e-6)
    ratio = r["backends"]["onnxruntime"]["per_image_s"] / r["backends"]["eager"]["per_image_s"]
    assert out.strip().splitlines()[-1].endswith(f"onnxruntime/eager={ratio:.2f}")
    with pytest.raises(ConfigError, match="then --artifacts DIR"):
        bench.main(["--model", "infinity-tiny", "--random-init", "0"])
    for extra in (["--batch", "2"], ["--model", "var-d2"], ["--random-init", "0"], ["--peak-tflops", "1"]):
        with pytest.raises(ConfigError, match="the batch is the exported one"):
            bench.main(["--artifacts", art] + extra)
    with pytest.raises(ConfigError, match="--aspect-ratio is for Infinity"):
        bench.main(["--model", "var-d2", "--random-init", "0", "--aspect-ratio", "3:4"])
    with pytest.raises(ConfigError, match="runs eager and onnxruntime"):
        InfinityBenchConfig(artifacts=art, backends=("tensorrt",))


def test_infinity_bench_decoder_time_is_the_median_of_each_runs_rest(monkeypatch):
    """The Infinity bench's decoder time is the median over runs of (run - its scales), not the
    median run less the per-scale medians (medians do not add): on a fake clock, runs of
    (scale 0, decoder) = (2, 1), (1, 5), (6, 0) give a decoder of 1 (the other way: 6 - 2 = 4)."""
    from types import SimpleNamespace
    from var_ssg.benchmarks import infinity_bench
    from var_ssg.graphs.infinity_config import get_infinity_preset
    from var_ssg.runtime import infinity as rt
    cfg = get_infinity_preset("infinity-tiny")
    K = cfg.schedule(1.0).num_scales
    clock = [0.0]
    plan = [(0, 0), (2, 1), (1, 5), (6, 0)]          # the warm-up, then three runs

    class FakePipe:
        info = SimpleNamespace(cfg=cfg, batch=1)

        def run(self, rows, ratio, progress=None):
            s0, dec = plan.pop(0)
            for k in range(K):
                clock[0] += s0 if k == 0 else 0
                progress(k)
            clock[0] += dec
    monkeypatch.setattr(rt, "open_infinity", lambda artifacts, backend: (FakePipe(), ""))
    monkeypatch.setattr(infinity_bench, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    r = infinity_bench.run_infinity_bench(infinity_bench.InfinityBenchConfig(artifacts="x", backends=("eager",)))
    t = r.backends["eager"]
    assert t.runs_s == [3, 6, 6] and t.per_scale_s == [2] + [0] * (K - 1) and t.decode_s == 1


def test_infinity_bench_runs_the_exported_batch_whatever_the_backend_order(monkeypatch, tmp_path):
    """On batch-2 artifacts every backend runs two rows and the time per image is a run's half,
    with eager (whose info has no batch) listed first, second or alone."""
    from types import SimpleNamespace
    from var_ssg.benchmarks import infinity_bench
    from var_ssg.graphs.infinity_config import get_infinity_preset
    from var_ssg.runtime import infinity as rt
    cfg = get_infinity_preset("infinity-tiny")
    (tmp_path / "manifest.json").write_text(json.dumps(dict(batch=2)))
    clock, seen = [0.0], []

    class FakePipe:
        def __init__(self, backend):
            self.backend, self.info = backend, SimpleNamespace(cfg=cfg, batch=None if backend == "eager" else 2)

        def run(self, rows, ratio, progress=None):
            seen.append((self.backend, len(rows)))
            clock[0] += 1
            progress(0)
            clock[0] += 1
    monkeypatch.setattr(rt, "open_infinity", lambda artifacts, backend: (FakePipe(backend), ""))
    monkeypatch.setattr(infinity_bench, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    for backends in (("eager", "onnxruntime"), ("onnxruntime", "eager"), ("eager",)):
        seen.clear()
        r = infinity_bench.run_infinity_bench(infinity_bench.InfinityBenchConfig(artifacts=str(tmp_path),
                                                                                backends=backends, repeats=1))
        assert r.batch == 2 and {n for _, n in seen} == {2}, (backends, seen)
        assert all(t.per_image_s == 1.0 for t in r.backends.values()), backends
