"""The serving benchmark: sequential single-image runs (the baseline) against closed-loop HTTP
load on the server, in one run; results as dataclasses (scripts/bench_serve.py prints them).

First the baseline: `sequential` images one after another with Pipeline.run_rows on batch-1
artifacts of the same model, in this process (after one warm-up image). Then, unless a URL is
given, a local server over the batch-B artifacts (serving.launch: the same lifecycle as
scripts/serve.py); one warm-up batch per replica; then C client threads each send a request and
wait for its answer until N have been sent. Batch fill = rows per batch / B, from the X-Batch-*
headers.
"""
from __future__ import annotations

import http.client
import json
import math
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from var_ssg.common.errors import ConfigError
from var_ssg.serving.requests import ServeOptions


def percentile(xs, q: float) -> float:
    """Nearest rank: the smallest value with at least q of the samples at or below it."""
    s = sorted(xs)
    return s[max(0, math.ceil(q * len(s)) - 1)]


@dataclass(frozen=True)
class Reply:
    status: Any                         # the HTTP status, or the name of the OSError
    headers: Dict[str, str]             # lower-case names
    seconds: float


def post(url: str, body: dict, timeout: float) -> Reply:
    """POST /v1/generate; the answer's body is read and dropped."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    t0 = time.perf_counter()
    try:
        conn.request("POST", f"{u.path.rstrip('/')}/v1/generate", json.dumps(body),
                     {"Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, time.perf_counter() - t0)
    except OSError as e:
        return Reply(type(e).__name__, {}, time.perf_counter() - t0)
    finally:
        conn.close()


def get_json(url: str, path: str, timeout: float = 10.0) -> Tuple[int, Any]:
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    try:
        conn.request("GET", f"{u.path.rstrip('/')}{path}")
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"null")
    finally:
        conn.close()


def closed_loop(url: str, n: int, c: int, num_classes: int, seed0: int, timeout: float) -> Tuple[List[Reply], float]:
    """C threads; each sends one request, waits, sends the next, until N were sent. Returns the
    replies and the wall time."""
    lock = threading.Lock()
    nxt = [0]
    out: List[Reply] = []

    def client():
        while True:
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= n:
                return
            r = post(url, {"class": i % num_classes, "seed": seed0 + i}, timeout)
            with lock:
                out.append(r)

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


def baseline(art: str, backend: str, device: str, n: int, num_classes: int, seed0: int) -> List[float]:
    """Seconds per image of sequential single-image runs (after one warm-up)."""
    from var_ssg.runtime.backends import open_backend
    from var_ssg.runtime.pipeline import Pipeline, Row
    pipe = Pipeline(open_backend(backend, art, device=device))
    pipe.run_rows([Row(class_id=0, seed=seed0 - 1)])
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        pipe.run_rows([Row(class_id=i % num_classes, seed=seed0 + i)])
        times.append(time.perf_counter() - t0)
    return times


@dataclass(frozen=True)
class BenchConfig:
    opts: Optional[ServeOptions]        # the served artifacts (None with url)
    url: Optional[str] = None           # a running server instead of one started here
    baseline_artifacts: Optional[str] = None
    sequential: int = 4                 # baseline images (0 = none)
    concurrency: int = 8
    requests: int = 32
    timeout_s: float = 3600.0
    backend: str = "onnxruntime"        # of the baseline (the server's is in opts)
    device: str = "cpu"

    def check(self) -> None:
        if self.concurrency < 1 or self.requests < 1 or self.sequential < 0:
            raise ConfigError("--concurrency and --requests must be >= 1, --sequential >= 0")
        if not self.opts and not self.url:
            raise ConfigError("give --model, --artifacts DIR or --url of a running server")
        if self.sequential and not self.baseline_artifacts:
            raise ConfigError("the baseline needs --baseline-artifacts DIR (batch-1 artifacts of the same model), "
                              "or --sequential 0")


@dataclass
class Sequential:
    artifacts: str
    model: str
    images: int
    s_per_image: float
    times_s: List[float]


@dataclass
class BenchResult:
    model: Dict[str, Any]               # the server's GET /v1/model
    url: Optional[str]                  # the running server measured (None: started here)
    concurrency: int
    requests: int
    wall_s: float
    ok: int
    errors: int
    statuses: List[str]
    throughput: float                   # images/s
    p50_s: float
    p99_s: float
    batch_fill: float
    batches: int
    latencies_s: List[float]
    sequential: Optional[Sequential] = None
    ratio: Optional[float] = None       # throughput / sequential images/s


def _measure(url: str, cfg: BenchConfig) -> Tuple[Dict[str, Any], List[Reply], float]:
    status, info = get_json(url, "/v1/model")
    if status != 200:
        raise ConfigError(f"{url}/v1/model answered {status}: is it a var-ssg server?")
    warm_n = info["batch"] * max(1, info.get("replicas", 1))
    warm, _ = closed_loop(url, warm_n, warm_n, info["num_classes"], 0, cfg.timeout_s)
    if any(r.status != 200 for r in warm):
        raise ConfigError(f"warm-up requests failed: {sorted({str(r.status) for r in warm})}")
    out, wall = closed_loop(url, cfg.requests, cfg.concurrency, info["num_classes"], 1_000_000, cfg.timeout_s)
    return info, out, wall


def run_bench(cfg: BenchConfig) -> BenchResult:
    """The baseline, then the load (on a server started here unless cfg.url)."""
    from var_ssg.contract.manifest import load_manifest
    from var_ssg.serving.launch import LaunchConfig, check_all, running
    cfg.check()
    man = None
    if cfg.opts:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launch = LaunchConfig(host="127.0.0.1", port=port)
        man = check_all(cfg.opts, launch)
    seq = None
    if cfg.sequential:
        base = load_manifest(cfg.baseline_artifacts)
        if base.batch != 1:
            raise ConfigError(f"--baseline-artifacts {cfg.baseline_artifacts} are batch {base.batch}; "
                              f"the baseline runs batch-1 artifacts (scripts/export.py --batch 1)")
        if man is not None:
            same_model(man, base)
        times = baseline(cfg.baseline_artifacts, cfg.backend, cfg.device, cfg.sequential, base.cfg.num_classes, 10_000)
        seq = Sequential(cfg.baseline_artifacts, base.cfg.name, len(times), sum(times) / len(times), times)
    if cfg.url:
        info, out, wall = _measure(cfg.url, cfg)
    else:
        with running(cfg.opts, launch, man=man) as srv:
            info, out, wall = _measure(srv.url, cfg)
    ok = [r for r in out if r.status == 200]
    lat = [r.seconds for r in ok]
    batches = {r.headers.get("x-batch-id"): (int(r.headers.get("x-batch-size", 0)),
                                             int(r.headers.get("x-batch-capacity", info["batch"]))) for r in ok}
    fill = sum(n for n, _ in batches.values()) / sum(c for _, c in batches.values()) if batches else 0.0
    tput = len(ok) / wall if wall > 0 else 0.0
    p50, p99 = (percentile(lat, 0.5), percentile(lat, 0.99)) if lat else (float("nan"),) * 2
    return BenchResult(model=info, url=cfg.url, concurrency=cfg.concurrency, requests=cfg.requests, wall_s=wall,
                       ok=len(ok), errors=len(out) - len(ok), statuses=sorted({str(r.status) for r in out}),
                       throughput=tput, p50_s=p50, p99_s=p99, batch_fill=fill, batches=len(batches),
                       latencies_s=lat, sequential=seq, ratio=tput * seq.s_per_image if seq else None)
