"""`scripts/bench_serve.py`: Closed-loop load on the HTTP server against sequential single-image runs, in one run.

  python scripts/bench_serve.py --model var-d16 --random-init 0 --batch 4 --concurrency 8 --requests 32
  python scripts/bench_serve.py --artifacts build/var-d16-b4 --baseline-artifacts build/var-d16-b1
  python scripts/bench_serve.py --url http://127.0.0.1:8000 --baseline-artifacts build/var-d16-b1   (a running server)

What is measured and how: serving/loadgen.py. Prints throughput (images/s), p50/p99 latency,
batch fill and the throughput ratio, and a last `summary:` line.
"""
from __future__ import annotations

import dataclasses

from var_ssg.tools.cli import add_model_args, parser
from var_ssg.common.errors import ConfigError


def main(argv=None) -> int:
    p = parser("Benchmark the HTTP server (closed loop) against sequential single-image runs.")
    add_model_args(p)
    p.add_argument("--batch", type=int, default=4, help="with --model: the served artifacts' batch")
    p.add_argument("--artifacts-root", default="build")
    p.add_argument("--artifacts", help="the served artifacts (batch B)")
    p.add_argument("--baseline-artifacts", help="batch-1 artifacts of the same model (default with --model: "
                                                "<artifacts-root>/<model>-b1; with batch-1 --artifacts: those)")
    p.add_argument("--url", help="benchmark this running server instead of starting one")
    p.add_argument("--backend", choices=("onnxruntime", "tensorrt", "eager"), default="onnxruntime")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda for tensorrt, else cpu")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--max-batch-wait-ms", type=float, default=20.0)
    p.add_argument("--concurrency", "-c", type=int, default=8)
    p.add_argument("--requests", "-n", type=int, default=32)
    p.add_argument("--sequential", type=int, default=4, help="baseline images (0 = no baseline)")
    p.add_argument("--timeout-s", type=float, default=3600.0, help="per request")
    p.add_argument("--json", metavar="FILE")
    a = p.parse_args(argv)
    from var_ssg.common.files import check_outputs, write_json       # output paths checked before any work
    check_outputs(("--json", a.json, ".json"))
    device = a.device or ("cuda" if a.backend == "tensorrt" else "cpu")
    if a.model and a.artifacts:
        raise ConfigError("give --model (exports what is missing) or --artifacts, not both")

    from var_ssg.contract.manifest import load_manifest
    from var_ssg.serving.loadgen import BenchConfig, run_bench
    from var_ssg.export.ensure import ModelSource, ensure_artifacts
    from var_ssg.serving.requests import ServeOptions, code_path
    if a.model:
        src = ModelSource(a.model, a.artifacts_root, a.ckpt, a.vae_ckpt, a.random_init)
        a.artifacts = ensure_artifacts(src, a.batch)
        a.baseline_artifacts = a.baseline_artifacts or ensure_artifacts(src, 1)
    opts = None
    if a.artifacts:
        opts = ServeOptions(artifacts=a.artifacts, backend=a.backend, device=device, replicas=a.replicas,
                            max_batch_wait_ms=a.max_batch_wait_ms, max_queue=max(64, a.concurrency),
                            request_timeout_s=a.timeout_s, pythonpath=code_path())
        if not a.baseline_artifacts and load_manifest(a.artifacts, verify_hashes=False).batch == 1:
            a.baseline_artifacts = a.artifacts
    cfg = BenchConfig(opts=opts, url=a.url, baseline_artifacts=a.baseline_artifacts, sequential=a.sequential,
                      concurrency=a.concurrency, requests=a.requests, timeout_s=a.timeout_s, backend=a.backend,
                      device=device)
    r = run_bench(cfg)

    s = r.sequential
    if s:
        print(f"sequential batch-1 {s.model} [{a.backend}/{device}]: {s.images} images, "
              f"{s.s_per_image:.3f} s/image, {1 / s.s_per_image:.3f} images/s")
    m = r.model
    print(f"server {m['model']} [{m['backend']}/{m['device']}, {m['replicas']} replica(s), batch {m['batch']}], "
          f"C={r.concurrency}: {r.ok}/{r.ok + r.errors} images in {r.wall_s:.2f} s: {r.throughput:.3f} images/s, "
          f"latency p50 {r.p50_s:.3f} s p99 {r.p99_s:.3f} s, batch fill {r.batch_fill:.2f} ({r.batches} batches)")
    if r.ratio is not None:
        print(f"throughput: server {r.throughput:.3f} images/s vs sequential batch-1 {1 / s.s_per_image:.3f} "
              f"images/s = {r.ratio:.2f}x")
    write_json(a.json, dict(dataclasses.asdict(r), backend=a.backend, device=device), indent=2)
    nan = float("nan")
    print(f"summary: throughput={r.throughput:.3f}/s sequential={(1 / s.s_per_image if s else nan):.3f}/s "
          f"ratio={(r.ratio if r.ratio is not None else nan):.2f}x p50={r.p50_s:.3f}s p99={r.p99_s:.3f}s "
          f"fill={r.batch_fill:.2f} errors={r.errors}")
    return 1 if r.errors or not r.ok else 0
