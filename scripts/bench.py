#!/usr/bin/env python
"""Side-by-side benchmarks in one process: backends alternate after warm-up, medians over
repeats. Prints per-image and per-scale latency, SSG on vs off, DSE folded vs chain vs
torch.fft, peak memory, and a last `summary:` line.

  python scripts/bench.py --artifacts build/var-d16 --backends eager,onnxruntime --repeats 3
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from graphs.config import ConfigError, SamplerConfig, make_ssg  # noqa: E402
from runtime.cli import parser, run_main  # noqa: E402


def timed_run(pipe, classes, seed, ssg):
    """One image batch; per-scale times from the pipeline's per-scale progress callback."""
    marks = [time.perf_counter()]
    pipe.run(classes, seed, 1.5, SamplerConfig(), ssg, progress=lambda k: marks.append(time.perf_counter()))
    total = time.perf_counter() - marks[0]
    return total, [b - a for a, b in zip(marks, marks[1:])]


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
    out = {}
    for name, fn in (("folded", folded), ("chain", chain), ("fft", fft)):
        fn()
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        out[name] = statistics.median(ts)
    return out


def main() -> int:
    p = parser("Benchmark backends side by side.")
    p.add_argument("--artifacts", required=True, help="artifacts directory (scripts/export.py)")
    p.add_argument("--backends", default="eager,onnxruntime")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--plot", metavar="FILE.png")
    a = p.parse_args()
    import torch
    from runtime.backends import open_backend
    from runtime.manifest import load_manifest
    from runtime.pipeline import Pipeline

    man = load_manifest(a.artifacts)
    cfg = man.cfg
    names = [b.strip() for b in a.backends.split(",") if b.strip()]
    if not names:
        raise ConfigError("--backends is empty")
    pipes = {n: Pipeline(open_backend(n, man, device=a.device)) for n in names}
    classes = [(7 * i + 1) % cfg.num_classes for i in range(man.batch)]
    on, off = make_ssg("linear:0.1,0.3", man.transform), make_ssg("0", man.transform)
    for pipe in pipes.values():          # warm-up
        timed_run(pipe, classes, 0, on)
    res = {n: dict(total=[], per=[], off=[]) for n in names}
    for r in range(a.repeats):           # alternate backends, and SSG on/off, every repeat
        for n, pipe in pipes.items():
            t, per = timed_run(pipe, classes, r, on)
            res[n]["total"].append(t)
            res[n]["per"].append(per)
            res[n]["off"].append(timed_run(pipe, classes, r, off)[0])
    summary = {}
    print(f"model {cfg.name} batch {man.batch} precision {man.precision} repeats {a.repeats} "
          f"torch threads {torch.get_num_threads()} cpu count {os.cpu_count()}")
    for n in names:
        tot = statistics.median(res[n]["total"])
        toff = statistics.median(res[n]["off"])
        per = [statistics.median(x) for x in zip(*res[n]["per"])]
        summary[n] = dict(per_image_s=tot / man.batch, total_s=tot, ssg_off_s=toff, per_scale_s=per,
                          ssg_overhead_pct=100 * (tot - toff) / toff)
        print(f"{n:12s} per image {tot / man.batch * 1000:9.1f} ms  ssg off {toff / man.batch * 1000:9.1f} ms  "
              f"ssg overhead {summary[n]['ssg_overhead_pct']:+.1f}%")
        print(f"{'':12s} per scale ms: " + " ".join(f"{x * 1000:.1f}" for x in per))
    dse = bench_dse()
    print(f"DSE 13->16, V=4096: folded {dse['folded'] * 1e3:.3f} ms, chain {dse['chain'] * 1e3:.3f} ms, "
          f"torch.fft {dse['fft'] * 1e3:.3f} ms")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(f"peak RSS {peak:.2f} GiB (all backends in one process)")
    if a.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4))
        for n in names:
            ax.plot(range(cfg.num_scales), [x * 1000 for x in summary[n]["per_scale_s"]], marker="o", label=n)
        ax.set_xlabel("scale k")
        ax.set_ylabel("ms")
        ax.set_title(f"{cfg.name} per-scale latency")
        ax.legend()
        fig.savefig(a.plot, dpi=100)
    if a.json:
        with open(a.json + ".tmp", "w") as f:
            json.dump(dict(summary=summary, dse=dse, peak_rss_gib=peak), f, indent=2)
        os.replace(a.json + ".tmp", a.json)
    parts = []
    if "eager" in summary and "onnxruntime" in summary:
        parts.append(f"onnxruntime/eager={summary['onnxruntime']['total_s'] / summary['eager']['total_s']:.2f}")
    exported = summary.get("onnxruntime") or summary[names[-1]]
    parts.append(f"ssg_overhead={exported['ssg_overhead_pct']:.1f}%")
    parts.append(f"dse_speedup={dse['fft'] / dse['folded']:.1f}x")
    print("summary: " + " ".join(parts))
    return 0


if __name__ == "__main__":
    run_main(main)
