"""Serving: runtime/serving.py, scripts/serve.py and scripts/bench_serve.py over real HTTP on
127.0.0.1 with the tiny model's batch-4 export. The CLI and bench tests start (and stop) their
own Ray instance in a child process first; then one Ray instance in this process serves the
rest of the module."""
import http.client as httpc
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pytest

from tests.conftest import ROOT, run_script

pytest.importorskip("ray.serve")
pytestmark = pytest.mark.slow

@pytest.fixture(scope="module", autouse=True)
def _ray_home(tmp_path_factory):
    """Ray writes an auth token to $HOME/.ray: the tests keep it in a temporary home, so no file
    outside the checkout changes (every server and Ray process started here inherits it)."""
    old = os.environ.get("HOME")
    os.environ["HOME"] = str(tmp_path_factory.mktemp("home"))
    yield
    if old is None:
        os.environ.pop("HOME", None)
    else:
        os.environ["HOME"] = old


TOP = dict(top_k=900)      # the CLI's default: all 64 tokens of the tiny VQVAE (exported with top-k 64)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, port, path, body=None, timeout=120):
    """(status, headers with lower-case names, body bytes)."""
    conn = httpc.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        if isinstance(body, dict):
            body = json.dumps(body)
        conn.request(method, path, body, {"Content-Type": "application/json"} if body is not None else {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def png(data: bytes):
    """(H W 3 uint8 pixels, the var-ssg text chunk)."""
    from PIL import Image
    im = Image.open(io.BytesIO(data))
    return np.asarray(im.convert("RGB")), im.text.get("var-ssg", "")


def concurrently(fn, args, timeout=180):
    """Run fn(*a) for every a in threads; every thread must finish (no request hangs)."""
    out = [None] * len(args)

    def run(i):
        out[i] = fn(*args[i])
    ts = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(args))]
    for t in ts:
        t.start()
    deadline = time.monotonic() + timeout
    for t in ts:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in ts), "a request hung"
    return out


def wait_healthy(port, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if http("GET", port, "/healthz", timeout=5)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"/healthz on port {port} not 200 within {timeout} s")


def proc_table():
    """pid -> (ppid, session id, state, cmdline) from /proc."""
    t = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        rest = st[st.rindex(")") + 2:].split()
        t[int(d)] = (int(rest[1]), int(rest[3]), rest[0], cmd)
    return t


def cpu_ticks(pid) -> int:
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return int(rest[11]) + int(rest[12])                  # utime + stime, all threads


def alive(pids):
    """The pids among `pids` still running (zombies count as gone)."""
    t = proc_table()
    return [p for p in pids if p in t and t[p][2] != "Z"]


def wait_gone(pids, timeout=30):
    deadline = time.monotonic() + timeout
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = alive(pids)
    t = proc_table()
    return [f"{p} {t[p][3][:80]}" for p in left if p in t]


# ------------------------------------------------------------------ CLI (own Ray instance)
def test_cli_refuses_artifacts_that_fail_verification(artifacts, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(artifacts(batch=4), bad)
    w = bad / "weights.bin"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0xFF                    # same size, other content
    w.write_bytes(bytes(data))
    gen = run_script("generate.py", "--backend", "onnxruntime", "--artifacts", bad, "--class", "1",
                     "--out", tmp_path / "x.png")
    srv = run_script("serve.py", "--artifacts", bad, "--port", free_port())
    assert gen.returncode == 2 and srv.returncode == 2, (gen.stderr[-500:], srv.stderr[-500:])
    line = srv.stderr.strip().splitlines()[-1]
    assert line == gen.stderr.strip().splitlines()[-1] and "sha256 does not match" in line, line
    assert len(srv.stderr.strip().splitlines()) == 1      # one line, and no Ray was started
    r = run_script("serve.py", "--artifacts", tmp_path / "missing")
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = run_script("serve.py", "--artifacts", artifacts(batch=4), "--replicas", "0")
    assert r.returncode == 2 and r.stderr.strip() == "error: --replicas must be >= 1, got 0"


def test_cli_serves_and_sigterm_leaves_no_process(artifacts):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "serve.py"), "--artifacts",
                          artifacts(batch=4), "--port", str(port), "--host", "127.0.0.1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                         start_new_session=True)       # its own session: every Ray process it starts is in it
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(iter(p.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        wait_healthy(port)
        deadline = time.time() + 60            # the CLI announces itself once serve.run has returned
        while not any(line.startswith("serving ") for line in lines) and time.time() < deadline:
            time.sleep(0.2)
        ours = [pid for pid, (_, sid, _, _) in proc_table().items() if sid == p.pid]
        assert len(ours) > 3                                # driver, gcs, raylet, replicas ...
        status, headers, body = http("POST", port, "/v1/generate", {"class": 207, "seed": 0, **TOP})
        assert status == 200 and headers["content-type"] == "image/png"
        assert "RANDOM WEIGHTS" in png(body)[1]
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=90)
        reader.join(timeout=10)
        err = p.stderr.read()
        out = "".join(lines)
        assert p.returncode == 0, err[-2000:]
        assert "serving var-d2-tiny" in out and out.strip().endswith("stopped")
        left = wait_gone(ours + [pid for pid, (_, sid, _, _) in proc_table().items() if sid == p.pid])
        assert not left, f"processes left behind: {left}"
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        for pid, (_, sid, _, _) in proc_table().items():   # never leave a stray Ray process on failure
            if sid == p.pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass


def test_bench_serve_runs_on_the_tiny_model(artifacts, tmp_path):
    js = tmp_path / "b.json"
    r = run_script("bench_serve.py", "--artifacts", artifacts(batch=4), "--baseline-artifacts", artifacts(),
                   "--concurrency", "8", "--requests", "8", "--sequential", "2", "--json", js)
    assert r.returncode == 0, r.stderr[-3000:]
    last = r.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"summary: throughput=(\d+\.\d+)/s sequential=(\d+\.\d+)/s ratio=(\d+\.\d\d)x "
                     r"p50=(\d+\.\d+)s p99=(\d+\.\d+)s fill=(\d\.\d\d) errors=0", last)
    assert m, last
    d = json.loads(js.read_text())
    assert d["ok"] == 8 and d["batches"] >= 2 and 0 < d["batch_fill"] <= 1 and d["p99_s"] >= d["p50_s"] > 0
    assert d["sequential"]["images"] == 2 and d["ratio"] == pytest.approx(d["throughput"] * d["sequential"]["s_per_image"])
    r = run_script("bench_serve.py", "--artifacts", artifacts(batch=4), "--baseline-artifacts", artifacts(batch=4))
    assert r.returncode == 2 and "the baseline runs batch-1 artifacts" in r.stderr


# ------------------------------------------------------------------ one Ray instance, in process
class Server:
    def __init__(self, port, artifacts, opts):
        self.port, self.artifacts, self.opts = port, artifacts, opts
        self.pids = []
        self.stopped = False

    def post(self, body, path="/v1/generate", timeout=120):
        return http("POST", self.port, path, body, timeout)

    def stop(self):
        if self.stopped:
            return []
        self.stopped = True
        import ray
        from ray import serve
        self.pids = [pid for pid, (ppid, _, _, _) in proc_table().items() if ppid == os.getpid()]
        t = proc_table()
        children = set(self.pids)
        for _ in range(4):       # raylet's workers are grandchildren
            children |= {pid for pid, (ppid, _, _, _) in t.items() if ppid in children}
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
        return wait_gone(sorted(children))


@pytest.fixture(scope="module")
def server(artifacts):
    import ray
    from ray import serve
    from runtime.serving import APP, ServeOptions, build_app, code_path
    art = artifacts(batch=4)
    port = free_port()
    tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")           # short: Ray's socket paths must fit
    metrics_port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=tmp,
             _metrics_export_port=metrics_port, _system_config={"metrics_report_interval_ms": 1000})
    opts = ServeOptions(artifacts=art, max_batch_wait_ms=100, max_queue=16, pythonpath=code_path())
    srv = Server(port, art, opts)
    srv.metrics_port = metrics_port
    try:
        serve.start(http_options=dict(host="127.0.0.1", port=port))
        serve.run(build_app(opts), name=APP, route_prefix="/")
        yield srv
    finally:
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def test_health_and_model_summary(server):
    status, _, body = http("GET", server.port, "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, _, body = http("GET", server.port, "/v1/model")
    d = json.loads(body)
    assert status == 200 and d["model"] == "var-d2-tiny" and d["batch"] == 4 and d["precision"] == "fp32"
    assert d["backend"] == "onnxruntime" and d["weights"] == "random" and "RANDOM WEIGHTS" in d["weights_source"]


def test_16_concurrent_requests_batched_and_equal_to_single_runs(server, artifacts, tmp_path):
    from runtime.backends import open_backend
    from runtime.pipeline import Pipeline, Row
    reqs = [dict(seed=100 + i, **{"class": (37 * i) % 1000}, **TOP) for i in range(16)]
    reqs[3].update(cfg=4.0, ssg_beta="0")
    reqs[5].update(top_k=8, top_p=0.5, temperature=0.7)
    reqs[6].update(**{"class": -1})                                # unconditional
    reqs[9].update(ssg_beta="linear:0.5,0.1")
    reqs[11].update(more_smooth=True)
    reqs[12].update(ssg_beta=[0.05 * k for k in range(1, 10)])
    got = concurrently(server.post, [(r,) for r in reqs])
    assert [s for s, _, _ in got] == [200] * 16, [(s, b[:200]) for s, _, b in got if s != 200]
    # batched: every batch id's size header equals how many responses name it, and batches were shared
    sizes = {}
    for _, h, _ in got:
        assert h["content-type"] == "image/png" and h["x-batch-capacity"] == "4"
        sizes.setdefault(h["x-batch-id"], []).append(int(h["x-batch-size"]))
    assert all(len(v) == v[0] and set(v) == {v[0]} for v in sizes.values()), sizes
    assert len(sizes) < 16 and max(len(v) for v in sizes.values()) == 4
    # each image is its own row's, whatever it was batched with: equal to a run of that row alone
    pipe = Pipeline(open_backend("onnxruntime", server.artifacts))
    keys = dict(cfg="guidance", top_k="top_k", top_p="top_p", temperature="temperature", ssg_beta="ssg_beta",
                more_smooth="more_smooth")
    for r, (_, _, body) in zip(reqs, got):
        row = Row(class_id=r["class"], seed=r["seed"],
                  **{keys[k]: tuple(v) if isinstance(v, list) else v for k, v in r.items() if k in keys})
        want = (pipe.run_rows([row]).images[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        pixels, note = png(body)
        assert np.array_equal(pixels, want), r
        assert f"class={r['class']} seed={r['seed']}" in note and "RANDOM WEIGHTS" in note
    # ... and to generate.py's image for the same class and seed (the CLI, one row)
    for r in (reqs[0], reqs[5]):
        out = tmp_path / f"g{r['seed']}.png"
        g = run_script("generate.py", "--backend", "onnxruntime", "--artifacts", server.artifacts,
                       "--class", r["class"], "--seed", r["seed"], "--top-k", r["top_k"],
                       *(("--top-p", r["top_p"], "--temperature", r["temperature"]) if "top_p" in r else ()),
                       "--out", out)
        assert g.returncode == 0, g.stderr[-2000:]
        assert np.array_equal(png(out.read_bytes())[0], png(got[reqs.index(r)][2])[0]), r


BAD = [
    (b'{"class": 207, "seed": 0', "malformed JSON"),
    (b'', "malformed JSON"),
    (b'[207, 0]', "must be a JSON object"),
    ({"class": 5000, "seed": 0}, "class id 5000 is outside 0..999"),
    ({"class": "207", "seed": 0}, "'class' must be an integer"),
    ({"class": 207}, "missing 'seed'"),
    ({"class": 207, "seed": 0, "ssg_beta": "linear:0.1"}, "malformed --ssg-beta"),
    ({"class": 207, "seed": 0, "ssg_beta": [0.1]}, "SSG schedule has 1 values, expected 9"),
    ({"class": 207, "seed": 0, "ssg_beta": {"a": 1}}, "'ssg_beta' must be a string"),
    ({"class": 207, "seed": 0, "more_smooth": 1}, "'more_smooth' must be true or false"),
    (b'{"class": 207, "seed": 0, "cfg": NaN}', "--cfg must be a finite number"),
    (b'{"class": 207, "seed": 0, "cfg": 1e999}', "--cfg must be a finite number"),
    ({"class": 207, "seed": 0, "top_p": 2}, "--top-p must be in [0, 1]"),
    ({"class": 207, "seed": 0, "temperature": 0}, "--temperature must be in"),
    ({"class": 207, "seed": 0, "guidance": 2}, "unknown field 'guidance'"),
]


def test_bad_input_is_400_with_a_message(server):
    for body, msg in BAD:
        status, h, out = server.post(body, timeout=30)
        assert status == 400 and h["content-type"] == "application/json", (body, status, out[:300])
        assert msg in json.loads(out)["error"], (body, out)
    status, _, out = server.post({"class": 207, "seed": 0, "pad": "x" * 70_000})
    assert status == 413 and "over" in json.loads(out)["error"]
    status, h, out = http("GET", server.port, "/v1/generate")
    assert status == 405 and h["allow"] == "POST" and "takes POST" in json.loads(out)["error"]
    status, _, out = http("GET", server.port, "/nowhere")
    assert status == 404 and "routes:" in json.loads(out)["error"]
    assert server.post({"class": 1, "seed": 1, **TOP})[0] == 200          # and it still serves


def test_full_queue_is_503_with_retry_after_then_recovers(server):
    """A second application with --max-queue 2: the replica holds 2 batches (8 requests) and the
    ingress lets 2 more wait for it, so a burst of 24 requests cannot all be taken: some get 503
    with Retry-After at once (how many depends on how the burst lands: 4..14 seen here), and
    without the bound every one would be 200."""
    from ray import serve
    from runtime.serving import ServeOptions, build_app
    opts = ServeOptions(**{**server.opts.__dict__, "max_queue": 2, "max_batch_wait_ms": 200})
    serve.run(build_app(opts), name="small", route_prefix="/small")
    try:
        got = concurrently(server.post, [({"class": i, "seed": i, **TOP}, "/small/v1/generate") for i in range(24)])
        codes = sorted(s for s, _, _ in got)
        assert set(codes) == {200, 503}, codes            # some served, some refused at once
        for s, h, body in got:
            if s == 503:
                assert int(h["retry-after"]) >= 1 and "queue is full" in json.loads(body)["error"]
        for i in range(2):                                              # recovered: served again
            assert server.post({"class": 1, "seed": i, **TOP}, "/small/v1/generate")[0] == 200
        assert http("GET", server.port, "/small/healthz")[0] == 200
    finally:
        serve.delete("small")


def test_replica_killed_under_load_is_restarted_and_nothing_hangs(server):
    from ray import serve
    from runtime.serving import APP
    gen = serve.get_deployment_handle("Generator", app_name=APP)
    pid = gen.pid.remote().result(timeout_s=30)
    reqs = [({"class": i, "seed": 500 + i, **TOP},) for i in range(12)]
    box = {}
    load = threading.Thread(target=lambda: box.update(got=concurrently(server.post, reqs)), daemon=True)
    t0, deadline = cpu_ticks(pid), time.monotonic() + 60
    load.start()
    while cpu_ticks(pid) - t0 < 0.5 * os.sysconf("SC_CLK_TCK") and time.monotonic() < deadline:
        time.sleep(0.05)                             # until the first batch is well under way
    os.kill(pid, signal.SIGKILL)
    load.join(240)
    assert not load.is_alive() and "got" in box, "requests hung after the replica died"
    codes = [s for s, _, _ in box["got"]]
    assert set(codes) <= {200, 503} and 503 in codes, codes          # in flight on the dead replica: 503
    for s, h, body in box["got"]:
        if s == 503:
            assert int(h["retry-after"]) >= 1 and "error" in json.loads(body)
    wait_healthy(server.port)
    assert gen.pid.remote().result(timeout_s=60) != pid                # Serve started a new replica
    got = concurrently(server.post, [({"class": i, "seed": i, **TOP},) for i in range(4)])
    assert [s for s, _, _ in got] == [200] * 4


def test_metrics_latency_batch_fill_queue_depth(server):
    """Our metrics reach Ray's Prometheus export (reported every second here)."""
    want = ("ray_var_ssg_request_latency_ms_bucket", "ray_var_ssg_requests_total", "ray_var_ssg_batch_fill_bucket",
            "ray_var_ssg_batch_ms_bucket", "ray_var_ssg_queue_depth", "ray_var_ssg_inflight")
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        text = http("GET", server.metrics_port, "/metrics", timeout=10)[2].decode()
        if all(w in text for w in want):
            break
        time.sleep(1)
    assert all(w in text for w in want), [w for w in want if w not in text]
    fill = [ln for ln in text.splitlines() if ln.startswith("ray_var_ssg_batch_fill_count")]
    assert fill and sum(float(ln.split()[-1]) for ln in fill) >= 4
    assert re.search(r'ray_var_ssg_requests_total\{[^}]*status="400"', text)


def test_shutdown_leaves_no_process(server):
    left = server.stop()
    assert server.pids and not left, f"processes left behind: {left}"
