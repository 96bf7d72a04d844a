"""The CLI layer: scripts/NAME.py and `var-ssg NAME` reach the same command after an editable
install (this checkout) and after a plain `pip install .` (a copy in site-packages, scripts run
from this checkout), and the scripts stay dispatchers."""
import os
import shutil
import subprocess
import sys

import pytest

from tools.cli import COMMANDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _scripts():
    return sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "scripts")) if f.endswith(".py"))


def test_every_script_is_a_command_and_a_dispatcher():
    assert _scripts() == sorted(COMMANDS)
    for name in COMMANDS:
        body = open(os.path.join(ROOT, "scripts", f"{name}.py")).read()
        code = [ln for ln in body.split('"""')[-1].splitlines() if ln.strip()]
        assert code == ["from tools.cli import script_main", "script_main(__file__)"], name


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A non-editable install of this checkout (`pip install --no-deps --target`): only the
    packages, as `pip install .` puts them in site-packages; no scripts/ beside them."""
    target = tmp_path_factory.mktemp("site")
    src = tmp_path_factory.mktemp("src") / "var-ssg"       # a copy: the build writes nothing here
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "tests", "docs", "*.egg-info",
                                                             "__pycache__", ".pytest_cache"))
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--disable-pip-version-check", "--target", str(target), str(src)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (target / "scripts").exists() and (target / "export" / "onnx_export.py").exists()
    return str(target)


def _run(args, pythonpath, cwd):
    env = dict(os.environ, PYTHONPATH=pythonpath)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["editable", "installed"])
def test_scripts_run_after_either_install(how, request, tmp_path):
    """`python scripts/export.py` must not see scripts/export.py as the `export` package, and the
    packages must come from the installation (not from the scripts' checkout)."""
    site = ROOT if how == "editable" else request.getfixturevalue("installed")
    taken = tmp_path / "a-file"
    taken.write_text("mine")
    r = _run([os.path.join(ROOT, "scripts", "export.py"), "--model", "var-d2-tiny", "--random-init", "0",
              "--out", str(taken)], site, str(tmp_path))       # imports export.onnx_export, then refuses --out
    assert r.returncode == 2 and r.stderr.strip().endswith(f"error: --out {taken} exists and is not a directory"), \
        r.stderr[-2000:]
    r = _run([os.path.join(ROOT, "scripts", "lint.py"), str(taken)], site, str(tmp_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "lint.py: error:" not in r.stderr, r.stderr[-2000:]
    r = _run(["-c", "import export.onnx_export as m; print(m.__file__)"], site, str(tmp_path))
    assert r.stdout.strip().startswith(site), (r.stdout, r.stderr[-1000:])

def test_console_entry_point_dispatches(capsys):
    from tools.cli import console
    with pytest.raises(SystemExit, match="^0$") as e:
        console(["export", "--help"])
    assert e.value.code == 0 and "--model" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="^2$") as e:
        console(["no-such-command"])
    assert e.value.code == 2 and "usage: var-ssg" in capsys.readouterr().err



def test_the_random_weights_reminder_follows_the_weights_note(capsys):
    """One wording (graphs.source) for the note and the reminder: a random source gets the line,
    a checkpoint's does not."""
    from graphs.source import WeightSource
    from tools.cli import note_random_weights
    note_random_weights(WeightSource(kind="random", seed=4).describe())
    note_random_weights(WeightSource(kind="checkpoint", ckpt="a.pth", vae_ckpt="v.pth").describe())
    assert capsys.readouterr().err == "note: made with RANDOM weights, not a trained model\n"
