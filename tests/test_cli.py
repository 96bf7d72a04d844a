"""The CLI layer: scripts/NAME.py and `var-ssg NAME` reach the same command from this checkout
and after a plain `pip install .` of the wheel (one var_ssg namespace in site-packages, scripts
run from this checkout), and the scripts stay dispatchers."""
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from var_ssg.tools.cli import COMMANDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _scripts():
    return sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "scripts")) if f.endswith(".py"))


def test_every_script_is_a_command_and_a_dispatcher():
    assert _scripts() == sorted(COMMANDS)
    for name in COMMANDS:
        body = open(os.path.join(ROOT, "scripts", f"{name}.py")).read()
        code = [ln for ln in body.split('"""')[-1].splitlines() if ln.strip()]
        assert code == ["from var_ssg.tools.cli import script_main", "script_main(__file__)"], name


DUMMIES = ("tools", "export", "common")       # generic names other projects install too


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel of this checkout installed (`pip install --no-deps --target`) into a folder that
    already holds packages named `tools`, `export` and `common` of another project: only the
    var_ssg namespace (and its dist-info) is added, as `pip install .` puts it in site-packages;
    no scripts/ beside it."""
    target = tmp_path_factory.mktemp("site")
    for name in DUMMIES:
        (target / name).mkdir()
        (target / name / "__init__.py").write_text(f"OWNER = 'another project ({name})'\n")
    src = tmp_path_factory.mktemp("src") / "var-ssg"       # a copy: the build writes nothing here
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", "build", "tests", "docs", "*.egg-info", "__pycache__", ".pytest_cache"))
    wheels = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "--disable-pip-version-check", "-w", str(wheels), str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = wheels.glob("var_ssg-*.whl")
    with zipfile.ZipFile(wheel) as z:                      # one name in site-packages
        tops = {n.split("/")[0] for n in z.namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"var_ssg"}, sorted(tops)
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
                        "--target", str(target), str(wheel)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    added = sorted(p.name for p in target.iterdir() if p.name not in DUMMIES and not p.name.endswith(".dist-info"))
    assert added == ["bin", "var_ssg"] or added == ["var_ssg"], added
    assert not (target / "var_ssg" / "__init__.py").exists() and (target / "var_ssg" / "export" / "onnx_export.py").exists()
    for name in DUMMIES:                                   # the other project's packages are untouched
        assert (target / name / "__init__.py").read_text() == f"OWNER = 'another project ({name})'\n"
    return str(target)


def _run(args, pythonpath, cwd):
    env = dict(os.environ, PYTHONPATH=pythonpath)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["checkout", "installed"])
def test_scripts_run_after_either_install(how, request, tmp_path):
    """`python scripts/export.py` runs from this checkout (the `var_ssg` link at its root) and from
    the installed wheel beside another project's `tools`, `export` and `common`: the scripts'
    folder shadows nothing, the packages come from the installation, and the other project's
    packages still import as theirs."""
    site = ROOT if how == "checkout" else request.getfixturevalue("installed")
    taken = tmp_path / "a-file"
    taken.write_text("mine")
    r = _run([os.path.join(ROOT, "scripts", "export.py"), "--model", "var-d2-tiny", "--random-init", "0",
              "--out", str(taken)], site, str(tmp_path))       # imports export.onnx_export, then refuses --out
    assert r.returncode == 2 and r.stderr.strip().endswith(f"error: --out {taken} exists and is not a directory"), \
        r.stderr[-2000:]
    r = _run([os.path.join(ROOT, "scripts", "lint.py"), str(taken)], site, str(tmp_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "lint.py: error:" not in r.stderr, r.stderr[-2000:]
    r = _run(["-c", "import var_ssg.export.onnx_export as m; print(m.__file__)"], site, str(tmp_path))
    assert r.stdout.strip().startswith(site), (r.stdout, r.stderr[-1000:])
    if how == "installed":
        r = _run(["-c", "import var_ssg.tools.cli, var_ssg.export.onnx_export, var_ssg.common.errors, tools, export, "
                  "common; print(tools.OWNER, export.OWNER, common.OWNER, sep='|')"], site, str(tmp_path))
        assert r.stdout.strip() == "|".join(f"another project ({n})" for n in DUMMIES), (r.stdout, r.stderr[-1000:])


def test_console_entry_point_dispatches(capsys):
    from var_ssg.tools.cli import console
    with pytest.raises(SystemExit, match="^0$") as e:
        console(["export", "--help"])
    assert e.value.code == 0 and "--model" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="^2$") as e:
        console(["no-such-command"])
    assert e.value.code == 2 and "usage: var-ssg" in capsys.readouterr().err



def test_the_random_weights_reminder_follows_the_weights_note(capsys):
    """One wording (graphs.source) for the note and the reminder: a random source gets the line,
    a checkpoint's does not."""
    from var_ssg.graphs.source import WeightSource
    from var_ssg.tools.cli import note_random_weights
    note_random_weights(WeightSource(kind="random", seed=4).describe())
    note_random_weights(WeightSource(kind="checkpoint", ckpt="a.pth", vae_ckpt="v.pth").describe())
    assert capsys.readouterr().err == "note: made with RANDOM weights, not a trained model\n"
