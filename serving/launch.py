"""The launcher: preflight, Ray up (cluster/: the one Ray lifecycle), the application up, then
a graceful stop and Ray down; for scripts/serve.py (in the foreground, until SIGINT/SIGTERM)
and scripts/bench_serve.py (around its load) alike.

    preflight   options, artifacts (fully verified), backend packages, the HTTP port: one
                `error:` line and exit 2 before any Ray process exists
    Ray up      a local instance bound to the asked host where it is loopback (cluster/),
                with the proxy's body bound (serving.proxy) and start-up waits that survive a
                loaded machine; a start-up that still fails is one line, nothing left running
    stop        Frontend.drain: new requests 503, those in flight finish (up to --drain-s) or
                get 503; then the application and Ray go down
"""
from __future__ import annotations

import logging
import os
import re
import signal
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Iterator, Optional

from var_ssg import cluster
from var_ssg.common.errors import ConfigError
from var_ssg.serving.proxy import CALLBACK, ENV_BODY_TIMEOUT
from var_ssg.serving.requests import APP, ServeOptions, preflight

log = logging.getLogger(__name__)

# Ray Serve's start-up waits (seconds), raised from 5-10 s: on two busy cores the HTTP proxy
# takes longer than that to answer its first check, and Serve then kills it.
SERVE_PATIENCE = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "120", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60"}


@dataclass(frozen=True)
class LaunchConfig:
    host: str = "127.0.0.1"             # the HTTP address (and, when loopback, every Ray port's)
    port: int = 8000
    address: Optional[str] = None       # join this Ray cluster instead of starting a local instance
    metrics_export_port: Optional[int] = None
    num_cpus: Optional[int] = None      # a local instance's CPUs (None: all)
    temp_dir: Optional[str] = None
    system_config: Dict[str, Any] = field(default_factory=dict, hash=False)

    def ray(self, opts: ServeOptions) -> cluster.RayConfig:
        env = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": CALLBACK, ENV_BODY_TIMEOUT: repr(opts.body_timeout_s),
               **SERVE_PATIENCE}
        if opts.pythonpath:                # the proxy imports serving.proxy from this checkout
            env["PYTHONPATH"] = os.pathsep.join(opts.pythonpath)
        return cluster.RayConfig(address=self.address, host=self.host, num_cpus=self.num_cpus,
                                 metrics_export_port=self.metrics_export_port, temp_dir=self.temp_dir,
                                 env=env, system_config=self.system_config)

    def check(self) -> None:
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise ConfigError(f"--port must be in 1..65535, got {self.port}")
        cluster.RayConfig(address=self.address, host=self.host, num_cpus=self.num_cpus,
                          metrics_export_port=self.metrics_export_port).check()


@dataclass(frozen=True)
class Running:
    url: str
    man: Any                            # the verified manifest
    opts: ServeOptions                  # replicas resolved (one per GPU with --device cuda)
    app: str


def check_all(opts: ServeOptions, launch: LaunchConfig):
    """Everything checked before Ray starts; returns the verified manifest."""
    launch.check()
    man = preflight(opts)
    if not launch.address:
        _port_free(launch.host, launch.port)
    return man


def _port_free(host: str, port: int) -> None:
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}): choose another --port or --host") from None


@contextmanager
def running(opts: ServeOptions, launch: LaunchConfig, app: str = APP,
            on_ray_up: Optional[Callable[[], None]] = None, man=None) -> Iterator[Running]:
    """The application serving on launch.host:launch.port inside the block; on leaving it the
    requests in flight are drained and everything started here is stopped. `man`: what
    check_all returned, if the caller ran it already."""
    man = man if man is not None else check_all(opts, launch)
    up, ray_up = False, cluster.RaySession(launch.ray(opts))
    try:
        ray_up.start()
        if on_ray_up:
            on_ray_up()
        import ray
        from ray import serve
        from var_ssg.serving.app import build_app
        try:
            gpus = 0
            if opts.device == "cuda":
                gpus = int(ray.cluster_resources().get("GPU", 0))
                if not gpus:
                    raise ConfigError("--device cuda but the Ray cluster has no GPU: use --device cpu (onnxruntime, "
                                      "eager) or --address of a cluster with GPUs")
            opts = replace(opts, replicas=opts.replicas or (gpus if opts.device == "cuda" else 1))
            serve.start(http_options=dict(host=launch.host, port=launch.port))
            up = True
            serve.run(build_app(opts, man.batch), name=app, route_prefix="/")
        except (ConfigError, KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - Ray reports start-up failures with many types
            raise ConfigError(_replica_error(app) or f"the server did not start: {cluster.one_line(e)}") from None
        yield Running(url=f"http://{launch.host}:{launch.port}", man=man, opts=opts, app=app)
    finally:
        try:
            if up:
                _drain(app, opts.drain_s)
                _remove(app, launch)
        finally:
            ray_up.stop()


_USER_ERROR = re.compile(r"(?:^|[\s.])(?:ManifestError|ConfigError|CheckpointError|ExportError): (?P<msg>.+)$")


def user_error_line(text: str) -> Optional[str]:
    """The message of the last user error (ManifestError, ConfigError, ...) in a replica's
    start-up traceback as Ray reports it, or None."""
    found = [m.group("msg").strip() for m in map(_USER_ERROR.search, str(text).splitlines()) if m]
    return found[-1] if found else None


def _replica_error(app: str) -> Optional[str]:
    """Why a replica of `app` failed to start, as generate.py would say it (one line), from Serve's
    status; None if it does not say."""
    try:
        from ray import serve
        st = serve.status().applications[app]
        texts = [d.message for d in st.deployments.values()] + [st.message]
    except Exception:  # noqa: BLE001 - no status to read: the caller's own message stands
        return None
    for text in texts:
        line = user_error_line(text or "")
        if line:
            return line
    return None


def _drain(app: str, timeout_s: float) -> None:
    from ray import serve
    try:
        front = serve.get_deployment_handle("Frontend", app_name=app)
        res = front.drain.remote(timeout_s).result(timeout_s=timeout_s + 15)
        if res["inflight"]:
            log.info("stopping: %d requests were in flight, %d answered 503", res["inflight"], res["cut"])
        time.sleep(0.5)                  # the proxy sends the last answers
    except Exception as e:  # noqa: BLE001 - nothing to drain (never came up, already gone)
        log.info("no drain: %s", cluster.one_line(e))


def _remove(app: str, launch: LaunchConfig) -> None:
    import ray
    from ray import serve
    if not ray.is_initialized():
        return
    if launch.address:
        serve.delete(app)                # the cluster and its other applications stay up
    else:
        serve.shutdown()


def serve_forever(opts: ServeOptions, launch: LaunchConfig, announce: Callable[[Running], None]) -> None:
    """scripts/serve.py: serve in the foreground until SIGINT or SIGTERM, then stop gracefully.
    A signal during start-up unwinds it (KeyboardInterrupt; SIGTERM then counts as a clean stop)."""
    stop = threading.Event()
    started = threading.Event()
    terminated = threading.Event()

    def on_signal(signum, frame):
        log.info("%s: shutting down", signal.Signals(signum).name)
        stop.set()
        if signum == signal.SIGTERM:
            terminated.set()
        if not started.is_set():
            raise KeyboardInterrupt      # during start-up: unwind, running() cleans up

    def take_signals():                  # ray.init installs its own handlers: take them back
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)

    take_signals()
    try:
        with running(opts, launch, on_ray_up=take_signals) as srv:
            started.set()
            announce(srv)
            while not stop.wait(1.0):
                pass
    except KeyboardInterrupt:
        if not terminated.is_set():      # Ctrl-C during start-up: 130, as for any script
            raise                        # SIGTERM during start-up is a clean stop like any other
    finally:
        started.set()                    # a second signal during shutdown only sets `stop`
