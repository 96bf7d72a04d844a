"""`scripts/serve.py`: Serve VAR + SSG over HTTP with Ray Serve, in the foreground; SIGINT/SIGTERM stop it cleanly.

  python scripts/serve.py --artifacts build/var-d16-b4 --backend onnxruntime --port 8000
  curl -s localhost:8000/v1/generate -d '{"class": 207, "seed": 0}' -o dog.png
  python scripts/serve.py --artifacts build/var-d16-b4-trt --backend tensorrt --address auto   (a Ray cluster)
"""
from __future__ import annotations

import logging
import signal
import socket
import threading

from tools.cli import parser
from graphs.config import ConfigError

log = logging.getLogger("serve")


def _one_line(e: BaseException) -> str:
    """The last 'SomethingError: message' line of a deployment failure (Ray reports tracebacks)."""
    lines = [ln.strip() for ln in str(e).splitlines() if "Error: " in ln]
    return (lines[-1] if lines else str(e).splitlines()[0] if str(e) else type(e).__name__)[:400]


def _port_free(host: str, port: int) -> None:
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}): choose another --port or --host") from None


def main(argv=None) -> int:
    p = parser("Serve VAR + SSG over HTTP (Ray Serve): POST /v1/generate, GET /healthz, GET /v1/model.")
    p.add_argument("--artifacts", required=True, help="artifacts directory (scripts/export.py); its batch is the "
                                                      "serving batch")
    p.add_argument("--backend", choices=("onnxruntime", "tensorrt", "eager"), default="onnxruntime")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda for tensorrt, else cpu")
    p.add_argument("--host", default="127.0.0.1", help="HTTP address (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, help="model replicas (default: one per GPU with --device cuda, else 1)")
    p.add_argument("--max-batch-wait-ms", type=float, default=20.0,
                   help="how long a partial batch waits for more requests")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a replica beyond the 2 batches "
                                                             "each replica holds; more get 503")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads per CPU replica (0 = all cores)")
    p.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs Ray reserves per CPU replica")
    p.add_argument("--request-timeout-s", type=float, default=600.0, help="a request waiting longer gets 504")
    p.add_argument("--address", help="join this Ray cluster (e.g. auto or ray://head:10001) instead of starting a "
                                     "local Ray instance")
    p.add_argument("--metrics-export-port", type=int, help="local Ray: Prometheus metrics port (default: Ray's choice)")
    a = p.parse_args(argv)

    from runtime.serving import APP, ServeOptions, build_app, code_path, preflight
    device = a.device or ("cuda" if a.backend == "tensorrt" else "cpu")
    if not 0 < a.port < 65536:
        raise ConfigError(f"--port must be in 1..65535, got {a.port}")
    if a.cpus_per_replica <= 0:
        raise ConfigError(f"--cpus-per-replica must be > 0, got {a.cpus_per_replica}")
    opts = ServeOptions(artifacts=a.artifacts, backend=a.backend, device=device, replicas=1 if a.replicas is None else a.replicas,
                        max_batch_wait_ms=a.max_batch_wait_ms, max_queue=a.max_queue, threads=a.threads,
                        cpus_per_replica=a.cpus_per_replica, request_timeout_s=a.request_timeout_s,
                        pythonpath=code_path())
    man = preflight(opts)               # bad options or artifacts: one line, exit 2, before Ray starts
    if not a.address:
        _port_free(a.host, a.port)

    stop = threading.Event()
    started = threading.Event()

    terminated = threading.Event()

    def on_signal(signum, frame):
        log.info("%s: shutting down", signal.Signals(signum).name)
        stop.set()
        if signum == signal.SIGTERM:
            terminated.set()
        if not started.is_set():
            raise KeyboardInterrupt      # during start-up: unwind, the finally below cleans up

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    import ray
    from ray import serve
    try:
        if a.address:
            ray.init(address=a.address, log_to_driver=False)
        else:
            kw = dict(_metrics_export_port=a.metrics_export_port) if a.metrics_export_port else {}
            ray.init(include_dashboard=False, log_to_driver=False, **kw)
        for sig in (signal.SIGTERM, signal.SIGINT):   # ray.init installs its own handlers: take them back
            signal.signal(sig, on_signal)
        if device == "cuda":
            gpus = int(ray.cluster_resources().get("GPU", 0))
            if not gpus:
                raise ConfigError("--device cuda but the Ray cluster has no GPU: use --device cpu (onnxruntime, eager) "
                                  "or --address of a cluster with GPUs")
            if a.replicas is None:
                opts = ServeOptions(**{**opts.__dict__, "replicas": gpus})
        serve.start(http_options=dict(host=a.host, port=a.port))
        try:
            serve.run(build_app(opts), name=APP, route_prefix="/")
        except RuntimeError as e:
            raise ConfigError(f"the replicas failed to start: {_one_line(e)}") from None
        started.set()
        print(f"serving {man.cfg.name} (batch {man.batch}, {opts.replicas} x {opts.backend}/{device}) on "
              f"http://{a.host}:{a.port}: POST /v1/generate, GET /healthz, GET /v1/model; Ctrl-C stops",
              flush=True)
        if man.weights["kind"] == "random":
            print("note: serving RANDOM weights, not a trained model", flush=True)
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        if not terminated.is_set():      # Ctrl-C during start-up: 130, as for any script
            raise                        # SIGTERM during start-up is a clean stop like any other
    finally:
        started.set()                    # a second signal during shutdown only sets `stop`
        try:
            if ray.is_initialized():
                if a.address:
                    serve.delete(APP)    # the cluster and its other applications stay up
                else:
                    serve.shutdown()
        finally:
            ray.shutdown()
    print("stopped", flush=True)
    return 0

