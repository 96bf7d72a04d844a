"""cluster: the one Ray lifecycle, in cluster.ray_session (RayConfig, RaySession, session). Used
by the server (serving/), the serving benchmark and distributed evaluation, which add their own
work on top (Serve applications, actors)."""
from .ray_session import LOOPBACK, RayConfig, RaySession, one_line, session

__all__ = ["RayConfig", "RaySession", "session", "one_line", "LOOPBACK"]
