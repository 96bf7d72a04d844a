"""`scripts/bench_serve.py`: Closed-loop load on the HTTP server against sequential single-image runs, in one run.

  python scripts/bench_serve.py --model var-d16 --random-init 0 --batch 4 --concurrency 8 --requests 32
  python scripts/bench_serve.py --artifacts build/var-d16-b4 --baseline-artifacts build/var-d16-b1
  python scripts/bench_serve.py --url http://127.0.0.1:8000 --baseline-artifacts build/var-d16-b1   (a running server)

First the baseline: --sequential images one after another with Pipeline.run_rows on batch-1
artifacts of the same model, in this process (after one warm-up image). Then, unless --url is
given, a local Ray Serve application over the batch-B artifacts (Ray started here, all cores);
one warm-up batch; then C client threads each send a request and wait for its answer until N
have been sent. Prints throughput (images/s), p50/p99 latency, batch fill (rows per batch /
B, from the X-Batch-* headers) and the throughput ratio, and a last `summary:` line.
"""
from __future__ import annotations

import http.client
import json
import math
import os
import threading
import time
import urllib.parse

from tools.cli import add_model_args, parser
from graphs.config import ConfigError


def percentile(xs, q: float) -> float:
    """Nearest rank: the smallest value with at least q of the samples at or below it."""
    s = sorted(xs)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def post(url: str, body: dict, timeout: float):
    """(status, headers, seconds); the body is read and dropped."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    t0 = time.perf_counter()
    try:
        conn.request("POST", "/v1/generate", json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, time.perf_counter() - t0
    except OSError as e:
        return f"{type(e).__name__}", {}, time.perf_counter() - t0
    finally:
        conn.close()


def get_json(url: str, path: str, timeout: float = 10.0):
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"null")
    finally:
        conn.close()


def closed_loop(url: str, n: int, c: int, num_classes: int, seed0: int, timeout: float):
    """C threads; each sends one request, waits, sends the next, until N were sent."""
    lock = threading.Lock()
    nxt = [0]
    out = []

    def client():
        while True:
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= n:
                return
            status, headers, dt = post(url, {"class": i % num_classes, "seed": seed0 + i}, timeout)
            with lock:
                out.append((status, headers, dt))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(c)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out, time.perf_counter() - t0


def same_model(a, b) -> None:
    keys = lambda m: (m.cfg.name, m.precision, m.transform, m.k_max, json.dumps(m.weights, sort_keys=True))
    if keys(a) != keys(b):
        raise ConfigError(f"--baseline-artifacts {b.root} are not the same model as {a.root} "
                          f"(preset, precision, DSE, top-k or weights differ)")


def baseline(art: str, backend: str, device: str, n: int, num_classes: int, seed0: int):
    """Seconds per image of sequential single-image runs (after one warm-up)."""
    from runtime.backends import open_backend
    from runtime.pipeline import Pipeline, Row
    pipe = Pipeline(open_backend(backend, art, device=device))
    pipe.run_rows([Row(class_id=0, seed=seed0 - 1)])
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        pipe.run_rows([Row(class_id=i % num_classes, seed=seed0 + i)])
        times.append(time.perf_counter() - t0)
    return times


def start_server(opts, port: int):
    import ray
    from ray import serve
    from runtime.serving import APP, build_app
    ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options=dict(host="127.0.0.1", port=port))
    serve.run(build_app(opts), name=APP, route_prefix="/")


def stop_server():
    import ray
    from ray import serve
    if ray.is_initialized():
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


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
    from common.files import check_outputs       # output paths checked before any work
    check_outputs(("--json", a.json, ".json"))
    device = a.device or ("cuda" if a.backend == "tensorrt" else "cpu")
    if a.concurrency < 1 or a.requests < 1 or a.sequential < 0:
        raise ConfigError("--concurrency and --requests must be >= 1, --sequential >= 0")
    if a.model and a.artifacts:
        raise ConfigError("give --model (exports what is missing) or --artifacts, not both")

    from contract.manifest import load_manifest
    from export.ensure import ModelSource, ensure_artifacts
    from runtime.serving import ServeOptions, code_path, preflight
    if a.model:
        src = ModelSource(a.model, a.artifacts_root, a.ckpt, a.vae_ckpt, a.random_init)
        a.artifacts = ensure_artifacts(src, a.batch)
        a.baseline_artifacts = a.baseline_artifacts or ensure_artifacts(src, 1)
    if not a.artifacts and not a.url:
        raise ConfigError("give --model, --artifacts DIR or --url of a running server")
    opts = None
    if a.artifacts:
        opts = ServeOptions(artifacts=a.artifacts, backend=a.backend, device=device, replicas=a.replicas,
                            max_batch_wait_ms=a.max_batch_wait_ms, max_queue=max(64, a.concurrency),
                            request_timeout_s=a.timeout_s, pythonpath=code_path())
        man = preflight(opts)
        if man.batch == 1 and not a.baseline_artifacts:
            a.baseline_artifacts = a.artifacts
    base_man = None
    if a.sequential:
        if not a.baseline_artifacts:
            raise ConfigError("the baseline needs --baseline-artifacts DIR (batch-1 artifacts of the same model), "
                              "or --sequential 0")
        base_man = load_manifest(a.baseline_artifacts)
        if base_man.batch != 1:
            raise ConfigError(f"--baseline-artifacts {a.baseline_artifacts} are batch {base_man.batch}; "
                              f"the baseline runs batch-1 artifacts (scripts/export.py --batch 1)")
        if a.artifacts:
            same_model(man, base_man)
    res = dict(concurrency=a.concurrency, requests=a.requests, backend=a.backend, device=device)

    seq_s = None
    if a.sequential:
        times = baseline(a.baseline_artifacts, a.backend, device, a.sequential, base_man.cfg.num_classes, 10_000)
        seq_s = sum(times) / len(times)
        print(f"sequential batch-1 {base_man.cfg.name} [{a.backend}/{device}]: {len(times)} images, "
              f"{seq_s:.3f} s/image, {1 / seq_s:.3f} images/s")
        res["sequential"] = dict(artifacts=a.baseline_artifacts, images=len(times), s_per_image=seq_s,
                                 times_s=times)

    started = False
    try:
        url = a.url
        if not url:
            import socket
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            start_server(opts, port)
            started = True
            url = f"http://127.0.0.1:{port}"
        status, info = get_json(url, "/v1/model")
        if status != 200:
            raise ConfigError(f"{url}/v1/model answered {status}: is it a var-ssg server?")
        B = info["batch"]
        num_classes = info["num_classes"]
        warm, _ = closed_loop(url, B * max(1, info.get("replicas", 1)), B * max(1, info.get("replicas", 1)),
                              num_classes, 0, a.timeout_s)
        if any(s != 200 for s, _, _ in warm):
            raise ConfigError(f"warm-up requests failed: {sorted({str(s) for s, _, _ in warm})}")
        out, wall = closed_loop(url, a.requests, a.concurrency, num_classes, 1_000_000, a.timeout_s)
    finally:
        if started:
            stop_server()

    ok = [(h, dt) for s, h, dt in out if s == 200]
    errors = len(out) - len(ok)
    lat = [dt for _, dt in ok]
    batches = {}
    for h, _ in ok:
        batches[h.get("x-batch-id")] = (int(h.get("x-batch-size", 0)), int(h.get("x-batch-capacity", B)))
    fill = sum(n for n, _ in batches.values()) / sum(cap for _, cap in batches.values()) if batches else 0.0
    tput = len(ok) / wall if wall > 0 else 0.0
    p50, p99 = (percentile(lat, 0.5), percentile(lat, 0.99)) if lat else (float("nan"),) * 2
    print(f"server {info['model']} [{info['backend']}/{info['device']}, {info['replicas']} replica(s), batch {B}], "
          f"C={a.concurrency}: {len(ok)}/{len(out)} images in {wall:.2f} s: {tput:.3f} images/s, latency "
          f"p50 {p50:.3f} s p99 {p99:.3f} s, batch fill {fill:.2f} ({len(batches)} batches)")
    ratio = tput * seq_s if seq_s else None
    if ratio is not None:
        print(f"throughput: server {tput:.3f} images/s vs sequential batch-1 {1 / seq_s:.3f} images/s = {ratio:.2f}x")
    res.update(url=url if a.url else None, model=info, wall_s=wall, ok=len(ok), errors=errors,
               statuses=sorted({str(s) for s, _, _ in out}), throughput=tput, p50_s=p50, p99_s=p99,
               batch_fill=fill, batches=len(batches), ratio=ratio, latencies_s=lat)
    if a.json:
        tmp = a.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f, indent=2)
        os.replace(tmp, a.json)
    print(f"summary: throughput={tput:.3f}/s sequential={(1 / seq_s if seq_s else float('nan')):.3f}/s "
          f"ratio={(ratio if ratio is not None else float('nan')):.2f}x p50={p50:.3f}s p99={p99:.3f}s "
          f"fill={fill:.2f} errors={errors}")
    return 1 if errors or not ok else 0

