"""The ONNX Runtime session cache never follows a link (runtime.backends.ort_cache): a linked
lock file, entry, ort/ folder or cache root makes it write or delete nothing where the link
points. ONNX Runtime and the artifacts are stood in for by small fakes, so these take
milliseconds; the real cache is exercised in test_startup.py."""
import logging
import os
import subprocess
import sys
import types

import pytest

import var_ssg.runtime.backends.ort_cache as oc


class _Options:
    optimized_model_filepath = ""

    def add_session_config_entry(self, key, value):
        pass


class _FakeOrt:
    """What SessionCache uses of onnxruntime: a session build that writes the files ONNX Runtime
    would write when asked to save the optimised graph."""
    __version__ = "0.fake"
    SessionOptions = _Options

    def __init__(self):
        self.built = []

    def InferenceSession(self, path, sess_options=None, providers=None):
        out = getattr(sess_options, "optimized_model_filepath", "")
        if out:
            with open(out, "wb") as f:
                f.write(b"graph")
            with open(os.path.join(os.path.dirname(out), oc.DATA), "wb") as f:
                f.write(b"data")
        self.built.append(path)
        return types.SimpleNamespace(path=path)


@pytest.fixture
def man(tmp_path):
    art = tmp_path / "art"
    art.mkdir()
    for n in ("manifest.json", "step_all.onnx", "weights.bin"):
        (art / n).write_bytes(b"x")
    data = dict(files={"step_all.onnx": dict(sha256="a" * 64), "weights.bin": dict(sha256="b" * 64)},
                external_data=dict(file="weights.bin"))
    return types.SimpleNamespace(root=str(art), data=data, graph=lambda name: dict(file="step_all.onnx"),
                                 path=lambda rel: os.path.join(str(art), rel))


def _dead_pid():
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout)


def _save(man, caplog):
    ort = _FakeOrt()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        try:
            cache = oc.SessionCache(man, ort, prepack=True, threads=0)
        except OSError as e:                    # as runtime.backends.ort does: one warning, cache off
            logging.getLogger(oc.__name__).warning("ONNX Runtime session cache off (%s)", e)
            return None, ort
        cache.save(_Options(), os.path.join(man.root, "step_all.onnx"), ["CPUExecutionProvider"])
    return cache, ort


def test_the_fake_cache_writes_an_entry(man, tmp_path, monkeypatch, caplog):
    """The fakes are enough to write a real entry (so the refusals below are not by accident)."""
    monkeypatch.setenv("VAR_SSG_CACHE", str(tmp_path / "cache"))
    cache, ort = _save(man, caplog)
    assert sorted(os.listdir(cache.dir)) == sorted([oc.GRAPH, oc.DATA, oc.ENTRY]) and not caplog.records


def test_a_linked_lock_file_creates_nothing_where_it_points(man, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("VAR_SSG_CACHE", str(tmp_path / "cache"))
    ort_dir = tmp_path / "cache" / "ort"
    ort_dir.mkdir(parents=True)
    st = os.lstat(os.path.join(man.root, "manifest.json"))
    victim = tmp_path / "outside" / "created-by-the-cache"
    victim.parent.mkdir()
    (ort_dir / f"{st.st_dev}-{st.st_ino}.lock").symlink_to(victim)
    cache, ort = _save(man, caplog)
    assert not victim.exists()
    (rec,) = caplog.records
    assert "not written" in rec.getMessage() and ".lock is not a regular file" in rec.getMessage()
    assert ort.built and not os.path.exists(cache.dir)        # built as without the cache


@pytest.mark.parametrize("linked", ["ort", "root"])
def test_a_linked_cache_folder_is_refused_with_one_line(man, tmp_path, monkeypatch, caplog, linked):
    """ort/ (or the cache root) linked elsewhere: the sweep would delete .tmp-* folders there and
    entries would be written there. Refused: nothing in the link's target changes."""
    target = tmp_path / "elsewhere"
    leftover = target / f".tmp-{_dead_pid()}-mine"
    (leftover / "keep").mkdir(parents=True)
    root = tmp_path / "cache"
    if linked == "ort":
        root.mkdir()
        (root / "ort").symlink_to(target)
    else:
        root.symlink_to(target)
        leftover = target / "ort" / leftover.name
        (leftover / "keep").mkdir(parents=True)
    monkeypatch.setenv("VAR_SSG_CACHE", str(root))
    before = sorted(str(p) for p in target.rglob("*"))
    cache, ort = _save(man, caplog)
    assert cache is None and ort.built == []
    (rec,) = caplog.records
    assert "is a symbolic link" in rec.getMessage() and "\n" not in rec.getMessage()
    assert sorted(str(p) for p in target.rglob("*")) == before and leftover.is_dir()
