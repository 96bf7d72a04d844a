"""`scripts/bench.py`: Side-by-side benchmarks in one process: backends alternate after warm-up, medians over
repeats. Prints per-image and per-scale latency, SSG on vs off, DSE folded vs chain vs
torch.fft, peak memory, and a last `summary:` line. The work is benchmarks.bench.run_bench.

  python scripts/bench.py --model var-d16 --random-init 0 --backends eager,onnxruntime --batch 1,4 \
      --repeats 3 --json build/bench.json --plot build/bench.png
  python scripts/bench.py --artifacts build/var-d24 --repeats 1        (one existing artifacts dir)
  python scripts/bench.py --model var-d16 --random-init 0 --precisions \
      eager-fp32,eager-bf16-autocast,onnxruntime-fp32,onnxruntime-int8,official-bf16-autocast --official ~/VAR
                          (precisions side by side, the CPU's features printed: benchmarks.precision)

  python scripts/bench.py --artifacts build/inf-tiny --aspect-ratio 3:4   (Infinity artifacts:
                          eager and onnxruntime, random T5 states: benchmarks.infinity_bench)

On a GPU (--device cuda) it also prints the roofline floor and each backend's distance from it.
"""
from __future__ import annotations

import argparse
import sys

from var_ssg.tools.cli import add_model_args, finite_float, parser
from var_ssg.common.files import check_outputs, write_json, write_outputs
from var_ssg.common.errors import ConfigError


def positive_float(s: str) -> float:
    v = finite_float(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return v


def print_batch(r) -> None:
    print(f"model {r.model} batch {r.batch} precision {r.precision} repeats {r.repeats} "
          f"torch threads {r.threads} cpu count {r.cpu_count} device {r.device}")
    for n, t in r.backends.items():
        ssg = "n/a" if t.ssg_s is None else f"{t.ssg_s * 1000:.1f} ms = {t.ssg_overhead_pct:.2f}%"
        print(f"{n:12s} per image {t.per_image_s * 1000:9.1f} ms  (runs {', '.join(f'{x:.2f}' for x in t.runs_s)} s)  "
              f"SSG cost {ssg} of the batch; beta=0 run {t.beta0_s / r.batch * 1000:.1f} ms/image "
              f"({t.beta0_delta_pct:+.1f}%, noise)")
        print(f"{'':12s} per scale ms: " + " ".join(f"{x * 1000:.1f}" for x in t.per_scale_s))
    if r.floor:
        print(r.floor.describe(r.num_scales))
        for n, t in r.backends.items():
            print(f"{n:12s} {t.x_floor:.1f}x the floor")


def main(argv=None) -> int:
    p = parser("Benchmark backends side by side.")
    add_model_args(p)
    p.add_argument("--artifacts", help="one artifacts directory; default <artifacts-root>/<model>-b<batch>, "
                                       "exported when missing or out of date")
    p.add_argument("--artifacts-root", default="build")
    p.add_argument("--batch", default=None, help="comma-separated batch sizes, e.g. 1,4 (needs --model)")
    p.add_argument("--backends", default="eager,onnxruntime")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--peak-tflops", type=positive_float, help="roofline: peak compute (default on a known GPU: data sheet)")
    p.add_argument("--bandwidth-gbs", type=positive_float, help="roofline: memory bandwidth in GB/s")
    p.add_argument("--precisions", metavar="ROWS",
                   help="instead: precisions side by side at batch 1 (needs --model), comma list of "
                        "eager-fp32, eager-bf16, eager-bf16-autocast, onnxruntime-fp32, onnxruntime-int8, "
                        "official-fp32, official-bf16-autocast")
    p.add_argument("--official", metavar="DIR", help="a FoundationVision/VAR checkout, for the official-* rows")
    p.add_argument("--aspect-ratio", default="1:1", help="Infinity artifacts: the schedule's aspect ratio H:W")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--plot", metavar="FILE.png")
    a = p.parse_args(argv)
    check_outputs(("--json", a.json, None), ("--plot", a.plot, ".png"), inputs=(a.artifacts, a.ckpt, a.vae_ckpt))
    from var_ssg.runtime.infinity import is_infinity
    if is_infinity(a.model, a.artifacts):
        return _infinity(a)
    if a.aspect_ratio != "1:1":
        raise ConfigError("--aspect-ratio is for Infinity artifacts; VAR draws square images")
    if a.precisions is not None:
        return _precisions(a)
    from var_ssg.benchmarks.bench import BenchConfig, per_scale_figure, run_bench
    from var_ssg.export.ensure import ModelSource
    try:
        batches = tuple(int(b) for b in a.batch.split(",") if b.strip()) if a.batch is not None else None
    except ValueError:
        raise ConfigError(f"--batch must be comma-separated integers, got {a.batch!r}") from None
    source = ModelSource(a.model, a.artifacts_root, a.ckpt, a.vae_ckpt, a.random_init) if a.model else None
    config = BenchConfig(backends=tuple(b.strip() for b in a.backends.split(",") if b.strip()),
                         artifacts=a.artifacts, source=source, batches=batches, repeats=a.repeats,
                         device=a.device, peak_tflops=a.peak_tflops, bandwidth_gbs=a.bandwidth_gbs)
    result = run_bench(config, on_batch=print_batch)
    dse = result.dse
    print(f"DSE 13->16, V=4096: folded {dse['folded'] * 1e3:.3f} ms, chain {dse['chain'] * 1e3:.3f} ms, "
          f"torch.fft {dse['fft'] * 1e3:.3f} ms")
    print(f"peak RSS {result.peak_rss_gib:.2f} GiB (all backends in one process)")
    if a.plot:
        fig = per_scale_figure(result, config.backends)
        write_outputs([(a.plot, lambda path: fig.savefig(path, dpi=100, format="png"))])
    write_json(a.json, dict(result.to_json(), argv=sys.argv[1:]), indent=2)
    print(result.summary())
    return 0


def _precisions(a) -> int:
    from dataclasses import asdict
    from var_ssg.benchmarks.precision import PrecisionBenchConfig, run_precision_bench
    from var_ssg.export.ensure import ModelSource
    if not a.model or a.artifacts or a.batch or a.plot:
        raise ConfigError("--precisions needs --model (batch 1; artifacts under --artifacts-root), not --artifacts, "
                          "--batch or --plot")
    cfg = PrecisionBenchConfig(source=ModelSource(a.model, a.artifacts_root, a.ckpt, a.vae_ckpt, a.random_init),
                               rows=tuple(r.strip() for r in a.precisions.split(",") if r.strip()),
                               official=a.official, repeats=a.repeats)
    res = run_precision_bench(cfg, progress=lambda s: print(s, file=sys.stderr, flush=True))
    print(res.table())
    write_json(a.json, dict(asdict(res), argv=sys.argv[1:]), indent=2)
    return 0


def _infinity(a) -> int:
    from var_ssg.benchmarks.infinity_bench import InfinityBenchConfig, run_infinity_bench
    from var_ssg.graphs.infinity_config import parse_aspect_ratio
    if not a.artifacts:
        raise ConfigError(f"Infinity benches exported artifacts: run scripts/export.py --model {a.model} "
                          f"--random-init 0 --out DIR (or with its checkpoints), then --artifacts DIR")
    if (a.batch or a.precisions is not None or a.plot or a.device != "cpu" or a.model or a.ckpt or a.vae_ckpt
            or a.random_init is not None or a.official or a.peak_tflops or a.bandwidth_gbs):
        raise ConfigError("on Infinity artifacts the bench takes --backends, --repeats, --aspect-ratio and --json "
                          "(the batch is the exported one; CPU only)")
    cfg = InfinityBenchConfig(artifacts=a.artifacts, backends=tuple(b.strip() for b in a.backends.split(",") if b.strip()),
                              repeats=a.repeats, aspect_ratio=parse_aspect_ratio(a.aspect_ratio))
    r = run_infinity_bench(cfg, progress=lambda s: print(s, file=sys.stderr, flush=True))
    print(f"model {r.model} batch {r.batch} schedule {'-'.join(f'{h}x{w}' for h, w in r.schedule)} "
          f"repeats {r.repeats} torch threads {r.threads}")
    for n, t in r.backends.items():
        print(f"{n:12s} per image {t.per_image_s * 1000:9.1f} ms  (runs {', '.join(f'{x:.2f}' for x in t.runs_s)} s)  "
              f"decoder {t.decode_s * 1000:.1f} ms")
        print(f"{'':12s} per scale ms: " + " ".join(f"{x * 1000:.1f}" for x in t.per_scale_s))
    print(f"peak RSS {r.peak_rss_gib:.2f} GiB (all backends in one process)")
    write_json(a.json, dict(r.to_json(), argv=sys.argv[1:]), indent=2)
    print(r.summary())
    return 0
