import atexit
import contextlib
import os
import shutil
import signal
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from var_ssg.graphs.config import get_preset  # noqa: E402
from var_ssg.graphs.weights import random_models  # noqa: E402

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
    """Export (once per preset and configuration, for the whole session) and return the
    directory: artifacts(**ExportConfig fields) for var-d2-tiny (top-k 64 unless given), or
    artifacts(preset="var-d2", ...) for another preset. `artifacts.stages[dir]`: the stages
    the export's progress named; `artifacts.cache[dir]`: the stamp cache it wrote to (the one in
    effect when it ran: a test may have pointed $VAR_SSG_CACHE elsewhere)."""
    from var_ssg.export.onnx_export import ExportConfig, export_artifacts
    from var_ssg.graphs.weights import WeightSource

    def make(preset=TINY, **kw):
        ec = ExportConfig(**({"top_k": 64, **kw} if preset == TINY else kw))
        if (preset, ec) not in _ARTIFACTS:
            var, vae = random_models(get_preset(preset), 0)
            out = str(tmp_path_factory.mktemp("art") / "a")
            seen = make.stages[out] = []
            make.cache[out] = os.environ.get("VAR_SSG_CACHE")
            export_artifacts(var, vae, WeightSource(kind="random", seed=0), out, ec, progress=seen.append)
            _ARTIFACTS[preset, ec] = out
        return _ARTIFACTS[preset, ec]
    make.stages, make.cache = {}, {}
    return make


def run_cli(name, *args, env=None):
    """scripts/NAME run in this process (its dispatcher, its error policy), as `python
    scripts/NAME args` would; env: variables set for the call. -> .returncode/.stdout/.stderr,
    like run_script, without a new interpreter's start-up (imports, torch) per call."""
    import contextlib
    import io
    import runpy
    import types
    path = os.path.join(ROOT, "scripts", name)
    out, err = io.StringIO(), io.StringIO()
    old_argv, old_env, old_path = sys.argv, dict(os.environ), list(sys.path)
    sys.argv = [path, *map(str, args)]
    os.environ.update(env or {})
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(path, run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv, sys.path[:] = old_argv, old_path
        os.environ.clear()
        os.environ.update(old_env)
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def run_script(name, *args, env=None):
    """Run scripts/NAME as a user would (the packages come from this checkout)."""
    import subprocess
    e = dict(os.environ, **(env or {}))
    e["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, e.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", name), *map(str, args)],
                          capture_output=True, text=True, env=e, cwd=ROOT)


@contextlib.contextmanager
def alarm_guard(what: str, seconds: int = 60):
    """A hang becomes a failure after `seconds` (SIGALRM raises TimeoutError naming `what`)."""
    def boom(*_):
        raise TimeoutError(what)
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
