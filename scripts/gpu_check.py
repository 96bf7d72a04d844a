#!/usr/bin/env python
"""The GPU check (run by scripts/gpu_check.sh): one table of eager CUDA (fp32, fp16), ONNX
Runtime's CUDA provider and TensorRT, per-image latency, ratios and parity against eager
fp32, for var-d16 and var-d24 with random weights. No network. Budget-aware: a stage that would
not fit the remaining time is skipped and the table says why.

  python scripts/gpu_check.py --budget 450                    (on the GPU machine)
  python scripts/gpu_check.py --device cpu --models var-d2-tiny --precisions fp32   (smoke test)
"""
from __future__ import annotations

import os
import sys
import time

from tools.cli import parser, run_main  # first: keeps scripts/ from shadowing the packages
from graphs.config import ConfigError, SamplerConfig, get_preset, make_ssg, topk_bake

PRECISION = {"fp32": "float32", "fp16": "float16"}


def sync(device):
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


def time_runs(pipe, device, repeats, sampler, ssg):
    """Warm-up (twice: TensorRT captures its CUDA graphs on the second run), then the median."""
    import statistics
    res = None
    for _ in range(2):
        res = pipe.run([207], 0, 1.5, sampler, ssg, keep_logits=True)
    ts = []
    for r in range(repeats):
        sync(device)
        t = time.perf_counter()
        pipe.run([207], r, 1.5, sampler, ssg)
        sync(device)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), res


def parity(ref, got):
    """(fraction of tokens equal, max relative logits error) over all scales, same noise."""
    eq = tot = 0
    rel = 0.0
    for a, b in zip(ref.tokens, got.tokens):
        eq += int((a.cpu() == b.cpu()).sum())
        tot += a.numel()
    for a, b in zip(ref.logits, got.logits):
        a, b = a.float().cpu(), b.float().cpu()
        rel = max(rel, float((a - b).abs().max() / a.abs().max().clamp_min(1e-12)))
    return eq / tot, rel


def main() -> int:
    p = parser("GPU check: eager CUDA vs ONNX Runtime CUDA vs TensorRT, one table.")
    p.add_argument("--models", default="var-d16,var-d24")
    p.add_argument("--precisions", default="fp32,fp16", help="eager precisions")
    p.add_argument("--device", default="cuda")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget", type=float, default=450, help="seconds; stages that would not fit are skipped")
    p.add_argument("--exported", default="var-d16",
                   help="models that also get ONNX Runtime/TensorRT (each needs an export)")
    p.add_argument("--artifacts-root", default="build/gpu_check")
    p.add_argument("--top-k", type=int, default=900)
    a = p.parse_args()
    t0 = time.time()
    import torch
    from export.onnx_export import ExportConfig, ExportError, export_artifacts
    from graphs.weights import WeightSource, random_models
    from runtime.backends import open_backend
    from runtime.backends.eager import EagerBackend
    from runtime.pipeline import Pipeline

    if a.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("no CUDA device visible to PyTorch: run this on the GPU machine (or --device cpu)")
    try:
        import onnxruntime as ort
        providers = ort.get_available_providers()
        ort_v = ort.__version__
    except ImportError:
        providers, ort_v = [], "not installed"
    try:
        import tensorrt
        trt_v = tensorrt.__version__
    except ImportError:
        trt_v = None
    gpu = torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu"
    print(f"device {gpu}; torch {torch.__version__} (cuda {torch.version.cuda}); onnxruntime {ort_v} "
          f"providers {providers}; tensorrt {trt_v or 'not installed'}", flush=True)
    left = lambda: a.budget - (time.time() - t0)        # noqa: E731
    rows, skipped = [], []
    for name in [m.strip() for m in a.models.split(",") if m.strip()]:
        cfg = get_preset(name)
        ssg = make_ssg("linear:0.1,0.3", "dct")
        var, vae = random_models(cfg, 0)
        k_max = topk_bake(a.top_k, cfg.V)                   # the sampler K the export bakes too
        s = SamplerConfig(top_k=min(a.top_k, k_max) if k_max else 0, top_p=0.96)
        ref = None
        base = None
        for prec in [x.strip() for x in a.precisions.split(",") if x.strip()]:
            if left() < 20:
                skipped.append(f"{name} eager {prec}: out of budget")
                continue
            dt = getattr(torch, PRECISION[prec])
            pipe = Pipeline(EagerBackend(var, vae, k_max=k_max, dtype=dt, device=a.device))
            sec, res = time_runs(pipe, a.device, a.repeats, s, ssg)
            if ref is None:
                ref, base = res, sec
            eq, rel = parity(ref, res)
            rows.append((name, "eager", prec, sec, base, eq, rel))
            print(f"  {name} eager {prec}: {sec * 1000:.1f} ms", flush=True)
            del pipe
        if name not in a.exported.split(","):
            skipped.append(f"{name} onnxruntime/tensorrt: not exported in this check (--exported), "
                           f"an export of {name} does not fit the budget; run scripts/export.py and scripts/bench.py")
            continue
        want_trt = trt_v is not None and a.device == "cuda"
        if left() < 120:
            skipped.append(f"{name} export: {left():.0f} s left, not enough to export")
            continue
        out = os.path.join(a.artifacts_root, f"{name}-b1-fp32")
        te = time.time()
        print(f"  {name} export to {out} (reused if up to date)", flush=True)
        ec = ExportConfig(top_k=a.top_k, target="trt" if want_trt else "onnx")
        try:                                   # reused when up to date (cache key)
            export_artifacts(var, vae, WeightSource(kind="random", seed=0), out, ec)
        except ExportError:
            export_artifacts(var, vae, WeightSource(kind="random", seed=0), out, ec, force=True)
        print(f"  {name} export ({ec.target}): {time.time() - te:.0f} s", flush=True)
        backends = []
        if a.device == "cuda" and "CUDAExecutionProvider" not in providers:
            skipped.append(f"{name} onnxruntime cuda: this onnxruntime has no CUDAExecutionProvider")
        else:
            backends.append(("onnxruntime", {}))
        if want_trt:
            backends.append(("tensorrt", {}))
        else:
            skipped.append(f"{name} tensorrt: " + ("tensorrt is not installed" if trt_v is None else "needs --device cuda"))
        for bname, kw in backends:
            if left() < 20:
                skipped.append(f"{name} {bname}: out of budget")
                continue
            try:
                pipe = Pipeline(open_backend(bname, out, device=a.device, **kw))
                sec, res = time_runs(pipe, a.device, a.repeats, s, ssg)
            except (ConfigError, RuntimeError) as e:
                skipped.append(f"{name} {bname}: failed: {e}")
                continue
            eq, rel = parity(ref, res)
            rows.append((name, bname, "fp32", sec, base, eq, rel))
            print(f"  {name} {bname}: {sec * 1000:.1f} ms", flush=True)
            del pipe
        del var, vae
    print()
    print("| model | backend | precision | ms / image | vs eager fp32 | tokens = eager fp32 | logits rel err |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name, b, prec, sec, base, eq, rel in rows:
        print(f"| {name} | {b} ({a.device}) | {prec} | {sec * 1000:.1f} | {sec / base:.2f}x | {eq * 100:.1f}% | {rel:.1e} |")
    for sk in skipped:
        print(f"skipped: {sk}")
    print(f"total {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    run_main(main)
