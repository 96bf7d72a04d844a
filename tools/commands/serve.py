"""`scripts/serve.py`: Serve VAR + SSG over HTTP with Ray Serve, in the foreground; SIGINT/SIGTERM stop it cleanly.

  python scripts/serve.py --artifacts build/var-d16-b4 --backend onnxruntime --port 8000
  curl -s localhost:8000/v1/generate -d '{"class": 207, "seed": 0}' -o dog.png
  python scripts/serve.py --artifacts build/var-d16-b4-trt --backend tensorrt --address auto   (a Ray cluster)
  python scripts/serve.py --artifacts build/inf-2b-b4 --text-encoder flan-t5-xl/          (Infinity: prompts)
  curl -s localhost:8000/v1/generate -d '{"prompt": "a red chair", "seed": 0, "aspect_ratio": "3:4"}' -o chair.png
"""
from __future__ import annotations

import sys

from var_ssg.tools.cli import add_session_cache_arg, note_random_weights, parser


def main(argv=None) -> int:
    p = parser("Serve VAR + SSG over HTTP (Ray Serve): POST /v1/generate, GET /healthz, GET /v1/model.")
    p.add_argument("--artifacts", required=True, help="artifacts directory (scripts/export.py); its batch is the "
                                                      "serving batch")
    p.add_argument("--backend", choices=("onnxruntime", "tensorrt", "eager"), default="onnxruntime")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda for tensorrt, else cpu")
    p.add_argument("--host", default="127.0.0.1", help="HTTP address (0.0.0.0 for every interface); a loopback "
                                                      "host also keeps a local Ray instance's ports on loopback")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, help="model replicas (default: one per GPU with --device cuda, else 1)")
    p.add_argument("--max-batch-wait-ms", type=float, default=20.0,
                   help="how long a partial batch waits for more requests")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a replica beyond the 2 batches "
                                                             "each replica holds; more get 503")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads per CPU replica (0 = all cores)")
    add_session_cache_arg(p)
    p.add_argument("--text-encoder", metavar="DIR", help="Infinity artifacts: local folder with the T5 tokenizer and "
                                                         "encoder the weights expect (prompts are encoded in the "
                                                         "replicas)")
    p.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs Ray reserves per CPU replica")
    p.add_argument("--request-timeout-s", type=float, default=600.0, help="a request waiting longer gets 504")
    p.add_argument("--body-timeout-s", type=float, default=30.0, help="a request body not complete within this "
                                                                      "gets 408")
    p.add_argument("--drain-s", type=float, default=30.0, help="on SIGINT/SIGTERM: how long requests in flight may "
                                                               "finish (the rest get 503)")
    p.add_argument("--address", help="join this Ray cluster (e.g. auto or ray://head:10001) instead of starting a "
                                     "local Ray instance")
    p.add_argument("--metrics-export-port", type=int, help="local Ray: Prometheus metrics port (default: Ray's choice)")
    a = p.parse_args(argv)

    from var_ssg.serving.launch import LaunchConfig, serve_forever
    from var_ssg.serving.requests import ServeOptions, code_path
    device = a.device or ("cuda" if a.backend == "tensorrt" else "cpu")
    opts = ServeOptions(artifacts=a.artifacts, backend=a.backend, device=device, replicas=a.replicas,
                        max_batch_wait_ms=a.max_batch_wait_ms, max_queue=a.max_queue, threads=a.threads,
                        session_cache=a.session_cache,
                        cpus_per_replica=a.cpus_per_replica, request_timeout_s=a.request_timeout_s,
                        body_timeout_s=a.body_timeout_s, drain_s=a.drain_s, pythonpath=code_path(),
                        text_encoder=a.text_encoder)
    launch = LaunchConfig(host=a.host, port=a.port, address=a.address, metrics_export_port=a.metrics_export_port)

    def announce(srv) -> None:
        o = srv.opts
        print(f"serving {srv.man.cfg.name} (batch {srv.man.batch}, {o.replicas} x {o.backend}/{o.device}) on "
              f"{srv.url}: POST /v1/generate, GET /healthz, GET /v1/model; Ctrl-C stops", flush=True)
        note_random_weights(srv.man.source_note, "serving", sys.stdout)

    serve_forever(opts, launch, announce)   # bad options or artifacts: one line, exit 2, before Ray starts
    print("stopped", flush=True)
    return 0
