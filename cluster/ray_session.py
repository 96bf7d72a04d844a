"""cluster.ray_session: the one Ray lifecycle (RaySession): start a local Ray instance (or join a
cluster), stop it, leave nothing behind. Used by the server (serving/), the serving benchmark and
distributed evaluation, which add their own work on top (Serve applications, actors). The only
module besides serving/ and evaluation's cluster runner that imports Ray.

A local instance binds what Ray lets us bind to the asked host: with a loopback host
(127.0.0.1, localhost, ::1) the node's address is the loopback one (Ray's single-machine mode,
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), so GCS, raylet, workers, the dashboard agent, the
runtime-env agent and the metrics export listen on 127.0.0.1 only; any other host keeps Ray's
defaults (every interface). A start-up that fails (a timeout on a loaded machine, a port taken)
is one ConfigError line, with every process it started stopped (DESIGN.md "Serving: bounded,
bound, stoppable").
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, Optional

from var_ssg.common.errors import ConfigError

from .address import check_address, reach

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
_SINGLE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"      # "0": Ray's node address is the loopback one
# Ray core's start-up waits, raised for a loaded machine (its defaults fail on 2 busy cores)
_PATIENT = {"RAY_worker_register_timeout_seconds": "300", "RAY_gcs_rpc_server_connect_timeout_s": "60"}


@dataclass(frozen=True)
class RayConfig:
    address: Optional[str] = None       # None or "local": a Ray instance of our own; "auto", HOST:PORT, ray://...: join
    host: str = "127.0.0.1"             # a local instance binds here (loopback: only there)
    num_cpus: Optional[int] = None      # a local instance's CPUs (None: Ray's count)
    metrics_export_port: Optional[int] = None
    temp_dir: Optional[str] = None      # a local instance's session files (Ray's default: /tmp/ray)
    env: Dict[str, str] = field(default_factory=dict, hash=False)             # for every process of a local instance
    system_config: Dict[str, Any] = field(default_factory=dict, hash=False)   # Ray's _system_config

    @property
    def local(self) -> bool:
        return self.address in (None, "", "local")

    def check(self) -> None:
        n = self.num_cpus
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ConfigError(f"the Ray instance needs a whole number of CPUs >= 1, got {n}")
        p = self.metrics_export_port
        if p is not None and (isinstance(p, bool) or not isinstance(p, int) or not 0 < p < 65536):
            raise ConfigError(f"--metrics-export-port must be in 1..65535, got {p}")
        if not self.host or not isinstance(self.host, str):
            raise ConfigError(f"--host must be an address, got {self.host!r}")
        check_address(self.address)


class RaySession:
    """One Ray lifecycle for `cfg`: `start()` brings Ray up (a local instance of our own, or the
    cluster at cfg.address), `stop()` shuts it down and undoes what start changed in this process
    (environment variables, Ray's single-machine flag). Safe to stop twice, or after a failed
    start. `with RaySession(cfg):` does both."""

    def __init__(self, cfg: RayConfig):
        self.cfg = cfg
        self._saved: Dict[str, Optional[str]] = {}      # environment variables start changed
        self._single = False                            # Ray's single-machine flag set by start

    def _set_env(self, env: Dict[str, str]) -> None:
        for k, v in env.items():
            self._saved.setdefault(k, os.environ.get(k))
            os.environ[k] = v

    def _restore_env(self) -> None:
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self._saved.clear()

    def _single_machine(self, on: bool) -> None:
        """Ray reads the flag at import: set the driver's copy too (the Ray processes read the env)."""
        from ray._private import ray_constants
        ray_constants.ENABLE_RAY_CLUSTER = not on
        self._single = on

    def start(self) -> None:
        """ray.init for the config. A failed start stops what it started and raises ConfigError
        (one line)."""
        cfg = self.cfg
        cfg.check()
        import ray
        try:
            if cfg.local:
                loop = cfg.host in LOOPBACK
                self._set_env({**_PATIENT, **cfg.env, **({_SINGLE_MACHINE: "0"} if loop else {})})
                if loop:
                    self._single_machine(True)
                kw: Dict[str, Any] = {}
                if cfg.metrics_export_port:
                    kw["_metrics_export_port"] = cfg.metrics_export_port
                if cfg.temp_dir:
                    kw["_temp_dir"] = cfg.temp_dir
                if cfg.system_config:
                    kw["_system_config"] = dict(cfg.system_config)
                if not loop and cfg.host not in ("0.0.0.0", "::"):
                    kw["_node_ip_address"] = cfg.host
                ray.init(include_dashboard=False, log_to_driver=False, num_cpus=cfg.num_cpus, **kw)
            else:
                reach(cfg.address)              # bounded: Ray itself retries for minutes
                ray.init(address=cfg.address, log_to_driver=False)
        except (KeyboardInterrupt, SystemExit):
            self.stop()
            raise
        except ConfigError:
            self.stop()
            raise
        except Exception as e:  # noqa: BLE001 - Ray reports start-up failures with many types
            self.stop()
            where = "a local Ray instance" if cfg.local else f"the Ray cluster at {cfg.address}"
            raise ConfigError(f"could not start {where}: {one_line(e)}") from None

    def stop(self) -> None:
        """Shut Ray down (a local instance: every process it started) and undo start's settings."""
        import ray
        try:
            if ray.is_initialized():
                ray.shutdown()
        finally:
            if self._single:
                self._single_machine(False)
            self._restore_env()

    def __enter__(self) -> "RaySession":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def one_line(e: BaseException) -> str:
    """The last 'SomethingError: message' line of a Ray failure (Ray reports tracebacks)."""
    text = str(e)
    lines = [ln.strip() for ln in text.splitlines() if "Error: " in ln]
    return (lines[-1] if lines else (text.splitlines()[0] if text.strip() else type(e).__name__))[:400]


@contextmanager
def session(cfg: RayConfig) -> Iterator[RaySession]:
    """`with session(cfg):` Ray is up inside, and shut down (a local instance: stopped) after."""
    s = RaySession(cfg)
    try:
        s.start()
        yield s
    finally:
        s.stop()
