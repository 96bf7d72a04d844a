import atexit
import os
import shutil
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from graphs.config import get_preset  # noqa: E402
from graphs.weights import random_models  # noqa: E402

TINY = "var-d2-tiny"

# Verified stamps (contract.stamp) go to a cache of the test session's own, never to ~/.cache
# (subprocesses inherit it); removed when the session ends.
_STAMPS = tempfile.mkdtemp(prefix="var-ssg-test-cache-")
os.environ["VAR_SSG_CACHE"] = _STAMPS
atexit.register(shutil.rmtree, _STAMPS, True)

# One home for the whole session. Ray (2.52+) writes an auth token to $HOME/.ray on its first local
# start and caches it for the life of the process: every in-process Ray start of the session (the
# evaluation pool, Serve) must see the same home, or the second cluster refuses the driver's token
# (InvalidAuthToken). It also keeps ~/.ray of the machine untouched; subprocesses inherit it.
_HOME = tempfile.mkdtemp(prefix="var-ssg-test-home-")
os.environ["HOME"] = _HOME
atexit.register(shutil.rmtree, _HOME, True)


def pytest_collection_modifyitems(items):
    """Tests that export artifacts (the `artifacts` fixture, directly or through another
    fixture) are slow; the fast lane is `-m "not slow and not gpu"`."""
    for item in items:
        if "artifacts" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny():
    """(cfg, var, vae) with seeded random weights."""
    cfg = get_preset(TINY)
    var, vae = random_models(cfg, 0)
    return cfg, var, vae


_ARTIFACTS = {}


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    """Export (once per configuration) and return the directory."""
    from export.onnx_export import ExportConfig, export_artifacts
    from graphs.weights import WeightSource

    def make(**kw):
        ec = ExportConfig(**{"top_k": 64, **kw})
        if ec not in _ARTIFACTS:
            cfg = get_preset(TINY)
            var, vae = random_models(cfg, 0)
            out = str(tmp_path_factory.mktemp("art") / "a")
            export_artifacts(var, vae, WeightSource(kind="random", seed=0), out, ec)
            _ARTIFACTS[ec] = out
        return _ARTIFACTS[ec]
    return make


def run_script(name, *args, env=None):
    """Run scripts/NAME as a user would (the packages come from this checkout)."""
    import subprocess
    e = dict(os.environ, **(env or {}))
    e["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, e.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", name), *map(str, args)],
                          capture_output=True, text=True, env=e, cwd=ROOT)
