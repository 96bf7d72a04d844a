"""The deployments: a Ray Serve application with dynamic batching.

    client ──HTTP──▶ Ray Serve proxy (serving.proxy: body ≤ MAX_BODY, complete within the body
                     │ timeout, else 413 / 408 before anything is forwarded)
                     ▼
                  Frontend (ingress, 1 replica, no CPU reserved)
                     │ parse + validate the JSON (serving.requests: the CLI's checks) → 400
                     ▼ DeploymentHandle (max_queued_requests → 503)
                  Generator × replicas (1 GPU each, or CPU)
                     serve.batch: up to the artifacts' batch B rows, or what arrived within
                     --max-batch-wait-ms → Pipeline.run_rows (pads a partial batch) → PNGs
                     Infinity artifacts (serving.prompts): prompts checked in the Frontend, encoded
                     by the replica's T5, the batch split by aspect template (one run each)

Every error is JSON {"error": "..."}: 400 bad request, 408 body too slow, 413 body too large,
503 + Retry-After for a full queue, a replica that died under the request or a server that is
stopping, 504 for a request that timed out, 500 (no traceback, logged here) for a bug.

Queue bound: each Generator replica holds up to 2·B requests (one batch running, the next one
forming); beyond that the Frontend queues up to --max-queue requests; one more is 503.
Stopping (Frontend.drain): new requests get 503, requests in flight may finish for up to
--drain-s, then the rest get 503: every connection gets an HTTP status.
Metrics (Ray's metrics export, Prometheus names prefixed `ray_`): var_ssg_request_latency_ms
and var_ssg_requests (by status), var_ssg_inflight; var_ssg_batch_fill (rows / B),
var_ssg_batch_ms, var_ssg_queue_depth (requests in a replica waiting for a batch).
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from typing import Any, Dict, List, Optional, Tuple

from ray import serve
from ray.serve.metrics import Counter, Gauge, Histogram

from var_ssg.common.proc import process_age_s
from var_ssg.serving.requests import (MAX_BODY, ROUTES, RequestError, ServeOptions, checker, describe, model_summary,
                              parse_request, row_note, too_large)

log = logging.getLogger(__name__)


class Generator:
    """One model replica: loads the artifacts, batches rows with serve.batch, runs the pipeline
    in a worker thread (the event loop keeps accepting requests and health checks)."""

    def __init__(self, opts: ServeOptions):
        t0 = time.perf_counter()
        from var_ssg.runtime.opener import open_artifacts
        t_import = time.perf_counter()
        self.opts = opts
        marks = {}

        def clock(stage: str) -> None:
            marks.setdefault(stage, time.perf_counter())
            if stage == "manifest" and opts.backend != "onnxruntime":    # a torch backend (ONNX Runtime on
                import torch                                                 # the CPU needs no torch)
                torch.set_num_threads(opts.threads or os.cpu_count() or 1)   # Ray sets OMP_NUM_THREADS to the reserved CPUs
        from var_ssg.runtime.infinity import is_infinity
        self.prompts = None              # Infinity artifacts: serving.prompts.InfinityReplica
        if is_infinity(artifacts=opts.artifacts):     # DESIGN.md "Serving prompts"
            from var_ssg.contract.manifest import load_manifest
            from var_ssg.serving.prompts import InfinityReplica
            clock("manifest")
            t_verify = marks["manifest"]
            self.prompts = InfinityReplica(opts)
            man, self.backend = load_manifest(opts.artifacts, verify_hashes=False), self.prompts.pipe.backend
        else:
            # verify="stamp", and ONNX Runtime's sessions built while the rest is checked: DESIGN.md "Start-up"
            man, self.backend = open_artifacts(opts.artifacts, opts.backend, device=opts.device,
                                               threads=opts.threads, session_cache=opts.session_cache,
                                               verify="stamp", clock=clock)
            t_verify = marks.get("files", marks["manifest"])
            from var_ssg.runtime.pipeline import Pipeline
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
        t1 = time.perf_counter()
        age = process_age_s()
        self.start = dict(replica=self.replica, ready_s=round(t1 - t0, 3), imports_s=round(t_import - t0, 3),
                          verify_s=round(t_verify - t_import, 3), open_s=round(t1 - t_verify, 3),
                          process_s=None if age is None else round(age, 3))
        log.info("replica %s ready in %.2f s (imports %.2f s, verify %.2f s, open %.2f s; %s s since its process "
                 "started): %s batch %d on %s/%s (%s)", self.replica, t1 - t0, t_import - t0, t_verify - t_import,
                 t1 - t_verify, "?" if age is None else f"{age:.2f}", man.cfg.name, self.B, opts.backend,
                 opts.device, self.source)

    def start_info(self) -> Dict[str, Any]:
        """How long this replica took to become ready (GET /v1/model shows it)."""
        return self.start

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
        from var_ssg.runtime.images import png_bytes
        for token, _ in items:
            self.waiting.discard(token)
        self.m_queue.set(len(self.waiting))
        rows = [row for _, row in items]
        out: List[Optional[Dict[str, Any]]] = [None] * len(rows)
        for group in self._groups(rows):     # VAR: one; Infinity: one per scale schedule (aspect template)
            sub = [rows[i] for i in group]
            self.seq += 1
            batch_id = f"{self.replica}:{self.seq}"
            t0 = time.perf_counter()
            try:
                images, notes = await asyncio.to_thread(self._images, sub)
            except Exception:
                self.failures += 1
                raise
            self.failures = 0
            ms = (time.perf_counter() - t0) * 1e3
            self.m_fill.observe(len(sub) / self.B)
            self.m_batch.observe(ms)
            log.info("batch %s: %d/%d rows in %.0f ms", batch_id, len(sub), self.B, ms)
            for i, img, note in zip(group, images, notes):
                out[i] = dict(png=png_bytes(img, note), batch_id=batch_id, batch_size=len(sub),
                              batch_capacity=self.B, batch_ms=round(ms, 1))
        return out

    def _groups(self, rows) -> List[List[int]]:
        """Which rows run together: all of them (VAR), or those of one aspect template (Infinity:
        one scale schedule per pipeline run)."""
        if self.prompts is None:
            return [list(range(len(rows)))]
        from var_ssg.serving.prompts import schedule_groups
        return schedule_groups(rows)

    def _images(self, rows):
        """(images, PNG notes) of one pipeline run."""
        if self.prompts is not None:
            from var_ssg.serving.prompts import prompt_note
            images, sched = self.prompts.run(rows)
            return images, [prompt_note(r, self.backend.info, sched, self.source) for r in rows]
        info = self.backend.info
        return self.pipe.run_rows(rows).images, [row_note(r, info, self.source) for r in rows]

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
    """The HTTP ingress: routes, request validation, errors as JSON, latency metrics, the
    graceful stop."""

    def __init__(self, opts: ServeOptions, generator):
        from var_ssg.contract.manifest import load_manifest
        self.opts, self.gen = opts, generator
        man = load_manifest(opts.artifacts, verify_hashes=False)   # the driver and every Generator verify them
        self.man = man
        if man.family == "infinity":     # prompts: DESIGN.md "Serving prompts"
            from var_ssg.serving.prompts import (describe_infinity, infinity_summary, parse_prompt_request,
                                                 prompt_checker)
            from var_ssg.serving.requests import load_tokenizer
            self.pipe = prompt_checker(describe_infinity(man, opts.backend, opts.device))
            tok = load_tokenizer(opts.text_encoder)
            self.parse = lambda body: parse_prompt_request(body, self.pipe, tok)
            self.summary = infinity_summary(man, opts)
        else:
            self.pipe = checker(describe(man, opts.backend, opts.device))
            self.parse = lambda body: parse_request(body, self.pipe)
            self.summary = model_summary(man, opts)
        self.starts: Dict[str, Dict[str, Any]] = {}     # replica id -> its start_info
        self.latency_s = 1.0             # running estimate of a request's time: the Retry-After hint
        self.inflight = 0
        self.draining = False            # stopping: new requests get 503
        self.abort = asyncio.Event()     # the drain time is over: requests still waiting get 503
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
            return _json(200, {**self.summary, "replica_start": await self.replica_starts()})
        t0 = time.perf_counter()
        self.inflight += 1
        self.m_inflight.set(self.inflight)
        try:
            resp = await self.generate(request)
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

    async def _body(self, request) -> bytes:
        """The body, bounded in size and time here too (the proxy bounds it first where the
        launcher started Ray; on a cluster joined with --address it may not)."""
        declared = request.headers.get("content-length", "")
        if declared.strip().isdigit() and int(declared) > MAX_BODY:
            raise RequestError(too_large(int(declared)), 413)

        async def read() -> bytes:
            parts, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_BODY:
                    raise RequestError(too_large(None), 413)
                parts.append(chunk)
            return b"".join(parts)
        try:
            return await asyncio.wait_for(read(), self.opts.body_timeout_s)
        except asyncio.TimeoutError:
            raise RequestError(f"the request body did not arrive within {self.opts.body_timeout_s:g} s", 408) from None

    async def generate(self, request):
        import ray.exceptions as rex
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
        from starlette.responses import Response
        if self.draining:
            return self._busy("the server is stopping; retry on another server or after the Retry-After seconds")
        try:
            row = self.parse(await self._body(request))
        except RequestError as e:
            return _json(e.status, {"error": str(e)})
        resp = self.gen.generate.remote(row)
        stop = asyncio.ensure_future(self.abort.wait())
        work = asyncio.ensure_future(asyncio.wait_for(resp, timeout=self.opts.request_timeout_s))
        try:
            await asyncio.wait([work, stop], return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                work.cancel()
                resp.cancel()
                return self._busy("the server stopped before this image was made; retry")
            out = work.result()
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
        finally:
            stop.cancel()
        headers = {"X-Batch-Id": out["batch_id"], "X-Batch-Size": str(out["batch_size"]),
                   "X-Batch-Capacity": str(out["batch_capacity"]), "X-Batch-Ms": str(out["batch_ms"])}
        return Response(out["png"], media_type="image/png", headers=headers)

    async def replica_starts(self) -> List[Dict[str, Any]]:
        """The start-up times of the replicas seen so far (asked of one replica per call; a
        busy replica is skipped rather than waited for)."""
        try:
            info = await asyncio.wait_for(self.gen.start_info.remote(), timeout=2.0)
            self.starts[info["replica"]] = info
        except Exception:  # noqa: BLE001 - busy or restarting: report what is known
            pass
        return sorted(self.starts.values(), key=lambda d: d["replica"])

    async def drain(self, timeout_s: float) -> Dict[str, int]:
        """Stop taking requests (503), let those in flight finish for up to timeout_s, then
        answer the rest 503. Returns how many were in flight and how many were cut short."""
        self.draining = True
        before = self.inflight
        deadline = time.monotonic() + timeout_s
        while self.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        cut = self.inflight
        self.abort.set()
        while self.inflight and time.monotonic() < deadline + 5:
            await asyncio.sleep(0.05)
        log.info("drained: %d requests in flight, %d answered 503", before, cut)
        return dict(inflight=before, cut=cut)

    async def healthz(self):
        if self.draining:
            return _json(503, dict(status="stopping", model=self.summary["model"]))
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


def build_app(opts: ServeOptions, batch: int):
    """The application: Frontend (ingress) bound to Generator (the model replicas); `batch` is
    the artifacts' batch (each replica holds two batches)."""
    env = {"PYTHONPATH": os.pathsep.join(opts.pythonpath)} if opts.pythonpath else {}
    gen_actor: Dict[str, Any] = dict(num_gpus=1) if opts.device == "cuda" else dict(num_cpus=opts.cpus_per_replica)
    if env:
        gen_actor["runtime_env"] = {"env_vars": env}
    gen = serve.deployment(Generator, name="Generator").options(
        num_replicas=opts.replicas, ray_actor_options=gen_actor,
        max_ongoing_requests=2 * batch, max_queued_requests=opts.max_queue,
        max_constructor_retry_count=2, graceful_shutdown_timeout_s=10)
    front_actor: Dict[str, Any] = dict(num_cpus=0)
    if env:
        front_actor["runtime_env"] = {"env_vars": env}
    front = serve.deployment(Frontend, name="Frontend").options(
        num_replicas=1, ray_actor_options=front_actor, max_ongoing_requests=10_000,
        graceful_shutdown_timeout_s=opts.drain_s + 10)
    return front.bind(opts, gen.bind(opts))
