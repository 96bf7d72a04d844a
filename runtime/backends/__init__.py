"""Backend factory. Backends are imported lazily so a missing optional package (tensorrt) only
matters when that backend is asked for."""
from __future__ import annotations

from var_ssg.graphs.config import BACKENDS
from var_ssg.common.errors import ConfigError


def open_backend(name: str, artifacts=None, **kw):
    """Open a backend over an artifacts directory or a loaded Manifest (eager: rebuilds the
    modules from the manifest's weight source)."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if artifacts is None:
        raise ConfigError(f"--backend {name} needs --artifacts DIR (made by scripts/export.py)")
    from var_ssg.contract.manifest import Manifest, load_manifest
    man = artifacts if isinstance(artifacts, Manifest) else load_manifest(artifacts)
    if man.family != "var":
        raise ConfigError(f"{man.root} holds {man.cfg.name} artifacts (family {man.family}): this command runs VAR "
                          f"artifacts; Infinity's run through scripts/generate.py --prompt and scripts/parity.py")
    if name == "eager":
        from .eager import EagerBackend
        return EagerBackend.from_manifest(man, **kw)
    if name == "onnxruntime":
        from .ort import OrtBackend
        return OrtBackend(man, **kw)
    from .trt import TrtBackend
    return TrtBackend(man, **kw)
