"""The one Ray lifecycle: start a local Ray instance (or join a cluster), stop it, leave nothing
behind. Used by the server (serving/), the serving benchmark and distributed evaluation, which
add their own work on top (Serve applications, actors). The only module besides serving/ and
evaluation's cluster runner that imports Ray."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

from common.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayConfig:
    address: Optional[str] = None       # None or "local": a Ray instance of our own; "auto", HOST:PORT, ray://...: join
    host: str = "127.0.0.1"             # a local instance binds here
    num_cpus: Optional[int] = None      # a local instance's CPUs (None: Ray's count)
    metrics_export_port: Optional[int] = None

    @property
    def local(self) -> bool:
        return self.address in (None, "", "local")

    def check(self) -> None:
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ConfigError(f"the Ray instance needs at least 1 CPU, got {self.num_cpus}")
        if self.metrics_export_port is not None and not 0 < self.metrics_export_port < 65536:
            raise ConfigError(f"--metrics-export-port must be in 1..65535, got {self.metrics_export_port}")


def start(cfg: RayConfig) -> None:
    """ray.init for `cfg`: a local instance of our own, or the cluster at cfg.address."""
    cfg.check()
    import ray
    if cfg.local:
        kw = {}
        if cfg.metrics_export_port:
            kw["_metrics_export_port"] = cfg.metrics_export_port
        ray.init(include_dashboard=False, log_to_driver=False, num_cpus=cfg.num_cpus, **kw)
    else:
        ray.init(address=cfg.address, log_to_driver=False)


def stop() -> None:
    import ray
    if ray.is_initialized():
        ray.shutdown()


@contextmanager
def session(cfg: RayConfig) -> Iterator[None]:
    """`with session(cfg):` Ray is up inside, and shut down (a local instance: stopped) after."""
    try:
        start(cfg)
        yield
    finally:
        stop()
