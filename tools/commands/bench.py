"""`scripts/bench.py`: Side-by-side benchmarks in one process: backends alternate after warm-up, medians over
repeats. Prints per-image and per-scale latency, SSG on vs off, DSE folded vs chain vs
torch.fft, peak memory, and a last `summary:` line.

  python scripts/bench.py --model var-d16 --random-init 0 --backends eager,onnxruntime --batch 1,4 \
      --repeats 3 --json build/bench.json --plot build/bench.png
  python scripts/bench.py --artifacts build/var-d24 --repeats 1        (one existing artifacts dir)

On a GPU (--device cuda) it also prints the roofline floor and each backend's distance from it.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

from tools.cli import add_model_args, finite_float, parser
from common.files import check_outputs, write_json, write_outputs
from graphs.config import ConfigError, SamplerConfig, make_ssg


def timed_run(pipe, classes, seed, ssg):
    """One image batch; per-scale times from the pipeline's per-scale progress callback."""
    marks = [time.perf_counter()]
    pipe.run(classes, seed, 1.5, SamplerConfig(), ssg, progress=lambda k: marks.append(time.perf_counter()))
    total = time.perf_counter() - marks[0]
    return total, [b - a for a, b in zip(marks, marks[1:])]


def _median_time(fn, repeats):
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def ssg_cost(man, backend, repeats=20):
    """Seconds per batch that SSG adds, measured in isolation (end-to-end on/off differences are
    below this machine's run-to-run noise, and beta = 0 runs the same arithmetic): for every
    scale k >= 1, the prior (DSE of the previous CFG logits) plus the fusion l + beta (l - prior),
    computed the way the backend does it. eager: its own step's prior (torch.fft reference);
    onnxruntime: the folded MatMul + fusion as an ONNX graph in an ONNX Runtime session with IO
    binding. None for other backends."""
    import numpy as np
    import torch
    from graphs.dse import dse_matrix
    cfg, B, V = man.cfg, man.batch, man.cfg.V
    total = 0.0
    for k in range(1, cfg.num_scales):
        n, m = cfg.patch_nums[k] ** 2, cfg.patch_nums[k - 1] ** 2
        l, prev, beta = torch.randn(B, n, V), torch.randn(B, m, V), torch.tensor([0.3])
        if getattr(backend, "steps", None) is not None and backend.info.name == "eager":
            step = backend.steps[k]
            with torch.inference_mode():
                total += _median_time(lambda: l + beta * (l - step.prior(prev)), repeats)
        elif backend.info.name == "onnxruntime":
            import onnx.helper as oh
            import onnxruntime as ort
            from onnx import TensorProto, numpy_helper
            M = dse_matrix((cfg.patch_nums[k - 1],) * 2, (cfg.patch_nums[k],) * 2, man.transform).astype(np.float32)
            F = TensorProto.FLOAT
            g = oh.make_graph(
                [oh.make_node("MatMul", ["M", "prev"], ["p"]), oh.make_node("Sub", ["l", "p"], ["d"]),
                 oh.make_node("Mul", ["beta", "d"], ["e"]), oh.make_node("Add", ["l", "e"], ["out"])], "ssg",
                [oh.make_tensor_value_info("l", F, [B, n, V]), oh.make_tensor_value_info("prev", F, [B, m, V]),
                 oh.make_tensor_value_info("beta", F, [1])], [oh.make_tensor_value_info("out", F, [B, n, V])],
                initializer=[numpy_helper.from_array(M, "M")])
            model = oh.make_model(g, opset_imports=[oh.make_opsetid("", 18)], ir_version=9)
            sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            out = torch.empty(B, n, V)
            bind = sess.io_binding()
            for name, t in (("l", l), ("prev", prev), ("beta", beta)):
                bind.bind_input(name, "cpu", 0, np.float32, tuple(t.shape), t.data_ptr())
            bind.bind_output("out", "cpu", 0, np.float32, tuple(out.shape), out.data_ptr())
            total += _median_time(lambda: sess.run_with_iobinding(bind), repeats)
        else:
            return None
    return total


def bench_dse(repeats=50):
    """One DSE call (13x13 -> 16x16 over V=4096, batch 1) three ways."""
    import torch
    from graphs.dse import dse_chain_matrices, dse_fft, dse_matrix
    V, h, H = 4096, 13, 16
    l = torch.randn(1, h * h, V)
    M = torch.tensor(dse_matrix((h, h), (H, H), "dct"), dtype=torch.float32)
    c = {k: torch.tensor(v, dtype=torch.float32) for k, v in dse_chain_matrices((h, h), (H, H), "dct").items()}

    def folded():
        return M @ l

    def chain():
        I = c["interp"] @ l
        Sr = c["fwd_re"] @ I * c["keep"][:, None] + c["coarse_re"] @ l
        Si = c["fwd_im"] @ I * c["keep"][:, None] + c["coarse_im"] @ l
        return c["inv_re"] @ Sr - c["inv_im"] @ Si

    def fft():
        return dse_fft(l.transpose(1, 2).reshape(1, V, h, h), (H, H), "dct")
    return {name: _median_time(fn, repeats) for name, fn in (("folded", folded), ("chain", chain), ("fft", fft))}


def artifacts_for(a, batch: int) -> str:
    """--artifacts as given, else <root>/<model>-b<batch>, exported (or reused by cache key)."""
    if a.artifacts:
        return a.artifacts
    if not a.model:
        raise ConfigError("give --model (with --ckpt/--vae-ckpt or --random-init) or --artifacts DIR")
    from export.onnx_export import ExportConfig, OutTaken, export_artifacts
    from graphs.config import get_preset
    from graphs.weights import load_models
    out = os.path.join(a.artifacts_root, f"{a.model}-b{batch}")
    var, vae, src = load_models(get_preset(a.model), a.ckpt, a.vae_ckpt, a.random_init)
    print(f"artifacts {out} (exported unless up to date)", file=sys.stderr)
    try:
        export_artifacts(var, vae, src, out, ExportConfig(batch=batch))
    except OutTaken:        # bench never replaces artifacts (it has no --force): say what to do instead
        raise ConfigError(f"{out} holds other artifacts (another model, weights or options): benchmark them with "
                          f"--artifacts {out}, choose another --artifacts-root, or replace them with "
                          f"scripts/export.py --force --out {out}") from None
    del var, vae
    return out


def bench_batch(a, art: str, names, rows: list) -> dict:
    import torch
    from contract.manifest import load_manifest
    from runtime.pipeline import Pipeline
    man = load_manifest(art)
    cfg = man.cfg
    from runtime.backends import open_backend
    pipes = {n: Pipeline(open_backend(n, man, device=a.device)) for n in names}
    classes = [(7 * i + 1) % cfg.num_classes for i in range(man.batch)]
    on, off = make_ssg("linear:0.1,0.3", man.transform), make_ssg("0", man.transform)
    for pipe in pipes.values():          # warm-up
        timed_run(pipe, classes, 0, on)
    res = {n: dict(total=[], per=[], off=[]) for n in names}
    for r in range(a.repeats):           # alternate backends, and beta on/0, every repeat
        for n, pipe in pipes.items():
            t, per = timed_run(pipe, classes, r, on)
            res[n]["total"].append(t)
            res[n]["per"].append(per)
            res[n]["off"].append(timed_run(pipe, classes, r, off)[0])
    out = {}
    cost = {n: ssg_cost(man, pipes[n].backend) for n in names}
    print(f"model {cfg.name} batch {man.batch} precision {man.precision} repeats {a.repeats} "
          f"torch threads {torch.get_num_threads()} cpu count {os.cpu_count()} device {a.device}")
    for n in names:
        tot = statistics.median(res[n]["total"])
        toff = statistics.median(res[n]["off"])
        per = [statistics.median(x) for x in zip(*res[n]["per"])]
        out[n] = dict(per_image_s=tot / man.batch, total_s=tot, beta0_s=toff, per_scale_s=per,
                      beta0_delta_pct=100 * (tot - toff) / toff, runs_s=res[n]["total"],
                      ssg_s=cost[n], ssg_overhead_pct=None if cost[n] is None else 100 * cost[n] / tot)
        ssg = "n/a" if cost[n] is None else f"{cost[n] * 1000:.1f} ms = {out[n]['ssg_overhead_pct']:.2f}%"
        print(f"{n:12s} per image {tot / man.batch * 1000:9.1f} ms  (runs {', '.join(f'{x:.2f}' for x in res[n]['total'])} s)  "
              f"SSG cost {ssg} of the batch; beta=0 run {toff / man.batch * 1000:.1f} ms/image ({out[n]['beta0_delta_pct']:+.1f}%, noise)")
        print(f"{'':12s} per scale ms: " + " ".join(f"{x * 1000:.1f}" for x in per))
    fl = floor_line(a, cfg, man)
    if fl:
        fl_s, note = fl
        print(note)
        for n in names:
            print(f"{n:12s} {out[n]['total_s'] / fl_s:.1f}x the floor")
            out[n]["x_floor"] = out[n]["total_s"] / fl_s
    rows.append(dict(batch=man.batch, model=cfg.name, precision=man.precision, backends=out))
    return out


def floor_line(a, cfg, man):
    """On a GPU (or with --peak-tflops and --bandwidth-gbs): the roofline floor of one batch."""
    from tools.roofline import floor, gpu_peaks
    peak, bw, what = a.peak_tflops and a.peak_tflops * 1e12, a.bandwidth_gbs and a.bandwidth_gbs * 1e9, "given"
    if not (peak and bw) and a.device == "cuda":
        import torch
        name = torch.cuda.get_device_name(0)
        p = gpu_peaks(name)
        if p:
            key = "fp32" if man.precision == "fp32" else "fp16"
            peak, bw, what = p[key], p["bandwidth"], f"{name} data sheet, {key}"
    if not (peak and bw):
        return None
    bpp = 4 if man.precision == "fp32" else 2
    f = floor(cfg, man.batch, peak, bw, bpp)
    return f.seconds, (f"floor {f.seconds * 1000:.2f} ms per batch = sum over scales of max(FLOPs/{peak / 1e12:.0f} TFLOP/s, "
                       f"weights {f.weight_bytes / cfg.num_scales / 2**20:.0f} MiB/{bw / 1e9:.0f} GB/s) ({what}); "
                       f"{f.flops / 1e9:.1f} GFLOP, compute-bound scales {f.compute_bound_scales}")


def positive_float(s: str) -> float:
    v = finite_float(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return v


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
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--plot", metavar="FILE.png")
    a = p.parse_args(argv)
    check_outputs(("--json", a.json, None), ("--plot", a.plot, ".png"), inputs=(a.artifacts, a.ckpt, a.vae_ckpt))
    names = [b.strip() for b in a.backends.split(",") if b.strip()]
    if not names:
        raise ConfigError("--backends is empty")
    if a.repeats < 1:
        raise ConfigError("--repeats must be >= 1")
    try:
        batches = [int(b) for b in (a.batch or "1").split(",") if b.strip()]
    except ValueError:
        raise ConfigError(f"--batch must be comma-separated integers, got {a.batch!r}") from None
    if a.artifacts and a.batch:
        raise ConfigError("--batch chooses artifacts per batch; with --artifacts the batch is the exported one")
    if not batches or min(batches) < 1:
        raise ConfigError("--batch sizes must be >= 1")
    rows = []
    summaries = [bench_batch(a, artifacts_for(a, b), names, rows) for b in batches]
    dse = bench_dse()
    print(f"DSE 13->16, V=4096: folded {dse['folded'] * 1e3:.3f} ms, chain {dse['chain'] * 1e3:.3f} ms, "
          f"torch.fft {dse['fft'] * 1e3:.3f} ms")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(f"peak RSS {peak:.2f} GiB (all backends in one process)")
    if a.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, len(rows), figsize=(6 * len(rows), 4), squeeze=False)
        for ax, row in zip(axes[0], rows):
            for n in names:
                per = row["backends"][n]["per_scale_s"]
                ax.plot(range(len(per)), [x * 1000 for x in per], marker="o", label=n)
            ax.set_xlabel("scale k")
            ax.set_ylabel("ms")
            ax.set_yscale("log")
            ax.set_title(f"{row['model']} batch {row['batch']} per-scale latency")
            ax.legend()
        fig.tight_layout()
        write_outputs([(a.plot, lambda path: fig.savefig(path, dpi=100, format="png"))])
    write_json(a.json, dict(runs=rows, dse=dse, peak_rss_gib=peak, argv=sys.argv[1:]), indent=2)
    summary = summaries[0]                # the first batch size (batch 1 by default)
    parts = []
    if "eager" in summary and "onnxruntime" in summary:
        parts.append(f"onnxruntime/eager={summary['onnxruntime']['total_s'] / summary['eager']['total_s']:.2f}")
    exported = summary.get("onnxruntime") or summary[names[-1]]
    if exported["ssg_overhead_pct"] is not None:
        parts.append(f"ssg_overhead={exported['ssg_overhead_pct']:.1f}%")
    parts.append(f"dse_speedup={dse['fft'] / dse['folded']:.1f}x")
    print("summary: " + " ".join(parts))
    return 0

