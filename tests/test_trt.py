"""TensorRT: what can be proven without it (engine-build plan, cache keys, version guards,
errors); the GPU test sits behind the `gpu` marker."""
import json
import os

import pytest
import torch

from contract.tensorrt import check_compat, engine_cache_key, import_tensorrt, version_tuple
from export.trt_build import plan
from graphs.config import ConfigError, get_preset
from tests.conftest import TINY, run_script


def _have_trt():
    try:
        import tensorrt  # noqa: F401
        return True
    except ImportError:
        return False


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
    # fp16 artifacts: the KV cache is half, the DSE/SSG arithmetic and the logits stay fp32
    # (strongly typed networks take their types from the ONNX)
    io = {t["name"]: t["dtype"] for t in man["graphs"]["step"]["inputs"] + man["graphs"]["step"]["outputs"]}
    assert {n for n, d in io.items() if d == "float16"} == {"past_kv", "new_kv"}
    assert all(io[n] == "float32" for n in ("logits", "logits_cfg", "prev_logits", "beta", "scale_dse", "noise"))


def test_engine_cache_key_changes_with_what_makes_an_engine(artifacts):
    man = json.load(open(os.path.join(artifacts(precision="fp16"), "manifest.json")))
    key = man["cache_key"]
    k1 = engine_cache_key(key, "10.13.0", "NVIDIA H200", "9.0")
    assert k1 == engine_cache_key(key, "10.13.0", "NVIDIA H200", "9.0")
    assert len({k1, engine_cache_key(key, "11.0.0", "NVIDIA H200", "9.0"),
                engine_cache_key(key, "10.13.0", "NVIDIA H200", "8.9"),
                engine_cache_key(key, "10.13.0", "NVIDIA H200", "9.0", hardware_compat=True),
                engine_cache_key("other", "10.13.0", "NVIDIA H200", "9.0")}) == 5


SEC = dict(version="10.13.0.35", gpu="NVIDIA H200", compute_capability="9.0",
           hardware_compatible=False, version_compatible=False)


def test_version_guards():
    check_compat(SEC, "10.13.0.35", "NVIDIA H200", "9.0")                     # same: fine
    with pytest.raises(ConfigError, match="built with TensorRT 10.13.0.35 and this is TensorRT 10.14.1"):
        check_compat(SEC, "10.14.1", "NVIDIA H200", "9.0")
    check_compat(dict(SEC, version_compatible=True), "10.14.1", "NVIDIA H200", "9.0")
    with pytest.raises(ConfigError, match="TensorRT 11"):                      # not across majors
        check_compat(dict(SEC, version_compatible=True), "11.4.0", "NVIDIA H200", "9.0")
    with pytest.raises(ConfigError, match=r"built for NVIDIA H200 \(compute capability 9.0\) and this GPU is NVIDIA L4 \(8.9\)"):
        check_compat(SEC, "10.13.0.35", "NVIDIA L4", "8.9")
    check_compat(dict(SEC, hardware_compatible=True), "10.13.0.35", "NVIDIA L4", "8.9")
    with pytest.raises(ConfigError, match="re-export with --target trt on this GPU"):   # pre-Ampere
        check_compat(dict(SEC, hardware_compatible=True), "10.13.0.35", "Tesla T4", "7.5")


def test_version_tuple():
    assert version_tuple("10.13.0.35") == (10, 13) and version_tuple("11.4.0.106") >= (10, 0)
    assert version_tuple("10.0.0b6") == (10, 0)


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
    a = eager.run([207], 0, 1.5, s, ssg)
    for _ in range(3):                  # plain run, CUDA graph capture, replay
        b = trt.run([207], 0, 1.5, s, ssg)
        assert all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(a.tokens, b.tokens))
        assert (a.images.cpu() - b.images.cpu()).abs().max() <= 1e-3


def test_gpu_check_script_runs_its_table_on_cpu(artifacts, tmp_path):
    """scripts/gpu_check.py end to end on the CPU with the tiny model (the GPU run uses the same
    code): eager row, ONNX Runtime row with parity, TensorRT listed as skipped with a reason."""
    import shutil
    root = tmp_path / "gc"
    shutil.copytree(artifacts(), root / f"{TINY}-b1-fp32")          # reused by cache key, no export
    r = run_script("gpu_check.py", "--device", "cpu", "--models", TINY, "--exported", TINY, "--precisions",
                   "fp32", "--top-k", "64", "--repeats", "1", "--artifacts-root", root)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith(f"| {TINY}")]
    assert [row.split("|")[2].strip() for row in rows] == ["eager (cpu)", "onnxruntime (cpu)"]
    ort_row = rows[1].split("|")
    assert ort_row[6].strip() == "100.0%" and float(ort_row[7]) < 1e-4        # same tokens, close logits
    if not _have_trt():
        assert f"skipped: {TINY} tensorrt: tensorrt is not installed" in r.stdout
