"""Evaluation over a Ray cluster: a pool of workers, one pipeline (per DSE transform) each, that
run chunks of batches and hand the images back to the driver, which alone writes files
(evaluation.sampling). Evaluation's only Ray code; the Ray lifecycle is cluster.session.

    Pool(cfg, source).start()   one actor per worker, placed spread over the nodes; each opens
                                its pipelines once (the artifacts verified there, on that node)
                                and says hello: the first failure stops the job with one line
    pool.run(work)              chunks of consecutive batches to idle workers; results as they
                                land; a worker that dies loses only its chunk, which goes back
                                to the queue (the actor restarts and reloads, or is given up)
    pool.stats                  per worker: images, busy seconds, wall seconds (idle share)

A chunk is whole batches of one job, so every batch runs exactly the rows the one-process run
gives it: the images, and the merged .npz, are the same bytes (DESIGN.md "Evaluation at scale").
"""
from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from var_ssg.cluster import RayConfig, session
from var_ssg.common.errors import ConfigError
from var_ssg.runtime.opener import PipelineSource

from .run import Work

log = logging.getLogger(__name__)

MAX_CHUNK = 16          # batches: what a killed worker can lose at most (default chunking)
RESTARTS = 3            # per worker, then it is given up


@dataclass(frozen=True)
class PoolConfig:
    ray: RayConfig = RayConfig()
    workers: Optional[int] = None       # None: one per GPU (cuda), else one per node
    chunk: Optional[int] = None         # batches per work item; None: ~4 items per worker, at most MAX_CHUNK
    device: str = "cpu"
    start_timeout_s: float = 900.0      # a worker that cannot be placed or load in this time: an error

    def check(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {self.workers}")
        if self.chunk is not None and self.chunk < 1:
            raise ConfigError(f"--chunk must be >= 1, got {self.chunk}")
        self.ray.check()


@dataclass
class WorkerStats:
    index: int
    node: str = ""
    pid: int = 0
    images: int = 0
    chunks: int = 0
    busy_s: float = 0.0                 # inside the pipeline
    wall_s: float = 0.0                 # from the first chunk handed out to the end of the job
    deaths: int = 0

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def idle_share(self) -> float:
        return max(0.0, 1.0 - self.busy_s / self.wall_s) if self.wall_s > 0 else 0.0


class _Worker:
    """One pipeline per DSE transform, opened once; `hello` reports what opened (or why not)."""

    def __init__(self, sources: Sequence[PipelineSource]):
        self.error, self.infos, self.note = None, [], ""
        try:
            from var_ssg.runtime.opener import open_sources
            pipes, self.note = open_sources(sources)
            self.pipes = {p.info.transform: p for p in pipes}
            self.infos = [p.info for p in pipes]
        except (ConfigError, OSError, MemoryError) as e:       # reported once by the driver
            self.error = f"{type(e).__name__ if not isinstance(e, ConfigError) else ''} {e}".strip()

    def hello(self):
        return self.error, self.infos, self.note, socket.gethostname(), os.getpid()

    def run(self, job, batches):
        from .run import run_batches
        t0 = time.perf_counter()
        out = [(b, images, seconds) for b, images, _, seconds in
               run_batches(self.pipes[job.ssg.transform], job, batches)]
        return out, time.perf_counter() - t0


class Pool:
    def __init__(self, cfg: PoolConfig, sources: Sequence[PipelineSource]):
        cfg.check()
        self.cfg, self.sources = cfg, list(sources)
        self.actors: List = []
        self.stats: List[WorkerStats] = []
        self.infos, self.note = [], ""
        self._alive: List[bool] = []
        self._busy: set = set()

    # ------------------------------------------------------------------ start
    def _plan(self) -> Tuple[int, Dict]:
        import ray
        res = ray.cluster_resources()
        gpus, cpus = int(res.get("GPU", 0)), float(res.get("CPU", 1))
        nodes = max(1, sum(1 for n in ray.nodes() if n.get("Alive")))
        if self.cfg.device.startswith("cuda"):
            n = self.cfg.workers or gpus
            if gpus < 1 or n > gpus:
                raise ConfigError(f"--device cuda with {n or 1} worker(s), but the Ray cluster has {gpus} GPU(s): "
                                  f"one worker per GPU")
            return n, {"num_gpus": 1, "num_cpus": min(1.0, cpus / n)}
        n = self.cfg.workers or nodes
        per = cpus / n                              # CPU threads split, not oversubscribed
        return n, {"num_cpus": per, "threads": max(1, int(per))}

    def start(self) -> "Pool":
        import ray
        n, opts = self._plan()
        threads = opts.pop("threads", 0)
        sources = [replace(s, threads=threads) for s in self.sources] if threads else self.sources
        cls = ray.remote(_Worker).options(max_restarts=RESTARTS, max_task_retries=0,
                                          scheduling_strategy="SPREAD", **opts)
        self.actors = [cls.remote(sources) for _ in range(n)]
        self.stats = [WorkerStats(i) for i in range(n)]
        self._alive = [True] * n
        log.info("starting %d worker(s) (%s)", n, ", ".join(f"{k}={v:g}" for k, v in opts.items()))
        refs = [a.hello.remote() for a in self.actors]
        ready, pending = ray.wait(refs, num_returns=n, timeout=self.cfg.start_timeout_s)
        if pending:
            raise ConfigError(f"{len(pending)} of {n} worker(s) did not start within {self.cfg.start_timeout_s:g} s "
                              f"(the cluster lacks the CPUs/GPUs asked for, or loading is that slow)")
        for i, ref in enumerate(refs):
            self._hello(i, ray.get(ref))
        return self

    def _hello(self, i: int, hello) -> None:
        error, infos, note, node, pid = hello
        if error:
            raise ConfigError(f"worker {i} on {node}: {error}")
        if not self.infos:
            self.infos, self.note = infos, note
        elif [(x.transform, x.batch, x.cfg.name) for x in infos] != [(x.transform, x.batch, x.cfg.name)
                                                                     for x in self.infos]:
            raise ConfigError(f"worker {i} on {node} opened other artifacts than worker 0 "
                              f"(the same path must hold the same artifacts on every node)")
        self.stats[i].node, self.stats[i].pid = node, pid

    def close(self) -> None:
        import ray
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []

    # ------------------------------------------------------------------ run
    def chunks(self, work: Sequence[Work]) -> List[Work]:
        n_batches = sum(len(w.batches) for w in work)
        size = self.cfg.chunk or max(1, min(MAX_CHUNK, -(-n_batches // (4 * max(1, len(self.actors))))))
        return [Work(w.key, w.job, w.batches[i:i + size]) for w in work for i in range(0, len(w.batches), size)]

    def busy_pids(self) -> List[int]:
        """Processes of the workers that hold a chunk right now (what a test kills)."""
        return [self.stats[i].pid for i in self._busy]

    def run(self, work: Sequence[Work]) -> Iterator[Tuple[int, int, object, float]]:
        import ray
        from ray.exceptions import RayActorError
        queue = deque(self.chunks(work))
        flight: Dict = {}                           # ref -> (worker, chunk or None: a hello after a death)
        idle = deque(i for i in range(len(self.actors)) if self._alive[i])
        self._busy = set()
        t0 = time.perf_counter()
        try:
            while queue or flight:
                while idle and queue:
                    i, chunk = idle.popleft(), queue.popleft()
                    flight[self.actors[i].run.remote(chunk.job, chunk.batches)] = (i, chunk)
                    self._busy.add(i)
                if not flight:
                    raise ConfigError("every worker died (each restarted "
                                      f"{RESTARTS} times): see the Ray logs of the nodes")
                (ref,), _ = ray.wait(list(flight), num_returns=1)
                i, chunk = flight.pop(ref)
                self._busy.discard(i)
                try:
                    result = ray.get(ref)
                except RayActorError:
                    if chunk is None:               # it did not come back: given up
                        self._alive[i] = False
                        log.warning("worker %d is gone for good", i)
                        continue
                    self.stats[i].deaths += 1
                    log.warning("worker %d died in a chunk of %d batch(es): that chunk is redone", i,
                                len(chunk.batches))
                    queue.appendleft(chunk)
                    flight[self.actors[i].hello.remote()] = (i, None)      # back once restarted
                    continue
                if chunk is None:                   # restarted and reloaded
                    self._hello(i, result)
                    idle.append(i)
                    continue
                rows, busy = result
                st = self.stats[i]
                st.chunks += 1
                st.busy_s += busy
                for b, images, seconds in rows:
                    st.images += len(images)
                    yield chunk.key, b, images, seconds
                idle.append(i)
        finally:
            wall = time.perf_counter() - t0
            for st in self.stats:
                st.wall_s += wall



@contextmanager
def pool_session(cfg: PoolConfig, sources: Sequence[PipelineSource]) -> Iterator[Pool]:
    """A started pool inside its Ray session; the workers are stopped and (a local instance)
    Ray with them on the way out, whatever happened. A program that already runs Ray (a
    notebook, a test) lends its session: the pool joins it and leaves it running."""
    import ray
    with (nullcontext() if ray.is_initialized() else session(cfg.ray)):
        pool = Pool(cfg, sources)
        try:
            yield pool.start()
        finally:
            pool.close()
