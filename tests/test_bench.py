"""bench.py and the roofline: the summary line scripts parse, the JSON, the FLOP count."""
import json
import re

import pytest
import torch

from graphs.config import get_preset
from tests.conftest import TINY, run_script


@pytest.mark.slow
def test_bench_side_by_side_summary_and_json(artifacts, tmp_path):
    d = artifacts()
    js, png = tmp_path / "b.json", tmp_path / "b.png"
    r = run_script("bench.py", "--artifacts", d, "--backends", "eager,onnxruntime", "--repeats", "1",
                   "--json", js, "--plot", png, "--peak-tflops", "1", "--bandwidth-gbs", "10")
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"summary: onnxruntime/eager=(\d+\.\d\d) ssg_overhead=(\d+\.\d)% dse_speedup=(\d+\.\d)x", last)
    assert m, last
    data = json.loads(js.read_text())
    run = data["runs"][0]
    assert run["batch"] == 1 and set(run["backends"]) == {"eager", "onnxruntime"}
    # every backend measured per scale, with SSG's cost measured in isolation
    for b in run["backends"].values():
        assert len(b["per_scale_s"]) == 10 and all(t > 0 for t in b["per_scale_s"]) and b["ssg_s"] > 0
    assert set(data["dse"]) == {"folded", "chain", "fft"}
    # nothing runs faster than the roofline floor (here 1 TFLOP/s, 10 GB/s)
    assert "x the floor" in r.stdout and all(b["x_floor"] > 1 for b in run["backends"].values())
    from PIL import Image
    assert Image.open(png).size[0] > 100


@pytest.mark.slow
def test_bench_bad_input(artifacts):
    r = run_script("bench.py", "--artifacts", artifacts(), "--batch", "1,4")
    assert r.returncode == 2 and "--batch chooses artifacts per batch" in r.stderr
    r = run_script("bench.py", "--backends", "eager")
    assert r.returncode == 2 and "give --model" in r.stderr


@pytest.mark.parametrize("name", [TINY, "var-d4-tiny", "var-d2-512-tiny"])
def test_roofline_flops_match_a_flop_counter(name):
    """Our closed-form FLOPs per scale agree with torch's FlopCounterMode on the real step."""
    from torch.utils.flop_counter import FlopCounterMode
    from graphs import dse_matrix
    from graphs.components import StepComponent
    from graphs.step import ScaleStep, StepSpec
    from graphs.weights import random_models
    from tools.roofline import step_flops, transformer_bytes
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
    from tools.roofline import floor
    cfg = get_preset("var-d16")
    slow_mem = floor(cfg, 1, peak_flops=1e15, bandwidth=1e9)
    assert slow_mem.compute_bound_scales == [] and slow_mem.seconds == pytest.approx(slow_mem.weight_bytes / 1e9)
    slow_math = floor(cfg, 1, peak_flops=1e9, bandwidth=1e15)
    assert slow_math.compute_bound_scales == list(range(10)) and slow_math.seconds == pytest.approx(slow_math.flops / 1e9)
