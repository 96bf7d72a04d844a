"""The pipeline behind HTTP: a Ray Serve application with dynamic batching.

    client ──HTTP──▶ Ray Serve proxy ──▶ Frontend (ingress, 1 replica, no CPU reserved)
                                            │ parse + validate the JSON (Pipeline.check_row: the
                                            │ CLI's checks) → 400 before anything is queued
                                            ▼ DeploymentHandle (max_queued_requests → 503)
                                         Generator × replicas (1 GPU each, or CPU)
                                            serve.batch: up to the artifacts' batch B rows, or
                                            what arrived within --max-batch-wait-ms
                                            → Pipeline.run_rows (pads a partial batch) → PNGs

Routes: POST /v1/generate {"class": 207, "seed": 0, ["cfg", "ssg_beta", "top_k", "top_p",
"temperature", "more_smooth"]} → 200 image/png (the PNG's "var-ssg" text chunk carries the parameters and the
weights' source); GET /healthz; GET /v1/model. Every error is JSON {"error": "..."}: 400 for a
bad request, 503 + Retry-After for a full queue or a replica that died under the request,
504 for a request that timed out, 500 (no traceback, logged here) for a bug.

Queue bound: each Generator replica holds up to 2·B requests (one batch running, the next one
forming); beyond that each Frontend queues up to --max-queue requests; one more is 503.
Metrics (Ray's metrics export, Prometheus names prefixed `ray_`): var_ssg_request_latency_ms
and var_ssg_requests (by status), var_ssg_inflight; var_ssg_batch_fill (rows / B),
var_ssg_batch_ms, var_ssg_queue_depth (requests in a replica waiting for a batch). Ray Serve
adds its own (queued requests per caller, ongoing requests per replica, serve.batch sizes).
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from ray import serve
from ray.serve.metrics import Counter, Gauge, Histogram

from graphs.config import BACKENDS, ConfigError

if TYPE_CHECKING:
    from runtime.pipeline import Row

log = logging.getLogger(__name__)

APP = "var-ssg"
FIELDS = ("class", "seed", "cfg", "ssg_beta", "top_k", "top_p", "temperature", "more_smooth")
MAX_BODY = 64 << 10
ROUTES = "POST /v1/generate, GET /healthz, GET /v1/model"
EXAMPLE = '{"class": 207, "seed": 0}'


@dataclass(frozen=True)
class ServeOptions:
    """Everything a replica needs (pickled into the deployments)."""
    artifacts: str
    backend: str = "onnxruntime"
    device: str = "cpu"
    replicas: int = 1
    max_batch_wait_ms: float = 20.0
    max_queue: int = 64
    threads: int = 0                    # per replica: torch and ONNX Runtime intra-op threads (0 = all cores)
    cpus_per_replica: float = 1.0       # what Ray reserves per CPU replica (scheduling only)
    request_timeout_s: float = 600.0
    pythonpath: Tuple[str, ...] = field(default_factory=tuple)   # where the replicas import this code from

    def check(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown backend {self.backend!r}; choose one of eager, onnxruntime, tensorrt")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.backend == "tensorrt" and self.device != "cuda":
            raise ConfigError("--backend tensorrt runs on --device cuda")
        if self.replicas < 1:
            raise ConfigError(f"--replicas must be >= 1, got {self.replicas}")
        if not (math.isfinite(self.max_batch_wait_ms) and 0 <= self.max_batch_wait_ms <= 60_000):
            raise ConfigError(f"--max-batch-wait-ms must be in 0..60000, got {self.max_batch_wait_ms}")
        if self.max_queue < 0:
            raise ConfigError(f"--max-queue must be >= 0, got {self.max_queue}")
        if self.threads < 0:
            raise ConfigError(f"--threads must be >= 0 (0 = all cores), got {self.threads}")
        if not (math.isfinite(self.request_timeout_s) and self.request_timeout_s > 0):
            raise ConfigError(f"--request-timeout-s must be > 0, got {self.request_timeout_s}")


class RequestError(Exception):
    """A user error in an HTTP request: `status` and a message that says what to fix."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------------------ requests
def _int(d: Dict[str, Any], key: str, what: str) -> int:
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise RequestError(f"{key!r} must be an integer ({what}), got {json.dumps(v)[:40]}")
    return v


def _num(d: Dict[str, Any], key: str) -> float:
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise RequestError(f"{key!r} must be a number, got {json.dumps(v)[:40]}")
    try:
        return float(v)
    except OverflowError:
        raise RequestError(f"{key!r} is too large: {str(v)[:40]}...") from None


def parse_request(body: bytes, pipe) -> "Row":
    """JSON body -> a checked Row. Raises RequestError (status 400/413) with what to fix; the
    value checks are the CLI's (Pipeline.check_row), shared, not rewritten."""
    from runtime.pipeline import Row
    if len(body) > MAX_BODY:
        raise RequestError(f"request body of {len(body)} bytes is over {MAX_BODY}; send one JSON object like {EXAMPLE}",
                           413)
    try:
        d = json.loads(body)
    except (ValueError, RecursionError) as e:
        msg = (f"{e.msg} at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError)
               else type(e).__name__)
        raise RequestError(f"malformed JSON ({msg}); send one object like {EXAMPLE}") from None
    if not isinstance(d, dict):
        raise RequestError(f"the body must be a JSON object like {EXAMPLE}, got {type(d).__name__}")
    unknown = sorted(set(d) - set(FIELDS))
    if unknown:
        raise RequestError(f"unknown field {unknown[0]!r:.40}; accepted fields: {', '.join(FIELDS)}")
    for key in ("class", "seed"):
        if key not in d:
            raise RequestError(f"missing {key!r}; send at least {EXAMPLE}")
    kw: Dict[str, Any] = dict(class_id=_int(d, "class", "an ImageNet class id, -1 = unconditional"),
                              seed=_int(d, "seed", "0..2**63-1"))
    if "cfg" in d:
        kw["guidance"] = _num(d, "cfg")
    if "ssg_beta" in d:
        v = d["ssg_beta"]
        if isinstance(v, list) and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in v):
            try:
                kw["ssg_beta"] = tuple(float(b) for b in v)
            except OverflowError:
                raise RequestError("'ssg_beta' holds a number too large for a float") from None
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            try:
                kw["ssg_beta"] = repr(float(v))
            except OverflowError:
                raise RequestError("'ssg_beta' is too large for a float") from None
        elif isinstance(v, str):
            kw["ssg_beta"] = v
        else:
            raise RequestError(f"'ssg_beta' must be a string like \"linear:0.1,0.3\", a number or a list of numbers, "
                               f"got {json.dumps(v)[:40]}")
    if "top_k" in d:
        kw["top_k"] = _int(d, "top_k", "0 = no top-k")
    for key in ("top_p", "temperature"):
        if key in d:
            kw[key] = _num(d, key)
    if "more_smooth" in d:
        if not isinstance(d["more_smooth"], bool):
            raise RequestError(f"'more_smooth' must be true or false, got {json.dumps(d['more_smooth'])[:40]}")
        kw["more_smooth"] = d["more_smooth"]
    try:
        row = Row(**kw)
        pipe.check_row(row)
    except ConfigError as e:
        raise RequestError(str(e)) from None
    return row


def row_note(row, cfg_name: str, backend: str, transform: str, source: str) -> str:
    """The PNG's text chunk: the request's parameters and where the weights came from."""
    beta = row.ssg_beta if isinstance(row.ssg_beta, str) else ",".join(f"{b:g}" for b in row.ssg_beta)
    smooth = " more_smooth" if row.more_smooth else ""
    return (f"{cfg_name} backend={backend} class={row.class_id} seed={row.seed} cfg={row.guidance} "
            f"top_k={row.top_k} top_p={row.top_p} T={row.temperature} ssg={beta} dse={transform}{smooth}; {source}")


def model_summary(man, opts: ServeOptions) -> Dict[str, Any]:
    from runtime.pipeline import Row
    cfg = man.cfg
    defaults = Row(class_id=0, seed=0)
    return dict(model=cfg.name, precision=man.precision, batch=man.batch, backend=opts.backend, device=opts.device,
                weights=man.weights["kind"], weights_source=man.source_note,
                random_weights=man.weights["kind"] == "random", num_classes=cfg.num_classes,
                image_size=16 * cfg.patch_nums[-1], dse=man.transform, top_k_max=man.k_max,
                defaults=dict(cfg=defaults.guidance, ssg_beta=defaults.ssg_beta, top_k=defaults.top_k,
                              top_p=defaults.top_p, temperature=defaults.temperature,
                              more_smooth=defaults.more_smooth),
                replicas=opts.replicas, max_batch_wait_ms=opts.max_batch_wait_ms, max_queue=opts.max_queue,
                cache_key=man.data.get("cache_key"))


class _InfoOnly:
    """A backend stand-in that only describes the artifacts: the Frontend validates requests
    with Pipeline.check_row without loading any weights."""

    def __init__(self, man, backend: str, device: str):
        from runtime.backends.base import BackendInfo
        self.info = BackendInfo(name=backend, cfg=man.cfg, k_max=man.k_max, transform=man.transform,
                                kv_dtype=man.kv_dtype, batch=None if backend == "eager" else man.batch,
                                device=device)


def preflight(opts: ServeOptions):
    """What the driver checks before starting anything: the options, the artifacts (fully
    verified: the same one-line error as generate.py) and that the backend's packages exist."""
    opts.check()
    from contract.manifest import load_manifest
    man = load_manifest(opts.artifacts)
    if opts.backend == "tensorrt":
        from contract.tensorrt import import_tensorrt
        import_tensorrt()
    elif opts.backend == "onnxruntime":
        from runtime.backends.ort import _import_ort
        ort = _import_ort()
        if opts.device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ConfigError("--device cuda: this onnxruntime has no CUDAExecutionProvider; "
                              "pip install onnxruntime-gpu (and a CUDA 12 runtime)")
    return man


# ------------------------------------------------------------------------------ deployments
class Generator:
    """One model replica: loads the artifacts, batches rows with serve.batch, runs the pipeline
    in a worker thread (the event loop keeps accepting requests and health checks)."""

    def __init__(self, opts: ServeOptions):
        import torch
        from contract.manifest import load_manifest
        from runtime.backends import open_backend
        from runtime.pipeline import Pipeline
        self.opts = opts
        torch.set_num_threads(opts.threads or os.cpu_count() or 1)   # Ray sets OMP_NUM_THREADS to the reserved CPUs
        man = load_manifest(opts.artifacts)
        kw = dict(threads=opts.threads) if opts.backend == "onnxruntime" else {}
        self.backend = open_backend(opts.backend, man, device=opts.device, **kw)
        self.pipe = Pipeline(self.backend)
        self.man = man
        self.B = man.batch
        self._run_batch.set_max_batch_size(self.B)
        self._run_batch.set_batch_wait_timeout_s(opts.max_batch_wait_ms / 1000.0)
        self.source = self.backend.source_note
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.seq = 0
        self.waiting = set()             # requests in this replica not yet in a running batch
        self.failures = 0                # consecutive failed batches: 3 make the replica unhealthy (restarted)
        self.m_fill = Histogram("var_ssg_batch_fill", description="rows in a batch / the artifacts' batch",
                                boundaries=[(i + 0.5) / 8 for i in range(8)])
        self.m_batch = Histogram("var_ssg_batch_ms", description="pipeline time of one batch (ms)",
                                 boundaries=[10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000])
        self.m_queue = Gauge("var_ssg_queue_depth", description="requests in this replica waiting for a batch")
        log.info("replica %s ready: %s batch %d on %s/%s (%s)", self.replica, man.cfg.name, self.B, opts.backend,
                 opts.device, self.source)

    async def generate(self, row) -> Dict[str, Any]:
        token = object()
        self.waiting.add(token)
        self.m_queue.set(len(self.waiting))
        try:
            return await self._run_batch((token, row))
        finally:                         # also when cancelled before its batch started
            self.waiting.discard(token)
            self.m_queue.set(len(self.waiting))

    @serve.batch(max_batch_size=1, batch_wait_timeout_s=0.0)
    async def _run_batch(self, items: List[Tuple[object, Any]]) -> List[Dict[str, Any]]:
        from runtime.pipeline import png_bytes
        for token, _ in items:
            self.waiting.discard(token)
        self.m_queue.set(len(self.waiting))
        rows = [row for _, row in items]
        self.seq += 1
        batch_id = f"{self.replica}:{self.seq}"
        t0 = time.perf_counter()
        try:
            images = await asyncio.to_thread(self._images, rows)
        except Exception:
            self.failures += 1
            raise
        self.failures = 0
        ms = (time.perf_counter() - t0) * 1e3
        self.m_fill.observe(len(rows) / self.B)
        self.m_batch.observe(ms)
        log.info("batch %s: %d/%d rows in %.0f ms", batch_id, len(rows), self.B, ms)
        info = self.backend.info
        return [dict(png=png_bytes(img, row_note(r, info.cfg.name, info.name, info.transform, self.source)),
                     batch_id=batch_id, batch_size=len(rows), batch_capacity=self.B, batch_ms=round(ms, 1))
                for r, img in zip(rows, images)]

    def _images(self, rows):
        return self.pipe.run_rows(rows).images

    def pid(self) -> int:
        return os.getpid()

    def check_health(self) -> None:
        """Serve calls this periodically; raising makes it replace the replica."""
        if self.failures >= 3:
            raise RuntimeError(f"{self.failures} batches in a row failed")


def _json(status: int, obj: Dict[str, Any], headers: Optional[Dict[str, str]] = None):
    from starlette.responses import JSONResponse
    return JSONResponse(obj, status_code=status, headers=headers)


class Frontend:
    """The HTTP ingress: routes, request validation, errors as JSON, latency metrics."""

    def __init__(self, opts: ServeOptions, generator):
        from contract.manifest import load_manifest
        from runtime.pipeline import Pipeline
        self.opts, self.gen = opts, generator
        man = load_manifest(opts.artifacts, verify_hashes=False)   # the driver and every Generator verify them
        self.man = man
        self.pipe = Pipeline(_InfoOnly(man, opts.backend, opts.device))
        self.summary = model_summary(man, opts)
        self.latency_s = 1.0             # running estimate of a request's time: the Retry-After hint
        self.inflight = 0
        self.m_latency = Histogram("var_ssg_request_latency_ms", description="POST /v1/generate latency (ms)",
                                   boundaries=[10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000, 300000],
                                   tag_keys=("status",))
        self.m_requests = Counter("var_ssg_requests", description="POST /v1/generate responses", tag_keys=("status",))
        self.m_inflight = Gauge("var_ssg_inflight", description="requests this ingress is waiting on")
        self.app = serve.get_replica_context().app_name

    async def __call__(self, request):
        path = request.url.path
        root = request.scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        path = path.rstrip("/") or "/"
        method = request.method
        routes = {"/v1/generate": "POST", "/healthz": "GET", "/v1/model": "GET"}
        if path not in routes:
            return _json(404, {"error": f"no route {method} {path}; routes: {ROUTES}"})
        if method != routes[path] and not (method == "HEAD" and routes[path] == "GET"):
            return _json(405, {"error": f"{path} takes {routes[path]}, not {method}"}, {"Allow": routes[path]})
        if path == "/healthz":
            return await self.healthz()
        if path == "/v1/model":
            return _json(200, self.summary)
        t0 = time.perf_counter()
        self.inflight += 1
        self.m_inflight.set(self.inflight)
        try:
            resp = await self.generate(await request.body())
        finally:
            self.inflight -= 1
            self.m_inflight.set(self.inflight)
        dt = time.perf_counter() - t0
        tags = {"status": str(resp.status_code)}
        self.m_requests.inc(tags=tags)
        self.m_latency.observe(dt * 1e3, tags=tags)
        if resp.status_code == 200:
            self.latency_s = 0.8 * self.latency_s + 0.2 * dt
        return resp

    def _busy(self, message: str):
        return _json(503, {"error": message}, {"Retry-After": str(max(1, math.ceil(self.latency_s)))})

    async def generate(self, body: bytes):
        import ray.exceptions as rex
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
        from starlette.responses import Response
        try:
            row = parse_request(body, self.pipe)
        except RequestError as e:
            return _json(e.status, {"error": str(e)})
        resp = self.gen.generate.remote(row)
        try:
            out = await asyncio.wait_for(resp, timeout=self.opts.request_timeout_s)
        except BackPressureError:
            return self._busy(f"the queue is full (more than {self.opts.max_queue} requests waiting for a "
                              f"model replica); retry after the Retry-After seconds")
        except (rex.RayActorError, DeploymentUnavailableError) as e:
            log.warning("request lost with its replica: %s", type(e).__name__)
            return self._busy("the model replica running this request stopped; Ray Serve is restarting it: retry")
        except asyncio.TimeoutError:
            resp.cancel()
            return _json(504, {"error": f"no image within {self.opts.request_timeout_s:g} s; the server is overloaded"})
        except Exception as e:  # noqa: BLE001 - a bug: log it here, never send a traceback
            cause = getattr(e, "cause", None) or e
            log.error("generate failed: %r", e)
            return _json(500, {"error": f"internal error ({type(cause).__name__}); see the server log"})
        headers = {"X-Batch-Id": out["batch_id"], "X-Batch-Size": str(out["batch_size"]),
                   "X-Batch-Capacity": str(out["batch_capacity"]), "X-Batch-Ms": str(out["batch_ms"])}
        return Response(out["png"], media_type="image/png", headers=headers)

    async def healthz(self):
        running, target = await asyncio.to_thread(_generator_state, self.app)
        body = dict(status="ok" if running and running >= target else ("degraded" if running else "starting"),
                    replicas_running=running, replicas_target=target, model=self.summary["model"])
        return _json(200 if running else 503, body)


def _generator_state(app: str) -> Tuple[int, int]:
    """(running, all) Generator replicas of application `app`, from the Serve controller."""
    try:
        dep = serve.status().applications[app].deployments["Generator"]
    except Exception:  # noqa: BLE001 - status not available yet: not healthy
        return 0, 0
    states = {str(getattr(k, "value", k)): v for k, v in (dep.replica_states or {}).items()}
    return int(states.get("RUNNING", 0)), int(sum(states.values()))


def build_app(opts: ServeOptions):
    """The application: Frontend (ingress) bound to Generator (the model replicas)."""
    env = {"PYTHONPATH": os.pathsep.join(opts.pythonpath)} if opts.pythonpath else {}
    gen_actor: Dict[str, Any] = dict(num_gpus=1) if opts.device == "cuda" else dict(num_cpus=opts.cpus_per_replica)
    if env:
        gen_actor["runtime_env"] = {"env_vars": env}
    gen = serve.deployment(Generator, name="Generator").options(
        num_replicas=opts.replicas, ray_actor_options=gen_actor,
        max_ongoing_requests=2 * _batch_of(opts), max_queued_requests=opts.max_queue,
        max_constructor_retry_count=2, graceful_shutdown_timeout_s=10)
    front_actor: Dict[str, Any] = dict(num_cpus=0)
    if env:
        front_actor["runtime_env"] = {"env_vars": env}
    front = serve.deployment(Frontend, name="Frontend").options(
        num_replicas=1, ray_actor_options=front_actor, max_ongoing_requests=10_000)
    return front.bind(opts, gen.bind(opts))


def _batch_of(opts: ServeOptions) -> int:
    from contract.manifest import load_manifest
    return load_manifest(opts.artifacts, verify_hashes=False).batch


def code_path() -> Tuple[str, ...]:
    """This checkout's root first, then the driver's PYTHONPATH: the replicas import the same code."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    return (root, *rest)


__all__ = ["APP", "ServeOptions", "RequestError", "parse_request", "model_summary", "preflight", "build_app",
           "code_path"]
