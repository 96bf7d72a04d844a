"""Serving: serving/ (requests, proxy body bound, app, launcher, load generator), scripts/serve.py
and scripts/bench_serve.py. Request parsing, the body bound and the options are unit-tested here
without Ray; then the CLI (one subprocess server under CPU load, the benchmark in process);
then one Ray instance in this process serves the rest of the module over real HTTP on
127.0.0.1 with the tiny model's batch-4 export."""
import asyncio
import contextlib
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

from var_ssg.common.errors import ConfigError
from var_ssg.graphs.config import get_preset
from tests.conftest import ROOT, TINY

TOP = dict(top_k=900)      # the CLI's default: all 64 tokens of the tiny VQVAE (exported with top-k 64)


# ------------------------------------------------------------------ helpers
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


def raw_exchange(port, head: bytes, body: bytes = b"", timeout=30):
    """Send `head` and `body` on a raw socket (stop sending there) and return the status line's
    code and the whole answer, or None if the server sent nothing within `timeout`."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head)
        try:
            s.sendall(body)
        except OSError:
            pass                        # the server answered and closed while we were still sending
        data = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except socket.timeout:
            pass
        except OSError:
            pass
    m = re.match(rb"HTTP/1\.[01] (\d+)", data)
    return (int(m.group(1)) if m else None), data


def png(data: bytes):
    """(H W 3 uint8 pixels, the var-ssg text chunk)."""
    from PIL import Image
    im = Image.open(io.BytesIO(data))
    return np.asarray(im.convert("RGB")), im.text.get("var-ssg", "")


def concurrently(fn, args, timeout=180):
    """Run fn(*a) for every a in threads; every thread must finish (no request hangs)."""
    out = [None] * len(args)

    def run(i):
        try:
            out[i] = fn(*args[i])
        except Exception as e:  # noqa: BLE001 - a dropped connection is a result here
            out[i] = (type(e).__name__, {}, b"")
    ts = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(args))]
    for t in ts:
        t.start()
    deadline = time.monotonic() + timeout
    for t in ts:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in ts), "a request hung"
    return out


def wait_healthy(port, timeout=120, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            if http("GET", port, "/healthz", timeout=5)[0] == 200:
                return True
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


def descendants(root: int):
    t = proc_table()
    out, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, (ppid, _, _, _) in t.items() if ppid in frontier} - out
        out |= frontier
    return sorted(out)


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


def listening(pids):
    """(pid, address, port) of every listening TCP socket the processes `pids` hold (/proc)."""
    socks = {}
    for path, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        with open(path) as f:
            next(f)
            for ln in f:
                parts = ln.split()
                if parts[3] != "0A":                         # LISTEN
                    continue
                hexip, hexport = parts[1].split(":")
                raw = bytes.fromhex(hexip)
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                ip = socket.inet_ntop(socket.AF_INET6 if v6 else socket.AF_INET, raw)
                socks[int(parts[9])] = (ip, int(hexport, 16))
    out = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and int(link[8:-1]) in socks:
                out.append((pid, *socks[int(link[8:-1])]))
    return out


LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def exposed(socks):
    """The listening sockets not on loopback, less the one Ray Serve 2.60 cannot be told to
    bind: each replica's inter-deployment gRPC server, hard-coded to [::]:0 (README "Serving")."""
    t = proc_table()
    out, per_replica = [], {}
    for pid, ip, port in socks:
        if ip in LOOPBACK:
            continue
        if t.get(pid, (0, 0, "", ""))[3].startswith("ray::ServeReplica") and ip == "::" and pid not in per_replica:
            per_replica[pid] = port
            continue
        out.append((pid, ip, port, t.get(pid, (0, 0, "", "?"))[3][:60]))
    return out


# ------------------------------------------------------------------ requests (no Ray, no server)
def tiny_checker(k_max=64, batch=4):
    from var_ssg.runtime.backends.base import BackendInfo
    from var_ssg.serving.requests import checker
    info = BackendInfo(name="onnxruntime", cfg=get_preset(TINY), k_max=k_max, transform="dct",
                       kv_dtype="float32", batch=batch)
    return checker(info), info


BAD = [
    (b'{"class": 207, "seed": 0', "malformed JSON"),
    (b'', "malformed JSON"),
    (b'[207, 0]', "must be a JSON object"),
    (b'[' * 60_000, "malformed JSON"),
    ({"class": 5000, "seed": 0}, "class id 5000 is outside 0..999"),
    ({"class": "207", "seed": 0}, "'class' must be an integer"),
    ({"class": 207}, "missing 'seed'"),
    ({"class": 207, "seed": -1}, "seed"),
    ({"class": 207, "seed": 2 ** 63}, "seed"),
    ({"class": 207, "seed": 0, "ssg_beta": "linear:0.1"}, "malformed --ssg-beta"),
    ({"class": 207, "seed": 0, "ssg_beta": [0.1]}, "SSG schedule has 1 values, expected 9"),
    ({"class": 207, "seed": 0, "ssg_beta": {"a": 1}}, "'ssg_beta' must be a string"),
    ({"class": 207, "seed": 0, "more_smooth": 1}, "'more_smooth' must be true or false"),
    (b'{"class": 207, "seed": 0, "cfg": NaN}', "--cfg must be a finite number"),
    (b'{"class": 207, "seed": 0, "cfg": 1e999}', "--cfg must be a finite number"),
    ({"class": 207, "seed": 0, "top_p": 2}, "--top-p must be in [0, 1]"),
    ({"class": 207, "seed": 0, "temperature": 0}, "--temperature must be in"),
    ({"class": 207, "seed": 0, "top_k": 1.5}, "'top_k' must be an integer"),
    ({"class": 207, "seed": 0, "guidance": 2}, "unknown field 'guidance'"),
    # integers far too long for any field: named as such, not "malformed JSON"
    (b'{"class": 207, "seed": ' + b"7" * 5000 + b'}', "'seed' must be an integer in range (0..2**63-1), "
                                                     "got an integer of 5000 digits"),
    (b'{"class": 207, "seed": -' + b"7" * 5000 + b'}', "got an integer of 5000 digits"),
    (b'{"class": ' + b"1" * 60_000 + b', "seed": 0}', "'class' must be an integer in range"),
    (b'{"class": 1, "seed": 0, "cfg": ' + b"9" * 5000 + b'}', "'cfg' is too large: an integer of 5000 digits"),
    (b'{"class": 1, "seed": 0, "ssg_beta": [' + b"9" * 5000 + b']}', "'ssg_beta' must be a string"),
]


@pytest.mark.parametrize("body,msg", BAD, ids=[m[:30] for _, m in BAD])
def test_bad_request_is_400_with_what_to_fix(body, msg):
    from var_ssg.serving.requests import RequestError, parse_request
    pipe, _ = tiny_checker()
    with pytest.raises(RequestError, match=re.escape(msg)) as e:
        parse_request(body if isinstance(body, bytes) else json.dumps(body).encode(), pipe)
    assert e.value.status == 400 and msg in str(e.value), str(e.value)


def test_good_requests_become_rows():
    from var_ssg.serving.requests import MAX_BODY, RequestError, parse_request
    pipe, _ = tiny_checker()
    row = parse_request(json.dumps({"class": -1, "seed": 2 ** 63 - 1, "cfg": 3, "ssg_beta": [0.1] * 9, "top_k": 8,
                                    "top_p": 0.5, "temperature": 0.7, "more_smooth": True}).encode(), pipe)
    assert (row.class_id, row.seed, row.guidance, row.ssg_beta, row.top_k, row.more_smooth) == \
        (-1, 2 ** 63 - 1, 3.0, (0.1,) * 9, 8, True)
    assert parse_request(b'{"class": 3, "seed": 0, "ssg_beta": 0.2}', pipe).ssg_beta == "0.2"
    with pytest.raises(RequestError, match="over 65536 bytes") as e:
        parse_request(b" " * (MAX_BODY + 1), pipe)
    assert e.value.status == 413 and "over 65536 bytes" in str(e.value)


def test_one_png_note_for_generate_and_the_server(tmp_path):
    """generate.py and the server write the same note for the same request (one function)."""
    from PIL import Image
    from var_ssg.runtime.pipeline import Row
    from var_ssg.serving.requests import row_note
    from var_ssg.tools.commands import generate
    out = tmp_path / "g.png"
    assert generate.main(["--model", TINY, "--random-init", "0", "--class", "207", "--seed", "3", "--cfg", "2",
                          "--top-k", "9", "--out", str(out)]) == 0
    want = ("var-d2-tiny backend=eager class=207 seed=3 cfg=2.0 top_k=9 top_p=0.96 T=1.0 ssg=linear:0.1,0.3 "
            "dse=dct; RANDOM WEIGHTS (seed 0) - not a trained model")
    assert Image.open(out).text["var-ssg"] == want
    _, info = tiny_checker()
    info = type(info)(**{**info.__dict__, "name": "eager"})
    assert row_note(Row(class_id=207, seed=3, guidance=2.0, top_k=9), info,
                    "RANDOM WEIGHTS (seed 0) - not a trained model") == want


def test_options_refused_before_ray_starts(capsys):
    """nan CPUs and a negative metrics port: one `error:` line, exit 2, no Ray process."""
    from var_ssg.tools.cli import run_main
    from var_ssg.tools.commands import serve
    before = set(descendants(os.getpid()))
    for flags, msg in ((["--cpus-per-replica", "nan"], "--cpus-per-replica must be a number > 0"),
                       (["--cpus-per-replica", "inf"], "--cpus-per-replica must be a number > 0"),
                       (["--metrics-export-port", "-1"], "--metrics-export-port must be in 1..65535, got -1"),
                       (["--port", "70000"], "--port must be in 1..65535"),
                       (["--drain-s", "-1"], "--drain-s must be a number > 0"),
                       (["--replicas", "0"], "--replicas must be >= 1, got 0")):
        with pytest.raises(SystemExit, match="^2$") as e:
            run_main(lambda: serve.main(["--artifacts", "/nonexistent", *flags]))
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and msg in err[0], err
    assert set(descendants(os.getpid())) <= before
    if "ray" in sys.modules:
        assert not sys.modules["ray"].is_initialized()


class _Client:
    """An ASGI client side for BodyLimit: the messages it receives and what it answered."""

    def __init__(self, messages, stall=False):
        self.messages, self.stall, self.reads, self.sent = list(messages), stall, 0, []

    async def receive(self):
        self.reads += 1
        if self.messages:
            return self.messages.pop(0)
        if self.stall:
            await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(self, msg):
        self.sent.append(msg)

    @property
    def status(self):
        return next(m["status"] for m in self.sent if m["type"] == "http.response.start")


def _through_limit(headers, messages, stall=False, timeout_s=30.0):
    from var_ssg.serving.proxy import BodyLimit
    seen = {}

    async def app(scope, receive, send):
        seen["body"] = (await receive())["body"]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
    c = _Client(messages, stall)
    scope = {"type": "http", "method": "POST", "path": "/v1/generate", "headers": headers}
    asyncio.run(BodyLimit(app, timeout_s=timeout_s)(scope, c.receive, c.send))
    return c, seen


def test_proxy_body_limit_413_before_reading_and_408_for_a_stalled_body():
    from var_ssg.serving.requests import MAX_BODY
    c, seen = _through_limit([(b"content-length", b"300000000")], [{"type": "http.request", "body": b"x" * 10}])
    assert c.status == 413 and c.reads == 0 and not seen                 # not a byte read
    chunk = {"type": "http.request", "body": b"x" * 16384, "more_body": True}
    c, seen = _through_limit([], [dict(chunk) for _ in range(1000)])     # chunked, no length: stops at the bound
    assert c.status == 413 and c.reads == MAX_BODY // 16384 + 1 and not seen
    t0 = time.monotonic()
    c, seen = _through_limit([(b"content-length", b"100")], [{"type": "http.request", "body": b"x" * 50,
                                                             "more_body": True}], stall=True, timeout_s=0.3)
    assert c.status == 408 and time.monotonic() - t0 < 2 and not seen
    assert (b"connection", b"close") in dict(enumerate(c.sent))[0]["headers"]
    c, seen = _through_limit([(b"content-length", b"9")], [{"type": "http.request", "body": b"{}", "more_body": True},
                                                           {"type": "http.request", "body": b"1234567"}])
    assert c.status == 200 and seen["body"] == b"{}1234567"              # a good body goes on whole


def test_percentile_is_nearest_rank():
    from var_ssg.serving.loadgen import percentile
    xs = [5, 1, 4, 2, 3]
    assert percentile(xs, 0.5) == 3 and percentile(xs, 0.99) == 5 and percentile(xs, 0.0) == 1


# ------------------------------------------------------------------ live servers (Ray)
@pytest.fixture(scope="module")
def ray_home():
    """Ray and Serve are installed (the session's own $HOME, where Ray keeps its auth token, is set
    in conftest: one for every Ray start of the session)."""
    pytest.importorskip("ray.serve")


def test_cli_refuses_artifacts_that_fail_verification(artifacts, tmp_path, ray_home):
    from var_ssg.tools.commands import generate, serve
    bad = tmp_path / "bad"
    shutil.copytree(artifacts(batch=4), bad)
    w = bad / "weights.bin"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0xFF                    # same size, other content
    w.write_bytes(bytes(data))
    errs = []
    for main, argv in ((generate.main, ["--backend", "onnxruntime", "--artifacts", str(bad), "--class", "1",
                                        "--out", str(tmp_path / "x.png")]),
                       (serve.main, ["--artifacts", str(bad), "--port", str(free_port())])):
        with pytest.raises(ConfigError, match="sha256 does not match") as e:
            main(argv)
        errs.append(str(e.value))
    assert errs[0] == errs[1] and "sha256 does not match" in errs[0], errs
    with pytest.raises(ConfigError, match="does not exist"):
        serve.main(["--artifacts", str(tmp_path / "missing")])


def _burn():
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def test_cli_under_load_comes_up_or_says_why_and_sigterm_finishes_requests(artifacts, ray_home):
    """serve.py beside two CPU-bound processes: it comes up, keeps a local Ray instance's ports on
    127.0.0.1, and on SIGTERM answers every request in flight (here: finished, the drain waits
    for the partial batch); no process is left. A server that does not come up fails the test
    (after checking it said why in one line and left nothing): a start-up regression is never a
    skip."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    burners = [_burn(), _burn()]
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "serve.py"), "--artifacts",
                          artifacts(batch=4), "--port", str(port), "--host", "127.0.0.1", "--max-batch-wait-ms",
                          "4000", "--drain-s", "60"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                         start_new_session=True)       # its own session: every Ray process it starts is in it
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(iter(p.stdout.readline, "")), daemon=True)
    reader.start()
    ours = lambda: [pid for pid, (_, sid, _, _) in proc_table().items() if sid == p.pid]   # noqa: E731
    try:
        up = wait_healthy(port, timeout=600, proc=p)
        for b in burners:
            b.kill()
            b.wait()
        if not up:                                       # it gave up: one line, exit 2, nothing left
            p.wait(timeout=120)
            err = p.stderr.read().strip().splitlines()
            assert p.returncode == 2 and len(err) == 1 and err[0].startswith("error: "), err[-20:]
            assert not wait_gone(ours())
            pytest.fail(f"serve.py did not come up under load (exit 2, one line: {err[0]})")
        deadline = time.time() + 60            # the CLI announces itself once serve.run has returned
        while not any(line.startswith("serving ") for line in lines) and time.time() < deadline:
            time.sleep(0.2)
        pids = ours()
        assert len(pids) > 3                                # driver, gcs, raylet, replicas ...
        socks = listening(pids)
        assert socks and not exposed(socks), exposed(socks)
        box = {}
        reqs = [({"class": i, "seed": i, **TOP},) for i in range(3)]    # a partial batch: waits 4 s
        load = threading.Thread(target=lambda: box.update(got=concurrently(
            lambda b: http("POST", port, "/v1/generate", b, timeout=120), reqs, timeout=150)), daemon=True)
        load.start()
        time.sleep(1.5)
        p.send_signal(signal.SIGTERM)
        load.join(160)
        assert [s for s, _, _ in box["got"]] == [200] * 3, [(s, b[:200]) for s, _, b in box["got"]]
        p.wait(timeout=120)
        reader.join(timeout=10)
        err = p.stderr.read()
        out = "".join(lines)
        assert p.returncode == 0, err[-2000:]
        assert "serving var-d2-tiny" in out and out.strip().endswith("stopped")
        assert "RANDOM weights" in out
        left = wait_gone(pids + ours())
        assert not left, f"processes left behind: {left}"
    finally:
        for b in burners:
            if b.poll() is None:
                b.kill()
                b.wait()
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        for pid in ours():                               # never leave a stray Ray process on failure
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def test_bench_serve_runs_on_the_tiny_model(artifacts, tmp_path, capsys, ray_home):
    from var_ssg.tools.commands import bench_serve
    js = tmp_path / "b.json"
    before = set(descendants(os.getpid()))
    rc = bench_serve.main(["--artifacts", artifacts(batch=4), "--baseline-artifacts", artifacts(),
                           "--concurrency", "8", "--requests", "8", "--sequential", "2", "--json", str(js)])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    last = out.strip().splitlines()[-1]
    m = re.fullmatch(r"summary: throughput=(\d+\.\d+)/s sequential=(\d+\.\d+)/s ratio=(\d+\.\d\d)x "
                     r"p50=(\d+\.\d+)s p99=(\d+\.\d+)s fill=(\d\.\d\d) errors=0", last)
    assert m, last
    d = json.loads(js.read_text())
    assert d["ok"] == 8 and d["batches"] >= 2 and 0 < d["batch_fill"] <= 1 and d["p99_s"] >= d["p50_s"] > 0
    assert d["sequential"]["images"] == 2 and d["ratio"] == pytest.approx(d["throughput"] * d["sequential"]["s_per_image"])
    assert not wait_gone(sorted(set(descendants(os.getpid())) - before))   # the bench's Ray is gone
    with pytest.raises(ConfigError, match="the baseline runs batch-1 artifacts"):
        bench_serve.main(["--artifacts", artifacts(batch=4), "--baseline-artifacts", artifacts(batch=4)])


# ------------------------------------------------------------------ one Ray instance, in process
class Server:
    def __init__(self, port, artifacts, opts, stack):
        self.port, self.artifacts, self.opts, self.stack = port, artifacts, opts, stack
        self.stopped = False

    def post(self, body, path="/v1/generate", timeout=120):
        return http("POST", self.port, path, body, timeout)

    def stop(self):
        """Stop everything the fixture started; returns the processes left behind."""
        if self.stopped:
            return []
        self.stopped = True
        children = descendants(os.getpid())
        self.pids = children
        self.stack.close()
        return wait_gone(children)


@pytest.fixture(scope="module")
def server(artifacts, ray_home):
    from var_ssg.serving.launch import LaunchConfig, running
    from var_ssg.serving.requests import ServeOptions, code_path
    art = artifacts(batch=4)
    port = free_port()
    tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")           # short: Ray's socket paths must fit
    metrics_port = free_port()
    opts = ServeOptions(artifacts=art, max_batch_wait_ms=100, max_queue=16, body_timeout_s=3,
                        pythonpath=code_path())
    launch = LaunchConfig(host="127.0.0.1", port=port, num_cpus=2, temp_dir=tmp, metrics_export_port=metrics_port,
                          system_config={"metrics_report_interval_ms": 1000})
    stack = contextlib.ExitStack()
    srv = Server(port, art, opts, stack)
    srv.metrics_port, srv.tmp = metrics_port, tmp
    try:
        stack.enter_context(running(opts, launch))
        yield srv
    finally:
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def test_health_model_summary_and_replica_start_time(server):
    status, _, body = http("GET", server.port, "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, _, body = http("GET", server.port, "/v1/model")
    d = json.loads(body)
    assert status == 200 and d["model"] == "var-d2-tiny" and d["batch"] == 4 and d["precision"] == "fp32"
    assert d["backend"] == "onnxruntime" and d["weights"] == "random" and "RANDOM WEIGHTS" in d["weights_source"]
    (start,) = d["replica_start"]
    assert start["ready_s"] > 0 and start["ready_s"] >= start["verify_s"] + start["open_s"]
    assert start["process_s"] is None or start["process_s"] >= start["ready_s"]


def test_ray_listens_on_loopback_only(server):
    socks = listening([os.getpid(), *descendants(os.getpid())])
    assert any(port == server.port for _, _, port in socks) and any(port == server.metrics_port for _, _, port in socks)
    assert not exposed(socks), exposed(socks)


def test_16_concurrent_requests_batched_and_equal_to_single_runs(server, tmp_path):
    from var_ssg.runtime.backends import open_backend
    from var_ssg.runtime.pipeline import Pipeline, Row
    from var_ssg.tools.commands import generate
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
    # each image is its own row's, whatever it was batched with: equal to the same row run with
    # other companions (the k-th request of every server batch in turn, so no reference batch is
    # a server batch), in full batches, a batch of 3 and a row alone (both padded)
    pipe = Pipeline(open_backend("onnxruntime", server.artifacts))
    keys = dict(cfg="guidance", top_k="top_k", top_p="top_p", temperature="temperature", ssg_beta="ssg_beta",
                more_smooth="more_smooth")
    rows = [Row(class_id=r["class"], seed=r["seed"],
                **{keys[k]: tuple(v) if isinstance(v, list) else v for k, v in r.items() if k in keys}) for r in reqs]
    served = {}
    for i, (_, h, _) in enumerate(got):
        served.setdefault(h["x-batch-id"], []).append(i)
    order = [i for k in range(4) for b in served.values() for i in b[k:k + 1]]
    groups = [order[0:4], order[4:8], order[8:12], order[12:15], order[15:]]
    assert sorted(order) == list(range(16)) and not {frozenset(g) for g in groups} & {frozenset(b) for b in served.values()}
    want = {}
    for g in groups:
        for i, im in zip(g, pipe.run_rows([rows[i] for i in g]).images):
            want[i] = (np.clip(im, 0, 1) * np.float32(255)).round().astype(np.uint8).transpose(1, 2, 0)
    for i, (r, (_, _, body)) in enumerate(zip(reqs, got)):
        pixels, note = png(body)
        assert np.array_equal(pixels, want[i]), r
        assert f"class={r['class']} seed={r['seed']}" in note and "RANDOM WEIGHTS" in note
    # ... and to generate.py's PNG for the same class and seed: the same pixels and the same note
    for r in (reqs[0], reqs[5]):
        out = tmp_path / f"g{r['seed']}.png"
        assert generate.main(["--backend", "onnxruntime", "--artifacts", server.artifacts, "--class", str(r["class"]),
                              "--seed", str(r["seed"]), "--top-k", str(r["top_k"]),
                              *(("--top-p", str(r["top_p"]), "--temperature", str(r["temperature"]))
                                if "top_p" in r else ()), "--out", str(out)]) == 0
        mine, theirs = png(out.read_bytes()), png(got[reqs.index(r)][2])
        assert np.array_equal(mine[0], theirs[0]) and mine[1] == theirs[1], (r, mine[1], theirs[1])


def test_http_errors_are_json_and_a_big_body_is_413_before_it_is_read(server):
    status, h, out = server.post({"class": 5000, "seed": 0})
    assert status == 400 and h["content-type"] == "application/json" and "outside 0..999" in json.loads(out)["error"]
    status, _, out = server.post(b'{"class": 207, "seed": ' + b"7" * 5000 + b"}")
    assert status == 400 and "an integer of 5000 digits" in json.loads(out)["error"]
    status, h, out = http("GET", server.port, "/v1/generate")
    assert status == 405 and h["allow"] == "POST" and "takes POST" in json.loads(out)["error"]
    status, _, out = http("GET", server.port, "/nowhere")
    assert status == 404 and "routes:" in json.loads(out)["error"]
    # 300 MB announced, 1 MB sent: the answer comes without the rest (nothing waits for it)
    head = (f"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {300 << 20}\r\n\r\n").encode()
    t0 = time.monotonic()
    status, data = raw_exchange(server.port, head, b"x" * (1 << 20), timeout=20)
    assert status == 413 and b"over 65536 bytes" in data and time.monotonic() - t0 < 20, data[:300]
    # chunked, no length: cut off once past the bound
    head = b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"4000\r\n" + b"x" * 0x4000 + b"\r\n"
    status, data = raw_exchange(server.port, head, chunk * 64, timeout=20)
    assert status == 413, data[:300]
    assert server.post({"class": 1, "seed": 1, **TOP})[0] == 200          # and it still serves
    logs = subprocess.run(["grep", "-rl", "var_ssg.serving.proxy:middlewares", server.tmp], capture_output=True, text=True)
    assert "proxy" in logs.stdout, "the HTTP proxy did not load the body bound"   # the bound sits in the proxy


def test_slow_body_is_408_within_the_body_timeout(server):
    """Half a body and then nothing: answered 408 after --body-timeout-s (3 s here), not held."""
    head = (b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n")
    results = concurrently(lambda: raw_exchange(server.port, head, b'{"class": 1, ', timeout=30), [()] * 5,
                           timeout=60)
    t0 = time.monotonic()
    assert [s for s, _ in results] == [408] * 5, [d[:200] for _, d in results]
    assert b"did not arrive within 3 s" in results[0][1] and time.monotonic() - t0 < 30


def test_slow_and_oversized_headers_are_408_and_431_in_the_proxy(server):
    """The issue's probes against Ray Serve's own proxy: connections that send a request line and
    part of a header block are answered 408 and closed (10 s bound), a 32 MiB header and 20,000
    headers are 431 after 64 KiB; the server still serves."""
    import socket as _socket
    from tests.test_serve_headers import _closed, _send_all, _status
    conns = []
    try:
        t0 = time.monotonic()
        for _ in range(30):
            c = _socket.create_connection(("127.0.0.1", server.port))
            c.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            conns.append(c)
        got = [_status(c, timeout=max(0.05, t0 + 40 - time.monotonic())) for c in conns]
        assert got == [408] * 30 and all(_closed(c) for c in conns)
        with _socket.create_connection(("127.0.0.1", server.port)) as c:
            _send_all(c, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
            for _ in range(512):
                _send_all(c, b"a" * 65536)
            assert _status(c) == 431 and _closed(c)
        with _socket.create_connection(("127.0.0.1", server.port)) as c:
            _send_all(c, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(20000))
                      + b"\r\n")
            assert _status(c) == 431 and _closed(c)
    finally:
        for c in conns:
            c.close()
    assert server.post({"class": 1, "seed": 1, **TOP})[0] == 200


def test_full_queue_is_503_with_retry_after_then_recovers(server):
    """A second application with --max-queue 2: the replica holds 2 batches (8 requests) and the
    ingress lets 2 more wait for it, so a burst of 24 requests cannot all be taken: some get 503
    with Retry-After at once, and without the bound every one would be 200."""
    from ray import serve
    from var_ssg.serving.app import build_app
    from var_ssg.serving.requests import ServeOptions
    opts = ServeOptions(**{**server.opts.__dict__, "max_queue": 2, "max_batch_wait_ms": 200})
    serve.run(build_app(opts, 4), name="small", route_prefix="/small")
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


def test_drain_answers_requests_cut_short_with_503(server):
    """Stopping with a drain time shorter than the work: the requests in flight get 503 (not a
    dropped connection), and new ones get 503 at once."""
    from ray import serve
    from var_ssg.serving.app import build_app
    from var_ssg.serving.requests import ServeOptions
    opts = ServeOptions(**{**server.opts.__dict__, "max_batch_wait_ms": 30_000})     # a partial batch waits 30 s
    serve.run(build_app(opts, 4), name="slow", route_prefix="/slow")
    try:
        box = {}
        load = threading.Thread(target=lambda: box.update(got=concurrently(
            server.post, [({"class": i, "seed": i, **TOP}, "/slow/v1/generate") for i in range(2)], timeout=60)),
            daemon=True)
        load.start()
        time.sleep(2)
        front = serve.get_deployment_handle("Frontend", app_name="slow")
        res = front.drain.remote(0.5).result(timeout_s=30)
        load.join(60)
        assert res == {"inflight": 2, "cut": 2}, res
        for s, h, body in box["got"]:
            assert s == 503 and "stopped before this image" in json.loads(body)["error"], (s, body[:200])
        s, _, body = server.post({"class": 1, "seed": 1, **TOP}, "/slow/v1/generate")
        assert s == 503 and "stopping" in json.loads(body)["error"]
    finally:
        serve.delete("slow")


def test_replica_killed_under_load_is_restarted_and_nothing_hangs(server):
    from ray import serve
    from var_ssg.serving.requests import APP
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
